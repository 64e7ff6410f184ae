"""The engine interface's simple implementations and the seed's reference loading path."""

from __future__ import annotations

import threading
from collections.abc import Generator

import pytest
import torch

from bot.settings import FinbotSettings
from llm.answering import answer_question
from llm.engine import (
    FakeEngine,
    FinishReason,
    Generation,
    HFGenerateEngine,
    IncrementalDecoder,
    SamplingParams,
)
from llm.loading import load_reference_model, load_tokenizer

KOREAN = "중앙은행은 통화정책을 통해 물가 안정을 도모합니다. 환율·금리 🙂 漢字 mixed English."


@pytest.fixture(scope="module")
def reference_engine(tiny_checkpoint):
    model = load_reference_model(str(tiny_checkpoint.base_dir), str(tiny_checkpoint.adapter_dir), "cpu")
    return HFGenerateEngine(model, load_tokenizer(str(tiny_checkpoint.base_dir)))


def test_incremental_decoder_emits_whole_characters_only(mistral_tokenizer):
    ids = mistral_tokenizer(KOREAN, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(mistral_tokenizer)
    chunks = [decoder.push(token_id) for token_id in ids] + [decoder.flush()]
    assert all("\ufffd" not in chunk for chunk in chunks)
    assert "".join(chunks) == mistral_tokenizer.decode(ids)
    # Byte-fallback tokens really occur here, so holding back partial characters is exercised.
    assert any(token.startswith("<0x") for token in mistral_tokenizer.convert_ids_to_tokens(ids))


def test_incremental_decoder_matches_a_full_decode_and_decodes_short_windows(mistral_tokenizer):
    """Random token streams (spaces, newlines, byte tokens, Hangul, digits): the deltas add up to
    the full decode, and no push decodes more than a few tokens, however long the answer."""
    import random

    rng = random.Random(7)
    korean = mistral_tokenizer(KOREAN * 3, add_special_tokens=False)["input_ids"]
    decoded_lengths: list[int] = []
    decode = mistral_tokenizer.decode

    class CountingTokenizer:
        def decode(self, ids, **kwargs):  # noqa: ANN001, ANN003, ANN202
            decoded_lengths.append(len(ids))
            return decode(ids, **kwargs)

    for _ in range(20):
        ids = [rng.choice(korean) if rng.random() < 0.6 else rng.randrange(3, 32000) for _ in range(300)]
        decoder = IncrementalDecoder(CountingTokenizer())
        chunks = [decoder.push(token_id) for token_id in ids]
        text = "".join(chunks) + decoder.flush()
        assert text == decode(ids, skip_special_tokens=False).rstrip("\ufffd")
        assert all("\ufffd" not in chunk[-1:] for chunk in chunks)
    assert max(decoded_lengths) <= 12, max(decoded_lengths)


def test_reference_path_is_the_seeds_4bit_peft_model(reference_engine):
    from bitsandbytes.nn import Linear4bit
    from peft import PeftModel

    model = reference_engine.model
    assert isinstance(model, PeftModel)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, Linear4bit)
    assert q_proj.base_layer.weight.quant_state.quant_type == "nf4"
    assert q_proj.base_layer.weight.quant_state.nested  # double quantization
    assert q_proj.base_layer.compute_dtype == torch.bfloat16
    assert q_proj.r["default"] == 32 and q_proj.scaling["default"] == pytest.approx(8 / 32)
    assert "default" in model.base_model.model.lm_head.lora_A  # the adapter covers lm_head too


def test_reference_stream_equals_plain_generate(reference_engine, mistral_tokenizer):
    prompt_ids = mistral_tokenizer("[INST]기준금리가 뭐야? [/INST]")["input_ids"]
    params = SamplingParams(max_new_tokens=12, greedy=True)
    streamed = "".join(reference_engine.stream(prompt_ids, params))
    with torch.inference_mode():
        output = reference_engine.model.generate(
            input_ids=torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=12, pad_token_id=2
        )
    expected = mistral_tokenizer.decode(output[0][len(prompt_ids) :].tolist())
    assert streamed == expected.replace("</s>", "")
    assert streamed


