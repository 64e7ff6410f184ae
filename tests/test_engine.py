"""The engine interface's simple implementations and the seed's reference loading path."""

from __future__ import annotations

import threading

import pytest
import torch

from llm.engine import FakeEngine, HFGenerateEngine, IncrementalDecoder, SamplingParams
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
