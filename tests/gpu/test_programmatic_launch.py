"""Programmatic dependent launch on the GPU (Hopper and newer): a decode kernel scheduled while the
kernel before it still runs must read that kernel's results, not what its buffers held before.

The kernel before is a slow writer (`tests.gpu.slow_writer`)."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.test_nf4_kernels import layouts, projection_and_input

pytestmark = pytest.mark.gpu

pytest.importorskip("triton")

if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
    pytest.skip("programmatic dependent launch needs compute capability 9.0+", allow_module_level=True)

from llm.serving import programmatic_launch, triton_kernels  # noqa: E402
from tests.gpu.slow_writer import written_slowly  # noqa: E402


def test_programmatic_launch_is_on_here():
    assert programmatic_launch.enabled("cuda")
    assert triton_kernels.programmatic_options(torch.device("cuda"))["GDC"]


@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("name", ["qkv", "gate_up", "down"])
def test_the_nf4_kernels_wait_for_the_kernel_before_them(rows, name):
    from llm.serving import nf4_kernels

    projection, x = projection_and_input(name, rows)
    configs = [c for c in layouts(projection, rows) if c.kind == "mma"]
    assert configs
    for config in configs:
        with programmatic_launch.serial_launches():
            expected = nf4_kernels.nf4_lora_linear(x, projection.weight, projection.lora, True, config)
        late_x = written_slowly(x)
        served = nf4_kernels.nf4_lora_linear(late_x, projection.weight, projection.lora, True, config)
        torch.cuda.synchronize()
        assert torch.equal(served.view(torch.int16), expected.view(torch.int16)), config.label


def test_the_rotary_kernel_waits_for_the_projection_before_it():
    heads, kv_heads, head_dim, block_size = 32, 8, 128, 16
    qkv = torch.randn(2, (heads + 2 * kv_heads) * head_dim, dtype=torch.bfloat16, device="cuda:0")
    positions = torch.tensor([5, 40], device="cuda:0")
    table = torch.arange(1, 9, dtype=torch.int32, device="cuda:0").view(2, 4)
    # [position, head_dim] tables, as the decoder builds them (run 44: half as wide, positions 32-63 read
    # past their end, and row 1 then depended on the memory after them: the one failure in run 43)
    angles = torch.outer(torch.arange(64, device="cuda:0").float(), torch.rand(head_dim // 2, device="cuda:0"))
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().contiguous(), angles.sin().contiguous()

    def rotate(late: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k_pool = torch.zeros(9, kv_heads, block_size, head_dim, dtype=torch.bfloat16, device="cuda:0")
        v_pool = torch.zeros_like(k_pool)
        source = written_slowly(qkv) if late else qkv  # the kernel right before the rotary one
        q = triton_kernels.rope_kv_write_paged(source, cos, sin, positions, table, k_pool, v_pool, heads, kv_heads,
                                               head_dim)
        return q, k_pool, v_pool

    with programmatic_launch.serial_launches():
        expected = rotate(late=False)
    for attempt in range(20):  # a race may show in some launches only (run 43 saw one failure in seven full runs)
        served = rotate(late=True)
        torch.cuda.synchronize()
        for name, ours, theirs in zip(("q", "k pool", "v pool"), served, expected, strict=True):
            assert torch.equal(ours, theirs), _difference(attempt, name, ours, theirs)


def _difference(attempt: int, name: str, ours: torch.Tensor, theirs: torch.Tensor) -> str:
    """Which rows differ, and how many of their values are zeros (what a read before the writer finished gives)."""
    rows = [r for r in range(ours.shape[0]) if not torch.equal(ours[r], theirs[r])]
    zeros = [f"{(ours[r] == 0).float().mean().item():.2f}" for r in rows]
    return f"launch {attempt}: {name} rows {rows} differ; share of zeros in them {zeros}"
