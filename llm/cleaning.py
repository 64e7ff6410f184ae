"""Tidy a raw model answer before it is shown: echoes, stray tags, cut-offs, loops, control characters.

Everything here is regex work on the decoded text (no tokenizer, no model), so it is cheap
enough to run on every answer. The rules are Korean-aware: sentence ends are detected from
punctuation and from the polite verb endings (``...니다``, ``...요``) that Korean answers close
with even when the model leaves out the final period.

An unfinished last sentence is trimmed only when the token limit cut the answer: an answer the
model ended itself (EOS) may well close on a list item, a URL or "출처: 한국은행", and is kept whole.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

# Characters no Slack message should carry: C0 controls other than tab and newline (a carriage
# return is turned into a newline first), DEL, C1 controls, and the bidirectional marks, embeddings,
# overrides and isolates (U+061C, U+200E/F, U+202A-E, U+2066-9), which can make text display in
# an order other than the one it was written in ("Trojan Source").
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_TAG_RE = re.compile(r"<s>|</s>|\[\s*/?\s*INST\s*\]", re.IGNORECASE)
_OPEN_INST_RE = re.compile(r"\[\s*INST\s*\]", re.IGNORECASE)
_CLOSE_INST_RE = re.compile(r"\[\s*/\s*INST\s*\]", re.IGNORECASE)
_ECHO_TAIL_RE = re.compile(r"(?:\s|</s>|\[\s*/\s*INST\s*\])*", re.IGNORECASE)
# An echoed prompt: optional BOS, one [INST]...[/INST] block, then any number of history turns.
# A history answer inside an echo always ends with a textual </s> (the prompt holds one after
# each answer), while a turn the model invents after its real answer cannot: generating EOS
# would have stopped it. That is what tells "echoed history" apart from "invented next turn".
_ECHO_RE = re.compile(
    r"\A\s*(?:<s>\s*)?\[\s*INST\s*\].*?\[\s*/\s*INST\s*\]"
    r"(?:(?:(?!\[\s*/?\s*INST\s*\]).)*?</s>\s*(?:<s>\s*)?\[\s*INST\s*\].*?\[\s*/\s*INST\s*\])*",
    re.IGNORECASE | re.DOTALL,
)
_CLOSERS = "\"'”’)]}」』》〉>*_~`"
# A sentence end: terminal punctuation (a period only when not part of a number like 3.5 or a
# list marker like "1." and not inside a word like "U.S"), then any closing quotes/brackets or
# emphasis markers, then whitespace or the end of the text.
_SENTENCE_END_RE = re.compile(rf"(?:(?<!\d)\.(?!\.)|\.\.\.|…|[?!。？！])[{re.escape(_CLOSERS)}]*(?=\s|$)")
# Polite Korean verb endings that close a sentence even without punctuation.
_KOREAN_END_RE = re.compile(rf"(?:니다|세요|[아어여에예해네군까지]요|죠)[{re.escape(_CLOSERS)}]*$")
_LIST_ITEM_RE = re.compile(r"^\s*(?:[-*+•]|\d+[.)])\s+\S")
_HEADING_RE = re.compile(r"^\s*#{1,6}\s+\S")
_FENCE_RE = re.compile(r"^\s*```", re.MULTILINE)
_BLANK_RUN_RE = re.compile(r"\n(?:[ \t]*\n){2,}")
_TRAILING_SPACE_RE = re.compile(r"[ \t]+$", re.MULTILINE)
# Lines and sentences shorter than this (in non-space characters) are never treated as a
# "loop" when repeated apart from each other: short headings like "장점:" legitimately recur.
_MIN_REPEAT_CHARS = 8
# How often a line or sentence may appear, not back to back, before it counts as a loop.
_LOOP_COUNT = 3


def strip_control_characters(text: str) -> str:
    """`text` without control and bidi-override characters; CR LF and lone CR become LF.

    Per character (CR LF counts as one line end), so the result for a prefix of a text is a prefix
    of the result for the whole: safe for text shown while it is still being generated.
    """
    return _CONTROL_RE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


def _canon(text: str) -> str:
    return re.sub(r"\s+", "", _TAG_RE.sub("", text))


def _strip_prompt_echo(text: str, prompt_text: str) -> str | None:
    """Return what follows `prompt_text` if `text` begins with it (ignoring tags and spacing)."""
    target = _canon(prompt_text)
    if not target:
        return None
    position, matched, closed = 0, 0, False
    while matched < len(target) and position < len(text):
        tag = _TAG_RE.match(text, position)
        if tag:
            closed = closed or bool(_CLOSE_INST_RE.fullmatch(tag.group()))
            position = tag.end()
        elif text[position].isspace():
            position += 1
        elif text[position] == target[matched]:
            position += 1
            matched += 1
        else:
            return None
    if matched < len(target):
        return None
    # The echo's own closing tags belong to it, not to the answer.
    tail = _ECHO_TAIL_RE.match(text, position)
    tail_end = tail.end() if tail else position
    closed = closed or bool(_CLOSE_INST_RE.search(text, position, tail_end))
    # Without a [/INST] this is no echo: an answer may well open with the question's own words.
    return text[tail_end:] if closed else None


def _remove_echo_and_invented_turns(text: str, prompt_text: str | None) -> tuple[str, bool]:
    """The answer without a leading echo of the prompt and without turns the model invented after
    it, and whether such an invented turn was cut off (the answer then ended before it)."""
    rest = None
    if prompt_text is not None:
        rest = _strip_prompt_echo(text, prompt_text)
        # The model may also repeat only the current question before its "[/INST]".
        last_open = list(_OPEN_INST_RE.finditer(prompt_text))
        if rest is None and last_open:
            rest = _strip_prompt_echo(text, prompt_text[last_open[-1].end() :])
    if rest is not None:
        text = rest
    elif echo := _ECHO_RE.match(text):
        text = text[echo.end() :]
    # A new [INST] after the answer is the model writing the user's next message: the answer
    # ends there.
    if invented := _OPEN_INST_RE.search(text):
        return text[: invented.start()], True
    return text, False


def _ends_cleanly(text: str) -> bool:
    if text.endswith("```") and len(_FENCE_RE.findall(text)) % 2 == 0:
        return True
    lines = [line for line in text.split("\n") if line.strip()]
    last_line = lines[-1] if lines else ""
    if _HEADING_RE.match(last_line) or unicodedata.category(text[-1]) == "So":  # a heading, an emoji
        return True
    if _ends_sentence(text):
        return True
    # In a list of bare items ("- 예금", "- 적금") the last item has no period either; only when the
    # item before it ended properly is a period-less last item a sign of a cut.
    if not _LIST_ITEM_RE.match(last_line):
        return False
    previous_item = next((line.rstrip() for line in reversed(lines[:-1]) if _LIST_ITEM_RE.match(line)), None)
    return previous_item is None or not _ends_sentence(previous_item)


def _ends_sentence(text: str) -> bool:
    """Whether `text` closes a sentence, by punctuation or by a polite Korean verb ending."""
    return _ends_with_sentence(text) or bool(_KOREAN_END_RE.search(text))


def _ends_with_sentence(text: str) -> bool:
    tail_start = max(0, len(text) - 16)
    return any(match.end() == len(text) for match in _SENTENCE_END_RE.finditer(text, tail_start))


def _trim_cut_off(text: str) -> str:
    """Cut an answer that stops mid-sentence back to its last complete sentence or line."""
    if not text or _ends_cleanly(text):
        return text
    limit = len(text)
    fences = list(_FENCE_RE.finditer(text))
    if len(fences) % 2 == 1:
        # Cut inside a code block: periods in code are not sentence ends, so only text before
        # the unclosed fence may hold the boundary.
        limit = fences[-1].start()
    boundary = 0
    for match in _SENTENCE_END_RE.finditer(text, 0, limit):
        boundary = match.end()
    # A finished line (one the model ended with a newline) is a clean stop too: list items,
    # headings and titles rarely carry a period. A line ending in ":" only introduces what was
    # cut, though.
    line_start = 0
    for line in text[:limit].split("\n")[:-1]:
        line_end = line_start + len(line)
        stripped = line.rstrip()
        if stripped and not stripped.endswith(":"):
            boundary = max(boundary, line_start + len(stripped))
        line_start = line_end + 1
    if boundary == 0 or not text[:boundary].strip():
        return text
    return text[:boundary]


def _split_sentences(line: str) -> list[str]:
    """Split a line into sentences, each keeping its punctuation and trailing spaces."""
    pieces, start = [], 0
    for match in _SENTENCE_END_RE.finditer(line):
        end = match.end()
        while end < len(line) and line[end] in " \t":
            end += 1
        pieces.append(line[start:end])
        start = end
    if start < len(line):
        pieces.append(line[start:])
    return pieces


def _loop_key(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _is_substantial(key: str) -> bool:
    # List markers, rules and the like ("-", "1.", "---") are structure, not content.
    content = re.sub(r"^(?:[-*+•]|\d+[.)])\s*", "", key)
    return bool(re.search(r"\w", content))


def _collapse_repetition(text: str) -> str:
    """Keep one copy of a sentence or line the model repeated back to back or over and over.

    Code blocks are left alone: identical lines there are normal.
    """
    parts = re.split(r"(^[ \t]*```.*?(?:^[ \t]*```[^\n]*$|\Z))", text, flags=re.MULTILINE | re.DOTALL)
    if len(parts) > 1:
        return "".join(part if index % 2 else _collapse_prose(part) for index, part in enumerate(parts))
    return _collapse_prose(text)


class _RepeatFilter:
    """Which lines (or sentences) of a text to keep when the model repeats itself.

    A copy of the item kept just before it goes, and so does any later copy of an item that
    appears `_LOOP_COUNT` times or more in the whole text. Counts and "seen" span the whole text;
    "just before" spans only one run of items passed to `keep`.
    """

    def __init__(self, keys: Iterable[str]) -> None:
        self._counts = Counter(keys)
        self._seen: set[str] = set()

    def keep(self, items: Sequence[str], keys: Sequence[str]) -> list[str]:
        kept: list[str] = []
        previous: str | None = None
        for item, key in zip(items, keys, strict=True):
            if key and _is_substantial(key):
                looping = self._counts[key] >= _LOOP_COUNT and len(key.replace(" ", "")) >= _MIN_REPEAT_CHARS
                if key == previous or (looping and key in self._seen):
                    continue
                self._seen.add(key)
            # A blank item in between does not make two copies any less back to back.
            if key:
                previous = key
            kept.append(item)
        return kept


def _collapse_prose(text: str) -> str:
    lines = text.split("\n")
    line_keys = [_loop_key(line) for line in lines]
    kept_lines = _RepeatFilter(line_keys).keep(lines, line_keys)

    split_lines = [_split_sentences(line) for line in kept_lines]
    sentence_keys = [[_loop_key(sentence) for sentence in sentences] for sentences in split_lines]
    sentence_filter = _RepeatFilter(key for keys in sentence_keys for key in keys)
    out_lines: list[str] = []
    for sentences, keys in zip(split_lines, sentence_keys, strict=True):
        kept = sentence_filter.keep(sentences, keys)
        if len(kept) == len(sentences):
            out_lines.append("".join(sentences))
        elif joined := "".join(kept).rstrip():
            out_lines.append(joined)
        # else every sentence of the line was a repeat: drop the line rather than leave a hole
    return "\n".join(out_lines)


def _tidy(text: str) -> str:
    text = _TRAILING_SPACE_RE.sub("", text)
    text = _BLANK_RUN_RE.sub("\n\n", text)
    return text.strip()


def clean_answer(text: str, prompt_text: str | None = None, cut_by_token_limit: bool = False) -> str:
    """Return the user-facing answer from raw model output.

    `prompt_text` is the decoded prompt (tags and spacing are ignored when matching); when the
    output begins with it, it is removed. Without it, a leading ``[INST]...[/INST]`` echo is
    still recognised. The answer ends where the model starts inventing a new ``[INST]`` turn or
    writes a textual ``</s>``;
    leftover tags and control characters are dropped, and runaway repetition is collapsed to the
    first occurrence. Only when `cut_by_token_limit` (the engine stopped at its token limit, finish
    reason "length") is an unfinished last sentence trimmed back to the last complete one: an
    answer the model ended itself keeps its last line, whatever it ends with. A non-empty answer
    never comes back empty: when every rule would remove everything, the tag-free text is
    returned as is.
    """
    text = strip_control_characters(text)
    fallback = _tidy(_TAG_RE.sub("", text))
    answer, ended_before_invented_turn = _remove_echo_and_invented_turns(text, prompt_text)
    # A textual end-of-sequence tag after the answer is the model's own end: what follows it is
    # not part of the answer (the tokenizer split EOS into characters, so generation went on).
    end_tag = re.search(r"</s>", answer, re.IGNORECASE)
    if end_tag is not None and answer[: end_tag.start()].strip():
        answer = answer[: end_tag.start()]
    answer = _tidy(_TAG_RE.sub("", answer))
    if not answer:
        return fallback
    # When the model went on to invent the user's next turn, the limit cut that turn, not the answer.
    if cut_by_token_limit and not ended_before_invented_turn:
        answer = _trim_cut_off(answer)
    answer = _collapse_repetition(answer)
    return _tidy(answer) or fallback
