"""One answer from question to cleaned text: the prompt layout and the echo it strips agree."""

from __future__ import annotations

from llm.answering import answer_question, clean_reply
from llm.engine import FakeEngine, SamplingParams
from llm.prompt import user_segment


def test_user_segment_is_the_seed_layout():
    assert user_segment("  금리가 뭐야?\n") == "[INST]금리가 뭐야? [/INST]"


def test_clean_reply_strips_an_echo_of_the_question_alone():
    raw = "금리가 뭐야? [/INST] 금리는 돈의 가격입니다."
    assert clean_reply(raw, "금리가 뭐야?", "eos") == "금리는 돈의 가격입니다."
    assert clean_reply("[INST]금리가 뭐야? [/INST] 금리는 돈의 가격입니다.", "금리가 뭐야?", "eos") == "금리는 돈의 가격입니다."
    # An answer that merely opens with the question's words keeps them.
    assert clean_reply("금리는 돈의 가격입니다.", "금리", "eos") == "금리는 돈의 가격입니다."


def test_answer_question_cleans_what_the_engine_wrote(mistral_tokenizer):
    engine = FakeEngine(mistral_tokenizer, "{question} [/INST] 금리는 돈의 가격입니다.")
    answer = answer_question(engine, [], "금리가 뭐야?", SamplingParams(max_new_tokens=64), 4096)
    assert answer == "금리는 돈의 가격입니다."
