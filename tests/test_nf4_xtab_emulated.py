"""The x-table kernel's own CUDA text, run on the CPU (tests/fakes/cuda_emulation.hpp: one std::thread
per CUDA thread, one block at a time, so its two phases run as two launches) against the reference
path: the pair tables in their banks, the lanes' bytes, the warp's reduce-scatter, the slices' sums
added per chunk and the LoRA epilogue. The real kernel, both phases in one launch, runs in
tests/gpu/test_nf4_kernels.py on a GPU."""

from __future__ import annotations

import ctypes
import shutil

import pytest
import torch

from llm.serving import nf4_kernels, nf4_xtab
from llm.serving.mistral_decoder import _add_rms_norm, _silu_mul
from llm.serving.nf4 import LoraParts, NF4Matrix, NF4Projection
from llm.serving.nf4_xtab import NextWeights, XtabLayout
from tests.fakes.cuda_emulation import NF4_CODE, build_emulated, taken_prefetches

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the emulated kernel")

LAUNCHER = r"""
// Returns the number of out-of-bounds global reads.
extern "C" long launch(int grid, int threads, const void* words, const float* absmax, const void* x,
                       const float* lora_a, const float* lora_b, void* y, float* partial, float* t_partial,
                       int* counters, int N, int seg1, int seg2, int RT, double scaling, int round_lora_first,
                       int phases, const void* residual, const void* norm_weight, void* residual_out, double eps,
                       const void* next_words, const void* next_absmax, int next_regions, int next_region_rows,
                       int next_chunk_rows, int next_row_bytes) {
    out_of_bounds_reads = 0;
    launch_blocks(grid, threads, [=] {
        nf4_xtab_kernel((const u32*)words, absmax, (const u16*)x, lora_a, lora_b, (u16*)y, partial, t_partial, counters,
                        N, seg1, seg2, RT, scaling, round_lora_first, phases, (const u16*)residual,
                        (const u16*)norm_weight, (u16*)residual_out, eps, (const char*)next_words,
                        (const char*)next_absmax, next_regions, next_region_rows, next_chunk_rows, next_row_bytes,
                        counters, counters);
    });
    return out_of_bounds_reads;
}
"""
RANK = 8


def _build(tmp_path_factory: pytest.TempPathFactory, k: int, layout: XtabLayout, chunks: int,
           prep: int = nf4_xtab.PLAIN, prefetch_next: bool = False) -> ctypes.CDLL:
    folder = tmp_path_factory.mktemp(f"xtab_k{k}_{layout.label}_c{chunks}_p{prep}_n{int(prefetch_next)}")
    kernel_source = nf4_xtab.source(NF4_CODE, k, RANK, chunks, prep, layout, prefetch_next=prefetch_next)
    library = build_emulated(folder, kernel_source, LAUNCHER)
    library.launch.restype = ctypes.c_long
    library.launch.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 9 + [ctypes.c_int] * 4 + [
        ctypes.c_double, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_double, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int] * 4
    return library


