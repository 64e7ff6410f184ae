"""The tensor-core kernel's own CUDA text, run on the CPU (tests/fakes/cuda_emulation.hpp: one
std::thread per CUDA thread, mma.sync from the PTX ISA's fragment layout), against the reference
path: the lane-to-weight mapping, the x operand order, the K split across warps, the x prefetch
(its addresses checked) and the LoRA epilogue. The real kernel runs in tests/gpu/test_nf4_kernels.py on a GPU."""

from __future__ import annotations

import ctypes
import shutil

import pytest
import torch

from llm.serving import nf4_kernels, nf4_mma
from llm.serving.nf4 import LoraParts, NF4Matrix, NF4Projection
from tests.fakes.cuda_emulation import NF4_CODE, build_emulated

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the emulated kernel")

LAUNCHER = r"""
// Returns the number of out-of-bounds global reads.
extern "C" long launch(int grid, int threads, const void* words, const float* absmax, void* xq, float* t,
                       const float* lora_b, void* y, int M, int K, int ldy, double scaling, int seg1, int seg2,
                       int RT, int t_splits, int round_lora_first, const void* x, int ldx, const float* lora_a,
                       float* a_partial, int* counters, int la_blocks, float* split_sums, int* tile_arrivals) {
    out_of_bounds_reads = 0;
    launch_blocks(grid, threads, [=] {
        nf4_mma_kernel((const uint4*)words, absmax, (uint2*)xq, t, lora_b, (u16*)y, M, K, ldy, scaling, seg1, seg2,
                       RT, t_splits, round_lora_first, (const u16*)x, ldx, lora_a, a_partial, counters, la_blocks,
                       split_sums, tile_arrivals);
    });
    return out_of_bounds_reads;
}
"""
RANK = 32


