"""clean_answer: what the user sees after the model's raw text is tidied.

`cut_by_token_limit=True` is an answer the token limit cut (finish reason "length"); without it
the model ended the answer itself (EOS), and its end is kept as written.
"""

from __future__ import annotations

import time

import pytest

from llm.cleaning import clean_answer, strip_control_characters


@pytest.mark.parametrize(
    "text",
    [
        "금리는 돈의 가격입니다.",
        "금리가 오르면 채권 가격은 내려갑니다. 반대로 금리가 내리면 채권 가격은 오릅니다.",
        "장점:\n- 안정적\n- 낮은 위험\n\n단점:\n- 낮은 수익\n- 유동성",
        "## 요약\n\n1. 예금은 원금이 보장됩니다.\n2. 주식은 변동성이 큽니다.\n\n투자에 유의하세요!",
        "ETF란 무엇일까요? 지수를 따라가는 펀드예요.",
        '그는 "좋아요."라고 말했다.',
        "감사합니다",
        "예시 코드입니다.\n```python\nrate = 0.035\n```",
    ],
)
def test_clean_text_is_unchanged(text):
    assert clean_answer(text) == text
    assert clean_answer(text, cut_by_token_limit=True) == text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("<s>금리는 돈의 가격입니다.</s>", "금리는 돈의 가격입니다."),
        ("금리는 돈의 가격입니다. [/INST]", "금리는 돈의 가격입니다."),
        ("  \n금리는 돈의 가격입니다.\n\n", "금리는 돈의 가격입니다."),
    ],
)
def test_leftover_tags_and_whitespace_removed(raw, expected):
    assert clean_answer(raw) == expected


def test_tag_only_text_becomes_empty():
    assert clean_answer("<s> [INST] [/INST] </s>") == ""
    assert clean_answer("   ") == ""


def test_prompt_echo_removed_without_prompt_text():
    assert clean_answer("[INST]금리가 뭐야? [/INST] 금리는 돈의 가격입니다.") == "금리는 돈의 가격입니다."
    assert clean_answer("<s> [INST]금리가 뭐야? [/INST]금리는 돈의 가격입니다.") == "금리는 돈의 가격입니다."


def test_multi_turn_echo_removed_without_prompt_text():
    raw = "<s> [INST]안녕 [/INST] 안녕하세요.</s> [INST]금리가 뭐야? [/INST] 금리는 돈의 가격입니다."
    assert clean_answer(raw) == "금리는 돈의 가격입니다."


def test_prompt_echo_removed_with_decoded_prompt():
    prompt = "<s> [INST]안녕 [/INST] 안녕하세요.</s> [INST]금리가 뭐야? [/INST]"
    skip_special = "[INST]안녕 [/INST] 안녕하세요. [INST]금리가 뭐야? [/INST]"
    raw = "[INST]안녕 [/INST] 안녕하세요. [INST]금리가 뭐야? [/INST] 금리는 돈의 가격입니다."
    assert clean_answer(raw, prompt) == "금리는 돈의 가격입니다."
    assert clean_answer(raw, skip_special) == "금리는 돈의 가격입니다."
    # An echo of just the question (the model repeated it before answering).
    assert clean_answer("금리가 뭐야? [/INST] 금리는 돈의 가격입니다.", prompt) == "금리는 돈의 가격입니다."


def test_answer_starting_with_the_question_words_is_not_an_echo():
    prompt = "[INST]금리 [/INST]"
    assert clean_answer("금리는 돈의 가격입니다.", prompt) == "금리는 돈의 가격입니다."


