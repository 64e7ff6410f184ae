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
from llm.serving.nf4_xtab import XtabLayout
from tests.fakes.cuda_emulation import NF4_CODE, build_emulated

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the emulated kernel")

LAUNCHER = r"""
// Returns the number of out-of-bounds global reads.
extern "C" long launch(int grid, int threads, const void* words, const float* absmax, const void* x,
                       const float* lora_a, const float* lora_b, void* y, float* partial, float* t_partial,
                       int* counters, int N, int seg1, int seg2, int RT, double scaling, int round_lora_first,
                       int phases, const void* residual, const void* norm_weight, void* residual_out, double eps) {
    out_of_bounds_reads = 0;
    launch_blocks(grid, threads, [=] {
        nf4_xtab_kernel((const u32*)words, absmax, (const u16*)x, lora_a, lora_b, (u16*)y, partial, t_partial, counters,
                        N, seg1, seg2, RT, scaling, round_lora_first, phases, (const u16*)residual,
                        (const u16*)norm_weight, (u16*)residual_out, eps);
    });
    return out_of_bounds_reads;
}
"""
RANK = 8


def _build(tmp_path_factory: pytest.TempPathFactory, k: int, layout: XtabLayout, chunks: int,
           prep: int = nf4_xtab.PLAIN) -> ctypes.CDLL:
    folder = tmp_path_factory.mktemp(f"xtab_k{k}_{layout.label}_c{chunks}_p{prep}")
    kernel_source = nf4_xtab.source(NF4_CODE, k, RANK, chunks, prep, layout)
    library = build_emulated(folder, kernel_source, LAUNCHER)
    library.launch.restype = ctypes.c_long
    library.launch.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 9 + [ctypes.c_int] * 4 + [
        ctypes.c_double, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_double]
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
    lora = LoraParts.stacked(torch.randn((RANK * len(parts), k), generator=g) * 0.02,
                             torch.randn((n, RANK), generator=g) * 0.02, parts, RANK, 0.25)
    return NF4Projection(weight, lora)


def _run(library: ctypes.CDLL, projection: NF4Projection, x: torch.Tensor, warps: int, chunks: int,
         residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
         residual_out: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    n, k = projection.weight.shape
    lora = projection.lora
    slices = k // nf4_xtab.SLICE
    y = torch.full((1, n), float("nan"), dtype=torch.bfloat16)
    partial = torch.full((slices, n), float("nan"))  # written before they are read
    t_partial = torch.full((slices, lora.a.shape[0]), float("nan"))
    counters = torch.zeros(2, dtype=torch.int32)
    extra = [t for t in (residual, norm_weight) if t is not None]
    for buffer in (projection.weight.packed, projection.weight.absmax, x, lora.a, lora.b, partial, t_partial, *extra):
        library.add_buffer(buffer.data_ptr(), buffer.numel() * buffer.element_size())
    pointers = [(t if t is not None else x).data_ptr() for t in (residual, norm_weight)]
    pointers.append((residual_out if residual_out is not None else y).data_ptr())
    for phase in (1, 2):
        out_of_bounds = library.launch(
            slices * chunks, warps * 32, projection.weight.packed.data_ptr(), projection.weight.absmax.data_ptr(),
            x.data_ptr(), lora.a.data_ptr(), lora.b.data_ptr(), y.data_ptr(), partial.data_ptr(),
            t_partial.data_ptr(), counters.data_ptr(), n, *lora.part_starts(n), lora.a.shape[0], lora.scaling,
            int(projection.round_lora_first), phase, *pointers, eps)
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


# Two groups ahead (parts, K, chunks): 20 row groups on 8 warps (a warp with three groups, the last one's
# partner missing) and 4 (warps with one group, none to refill)
@pytest.mark.parametrize(("parts", "k", "chunks"), [([320, 320], 256, 1), ([64, 32, 32], 512, 1)])
def test_two_groups_ahead_compute_the_same_function(tmp_path_factory, parts, k, chunks):
    plain = _build(tmp_path_factory, k, XtabLayout(8), chunks)
    library = _build(tmp_path_factory, k, XtabLayout(8, 2), chunks)
    projection = _projection(parts, k, seed=k + 5)
    x = torch.randn((1, k), generator=torch.Generator().manual_seed(k + 6)).to(torch.bfloat16)
    out = _run(library, projection, x, 8, chunks)
    assert not out.isnan().any()
    assert nf4_kernels.matches_reference(out, projection.reference(x)), (out.float() - projection.reference(x).float()).abs().max()
    assert torch.equal(out, _run(plain, projection, x, 8, chunks))  # the same sums in the same order


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


def test_layouts_are_named_by_their_labels():
    for layout in nf4_xtab.SERVED_LAYOUTS:
        assert XtabLayout.parse(layout.label) == layout
    assert XtabLayout.parse("8x2") == XtabLayout(8, 2)
    # the tuner's configuration of a layout: named after it, and giving it back
    config = nf4_kernels._xtab_config(XtabLayout.parse("8x2"))
    assert config.label == "xtab_32x256w8s2" and config.xtab_layout == XtabLayout(8, 2)
    assert [c.label for c in nf4_kernels.XTAB_CONFIGS] == ["xtab_32x256w8s1", "xtab_32x256w16s1", "xtab_32x256w8s2"]
    for bad in ("16", "16x3", "12x1", "16x1l2", "8x1g1", "16x1 l2", "16x1r"):
        with pytest.raises(ValueError):
            XtabLayout.parse(bad)