def test_reference_sampling_is_reproducible_with_a_seed(reference_engine, mistral_tokenizer):
    prompt_ids = mistral_tokenizer("[INST]환율이 뭐야? [/INST]")["input_ids"]
    first = reference_engine.generate(prompt_ids, SamplingParams(max_new_tokens=10, seed=7))
    second = reference_engine.generate(prompt_ids, SamplingParams(max_new_tokens=10, seed=7))
    other_seed = reference_engine.generate(prompt_ids, SamplingParams(max_new_tokens=10, seed=8))
    greedy = reference_engine.generate(prompt_ids, SamplingParams(max_new_tokens=10, greedy=True))
    assert first == second
    assert other_seed != first and greedy != first  # it really samples


def test_cancel_stops_generation_early(reference_engine, mistral_tokenizer):
    prompt_ids = mistral_tokenizer("[INST]환율이 뭐야? [/INST]")["input_ids"]
    cancel = threading.Event()
    stream = reference_engine.stream(prompt_ids, SamplingParams(max_new_tokens=200, greedy=True), cancel)
    next(stream)
    cancel.set()
    rest = list(stream)
    # Random weights rarely hit EOS, so without the cancel flag this would run to 200 tokens.
    assert len(rest) < 20


def test_fake_engine_reports_what_reached_it(mistral_tokenizer):
    engine = FakeEngine(mistral_tokenizer, "답: {question} / 이전 {history_turns}개")
    first_turn = mistral_tokenizer("[INST]환율이 뭐야? [/INST]")["input_ids"]
    assert engine.generate(first_turn, SamplingParams()).strip() == "답: 환율이 뭐야? / 이전 0개"
    follow_up = first_turn + mistral_tokenizer("답이에요", add_special_tokens=False)["input_ids"] + [2]
    follow_up += mistral_tokenizer("[INST]그럼 금리는? [/INST]", add_special_tokens=False)["input_ids"]
    assert engine.generate(follow_up, SamplingParams()).strip() == "답: 그럼 금리는? / 이전 1개"


# --- why generation stopped -----------------------------------------------------------------------


