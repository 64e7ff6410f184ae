"""Fidelity of `fast` (and `low-memory`) against the reference path, on the GPU (device tool).

Run: FINBOT_TOKENIZER_FILE=.tok/tokenizer.model.v1 python -m pytest tests/gpu -s
The random-7B numbers come from bench/bench_engines.py (one model build for both).
"""

from __future__ import annotations

import json

import pytest
import torch

from llm.fidelity import KOREAN_FINANCE_TEXT, kl_summary, teacher_forced_decode_logits
from llm.loading import load_reference_model, load_tokenizer

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny_reference(tiny_checkpoint):
    model = load_reference_model(str(tiny_checkpoint.base_dir), str(tiny_checkpoint.adapter_dir), "cuda:0")
    return model, load_tokenizer(str(tiny_checkpoint.base_dir))


# nf4 computes the seed's own function (NF4 values bit-exact, LoRA unmerged): a tighter bound.
KL_BOUND = {"fast": 0.01, "fast-static": 0.01, "low-memory": 0.01, "nf4": 0.001}


@pytest.mark.parametrize("mode", ["fast", "fast-static", "low-memory", "nf4"])
def test_tiny_kl_and_greedy_agreement(tiny_reference, mode):
    from llm.serving.fast import build_fast_engine, build_low_memory_engine
    from llm.serving.nf4 import build_nf4_engine

    model, tokenizer = tiny_reference
    ids = tokenizer(KOREAN_FINANCE_TEXT).input_ids
    assert len(ids) >= 300, len(ids)
    with torch.inference_mode():
        reference = model(torch.tensor([ids], device="cuda:0")).logits[0].float()
        prompt = torch.tensor([ids[:40]], device="cuda:0")
        ref_greedy = model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
            max_new_tokens=32, min_new_tokens=32, pad_token_id=tokenizer.eos_token_id,
        )[0, 40:].tolist()
    if mode.startswith("fast"):  # fast: block tables + the Triton paged decode attention
        engine = build_fast_engine(model, tokenizer, max_batch=4, max_seq_len=1024, free_source=False,
                                   compile_kernels=False, paged_kv=mode == "fast")
    elif mode == "nf4":  # the fused NF4 kernels in decode, dequantize + cuBLAS for prompts
        engine = build_nf4_engine(model, tokenizer, max_batch=4, max_seq_len=1024, free_source=False,
                                  compile_kernels=False, kv_cache_tokens=2048)
        assert engine.info["nf4_kernels"] is True, engine.info
    else:
        engine = build_low_memory_engine(model, tokenizer, max_batch=4, max_seq_len=1024, compile_kernels=False)
    try:
        step_model = engine.scheduler.model
        prefill = step_model.decoder.prefill(0, torch.tensor(ids), all_logits=True)
        decoded = teacher_forced_decode_logits(step_model, ids, slot=1)
        from llm.engine import SamplingParams

        greedy = list(engine.stream_tokens(ids[:40], SamplingParams(greedy=True, max_new_tokens=32), ignore_eos=True))
    finally:
        engine.close()
    agree = 0
    for a, b in zip(ref_greedy, greedy, strict=True):
        if a != b:
            break
        agree += 1
    result = {
        "model": "tiny", "mode": mode, "engine_info": engine.info,
        "prefill_path": kl_summary(reference, prefill),
        "decode_path": kl_summary(reference, decoded),
        "greedy_agreeing_prefix": agree,
    }
    print("FIDELITY " + json.dumps(result))
    assert result["prefill_path"]["kl_mean"] <= KL_BOUND[mode]
    assert result["decode_path"]["kl_mean"] <= KL_BOUND[mode]
    assert agree >= 32, (ref_greedy, greedy)


@pytest.mark.parametrize("paged", [False, True], ids=["static", "paged"])
def test_prefill_graphs_equal_eager_prefill(tiny_reference, paged):
    """The captured prefill buckets give the logits and KV cache of the eager exact-length
    prefill, for one prompt and for several prompts grouped into one bucket."""
    from llm.serving.fast import build_fast_engine

    model, tokenizer = tiny_reference
    ids = tokenizer(KOREAN_FINANCE_TEXT).input_ids
    engine = build_fast_engine(model, tokenizer, max_batch=4, max_seq_len=1024, free_source=False,
                               compile_kernels=False, paged_kv=paged)
    try:
        graphs = engine.scheduler.model.graphs
        decoder = graphs.decoder
        assert engine.info["prefill_graphs"] == len(graphs.prefill_shapes()) > 10, engine.info
        prompts = [torch.tensor(ids[:n]) for n in (300, 7, 45)]
        slots = [2, 0, 1]
        with torch.inference_mode():
            eager = decoder.prefill_many(slots, prompts)
            keys = [decoder.k_cache[-1].clone()] if not paged else None
            captured = graphs.prefill_many(slots, prompts)
            single = graphs.prefill_many([3], [prompts[1]])
        torch.testing.assert_close(captured, eager, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(single[0], eager[1], atol=2e-2, rtol=2e-2)
        if keys is not None:
            for slot, prompt in zip(slots, prompts, strict=True):
                n = prompt.shape[0]
                torch.testing.assert_close(decoder.k_cache[-1][slot, :, :n], keys[0][slot, :, :n], atol=2e-2, rtol=2e-2)
        print("PREFILL_GRAPHS " + json.dumps({"paged": paged, "max_abs_diff": (captured - eager).abs().max().item()}))
    finally:
        engine.close()
