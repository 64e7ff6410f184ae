"""to_mrkdwn: model text can never mention or link in Slack, and Markdown reads as mrkdwn.

Neither the final message nor the view streamed while the answer is written carries control
characters or bidi overrides."""

from __future__ import annotations

import re

import pytest

from bot.formatting import escape_for_stream, to_mrkdwn

WJ = "\u2060"
ZWSP = "\u200b"


@pytest.mark.parametrize(
    "dangerous",
    [
        "<!channel>",
        "<!here>",
        "<!everyone>",
        "<@U123ABC>",
        "<#C123|general>",
        "<!subteam^S123|@team>",
        "<http://evil.example|여기를 누르세요>",
        "<!date^1392734382^{date}|x>",
    ],
)
def test_slack_control_sequences_cannot_survive(dangerous):
    for text in (
        dangerous,
        f"공지: {dangerous} 확인",
        f"`{dangerous}`",
        f"```\n{dangerous}\n```",
        f"**{dangerous}**",
    ):
        out = to_mrkdwn(text)
        assert "<" not in out and ">" not in out
        assert "&lt;" in out and "&gt;" in out


def test_escaping_order_does_not_double_escape():
    assert to_mrkdwn("A & B < C > D") == "A &amp; B &lt; C &gt; D"
    # Text that already looks like an entity is escaped once, so it shows literally.
    assert to_mrkdwn("&lt;!channel&gt;") == "&amp;lt;!channel&amp;gt;"


def test_exact_escape_of_channel_mention():
    assert to_mrkdwn("<!channel> 확인하세요") == "&lt;!channel&gt; 확인하세요"
    assert to_mrkdwn("<@U123>") == f"&lt;@{WJ}U123&gt;"


@pytest.mark.parametrize("word", ["channel", "here", "everyone"])
def test_bare_broadcast_mentions_neutralised(word):
    out = to_mrkdwn(f"@{word} 모두 보세요")
    assert f"@{word}" not in out
    assert out.replace(WJ, "") == f"@{word} 모두 보세요"
    assert out.startswith(f"@{WJ}{word}")


def test_email_addresses_untouched():
    assert to_mrkdwn("문의: help@example.com") == "문의: help@example.com"


def test_bold_conversion():
    assert to_mrkdwn("**중요**: 분산 투자") == "*중요*: 분산 투자"
    assert to_mrkdwn("__중요__ 합니다") == "*중요* 합니다"
    assert "**" not in to_mrkdwn("이것은 **굵게** 그리고 **또 굵게** 입니다")


def test_bold_glued_to_korean_particle_gets_invisible_word_edge():
    out = to_mrkdwn("**금리**는 오릅니다")
    assert out == f"*금리*{ZWSP}는 오릅니다"
    assert out.replace(ZWSP, "") == "*금리*는 오릅니다"


def test_italic_and_strike():
    assert to_mrkdwn("*기울임* 과 ~~취소선~~") == "_기울임_ 과 ~취소선~"
    assert to_mrkdwn("***둘 다***") in ("*_둘 다_*", "_*둘 다*_")
    assert to_mrkdwn("2 * 3 * 4 = 24") == "2 * 3 * 4 = 24"


def test_headings_become_bold_lines():
    assert to_mrkdwn("# 요약\n본문") == "*요약*\n본문"
    assert to_mrkdwn("## 금리 전망 ##") == "*금리 전망*"
    assert to_mrkdwn("### **이미 굵게**") == "*이미 굵게*"
    assert to_mrkdwn("#해시태그") == "#해시태그"


def test_bullets_and_nesting():
    text = "- 예금\n  - 정기예금\n    * 특판\n+ 적금\n* 주식"
    assert to_mrkdwn(text) == "• 예금\n  • 정기예금\n    • 특판\n• 적금\n• 주식"


def test_numbered_lists_stay():
    text = "1. 예금\n2. 적금\n   1) 자유적금"
    assert to_mrkdwn(text) == text


def test_bullet_with_bold_label():
    assert to_mrkdwn("- **장점**: 안정적") == "• *장점*: 안정적"


def test_markdown_links_become_plain_text():
    out = to_mrkdwn("[한국은행](https://www.bok.or.kr/portal/main.do?a=1&b=2) 참고")
    assert out == "한국은행 (https://www.bok.or.kr/portal/main.do?a=1&amp;b=2) 참고"
    assert to_mrkdwn("[https://x.kr](https://x.kr)") == "https://x.kr"
    assert "|" not in to_mrkdwn("[클릭](http://evil.example)")


def test_fenced_code_kept_verbatim_except_escaping():
    text = "예시:\n```python\nrate = a**2 ** b  # **not bold** <tag> & __x__\n- not a bullet\n```\n끝"
    out = to_mrkdwn(text)
    assert out == (
        "예시:\n```\nrate = a**2 ** b  # **not bold** &lt;tag&gt; &amp; __x__\n- not a bullet\n```\n끝"
    )


def test_unclosed_fence_is_closed_and_not_formatted():
    out = to_mrkdwn("코드:\n```\nx = **y**\n# comment")
    assert out == "코드:\n```\nx = **y**\n# comment\n```"


def test_inline_code_kept():
    assert to_mrkdwn("`**x**` 와 **y**") == "`**x**` 와 *y*"
    assert to_mrkdwn("`a < b && c`") == "`a &lt; b &amp;&amp; c`"


def test_horizontal_rule_not_a_bullet():
    assert to_mrkdwn("위\n* * *\n아래\n---") == "위\n──────────\n아래\n──────────"


def test_plain_korean_unchanged():
    text = "금리가 오르면 채권 가격은 내려갑니다.\n\n환율은 1,350원입니다 (2024년 기준)."
    assert to_mrkdwn(text) == text


def test_private_use_sentinels_in_input_cannot_corrupt_output():
    out = to_mrkdwn("\ue0000\ue001 `code` **b**")
    assert re.search("[\ue000-\ue002]", out) is None
    assert out == "0 `code` *b*"


# A model (or a question echoed into the answer) can emit terminal escapes, NULs, C1 controls and
# bidi overrides: U+202E makes "gpj.exe" read as "exe.jpg", and a Slack client shows such text in
# another order than it reads.
CONTROLLED = (
    "금리는\x00 돈의 \x1b[31m가격\x7f입니다.\r\n"
    "파일: \u202egpj.exe\u202c, \u2067주의\u2069\x85\u200e\r"
    "`코드\x08` 끝\x0b"
)
CONTROL_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def test_control_characters_and_bidi_overrides_never_reach_the_final_message():
    out = to_mrkdwn(CONTROLLED)
    assert CONTROL_CHARS.search(out) is None
    assert out == "금리는 돈의 [31m가격입니다.\n파일: gpj.exe, 주의\n`코드` 끝"


def test_control_characters_and_bidi_overrides_never_reach_the_streamed_view():
    shown = ""
    for end in range(1, len(CONTROLLED) + 1):
        view = escape_for_stream(CONTROLLED[:end])
        assert CONTROL_CHARS.search(view) is None, repr(view)
        assert view.startswith(shown)  # still safe to append: a CR that turns out to be CR LF included
        shown = view
    assert shown == to_mrkdwn(CONTROLLED)