def _greedy_ids(engine: HFGenerateEngine, prompt_ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        output = engine.model.generate(
            input_ids=torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=n, pad_token_id=2
        )
    return output[0][len(prompt_ids) :].tolist()


def test_generation_reports_its_finish_reason_only_once_iterated(mistral_tokenizer):
    engine = FakeEngine(mistral_tokenizer, "금리는 돈의 가격입니다.")
    generation = engine.stream(mistral_tokenizer("[INST]금리? [/INST]")["input_ids"], SamplingParams())
    assert isinstance(generation, Generation)
    assert generation.finish_reason is None
    assert "".join(generation).strip() == "금리는 돈의 가격입니다."
    assert generation.finish_reason == "eos"


def test_generation_reports_error_and_cancelled():
    def failing() -> Generator[str, None, FinishReason]:
        yield "금리는 "
        raise RuntimeError("CUDA out of memory")

    generation = Generation(failing())
    with pytest.raises(RuntimeError):
        list(generation)
    assert generation.finish_reason == "error"

    closed: list[bool] = []

    def endless() -> Generator[str, None, FinishReason]:
        try:
            while True:
                yield "가"
        finally:
            closed.append(True)

    generation = Generation(endless())
    next(generation)
    generation.close()  # the consumer walked away: the engine side is closed too
    assert generation.finish_reason == "cancelled" and closed == [True]


def test_fake_engine_finish_reasons(mistral_tokenizer):
    engine = FakeEngine(mistral_tokenizer, "하나 둘 셋 넷")
    prompt_ids = mistral_tokenizer("[INST]세어 봐 [/INST]")["input_ids"]
    whole = engine.stream(prompt_ids, SamplingParams(max_new_tokens=4))
    assert "".join(whole).split() == ["하나", "둘", "셋", "넷"] and whole.finish_reason == "eos"
    cut = engine.stream(prompt_ids, SamplingParams(max_new_tokens=2))
    assert "".join(cut).split() == ["하나", "둘"] and cut.finish_reason == "length"
    cancel = threading.Event()
    cancelled = engine.stream(prompt_ids, SamplingParams(), cancel)
    assert next(cancelled) == "하나 "
    cancel.set()
    assert list(cancelled) == [] and cancelled.finish_reason == "cancelled"


def test_default_fake_reply_reaches_the_user_whole(mistral_tokenizer):
    """The shipped fake reply ends in "(이전 대화 N개)", no sentence punctuation: the engine ended it
    (EOS), so cleaning must not cut it off as if the token limit had."""
    engine = FakeEngine(mistral_tokenizer, FinbotSettings.model_fields["fake_reply"].default)
    answer = answer_question(engine, [], "금리가 뭐야?", SamplingParams(), 4096)
    assert answer == "테스트 답변입니다. 질문: 금리가 뭐야? (이전 대화 0개)"
    follow_up = answer_question(engine, [("금리가 뭐야?", answer)], "환율은?", SamplingParams(), 4096)
    assert follow_up == "테스트 답변입니다. 질문: 환율은? (이전 대화 1개)"


def test_an_answer_the_token_limit_cut_still_ends_at_its_last_complete_sentence(mistral_tokenizer):
    engine = FakeEngine(mistral_tokenizer, "금리는 돈의 가격입니다. 금리가 오르면 대출 이자가 늘어납니다.")
    answer = answer_question(engine, [], "금리가 뭐야?", SamplingParams(max_new_tokens=5), 4096)
    assert answer == "금리는 돈의 가격입니다."


def test_reference_engine_reports_length_and_leaves_the_callers_cancel_alone(reference_engine, mistral_tokenizer):
    prompt_ids = mistral_tokenizer("[INST]기준금리가 뭐야? [/INST]")["input_ids"]
    assert 2 not in _greedy_ids(reference_engine, prompt_ids, 6)  # random weights: no EOS this early
    cancel = threading.Event()
    generation = reference_engine.stream(prompt_ids, SamplingParams(max_new_tokens=6, greedy=True), cancel)
    assert "".join(generation)
    assert generation.finish_reason == "length"
    # The caller's event means "give up": an answer that simply finished must not look timed out.
    assert not cancel.is_set()


def test_reference_engine_reports_eos(reference_engine, mistral_tokenizer):
    prompt_ids = mistral_tokenizer("[INST]기준금리가 뭐야? [/INST]")["input_ids"]
    greedy = _greedy_ids(reference_engine, prompt_ids, 6)
    config = reference_engine.model.generation_config
    original = config.eos_token_id
    config.eos_token_id = greedy[3]  # the 4th greedy token now ends the answer, as EOS would
    try:
        generation = reference_engine.stream(prompt_ids, SamplingParams(max_new_tokens=6, greedy=True))
        text = "".join(generation)
    finally:
        config.eos_token_id = original
    assert generation.finish_reason == "eos"
    assert text == mistral_tokenizer.decode(greedy[:3])  # the end token itself is not text


def test_reference_engine_reports_cancelled(reference_engine, mistral_tokenizer):
    prompt_ids = mistral_tokenizer("[INST]환율이 뭐야? [/INST]")["input_ids"]
    cancel = threading.Event()
    generation = reference_engine.stream(prompt_ids, SamplingParams(max_new_tokens=200, greedy=True), cancel)
    next(generation)
    cancel.set()
    list(generation)
    assert generation.finish_reason == "cancelled"
