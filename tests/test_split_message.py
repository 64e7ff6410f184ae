"""Long answers are split into Slack messages; one that fits the limit is never split."""

from __future__ import annotations

import pytest

from bot.formatting import split_message


def _sentences(length: int) -> str:
    """Korean sentences (full of places a split could cut) trimmed to exactly `length` characters."""
    text = " ".join(f"{n}번째 문장입니다." for n in range(length))[:length].rstrip()
    while len(text) < length:
        text += "다"
    assert len(text) == length and text.count(". ") > 5
    return text


@pytest.mark.parametrize("limit", [100, 3000])
def test_a_message_of_exactly_the_limit_is_one_message(limit):
    text = _sentences(limit)
    assert split_message(text, limit) == [text]
    # Whitespace around it is not part of the message.
    assert split_message(f"\n {text} \n", limit) == [text]


@pytest.mark.parametrize("limit", [100, 3000])
def test_one_character_over_the_limit_is_two_messages(limit):
    text = _sentences(limit + 1)
    pieces = split_message(text, limit)
    assert len(pieces) == 2 and all(len(p) <= limit for p in pieces)
    assert " ".join(pieces) == text
