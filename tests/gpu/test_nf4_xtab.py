"""The one-row x-table kernel (llm/serving/nf4_xtab.py) on the GPU: both phases in one launch, the
row chunks' blocks waiting for each other, against the exact NF4 function and the reference path,
replayed from CUDA graphs as serving runs it (device tool; skipped without CUDA)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.gpu.test_nf4_kernels import (
    assert_replays_follow_new_inputs,
    assert_replays_repeat,
    layouts,
    projection_and_input,
)

pytestmark = pytest.mark.gpu


def _exact(projection, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """x @ (code * absmax).T + the LoRA, in float64: the NF4 weights before any rounding."""
    weight = projection.weight
    n, k = weight.shape
    nibbles = torch.stack((weight.packed >> 4, weight.packed & 0xF), dim=-1).reshape(n, k).long()
    values = (weight.code.double()[nibbles].reshape(n, -1, 64) * weight.absmax.double().unsqueeze(-1)).reshape(n, k)
    return x.double() @ values.T + projection.lora.delta(x).double()


@pytest.mark.parametrize("name", ["qkv", "gate_up", "down"])
def test_the_x_table_kernel_is_as_close_to_the_exact_function_as_the_reference_path(name):
    from llm.serving import nf4_kernels

    projection, x = projection_and_input(name, 1)
    configs = [c for c in layouts(projection, 1) if c.kind == "xtab"]
    assert configs, "no x-table layout here"
    reference = projection.reference(x)
    exact = _exact(projection, x)
    reference_error = (reference.double() - exact).abs().mean().item()
    for config in configs:
        out = nf4_kernels.nf4_lora_linear(x, projection.weight, projection.lora, True, config)
        assert not out.isnan().any()
        assert nf4_kernels.matches_reference(out, reference), config.label
        error = (out.double() - exact).abs().mean().item()
        print("NF4_XTAB " + json.dumps({"name": name, "config": config.label, "mean_abs_error": error,
                                        "reference_path_mean_abs_error": reference_error}))
        # no bf16 weight rounding: closer to the exact function than the path that rounds them
        assert error <= reference_error, (config.label, error, reference_error)


@pytest.mark.parametrize("name", ["qkv", "gate_up", "down"])
def test_the_one_byte_absmax_gives_the_float32_absmax_results_bit_for_bit(name):
    """bitsandbytes' double-quantized absmax, one byte each as it stores them and decoded in the kernel,
    gives the same output bits as the float32 values decoded at load time (a quarter of their bytes)."""
    from dataclasses import replace

    from llm.serving import nf4_kernels
    from llm.serving.nf4 import NF4Projection

    projection, x = projection_and_input(name, 1)
    assert projection.weight.compact is not None  # bitsandbytes' CUDA decode is the one the kernel repeats
    as_float32 = NF4Projection(replace(projection.weight, compact=None), projection.lora)
    for config in _xtab_configs(projection):
        out = nf4_kernels.nf4_lora_linear(x, projection.weight, projection.lora, True, config)
        expected = nf4_kernels.nf4_lora_linear(x, as_float32.weight, as_float32.lora, True, config)
        assert torch.equal(out, expected), config.label


@pytest.mark.parametrize("name", ["qkv", "down"])
def test_the_x_table_kernel_repeats_its_bits_in_graphs_and_leaves_its_counters_at_zero(name):
    # The blocks of a row chunk wait for each other's slice sums on counters the last to leave zeroes:
    # a replay that found them raised would read sums too early (other bits) or never wait.
    from llm.serving import nf4_kernels

    projection, x = projection_and_input(name, 1)
    for config in [c for c in layouts(projection, 1) if c.kind == "xtab"]:
        def run(config=config):  # noqa: ANN001, ANN202
            return nf4_kernels.nf4_lora_linear(x, projection.weight, projection.lora, True, config)

        first = run()
        assert torch.equal(run(), first), config.label
        assert_replays_repeat(run, first, projection.lora, "xtab", config.label, replays=5)


def _xtab_configs(projection) -> list:  # noqa: ANN001
    configs = [c for c in layouts(projection, 1) if c.kind == "xtab"]
    assert configs, "no x-table layout here"
    return configs


def test_down_after_silu_mul_in_one_launch_equals_the_two_steps_bit_for_bit():
    """The MLP's `silu(gate) * up` inside down's launch: the same bits as eager PyTorch's two ops
    (accurate expf, IEEE division, each op rounded to bf16) followed by the plain kernel."""
    from llm.serving import nf4_mma, nf4_xtab
    from llm.serving.mistral_decoder import _silu_mul

    projection, _ = projection_and_input("down", 1)
    n, k = projection.weight.shape
    gate_up = torch.randn((1, 2 * k), dtype=torch.bfloat16, device="cuda:0") * 3
    code = nf4_mma.code_values(projection.weight.code)
    seg1, seg2 = projection.lora.part_starts(n)
    for config in _xtab_configs(projection):
        two_steps = nf4_xtab.nf4_xtab_linear(_silu_mul(gate_up), projection.weight, projection.lora, seg1, seg2, True,
                                             config.num_warps, code)

        def run(config=config):  # noqa: ANN001, ANN202
            return nf4_xtab.nf4_xtab_after_silu_mul(gate_up, projection.weight, projection.lora, seg1, seg2, True,
                                                    config.num_warps, code)

        assert torch.equal(run(), two_steps), config.label
        assert_replays_repeat(run, two_steps, projection.lora, "xtab", config.label)


@pytest.mark.parametrize("name", ["qkv", "gate_up"])
def test_add_and_norm_in_one_launch_give_the_residual_bit_for_bit_and_the_normed_product(name):
    """The residual add and MistralRMSNorm inside the projection's launch: the residual stream's next
    value exactly, the product as the two steps give it (the squares summed in another order may move
    a normed input by one rounding step)."""
    from llm.serving import nf4_kernels, nf4_mma, nf4_xtab
    from llm.serving.mistral_decoder import _add_rms_norm

    projection, _ = projection_and_input(name, 1)
    n, k = projection.weight.shape
    residual = torch.randn((1, k), dtype=torch.bfloat16, device="cuda:0") * 4
    delta = torch.randn((1, k), dtype=torch.bfloat16, device="cuda:0")
    norm_weight = (1 + 0.1 * torch.randn((k,), device="cuda:0")).to(torch.bfloat16)
    expected_h, normed = _add_rms_norm(residual, delta, norm_weight, 1e-5)
    code = nf4_mma.code_values(projection.weight.code)
    seg1, seg2 = projection.lora.part_starts(n)
    for config in _xtab_configs(projection):
        two_steps = nf4_xtab.nf4_xtab_linear(normed, projection.weight, projection.lora, seg1, seg2, True,
                                             config.num_warps, code)
        h, y = nf4_xtab.nf4_xtab_after_add_norm(residual, delta, norm_weight, 1e-5, projection.weight,
                                                 projection.lora, seg1, seg2, True, config.num_warps, code)
        assert torch.equal(h, expected_h), config.label
        assert nf4_kernels.matches_reference(y, two_steps), config.label
        same = (y == two_steps).float().mean().item()
        print("NF4_XTAB_ADD_NORM " + json.dumps({"name": name, "config": config.label, "bits_equal": same}))
        assert same > 0.9, (config.label, same)

        def run(config=config):  # noqa: ANN001, ANN202
            return nf4_xtab.nf4_xtab_after_add_norm(residual, delta, norm_weight, 1e-5, projection.weight,
                                                     projection.lora, seg1, seg2, True, config.num_warps, code)[1]

        assert_replays_repeat(run, y, projection.lora, "xtab", config.label)


def test_a_chained_launch_reads_this_steps_output_of_the_launch_before_it_in_graph_replays():
    """gate/up's x-table launch lets down's start early (down's weights stream in meanwhile): down must
    still read this step's gate/up output, never the one of the replay before (run 32: a load hoisted
    above the wait did, and the decode step's logits turned to NaN)."""
    from llm.serving import nf4_mma, nf4_xtab

    gate_up, x = projection_and_input("gate_up", 1)
    down, _ = projection_and_input("down", 1)
    code = nf4_mma.code_values(gate_up.weight.code)
    gate_up_warps = _xtab_configs(gate_up)[0].num_warps
    down_warps = _xtab_configs(down)[0].num_warps

    def step(x: torch.Tensor) -> torch.Tensor:
        first = nf4_xtab.nf4_xtab_linear(x, gate_up.weight, gate_up.lora,
                                         *gate_up.lora.part_starts(gate_up.weight.shape[0]), True, gate_up_warps, code)
        return nf4_xtab.nf4_xtab_after_silu_mul(first, down.weight, down.lora,
                                                *down.lora.part_starts(down.weight.shape[0]), True, down_warps, code)

    assert_replays_follow_new_inputs(step, x, "gate_up -> down")


@pytest.mark.parametrize("add_norm", [False, True])
def test_the_rope_epilogue_writes_what_the_rope_kernel_writes_for_the_plain_launchs_output(add_norm):
    """q/k/v's launch with the rope kernel's work in its epilogue (`RopeWrite`): q, and the pool's k and v
    at the row's slot, the same bits as `triton_kernels.rope_kv_write_paged` on the launch's plain
    output; the rest of the pool untouched; the same again from graph replays."""
    from llm.serving import nf4_mma, nf4_xtab, triton_kernels

    projection, x = projection_and_input("qkv", 1)
    n, k = projection.weight.shape
    code = nf4_mma.code_values(projection.weight.code)
    seg1, seg2 = projection.lora.part_starts(n)
    shape = nf4_xtab.RopeShape(num_heads=32, num_kv_heads=8, head_dim=128, kv_block=32)
    angles = torch.rand((4096, 64), device="cuda:0") * 6
    cos = torch.cat((angles.cos(), angles.cos()), dim=1).to(torch.bfloat16)
    sin = torch.cat((angles.sin(), angles.sin()), dim=1).to(torch.bfloat16)
    positions = torch.tensor([1000], device="cuda:0")  # page 31, offset 8
    table = torch.randperm(64, device="cuda:0").to(torch.int32)[None, :] + 1
    residual = torch.randn((1, k), dtype=torch.bfloat16, device="cuda:0") * 4
    norm_weight = (1 + 0.1 * torch.randn((k,), device="cuda:0")).to(torch.bfloat16)

    def launch(warps: int, rope: nf4_xtab.RopeWrite | None) -> torch.Tensor:
        if add_norm:
            return nf4_xtab.nf4_xtab_after_add_norm(residual, x, norm_weight, 1e-5, projection.weight,
                                                     projection.lora, seg1, seg2, True, warps, code, rope=rope)[1]
        return nf4_xtab.nf4_xtab_linear(x, projection.weight, projection.lora, seg1, seg2, True, warps, code,
                                        rope=rope)

    for config in _xtab_configs(projection):
        assert nf4_xtab.rope_serves(projection.weight, config.num_warps, x.device, shape), config.label
        expected_pools = [torch.randn((66, 8, 32, 128), device="cuda:0").to(torch.bfloat16) for _ in range(2)]
        pools = [p.clone() for p in expected_pools]
        expected_q = triton_kernels.rope_kv_write_paged(launch(config.num_warps, None), cos, sin, positions, table,
                                                        *expected_pools, 32, 8, 128)
        rope = nf4_xtab.RopeWrite(shape, cos, sin, positions, table, *pools)
        q = launch(config.num_warps, rope)
        assert torch.equal(q, expected_q), config.label
        assert torch.equal(pools[0], expected_pools[0]) and torch.equal(pools[1], expected_pools[1]), config.label
        assert_replays_repeat(lambda config=config, rope=rope: launch(config.num_warps, rope), expected_q,
                              projection.lora, "xtab", config.label)


def test_o_combining_the_attention_splits_in_its_launch_gives_o_of_the_reduce_kernels_output():
    """o's launch with the split attention's combine inside (ATTN_COMBINE): the reduce kernel's output
    through the plain launch, but for a rounding step of the combined input here and there (float32 sums
    in another order), from real partials of a paged pool; the same bits again from graph replays."""
    from llm.serving import nf4_kernels, nf4_mma, nf4_xtab, triton_kernels
    from tests.gpu.test_nf4_kernels import _projection

    projection = _projection([(4096, 0)], 4096)
    n, k = projection.weight.shape
    code = nf4_mma.code_values(projection.weight.code)
    seg1, seg2 = projection.lora.part_starts(n)
    k_pool, v_pool = (torch.randn((130, 8, 32, 128), device="cuda:0").to(torch.bfloat16) for _ in range(2))
    table = (torch.randperm(128, device="cuda:0") + 1).to(torch.int32)[None, :]
    q = torch.randn((1, 4096), dtype=torch.bfloat16, device="cuda:0")
    for position in (5, 700, 4095):
        positions = torch.tensor([position], device="cuda:0")
        acc, ml = triton_kernels.paged_decode_partials(q, k_pool, v_pool, table, positions, 128**-0.5, 32)
        shape = nf4_xtab.AttentionShape(8, 4, acc.shape[2], 128, 32, triton_kernels.PAGES_PER_SPLIT)
        partials = nf4_xtab.AttentionPartials(shape, acc, ml, positions)
        attention_out = triton_kernels.paged_decode_reduce(acc, ml, positions, 32)
        for config in _xtab_configs(projection):
            two_steps = nf4_xtab.nf4_xtab_linear(attention_out, projection.weight, projection.lora, seg1, seg2, True,
                                                 config.num_warps, code)

            def run(config=config, partials=partials):  # noqa: ANN001, ANN202
                return nf4_xtab.nf4_xtab_after_attention(partials, projection.weight, projection.lora, seg1, seg2,
                                                         True, config.num_warps, code)

            out = run()
            assert nf4_kernels.matches_reference(out, two_steps), (position, config.label)
            same = (out == two_steps).float().mean().item()
            print("NF4_XTAB_ATTN_COMBINE " + json.dumps({"position": position, "config": config.label,
                                                         "bits_equal": same}))
            assert same > 0.9, (position, config.label, same)
            assert_replays_repeat(run, out, projection.lora, "xtab", config.label)