def test_invented_next_turn_is_cut():
    raw = "금리는 돈의 가격입니다. [INST]그럼 환율은 뭐야? [/INST] 환율은 두 통화의 교환 비율입니다."
    assert clean_answer(raw) == "금리는 돈의 가격입니다."
    echoed = (
        "[INST]금리가 뭐야? [/INST] 금리는 돈의 가격입니다.\n[INST]환율은? [/INST] 환율은 교환 비율입니다."
    )
    assert clean_answer(echoed) == "금리는 돈의 가격입니다."


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            "금리는 돈의 가격입니다. 금리가 오르면 대출 이자가 늘어나고, 예금 이",
            "금리는 돈의 가격입니다.",
        ),
        ("금리가 오르면 어떻게 될까요? 대출 이자가 늘어", "금리가 오르면 어떻게 될까요?"),
        ("정말 중요합니다! 그래서 저축", "정말 중요합니다!"),
        ('그는 "좋아요."라고 말했다. 그리고 다시', '그는 "좋아요."라고 말했다.'),
        ("**핵심은 분산 투자입니다.** 주식과 채", "**핵심은 분산 투자입니다.**"),
        ("금리는 3.5%입니다. 작년에는 3.", "금리는 3.5%입니다."),
        (
            "종류는 다음과 같습니다.\n1. 예금입니다.\n2. 적금입니다.\n3. 주식은 위험",
            "종류는 다음과 같습니다.\n1. 예금입니다.\n2. 적금입니다.",
        ),
        ("## 금리 인상의 영향\n대출 이자가 늘", "## 금리 인상의 영향"),
    ],
)
def test_cut_off_answer_trimmed_to_last_complete_sentence(raw, expected):
    assert clean_answer(raw, cut_by_token_limit=True) == expected


# Answers the model ended itself (EOS) whose last line carries no sentence punctuation: a source,
# a note, a list item, a link. Trimming them as if cut off loses exactly the part users look for.
WHOLE_ANSWERS = [
    "기준금리는 한국은행 금융통화위원회가 정합니다.\n출처: 한국은행",
    "환율은 두 통화의 교환 비율입니다. 수출입 기업은 환율 변동에 민감합니다. (참고)",
    "예금과 적금의 차이입니다.\n1. 예금은 한 번에 맡깁니다.\n2. 적금은 매달 나눠 넣습니다.\n3. 둘 다 예금자 보호 대상",
    "기준금리는 연 3.50%입니다. 자세한 내용은 한국은행 누리집에서 볼 수 있습니다: https://www.bok.or.kr/portal/main/main.do",
]


@pytest.mark.parametrize("text", WHOLE_ANSWERS, ids=["source", "note", "list-item", "url"])
def test_answer_the_model_ended_itself_is_kept_whole(text):
    assert clean_answer(text) == text
    assert clean_answer(text, cut_by_token_limit=False) == text


@pytest.mark.parametrize("text", WHOLE_ANSWERS, ids=["source", "note", "list-item", "url"])
def test_the_same_endings_cut_by_the_token_limit_end_at_the_last_complete_sentence(text):
    cut = clean_answer(text, cut_by_token_limit=True)
    assert text.startswith(cut) and len(cut) < len(text)
    assert cut.endswith("다.")


def test_the_limit_cutting_an_invented_next_turn_does_not_trim_the_answer_before_it():
    """The model finished its answer, then wrote the user's next message until the limit: the
    limit cut that invented turn, not the answer."""
    raw = "금리는 돈의 가격이에요.\n출처: 한국은행\n[INST]그럼 환율은 뭐"
    assert clean_answer(raw, cut_by_token_limit=True) == "금리는 돈의 가격이에요.\n출처: 한국은행"


def test_cut_off_without_any_complete_sentence_is_kept():
    assert clean_answer("금리가 오르면 대출 이자가", cut_by_token_limit=True) == "금리가 오르면 대출 이자가"


def test_polite_ending_without_period_counts_as_complete():
    assert clean_answer("투자에 유의하시기 바랍니다", cut_by_token_limit=True) == "투자에 유의하시기 바랍니다"
    text = "첫 문장입니다. 분산 투자가 중요해요"
    assert clean_answer(text, cut_by_token_limit=True) == text


def test_repeated_sentence_collapsed():
    sentence = "금리가 오르면 채권 가격은 내려갑니다."
    assert clean_answer(" ".join([sentence] * 6)) == sentence
    # With a cut-off copy at the end too.
    assert clean_answer(" ".join([sentence] * 4) + " 금리가 오르면", cut_by_token_limit=True) == sentence


