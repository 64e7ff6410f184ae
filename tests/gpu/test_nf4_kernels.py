"""`nf4` mode on the GPU: bit-exact dequantization, the fused kernels against the reference path,
and fidelity + greedy agreement on the tiny model (device tool; skipped without CUDA)."""

from __future__ import annotations

import json

import pytest
import torch

from llm.fidelity import KOREAN_FINANCE_TEXT, kl_summary, teacher_forced_decode_logits
from llm.loading import load_reference_model, load_tokenizer

pytestmark = pytest.mark.gpu


def _quantized(rows: int, cols: int, seed: int):  # noqa: ANN202
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    weight = torch.randn(rows, cols, dtype=torch.bfloat16) * 0.02
    return bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4").to("cuda:0")


@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)])
def test_dequantization_is_bitsandbytes_bit_for_bit(shape):
    import bitsandbytes.functional as bnbf

    from llm.nf4 import NF4Matrix

    param = _quantized(*shape, seed=shape[0])
    theirs = bnbf.dequantize_4bit(param.data, param.quant_state)
    ours = NF4Matrix.from_bnb(param).dequantize(torch.bfloat16)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    mismatches = (ours.view(torch.int16) != theirs.view(torch.int16)).sum().item()
    print("NF4_DEQUANT " + json.dumps({"shape": shape, "mismatches": mismatches}))
    assert mismatches == 0


def _projection(parts: list[tuple[int, int]], cols: int, rank: int = 32, round_first: bool = True):  # noqa: ANN202
    from llm.nf4 import LoraParts, NF4Matrix, NF4Projection

    matrices = [NF4Matrix.from_bnb(_quantized(rows, cols, seed=i)) for i, (rows, _) in enumerate(parts)]
    g = torch.Generator(device="cuda:0").manual_seed(7)
    a = torch.randn(rank * len(parts), cols, device="cuda:0", generator=g) * 0.02
    b = torch.randn(sum(r for r, _ in parts), rank, device="cuda:0", generator=g) * 0.02
    segments, row = [], 0
    for i, (rows, _) in enumerate(parts):
        segments.append((row, row + rows, i * rank))
        row += rows
    lora = LoraParts(a=a, b=b, segments=tuple(segments), rank=rank, scaling=0.25)
    return NF4Projection(NF4Matrix.concat(matrices), lora, round_lora_first=round_first)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("name", ["qkv", "gate_up", "down"])
def test_fused_kernel_equals_the_reference_path(rows, name):
    from llm import nf4_kernels

    shapes = {"qkv": ([(4096, 0), (1024, 0), (1024, 0)], 4096), "gate_up": ([(14336, 0), (14336, 0)], 4096),
              "down": ([(4096, 0)], 14336)}
    parts, cols = shapes[name]
    projection = _projection(parts, cols)
    x = torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda:0")
    reference = projection.reference(x)
    n, k = projection.weight.shape
    boundaries = [s for s, _, _ in projection.lora.segments[1:]]
    worst = 0.0
    for config in nf4_kernels._candidates(rows, n, k, boundaries):
        fused = nf4_kernels.nf4_lora_linear(x, projection.weight, projection.lora, True, config)
        diff = (fused.float() - reference.float()).abs()
        # Only the float32 summation order differs: a bf16 rounding step at most, rarely.
        assert diff.max().item() <= 2 * reference.float().abs().max().item() * 2**-8, (config, diff.max())
        assert (diff > 0).float().mean().item() < 0.05, config
        worst = max(worst, diff.max().item())
    print("NF4_KERNEL " + json.dumps({"name": name, "rows": rows, "max_abs_diff": worst}))


@pytest.fixture(scope="module")
def tiny_reference(tiny_checkpoint):
    model = load_reference_model(str(tiny_checkpoint.base_dir), str(tiny_checkpoint.adapter_dir), "cuda:0")
    return model, load_tokenizer(str(tiny_checkpoint.base_dir))


def test_nf4_tiny_kl_and_greedy_agreement(tiny_reference):
    from llm.engine import SamplingParams
    from llm.nf4 import build_nf4_engine

    model, tokenizer = tiny_reference
    ids = tokenizer(KOREAN_FINANCE_TEXT).input_ids
    with torch.inference_mode():
        reference = model(torch.tensor([ids], device="cuda:0")).logits[0].float()
        prompt = torch.tensor([ids[:40]], device="cuda:0")
        ref_greedy = model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
            max_new_tokens=32, min_new_tokens=32, pad_token_id=tokenizer.eos_token_id,
        )[0, 40:].tolist()
    engine = build_nf4_engine(model, tokenizer, max_batch=4, max_seq_len=1024, free_source=False,
                              compile_kernels=False, kv_cache_tokens=2048)
    try:
        step_model = engine.scheduler.model
        prefill = step_model.decoder.prefill(0, torch.tensor(ids), all_logits=True)
        decoded = teacher_forced_decode_logits(step_model, ids, slot=1)
        greedy = list(engine.stream_tokens(ids[:40], SamplingParams(greedy=True, max_new_tokens=32), ignore_eos=True))
    finally:
        engine.close()
    agree = 0
    for a, b in zip(ref_greedy, greedy, strict=True):
        if a != b:
            break
        agree += 1
    result = {"model": "tiny", "mode": "nf4", "engine_info": engine.info,
              "prefill_path": kl_summary(reference, prefill), "decode_path": kl_summary(reference, decoded),
              "greedy_agreeing_prefix": agree}
    print("FIDELITY " + json.dumps(result))
    assert engine.info["nf4_kernels"] is True, engine.info
    assert result["prefill_path"]["kl_mean"] <= 0.001 and result["decode_path"]["kl_mean"] <= 0.001
    assert agree >= 32, (ref_greedy, greedy)
