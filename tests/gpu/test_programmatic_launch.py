"""Programmatic dependent launch on the GPU (Hopper and newer): a decode kernel scheduled while the
kernel before it still runs must read that kernel's results, not what its buffers held before.

The kernel before is a slow writer that lets the next kernel be scheduled at once
(`griddepcontrol.launch_dependents`) and writes its output only after ~0.2 ms: a kernel that read
its input before `griddepcontrol.wait` would see the old contents (zeros)."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.test_nf4_kernels import layouts, projection_and_input

pytestmark = pytest.mark.gpu

triton = pytest.importorskip("triton")
tl = triton.language

if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
    pytest.skip("programmatic dependent launch needs compute capability 9.0+", allow_module_level=True)

from llm.serving import programmatic_launch, triton_kernels  # noqa: E402

SLOW_NS = 200_000


@triton.jit
def _slow_copy_kernel(src_ptr, dst_ptr, n, DELAY_NS: tl.constexpr, BLOCK: tl.constexpr):
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()  # the next kernel may be scheduled before dst is written
    start = tl.extra.cuda.globaltimer()
    while tl.extra.cuda.globaltimer() - start < DELAY_NS:
        pass
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=offsets < n), mask=offsets < n)


def _written_slowly(source: torch.Tensor) -> torch.Tensor:
    """A zeroed copy of `source` that a slow kernel fills, launched programmatically."""
    destination = torch.zeros_like(source)
    block = 1024
    _slow_copy_kernel[(triton.cdiv(source.numel(), block),)](
        source, destination, source.numel(), DELAY_NS=SLOW_NS, BLOCK=block, launch_pdl=True)
    return destination


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
        late_x = _written_slowly(x)
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
        source = _written_slowly(qkv) if late else qkv  # the kernel right before the rotary one
        q = triton_kernels.rope_kv_write_paged(source, cos, sin, positions, table, k_pool, v_pool, heads, kv_heads,
                                               head_dim)
        return q, k_pool, v_pool

    with programmatic_launch.serial_launches():
        expected = rotate(late=False)
    served = rotate(late=True)
    torch.cuda.synchronize()
    for ours, theirs in zip(served, expected, strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize(("warps", "tiles", "ahead", "shared_lookups"), [(4, 1, 2, 0), (4, 2, 1, 2), (8, 1, 2, 0)])
def test_the_occupancy_the_timeline_reports_follows_registers_and_shared_memory(warps, tiles, ahead, shared_lookups):
    # bench/mma_timeline.py's blocks per SM (run 46: q/k/v's 16-row layout, 134 registers, 3 of 4 warps;
    # gate/up's, 4 for its shared memory), against Hopper's limits: 64K registers in 256-register warp
    # allocations, 228 KB of shared memory with 1 KB reserved a block, 64 warps, 32 blocks
    from llm.serving import nf4_mma

    projection, _ = projection_and_input("qkv", 16)
    registers, per_sm = nf4_mma.occupancy(projection.weight.code, 16, warps, 32, tiles, False, ahead, 4096, True,
                                          shared_lookups, 1)
    assert 32 <= registers <= 255
    by_registers = 65536 // (-(-registers * 32 // 256) * 256 * warps)
    shared = nf4_mma.static_shared_bytes(warps, 16, 32, tiles, shared_lookups)
    by_shared = (228 * 1024) // (shared + 1024)
    assert per_sm == min(by_registers, by_shared, 64 // warps, 32), (registers, shared)
