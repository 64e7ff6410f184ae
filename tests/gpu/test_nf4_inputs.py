"""The element-wise steps that write x in the tensor-core kernel's operand order too
(`llm.serving.nf4_inputs`) on the GPU: eager PyTorch's bits, the copy in operand order, and the fused
launch after them reading it: the same bits as the launch that copies x itself, in graph replays with
the launch started early (device tool; skipped without CUDA). The CPU runs them interpreted:
tests/test_nf4_inputs_interpreted.py."""

from __future__ import annotations

import json

import pytest
import torch

from tests.gpu.test_nf4_kernels import assert_replays_follow_new_inputs, layouts, projection_and_input

pytestmark = pytest.mark.gpu


def _real_values(xq: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    from llm.serving import nf4_mma

    row_of_value = nf4_mma.operand_order(torch.arange(16, device=xq.device)[:, None].expand(16, k).float())
    return row_of_value < rows  # the kernel reads only real rows' values


@pytest.mark.parametrize("rows", [2, 5, 16])
def test_the_add_and_norm_are_eagers_and_written_in_operand_order(rows):
    from llm.serving import nf4_inputs, nf4_mma
    from llm.serving.mistral_decoder import _add_rms_norm, _rms_norm

    k = 4096
    residual, delta = (torch.randn(2, rows, k, device="cuda:0") * 3).to(torch.bfloat16)
    weight = (torch.rand(k, device="cuda:0") + 0.5).to(torch.bfloat16)
    h, x, xq = nf4_inputs.add_norm_operand_order(residual, delta, weight, 1e-5)
    eager_h, eager_x = _add_rms_norm(residual, delta, weight, 1e-5)
    assert torch.equal(h, eager_h)
    # The sum of squares in another order than eager's: its scale may differ in the last bit, and a
    # normalized value then by a rounding step, rarely
    differ = (x != eager_x).float().mean().item()
    assert ((x.float() - eager_x.float()).abs() <= eager_x.float().abs() * 2**-7).all()
    assert differ < 0.01, differ
    real = _real_values(xq, rows, k)
    assert torch.equal(xq[real], nf4_mma.operand_order(x)[real])
    print("NF4_INPUTS " + json.dumps({"rows": rows, "norm_values_off_eager": differ,
                                      "of_eagers_scale": torch.equal(x, _rms_norm(h, weight, 1e-5))}))


@pytest.mark.parametrize("rows", [2, 16])
def test_silu_mul_is_eagers_bit_for_bit_and_written_in_operand_order(rows):
    from llm.serving import nf4_inputs, nf4_mma
    from llm.serving.mistral_decoder import _silu_mul

    inter = 14336
    gate_up = (torch.randn(rows, 2 * inter, device="cuda:0") * 4).to(torch.bfloat16)
    x, xq = nf4_inputs.silu_mul_operand_order(gate_up)
    assert torch.equal(x, _silu_mul(gate_up))
    real = _real_values(xq, rows, inter)
    assert torch.equal(xq[real], nf4_mma.operand_order(x)[real])


@pytest.mark.parametrize("rows", [5, 16])
@pytest.mark.parametrize("name", ["qkv", "gate_up", "down"])
def test_a_fused_launch_after_them_gives_its_own_copys_bits_in_graph_replays(rows, name):
    # The fused launch that reads x in operand order from the step before it starts its weight loop
    # right after that step is done: it must read this replay's copy, and compute what the launch
    # that copies x itself computes, bit for bit (the same t, the same x values).
    from llm.serving import nf4_inputs, nf4_kernels, nf4_mma

    projection, _ = projection_and_input(name, rows)
    k = projection.weight.shape[1]
    lora = projection.lora
    norm_weight = (torch.rand(k, device="cuda:0") + 0.5).to(torch.bfloat16)
    fused = [c for c in layouts(projection, rows) if c.kind == "mma" and c.fuse_a]
    assert fused
    # a spread of the 14-17 fused layouts (tiles, x prefetch, groups ahead, shared lookups, the last one's
    # K split), compiled at once: each is two NVRTC compiles of 1-3 s
    picked = list(dict.fromkeys(fused[::4] + fused[-1:]))
    code, rank = projection.weight.code, lora.rank
    nf4_mma.precompile([(code, rows, k, rank, nf4_kernels.mma_layout(c), given) for c in picked
                        for given in (True, False)], threads=8)
    for config in picked:
        def step(inputs: torch.Tensor, given: bool = True, config=config) -> torch.Tensor:  # noqa: ANN001
            if name == "down":
                x, xq = nf4_inputs.silu_mul_operand_order(inputs)
            else:
                _, x, xq = nf4_inputs.add_norm_operand_order(inputs[0], inputs[1], norm_weight, 1e-5)
            if not given:
                return nf4_kernels.nf4_lora_linear(x, projection.weight, lora, True, config)
            return nf4_kernels._mma_with_xq(x, xq, projection.weight, lora, True, nf4_kernels.mma_layout(config))

        inputs = torch.randn((2, rows, k) if name != "down" else (rows, 2 * k), device="cuda:0").to(torch.bfloat16)
        assert torch.equal(step(inputs), step(inputs, given=False)), config.label
        assert_replays_follow_new_inputs(step, inputs, config.label)
        assert int(lora.counters("fused", 0, inputs.device).abs().sum()) == 0, config.label