def _build(tmp_path_factory: pytest.TempPathFactory, warps: int, rows: int, tiles: int, prefetch: bool,
           ahead: int, k: int, fuse_a: bool = False, shared_lookups: int = 0, k_splits: int = 1) -> ctypes.CDLL:
    folder = tmp_path_factory.mktemp(
        f"nf4_w{warps}_r{rows}_t{tiles}_p{int(prefetch)}_a{ahead}_k{k}_f{int(fuse_a)}_s{shared_lookups}_ks{k_splits}")
    kernel_source = nf4_mma.source(NF4_CODE, warps, rows, RANK, tiles, prefetch, ahead, k, fuse_a,
                                   shared_lookups=shared_lookups, k_splits=k_splits)
    library = build_emulated(folder, kernel_source, LAUNCHER)
    library.launch.restype = ctypes.c_long
    library.launch.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 6 + [
        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_double] + [ctypes.c_int] * 5 + [
        ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 2
    return library


def _projection(n: int, k: int, seed: int) -> NF4Projection:
    g = torch.Generator().manual_seed(seed)
    weight = NF4Matrix(
        packed=torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g),
        absmax=torch.rand((n, k // 64), generator=g) * 0.05 + 0.005,
        code=torch.tensor(NF4_CODE, dtype=torch.float32),
    )
    half = n // 2  # two parts, as gate/up: each its own A rows and B
    lora = LoraParts(
        a=torch.randn((2 * RANK, k), generator=g) * 0.02,
        b=torch.randn((n, RANK), generator=g) * 0.02,
        segments=((0, half, 0), (half, n, RANK)),
        rank=RANK,
        scaling=0.25,
    )
    return NF4Projection(weight, lora)


def _run(library: ctypes.CDLL, projection: NF4Projection, x: torch.Tensor, warps: int, tiles: int,
         counters: torch.Tensor | None = None, k_splits: int = 1, arrivals: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's output; with `counters`, the fused kernel's, and with `k_splits`, the tile arrivals
    (both left as the kernel found them)."""
    m, k = x.shape
    n = projection.weight.shape[0]
    lora = projection.lora
    rt = lora.a.shape[0]
    fuse_a = counters is not None
    counters = torch.zeros(1, dtype=torch.int32) if counters is None else counters
    a_partial = torch.full((k // nf4_mma.GROUP, m, rt), float("nan"))
    if fuse_a:  # the launch writes both; stale values must not matter
        xq = torch.full((16 * k,), float("nan"), dtype=torch.bfloat16)
        t = torch.full((m, rt), float("nan"))
        splits = 1
    else:
        xq = nf4_mma.operand_order(x).contiguous()
        cut = k // 2  # two split-K partial sums, as the LoRA A kernel leaves them
        t = torch.stack([x[:, :cut].float() @ lora.a[:, :cut].T,
                         x[:, cut:].float() @ lora.a[:, cut:].T]).contiguous()
        splits = 2
    # the grid as `nf4_mma_linear` launches it
    la_blocks, weight_blocks = nf4_mma.launch_blocks(m, n, k, rt, warps, tiles, fuse_a, k_splits)
    y = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
    split_sums = torch.full((k_splits, m, n), float("nan"))  # the launch writes them before it reads them
    arrivals = torch.zeros(n // 16, dtype=torch.int32) if arrivals is None else arrivals
    for buffer in (projection.weight.packed, projection.weight.absmax, xq, t, lora.b, x, lora.a, a_partial, split_sums):
        library.add_buffer(buffer.data_ptr(), buffer.numel() * buffer.element_size())
    out_of_bounds = library.launch(
        la_blocks + weight_blocks, warps * 32, projection.weight.packed.data_ptr(),
        projection.weight.absmax.data_ptr(), xq.data_ptr(), t.data_ptr(), lora.b.data_ptr(), y.data_ptr(), m, k, n,
        lora.scaling, *lora.part_starts(n), rt, splits, 1, x.data_ptr(), x.stride(0), lora.a.data_ptr(),
        a_partial.data_ptr(), counters.data_ptr(), la_blocks, split_sums.data_ptr(), arrivals.data_ptr())
    assert out_of_bounds == 0, f"{out_of_bounds} global reads outside the kernel's buffers"
    return y


# (warps, tiles, x prefetch, groups ahead, shared lookups): one tile, two tiles per warp, the x prefetch,
# two groups of weights in registers ahead, and absmax blocks decoded through the shared code pairs
# (one of two, three of four)
VARIANTS = [(4, 1, False, 1, 0), (8, 2, False, 1, 0), (4, 1, True, 1, 0), (4, 2, True, 2, 0), (4, 2, False, 1, 3),
            (8, 1, True, 2, 1)]


@pytest.mark.parametrize(("warps", "tiles", "prefetch", "ahead", "shared_lookups"), VARIANTS)
@pytest.mark.parametrize("rows", [1, 3, 11, 16])
def test_the_kernel_text_computes_the_reference_function(tmp_path_factory, warps, tiles, prefetch, ahead,
                                                         shared_lookups, rows):
    # 5 groups of 256 inputs: some warps get two, some one, some none; with the prefetch, 9 or 11:
    # a warp prefetches several times, its last group none, and two groups ahead ends on either half
    # of its loop.
    k = 256 * ((9 if ahead == 1 else 11) if prefetch else 5)
    library = _build(tmp_path_factory, warps, 8 if rows <= 8 else 16, tiles, prefetch, ahead, k,
                     shared_lookups=shared_lookups)
    projection = _projection(n=64, k=k, seed=rows)
    x = torch.randn((rows, k), generator=torch.Generator().manual_seed(100 + rows)).to(torch.bfloat16)
    out = _run(library, projection, x, warps, tiles)
    reference = projection.reference(x)
    assert not out.isnan().any()  # every output written
    assert nf4_kernels.matches_reference(out, reference), (out.float() - reference.float()).abs().max()


# (warps, tiles, x prefetch, groups ahead, shared lookups) of the fused configurations: more units than
# warps, fewer, and every absmax block decoded through the shared code pairs
@pytest.mark.parametrize(("warps", "tiles", "prefetch", "ahead", "shared_lookups"),
                         [(4, 1, False, 1, 0), (8, 2, True, 2, 0), (4, 2, False, 1, 4)])
@pytest.mark.parametrize("rows", [1, 5, 11])
def test_the_fused_kernel_computes_lora_a_itself_and_leaves_its_counters_at_zero(
        tmp_path_factory, warps, tiles, prefetch, ahead, shared_lookups, rows):
    k = 256 * 5
    library = _build(tmp_path_factory, warps, nf4_mma.fused_kernel_rows(rows), tiles, prefetch, ahead, k, fuse_a=True,
                     shared_lookups=shared_lookups)
    projection = _projection(n=64, k=k, seed=rows)
    x = torch.randn((rows, k), generator=torch.Generator().manual_seed(200 + rows)).to(torch.bfloat16)
    reference = projection.reference(x)
    counters = torch.zeros(nf4_mma.fused_counter_count(projection.lora.a.shape[0]), dtype=torch.int32)
    for _ in range(2):  # the second launch finds the counters as the first left them
        out = _run(library, projection, x, warps, tiles, counters)
        assert not out.isnan().any()
        assert nf4_kernels.matches_reference(out, reference), (out.float() - reference.float()).abs().max()
        assert counters.abs().sum() == 0, counters


# (warps, tiles, groups ahead, fused, k_splits): K split across two, four and eight blocks of a tile,
# with and without the fused LoRA A blocks; 8 groups of 256 inputs, so that with 4 or 8 splits some
# warps have no group of their own
@pytest.mark.parametrize(("warps", "tiles", "ahead", "fuse_a", "k_splits"),
                         [(4, 1, 1, False, 2), (4, 2, 2, True, 4), (8, 1, 1, True, 2), (4, 1, 2, True, 8)])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_blocks_splitting_k_add_up_to_the_reference_function_and_leave_their_counters_at_zero(
        tmp_path_factory, warps, tiles, ahead, fuse_a, k_splits, rows):
    k = 256 * 8
    kernel_rows = nf4_mma.fused_kernel_rows(rows) if fuse_a else 8 if rows <= 8 else 16
    if kernel_rows == 1 and not fuse_a:
        kernel_rows = 8
    library = _build(tmp_path_factory, warps, kernel_rows, tiles, False, ahead, k, fuse_a=fuse_a,
                     k_splits=k_splits)
    projection = _projection(n=64, k=k, seed=rows)
    x = torch.randn((rows, k), generator=torch.Generator().manual_seed(300 + rows)).to(torch.bfloat16)
    reference = projection.reference(x)
    counters = torch.zeros(nf4_mma.fused_counter_count(projection.lora.a.shape[0]), dtype=torch.int32) if fuse_a else None
    arrivals = torch.zeros(64 // 16, dtype=torch.int32)
    outputs = []
    for _ in range(2):  # the second launch finds the counters as the first left them
        out = _run(library, projection, x, warps, tiles, counters, k_splits, arrivals)
        assert not out.isnan().any()  # every tile finished by one of its blocks
        assert nf4_kernels.matches_reference(out, reference), (out.float() - reference.float()).abs().max()
        assert arrivals.abs().sum() == 0, arrivals
        if counters is not None:
            assert counters.abs().sum() == 0, counters
        outputs.append(out)
    assert torch.equal(outputs[0], outputs[1])