def test_repeated_lines_collapsed_keeping_first_occurrence_order():
    raw = "요약입니다.\n투자 시 유의하세요.\n" + "투자 시 유의하세요.\n" * 5 + "끝입니다."
    assert clean_answer(raw) == "요약입니다.\n투자 시 유의하세요.\n끝입니다."
    loop = "A 주식은 성장주입니다.\nB 주식은 가치주입니다.\n" * 4
    assert clean_answer(loop) == "A 주식은 성장주입니다.\nB 주식은 가치주입니다."


def test_sentence_repeated_across_lines_collapsed():
    raw = "예금은 안전합니다. 원금이 보장됩니다.\n적금도 비슷합니다. 원금이 보장됩니다.\n채권은 다릅니다. 원금이 보장됩니다."
    assert clean_answer(raw) == "예금은 안전합니다. 원금이 보장됩니다.\n적금도 비슷합니다.\n채권은 다릅니다."


def test_legitimate_short_repeats_kept():
    raw = "장점:\n- 안정적\n\n단점:\n- 낮은 수익\n\n장점:\n- 세제 혜택\n\n단점:\n- 중도 해지 불이익\n\n장점:\n- 간편함"
    assert clean_answer(raw) == raw
    numbered = "1. 예\n2. 예\n3. 예"
    assert clean_answer(numbered) == numbered


def test_a_line_repeated_twice_apart_is_kept():
    raw = "예금은 원금이 보장됩니다.\n하지만 수익이 낮습니다.\n예금은 원금이 보장됩니다."
    assert clean_answer(raw) == raw


def test_blank_line_runs_normalised():
    assert clean_answer("첫 문단입니다.\n\n\n\n\n둘째 문단입니다.") == "첫 문단입니다.\n\n둘째 문단입니다."
    assert clean_answer("첫 문단입니다.\r\n \r\n\r\n둘째 문단입니다.") == "첫 문단입니다.\n\n둘째 문단입니다."


def test_never_empty_for_real_text():
    assert clean_answer("[INST]다음 질문을 해도 될까") == "다음 질문을 해도 될까"
    assert clean_answer("[INST]금리가 뭐야? [/INST]") == "금리가 뭐야?"
    assert clean_answer("음") == "음"


def test_fast_on_long_output():
    raw = "[INST]질문 [/INST] " + "금리는 경제의 온도계입니다. 물가와 고용을 봅니다.\n" * 2000 + "그런데"
    start = time.perf_counter()
    cleaned = clean_answer(raw, cut_by_token_limit=True)
    assert time.perf_counter() - start < 1.0
    assert cleaned == "금리는 경제의 온도계입니다. 물가와 고용을 봅니다."


def test_identical_code_lines_are_not_collapsed():
    raw = "코드입니다.\n```\nx = 1\nx = 1\nx = 1\n```\n반복입니다. 반복입니다."
    assert clean_answer(raw) == "코드입니다.\n```\nx = 1\nx = 1\nx = 1\n```\n반복입니다."


def test_control_characters_and_bidi_overrides_never_reach_the_answer():
    """Terminal escapes, NULs, C1 controls and bidi overrides (which make Slack show text in another
    order than it reads) are dropped; tabs and line breaks stay, CR LF and CR become LF."""
    raw = (
        "금리는\x00 돈의 \x1b[31m가격\x7f입니다.\r\n"
        "환율은\x85 \u202e교환 비율\u202c입니다.\r"
        "\u2066주의\u2069:\t\u200f원금 손실\x0b\x0c 가능"
    )
    assert clean_answer(raw) == "금리는 돈의 [31m가격입니다.\n환율은 교환 비율입니다.\n주의:\t원금 손실 가능"


def test_strip_control_characters_keeps_korean_emoji_and_formatting_characters():
    text = "중앙은행 🙂 漢字 — “인용” \u200b\u2060 end\n\tindent"
    assert strip_control_characters(text) == text
    assert strip_control_characters("a\r\nb\rc") == "a\nb\nc"


def test_a_textual_end_tag_ends_the_answer_even_when_the_model_went_on():
    assert clean_answer("기준금리는 정책금리예요.</s> 그리고 이어서", cut_by_token_limit=False) == "기준금리는 정책금리예요."
    # ...but a tag before any answer text is only dropped
    assert clean_answer("</s>기준금리는 정책금리예요.") == "기준금리는 정책금리예요."
