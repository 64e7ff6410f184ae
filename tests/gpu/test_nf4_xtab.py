"""The one-row x-table kernel (llm/serving/nf4_xtab.py) on the GPU: both phases in one launch, the
row chunks' blocks waiting for each other, against the exact NF4 function and the reference path,
replayed from CUDA graphs as serving runs it (device tool; skipped without CUDA)."""

from __future__ import annotations

import json

import pytest
import torch

from llm.serving import nf4_xtab
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
                                             config.xtab_layout, code)

        def run(config=config):  # noqa: ANN001, ANN202
            return nf4_xtab.nf4_xtab_after_silu_mul(gate_up, projection.weight, projection.lora, seg1, seg2, True,
                                                    config.xtab_layout, code)

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
                                             config.xtab_layout, code)
        h, y = nf4_xtab.nf4_xtab_after_add_norm(residual, delta, norm_weight, 1e-5, projection.weight,
                                                 projection.lora, seg1, seg2, True, config.xtab_layout, code)
        assert torch.equal(h, expected_h), config.label
        assert nf4_kernels.matches_reference(y, two_steps), config.label
        same = (y == two_steps).float().mean().item()
        print("NF4_XTAB_ADD_NORM " + json.dumps({"name": name, "config": config.label, "bits_equal": same}))
        assert same > 0.9, (config.label, same)

        def run(config=config):  # noqa: ANN001, ANN202
            return nf4_xtab.nf4_xtab_after_add_norm(residual, delta, norm_weight, 1e-5, projection.weight,
                                                     projection.lora, seg1, seg2, True, config.xtab_layout, code)[1]

        assert_replays_repeat(run, y, projection.lora, "xtab", config.label)


@pytest.mark.parametrize("layout", nf4_xtab.SERVED_LAYOUTS, ids=lambda layout: layout.label)
def test_a_chained_launch_reads_this_steps_output_of_the_launch_before_it_in_graph_replays(layout):
    """gate/up's x-table launch lets down's start early (down's weights stream in meanwhile, two groups of
    them with 8x2): down must still read this step's gate/up output, never the one of the replay before
    (run 32: a load hoisted above the wait did, and the decode step's logits turned to NaN)."""
    from llm.serving import nf4_mma

    gate_up, x = projection_and_input("gate_up", 1)
    down, _ = projection_and_input("down", 1)
    code = nf4_mma.code_values(gate_up.weight.code)

    def step(x: torch.Tensor) -> torch.Tensor:
        first = nf4_xtab.nf4_xtab_linear(x, gate_up.weight, gate_up.lora,
                                         *gate_up.lora.part_starts(gate_up.weight.shape[0]), True, layout, code)
        return nf4_xtab.nf4_xtab_after_silu_mul(first, down.weight, down.lora,
                                                *down.lora.part_starts(down.weight.shape[0]), True, layout, code)

    assert_replays_follow_new_inputs(step, x, f"gate_up -> down {layout.label}")


# Two row groups ahead (8x2, served since run 39): its loads run further ahead of its lookups
@pytest.mark.parametrize("name", ["qkv", "gate_up", "down"])
def test_two_groups_ahead_give_the_plain_layouts_bits_in_graph_replays(name):
    """The same sums in the same order as the plain layout with as many warps."""
    from llm.serving import nf4_mma

    projection, x = projection_and_input(name, 1)
    layout = nf4_xtab.XtabLayout(8, 2)
    code = nf4_mma.code_values(projection.weight.code)
    seg1, seg2 = projection.lora.part_starts(projection.weight.shape[0])
    plain = nf4_xtab.nf4_xtab_linear(x, projection.weight, projection.lora, seg1, seg2, True,
                                     nf4_xtab.XtabLayout(layout.warps), code)

    def run() -> torch.Tensor:
        return nf4_xtab.nf4_xtab_linear(x, projection.weight, projection.lora, seg1, seg2, True, layout, code)

    label = f"{name} {layout.label}"
    assert torch.equal(run(), plain), label
    assert_replays_repeat(run, plain, projection.lora, "xtab", label, replays=5)