def _projection(parts: list[int], k: int, seed: int) -> NF4Projection:
    """A fused projection of len(parts) LoRA parts (q/k/v: three), random bytes and absmax."""
    g = torch.Generator().manual_seed(seed)
    n = sum(parts)
    weight = NF4Matrix(
        packed=torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g),
        absmax=torch.rand((n, k // 64), generator=g) * 0.05 + 0.005,
        code=torch.tensor(NF4_CODE, dtype=torch.float32),
    )
    segments, row = [], 0
    for i, rows in enumerate(parts):
        segments.append((row, row + rows, RANK * i))
        row += rows
    lora = LoraParts(a=torch.randn((RANK * len(parts), k), generator=g) * 0.02,
                     b=torch.randn((n, RANK), generator=g) * 0.02, segments=tuple(segments), rank=RANK, scaling=0.25)
    return NF4Projection(weight, lora)


def _run(library: ctypes.CDLL, projection: NF4Projection, x: torch.Tensor, warps: int, chunks: int,
         residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
         residual_out: torch.Tensor | None = None, eps: float = 0.0,
         next_weights: NextWeights | None = None) -> torch.Tensor:
    n, k = projection.weight.shape
    lora = projection.lora
    slices = k // nf4_xtab.SLICE
    y = torch.full((1, n), float("nan"), dtype=torch.bfloat16)
    partial = torch.full((slices, n), float("nan"))  # written before they are read
    t_partial = torch.full((slices, lora.a.shape[0]), float("nan"))
    counters = torch.zeros(2, dtype=torch.int32)
    extra = [t for t in (residual, norm_weight) if t is not None]
    if next_weights is not None:
        extra += [next_weights.weight.packed, next_weights.weight.absmax]
    next_arguments = [0, 0, 0, 0, 0, 0] if next_weights is None else [
        a.data_ptr() if isinstance(a, torch.Tensor) else a for a in next_weights.arguments()]
    for buffer in (projection.weight.packed, projection.weight.absmax, x, lora.a, lora.b, partial, t_partial, *extra):
        library.add_buffer(buffer.data_ptr(), buffer.numel() * buffer.element_size())
    pointers = [(t if t is not None else x).data_ptr() for t in (residual, norm_weight)]
    pointers.append((residual_out if residual_out is not None else y).data_ptr())
    for phase in (1, 2):
        out_of_bounds = library.launch(
            slices * chunks, warps * 32, projection.weight.packed.data_ptr(), projection.weight.absmax.data_ptr(),
            x.data_ptr(), lora.a.data_ptr(), lora.b.data_ptr(), y.data_ptr(), partial.data_ptr(),
            t_partial.data_ptr(), counters.data_ptr(), n, *lora.part_starts(n), lora.a.shape[0], lora.scaling,
            int(projection.round_lora_first), phase, *pointers, eps, *next_arguments)
        assert out_of_bounds == 0, f"{out_of_bounds} global reads outside the kernel's buffers"
    return y


# (parts, K, warps, chunks): q/k/v-like parts over 2 slices in one chunk, 3 slices (a chunk's rows do not
# split evenly over its slices) in 3 chunks, and gate/up-like parts; one with 20 row groups for 8 warps,
# so that a warp's next group streams in while it computes one, two or none; 16 warps (another table
# fill); 5 chunks for 16 LoRA ranks (the A product's ranks spread unevenly over the chunks' blocks)
@pytest.mark.parametrize(("parts", "k", "warps", "chunks"),
                         [([64, 32, 32], 512, 8, 1), ([96, 96, 96], 768, 8, 3), ([160, 160], 256, 8, 2),
                          ([320, 320], 256, 8, 1), ([96, 32, 32], 512, 16, 1), ([80, 80], 512, 8, 5)])
def test_the_kernel_text_computes_the_reference_function(tmp_path_factory, parts, k, warps, chunks):
    library = _build(tmp_path_factory, k, XtabLayout(warps), chunks)
    projection = _projection(parts, k, seed=k)
    x = torch.randn((1, k), generator=torch.Generator().manual_seed(k + 1)).to(torch.bfloat16)
    out = _run(library, projection, x, warps, chunks)
    reference = projection.reference(x)
    assert not out.isnan().any()  # every output written
    assert nf4_kernels.matches_reference(out, reference), (out.float() - reference.float()).abs().max()


# More weights in flight (parts, K, chunks, layout): two groups ahead with 20 row groups on 8 warps (a
# warp with three groups, the last one's partner missing) and with 4 (warps with one group, none to
# refill); one group staged, then registers (20 groups on 8 warps) or nothing more (4 groups on 16 warps);
# two and three staged, with two ahead after them; groups prefetched into L2 (below)
@pytest.mark.parametrize(("parts", "k", "chunks", "layout"),
                         [([320, 320], 256, 1, XtabLayout(8, 2)), ([64, 32, 32], 512, 1, XtabLayout(8, 2)),
                          ([320, 320], 256, 1, XtabLayout(8, 1, 1)), ([64, 32, 32], 512, 1, XtabLayout(16, 1, 1)),
                          ([320, 320], 256, 1, XtabLayout(8, 2, 2)), ([160, 160], 512, 2, XtabLayout(8, 1, 3)),
                          ([320, 320], 256, 1, XtabLayout(8, 1, 0, 2)), ([320, 320], 512, 2, XtabLayout(8, 2, 1, 1))],
                         ids=lambda v: v.label if isinstance(v, XtabLayout) else None)
def test_more_weights_in_flight_compute_the_same_function(tmp_path_factory, parts, k, chunks, layout):
    plain = _build(tmp_path_factory, k, XtabLayout(layout.warps), chunks)
    library = _build(tmp_path_factory, k, layout, chunks)
    projection = _projection(parts, k, seed=k + 5)
    x = torch.randn((1, k), generator=torch.Generator().manual_seed(k + 6)).to(torch.bfloat16)
    out = _run(library, projection, x, layout.warps, chunks)
    assert not out.isnan().any()
    assert nf4_kernels.matches_reference(out, projection.reference(x)), (out.float() - projection.reference(x).float()).abs().max()
    assert torch.equal(out, _run(plain, projection, x, layout.warps, chunks))  # the same sums in the same order


def _span(buffer: torch.Tensor) -> tuple[int, int]:
    return buffer.data_ptr(), buffer.data_ptr() + buffer.numel() * buffer.element_size()


def _rows_covered(ranges: list[tuple[int, int]], buffer: torch.Tensor) -> tuple[set[int], int]:
    """(the rows of `buffer` whose every byte the prefetches asked for, its bytes asked for more than once)."""
    start, end = _span(buffer)
    asked = torch.zeros(end - start, dtype=torch.int32)
    for first, last in ranges:
        if first < end and last > start:
            asked[max(first, start) - start:min(last, end) - start] += 1
    whole = asked.view(buffer.shape[0], -1).bool().all(dim=1)
    return set(whole.nonzero().flatten().tolist()), int((asked - 1).clamp(min=0).sum())


# (parts, K, chunks, layout, rows of each chunk prefetched): the first groups are loaded into registers
# (and the stage) before the wait, so the prefetch starts after them: one group per warp on 8 warps is
# 256 rows; with a stage of one and two ahead, 768. A prefetch past the chunk's end stops at it. A
# rolling one asks for the rest of the chunk as the warps go.
@pytest.mark.parametrize(("parts", "k", "chunks", "layout", "rows"),
                         [([320, 320], 256, 1, XtabLayout(8, 1, 0, 2), range(256, 640)),
                          ([512, 512], 512, 1, XtabLayout(8, 1, 0, 1), range(256, 512)),
                          ([640, 640], 512, 2, XtabLayout(8, 2, 1, 1), range(768, 640)),
                          ([1024, 1024], 256, 1, XtabLayout(8, 2, 1, 1), range(768, 1024)),
                          ([768, 768], 512, 2, XtabLayout(16, 1, 0, 1), range(512, 768)),
                          # rolling: the rest of each chunk too, as the groups start (here 20 and 16 groups)
                          ([320, 320], 256, 1, XtabLayout(8, 1, 0, 1, True), range(256, 640)),
                          ([1024, 1024], 256, 2, XtabLayout(8, 2, 1, 1, True), range(768, 1024)),
                          ([1536, 1536], 256, 1, XtabLayout(8, 2, 1, 1, True), range(768, 3072))],
                         ids=lambda v: v.label if isinstance(v, XtabLayout) else None)
def test_the_next_row_groups_are_prefetched_into_l2_once_each(tmp_path_factory, parts, k, chunks, layout, rows):
    """Each chunk's next rows after those loaded before the wait, weights and absmax, every byte asked
    for by exactly one lane of the chunk's blocks and nothing else (the GPU would fault on a prefetch
    outside the weights)."""
    library = _build(tmp_path_factory, k, layout, chunks)
    projection = _projection(parts, k, seed=k + 7)
    x = torch.randn((1, k), generator=torch.Generator().manual_seed(k + 8)).to(torch.bfloat16)
    taken_prefetches(library)
    _run(library, projection, x, layout.warps, chunks)
    ranges = taken_prefetches(library)
    chunk_rows = sum(parts) // chunks
    expected = {chunk * chunk_rows + row for chunk in range(chunks) for row in rows}
    buffers = (projection.weight.packed, projection.weight.absmax)
    for buffer in buffers:
        assert _rows_covered(ranges, buffer) == (expected, 0)
    # every piece inside the weights or the absmax, no empty ones, nothing beyond those rows
    assert all(any(start <= first < last <= end for start, end in map(_span, buffers)) for first, last in ranges)
    row_bytes = sum(b[0].numel() * b.element_size() for b in buffers)
    assert sum(last - first for first, last in ranges) == len(expected) * row_bytes


# (the next weight's parts and K, what to prefetch of it: regions, rows each): the rows the next launch
# holds before its wait (two chunks, 256 rows each), a whole matrix (o after q/k/v), and a grid of fewer
# lanes than 16-byte units in a region (uneven pieces)
@pytest.mark.parametrize(("parts", "k", "regions", "region_rows"),
                         [([512, 512], 512, 2, 256), ([256], 256, 1, 256), ([96, 96, 96], 768, 3, 64)])
def test_a_launch_prefetches_the_next_launchs_first_rows_while_it_finishes(tmp_path_factory, parts, k, regions,
                                                                           region_rows):
    library = _build(tmp_path_factory, 512, XtabLayout(8), 1, prefetch_next=True)
    projection = _projection([64, 32, 32], 512, seed=21)
    following = _projection(parts, k, seed=22).weight
    x = torch.randn((1, 512), generator=torch.Generator().manual_seed(23)).to(torch.bfloat16)
    taken_prefetches(library)
    out = _run(library, projection, x, 8, 1, next_weights=NextWeights(following, regions, region_rows))
    ranges = taken_prefetches(library)
    assert nf4_kernels.matches_reference(out, projection.reference(x))
    n = following.shape[0]
    expected = {region * (n // regions) + row for region in range(regions) for row in range(region_rows)}
    buffers = (following.packed, following.absmax)
    for buffer in buffers:
        assert _rows_covered(ranges, buffer) == (expected, 0)
    row_bytes = sum(b[0].numel() * b.element_size() for b in buffers)
    assert sum(last - first for first, last in ranges) == len(expected) * row_bytes  # nothing else


def test_what_the_next_launch_holds_before_its_wait_is_what_is_prefetched_for_it():
    weight = _projection([14336, 14336], 4096, seed=1).weight
    assert NextWeights.held_by(weight, XtabLayout(16), 132) == NextWeights(weight, 8, 512)
    assert NextWeights.held_by(weight, XtabLayout(16, 1, 0, 2), 132) == NextWeights(weight, 8, 1536)
    assert NextWeights.held_by(weight, XtabLayout(8, 2, 3, 4), 132) == NextWeights(weight, 8, 2304)
    qkv = _projection([4096, 1024, 1024], 4096, seed=2).weight
    assert NextWeights.held_by(qkv, XtabLayout(16, 1, 0, 4), 132) == NextWeights(qkv, 8, 768)  # the whole chunk
    with pytest.raises(ValueError, match="cannot prefetch"):
        NextWeights(qkv, 5, 10).arguments()  # 6,144 rows do not split in 5


def test_the_plain_linear_rounding_is_kept(tmp_path_factory):
    """The lm_head-style projection (round_lora_first off): the float32 sum rounded once."""
    library = _build(tmp_path_factory, 256, XtabLayout(8), 1)
    projection = _projection([64], 256, seed=7)
    projection.round_lora_first = False
    x = torch.randn((1, 256), generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    out = _run(library, projection, x, 8, 1)
    assert nf4_kernels.matches_reference(out, projection.reference(x))


def test_row_chunks_keep_every_block_resident_and_whole_row_groups():
    assert nf4_xtab.chunks_for(6144, 4096, 132) == 8  # q/k/v: 16 slices x 8 chunks = 128 blocks
    assert nf4_xtab.chunks_for(28672, 4096, 132) == 8
    assert nf4_xtab.chunks_for(4096, 14336, 132) == 2  # down: 56 slices x 2
    assert nf4_xtab.chunks_for(96, 768, 132) == 3
    assert nf4_xtab.chunks_for(100, 4096, 132) is None  # rows not in 32-row groups
    assert nf4_xtab.chunks_for(4096, 4000, 132) is None  # K not in 256-input slices
    assert nf4_xtab.chunks_for(4096, 256 * 200, 132) is None  # more slices than SMs: blocks would wait forever


def test_down_takes_silu_of_gate_times_up_inside_the_launch(tmp_path_factory):
    """SILU_MUL: the input is gate/up's output row [gate | up]; the kernel computes the MLP's
    `silu(gate) * up` itself, rounded as eager PyTorch rounds each op."""
    k = 512
    library = _build(tmp_path_factory, k, XtabLayout(8), 2, nf4_xtab.SILU_MUL)
    projection = _projection([128], k, seed=11)
    gate_up = (torch.randn((1, 2 * k), generator=torch.Generator().manual_seed(12)) * 3).to(torch.bfloat16)
    out = _run(library, projection, gate_up, 8, 2)
    reference = projection.reference(_silu_mul(gate_up))
    assert not out.isnan().any()
    assert nf4_kernels.matches_reference(out, reference), (out.float() - reference.float()).abs().max()
    # and not the function of the gate half alone (what a kernel ignoring the prep would compute)
    assert not nf4_kernels.matches_reference(out, projection.reference(gate_up[:, :k]))


@pytest.mark.parametrize("warps", [8, 16])
def test_qkv_adds_the_residual_and_normalizes_inside_the_launch(tmp_path_factory, warps):
    """ADD_NORM: the input is the last projection's output; the kernel adds it to the residual stream,
    writes the stream's new value once (chunk 0) and normalizes it over all of K as MistralRMSNorm does."""
    k, chunks, eps = 768, 3, 1e-5
    library = _build(tmp_path_factory, k, XtabLayout(warps), chunks, nf4_xtab.ADD_NORM)
    projection = _projection([96, 96, 96], k, seed=13)
    g = torch.Generator().manual_seed(14)
    residual = (torch.randn((1, k), generator=g) * 4).to(torch.bfloat16)
    delta = torch.randn((1, k), generator=g).to(torch.bfloat16)
    norm_weight = (1 + 0.1 * torch.randn((k,), generator=g)).to(torch.bfloat16)
    residual_out = torch.full((1, k), float("nan"), dtype=torch.bfloat16)
    out = _run(library, projection, delta, warps, chunks, residual, norm_weight, residual_out, eps)
    expected_h, normed = _add_rms_norm(residual, delta, norm_weight, eps)
    assert torch.equal(residual_out, expected_h)  # the stream's next value, every element once
    reference = projection.reference(normed)
    assert not out.isnan().any()
    assert nf4_kernels.matches_reference(out, reference), (out.float() - reference.float()).abs().max()
    assert not nf4_kernels.matches_reference(out, projection.reference(delta))


def test_a_stage_that_does_not_fit_beside_the_table_is_refused():
    """Hopper gives a block 227 KB of shared memory: the 128 KB table plus 16 warps x one 4 KB group, or
    8 warps x three; more cannot launch, so no such kernel text is made."""
    assert XtabLayout(16, 1, 1).shared_bytes == 192 * 1024
    assert XtabLayout(8, 1, 3).shared_bytes == 224 * 1024
    nf4_xtab.source(NF4_CODE, 4096, RANK, 8, layout=XtabLayout(8, 1, 3))
    with pytest.raises(ValueError, match="staged=2"):
        nf4_xtab.source(NF4_CODE, 4096, RANK, 8, layout=XtabLayout(16, 1, 2))
    with pytest.raises(ValueError, match="within 232448 bytes"):
        XtabLayout.parse("16x1g2")


def test_layouts_are_named_by_their_labels():
    for layout in (*nf4_xtab.SERVED_LAYOUTS, *nf4_xtab.CANDIDATE_LAYOUTS):
        assert XtabLayout.parse(layout.label) == layout
    assert XtabLayout.parse("16x1l2") == XtabLayout(16, 1, 0, 2)
    assert XtabLayout.parse("8x2g1l1r") == XtabLayout(8, 2, 1, 1, rolling=True)
    # the tuner's configuration of a layout: named after it, and giving it back
    config = nf4_kernels._xtab_config(XtabLayout.parse("8x2g1l1r"))
    assert config.label == "xtab_32x256w8s2g1l1r" and config.xtab_layout == XtabLayout(8, 2, 1, 1, rolling=True)
    assert [c.label for c in nf4_kernels.XTAB_CONFIGS] == ["xtab_32x256w8s1", "xtab_32x256w16s1"]  # served, as before
    for bad in ("16", "16x3", "12x1", "16x1l3", "8x1g4", "16x1 l2", "16x1r", "16x1rl2"):
        with pytest.raises(ValueError):
            XtabLayout.parse(bad)


def test_a_prefetching_layout_where_the_instruction_is_missing_is_the_callers_error():
    """L2 prefetches need sm_90: asking for them elsewhere is refused in one line, before any compile, and
    the x-table kernels stay available (a failed compile would turn them all off)."""
    for layout, prefetch_next in ((XtabLayout(8, 1, 0, 1), False), (XtabLayout(8), True)):
        with pytest.raises(ValueError, match="needs sm_90"):
            nf4_xtab._kernel(tuple(NF4_CODE), torch.device("cpu"), 256, RANK, 1, nf4_xtab.PLAIN, layout,
                             prefetch_next=prefetch_next)
    assert nf4_xtab._DISABLED is None
