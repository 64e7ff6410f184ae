"""`nf4`'s fused prompt base on the GPU: each weight tile dequantized in registers and multiplied on the
tensor cores with cuBLAS's K split, so that a prompt's products keep the bits of bitsandbytes' dequantize +
F.linear (the seed's, for the rows where bitsandbytes takes that path) without the bf16 copy of every weight
(run 47, `bench/prompt_gemm_bits.py`)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from tests.gpu.test_nf4_kernels import _quantized, assert_replays_follow_new_inputs, projection_and_input

pytestmark = pytest.mark.gpu

# The seed's original projections: (N, K)
PART_SHAPES = {"q_o": (4096, 4096), "k_v": (1024, 4096), "gate_up": (14336, 4096), "down": (4096, 14336)}


@pytest.mark.parametrize("rows", [32, 64, 128, 256, 384, 512])
@pytest.mark.parametrize("shape", list(PART_SHAPES))
def test_a_split_with_cublas_bits_is_found_for_every_prompt_shape(rows, shape):
    from llm.serving import nf4_kernels
    from llm.serving.nf4 import NF4Matrix

    n, k = PART_SHAPES[shape]
    weight = NF4Matrix.from_bnb(_quantized(n, k, seed=n + k))
    nf4_kernels.plan_prompt_base(rows, weight)
    report = nf4_kernels.PROMPT_BASE_REPORT[f"m{rows}_{n}x{k}"]
    print("NF4_PROMPT_BASE " + json.dumps(report))
    assert report.get("cublas_bits"), report
    # other rows of x (and the real weights' values, not the planning's): the same bits again
    plan = nf4_kernels.PROMPT_BASE_PLANS[(rows, n, k, 0)]
    x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda:0") * 3
    fused = nf4_kernels.prompt_base(x, weight, plan.splits, plan.k_per_split, plan.warps)
    assert torch.equal(fused, F.linear(x, weight.dequantize(torch.bfloat16)))


@pytest.mark.parametrize("rows", [32, 64, 128])
@pytest.mark.parametrize("name", ["qkv", "gate_up", "down"])
def test_prompts_through_the_fused_base_are_the_reference_path_bit_for_bit_in_graph_replays(rows, name, monkeypatch):
    """Every original projection's base through the fused kernel (forced, whatever the planning's timing
    said), its part of the output written beside the others', PEFT's LoRA products added: the reference
    path's bits, eagerly and in a CUDA graph replayed on new prompts."""
    from llm.serving import nf4_kernels

    projection, x = projection_and_input(name, rows)
    projection.use_kernels = True
    monkeypatch.setattr(nf4_kernels, "SERVE_FUSED_PROMPT_BASE", True)
    k = projection.weight.shape[1]
    for start, end, _ in projection.lora.segments:
        nf4_kernels.plan_prompt_base(rows, nf4_kernels._part(projection.weight, start, end))
        key = (rows, end - start, k, 0)
        plan = nf4_kernels.PROMPT_BASE_PLANS[key]
        assert plan is not None, nf4_kernels.PROMPT_BASE_REPORT
        monkeypatch.setitem(nf4_kernels.PROMPT_BASE_PLANS, key, dataclasses.replace(plan, faster=True))
    assert nf4_kernels._fused_prompt_base(x, projection.weight, projection.lora) is not None
    out, reference = projection(x), projection.reference(x)
    assert torch.equal(out, reference), (out.float() - reference.float()).abs().max()
    assert_replays_follow_new_inputs(projection, x, f"{name} fused prompt base", replays=3)
