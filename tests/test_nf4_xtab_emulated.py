"""The x-table kernel's own CUDA text, run on the CPU (tests/fakes/cuda_emulation.hpp: one std::thread
per CUDA thread, one block at a time, so its two phases run as two launches) against the reference
path: the pair tables in their banks, the lanes' bytes, the warp's reduce-scatter, the slices' sums
added per chunk and the LoRA epilogue. The real kernel, both phases in one launch, runs in
tests/gpu/test_nf4_kernels.py on a GPU."""

from __future__ import annotations

import ctypes
import shutil
from dataclasses import replace

import pytest
import torch

from llm.serving import nf4_kernels, nf4_xtab
from llm.serving.mistral_decoder import _add_rms_norm, _rope_decode, _silu_mul
from llm.serving.nf4 import NESTED_BLOCK, CompactAbsmax, LoraParts, NF4Matrix, NF4Projection
from tests.fakes.cuda_emulation import NF4_CODE, build_emulated

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the emulated kernel")

LAUNCHER = r"""
// Returns the number of out-of-bounds global reads.
extern "C" long launch(int grid, int threads, const void* words, const void* absmax, const float2* nested,
                       const float* absmax_table, const void* x,
                       const float* lora_a, const float* lora_b, void* y, float* partial, float* t_partial,
                       int* counters, int N, int seg1, int seg2, int RT, double scaling, int round_lora_first,
                       int phases, const void* residual, const void* norm_weight, void* residual_out, double eps,
                       const void* rope_cos, const void* rope_sin, const long long* positions, const int* kv_table,
                       void* q_out, void* k_pool, void* v_pool, int stride_pb, int stride_ph, int stride_pt,
                       const float* attn_acc, const float* attn_ml) {
    out_of_bounds_reads = 0;
    launch_blocks(grid, threads, [=] {
        nf4_xtab_kernel((const u32*)words, absmax, nested, absmax_table, (const u16*)x, lora_a, lora_b, (u16*)y, partial, t_partial, counters,
                        N, seg1, seg2, RT, scaling, round_lora_first, phases, (const u16*)residual,
                        (const u16*)norm_weight, (u16*)residual_out, eps, (const u16*)rope_cos, (const u16*)rope_sin,
                        positions, kv_table, (u16*)q_out, (u16*)k_pool, (u16*)v_pool, stride_pb, stride_ph, stride_pt,
                        attn_acc, attn_ml);
    });
    return out_of_bounds_reads;
}
"""
RANK = 8


def _build(tmp_path_factory: pytest.TempPathFactory, k: int, warps: int, chunks: int,
           prep: int = nf4_xtab.PLAIN, compact: bool = False, rope: nf4_xtab.RopeShape | None = None,
           attention: nf4_xtab.AttentionShape | None = None) -> ctypes.CDLL:
    folder = tmp_path_factory.mktemp(f"xtab_k{k}_w{warps}_c{chunks}_p{prep}_a{int(compact)}_r{int(rope is not None)}")
    kernel_source = nf4_xtab.source(NF4_CODE, k, warps, RANK, chunks, prep, compact, rope, attention)
    library = build_emulated(folder, kernel_source, LAUNCHER)
    library.launch.restype = ctypes.c_long
    library.launch.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 11 + [ctypes.c_int] * 4 + [
        ctypes.c_double, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_double] + [ctypes.c_void_p] * 7 + [ctypes.c_int] * 3 + [ctypes.c_void_p] * 2
    return library


def _projection(parts: list[int], k: int, seed: int, compact: bool = False) -> NF4Projection:
    """A fused projection of len(parts) LoRA parts (q/k/v: three), random bytes and absmax: float32,
    or (`compact`) one byte each with second-level values and offsets per 256, as bitsandbytes' double
    quantization stores them (each part its own)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(parts)
    absmax = torch.rand((n, k // 64), generator=g) * 0.05 + 0.005
    compact_absmax = None
    if compact:
        blocks = n * k // 64 // NESTED_BLOCK
        compact_absmax = CompactAbsmax(
            codes=torch.randint(0, 256, (n, k // 64), dtype=torch.uint8, generator=g),
            nested=torch.stack((torch.rand(blocks, generator=g) * 0.05 + 0.01,
                                torch.rand(blocks, generator=g) * 0.01 + 0.02), dim=1),
            table=torch.linspace(-1, 1, 256) ** 3,
        )
        absmax = compact_absmax.decode()
    weight = NF4Matrix(
        packed=torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g),
        absmax=absmax,
        code=torch.tensor(NF4_CODE, dtype=torch.float32),
        compact=compact_absmax,
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
         residual_out: torch.Tensor | None = None, eps: float = 0.0, rope: nf4_xtab.RopeWrite | None = None,
         attention: nf4_xtab.AttentionPartials | None = None) -> torch.Tensor:
    """y (or, with `rope`, q rotated; k and v then in the pool)."""
    n, k = projection.weight.shape
    lora = projection.lora
    slices = k // nf4_xtab.SLICE
    y = torch.full((1, n), float("nan"), dtype=torch.bfloat16)
    partial = torch.full((slices, n), float("nan"))  # written before they are read
    t_partial = torch.full((slices, lora.a.shape[0]), float("nan"))
    counters = torch.zeros(2, dtype=torch.int32)
    compact = projection.weight.compact
    absmax_parts = ((compact.codes, compact.nested, compact.table) if compact is not None
                    else (projection.weight.absmax,) * 3)
    extra = [t for t in (residual, norm_weight) if t is not None]
    if rope is not None:
        extra += [rope.cos, rope.sin, rope.positions, rope.table]
        y = torch.full((1, rope.shape.num_heads * rope.shape.head_dim), float("nan"), dtype=torch.bfloat16)
        rope_args = [rope.cos.data_ptr(), rope.sin.data_ptr(), rope.positions.data_ptr(), rope.table.data_ptr(),
                     y.data_ptr(), rope.k_pool.data_ptr(), rope.v_pool.data_ptr(), *rope.k_pool.stride()[:3]]
    else:
        positions = attention.positions if attention is not None else x
        rope_args = [x.data_ptr()] * 2 + [positions.data_ptr(), x.data_ptr()] + [y.data_ptr()] * 3 + [0, 0, 0]
    attention_args = [t.data_ptr() for t in ((attention.acc, attention.ml) if attention is not None else (x, x))]
    if attention is not None:
        extra += [attention.acc, attention.ml, attention.positions]
    for buffer in (projection.weight.packed, *absmax_parts, x, lora.a, lora.b, partial, t_partial, *extra):
        library.add_buffer(buffer.data_ptr(), buffer.numel() * buffer.element_size())
    pointers = [(t if t is not None else x).data_ptr() for t in (residual, norm_weight)]
    pointers.append((residual_out if residual_out is not None else y).data_ptr())
    for phase in (1, 2):
        out_of_bounds = library.launch(
            slices * chunks, warps * 32, projection.weight.packed.data_ptr(), *(t.data_ptr() for t in absmax_parts),
            x.data_ptr(), lora.a.data_ptr(), lora.b.data_ptr(), y.data_ptr(), partial.data_ptr(),
            t_partial.data_ptr(), counters.data_ptr(), n, *lora.part_starts(n), lora.a.shape[0], lora.scaling,
            int(projection.round_lora_first), phase, *pointers, eps, *rope_args, *attention_args)
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
    library = _build(tmp_path_factory, k, warps, chunks)
    projection = _projection(parts, k, seed=k)
    x = torch.randn((1, k), generator=torch.Generator().manual_seed(k + 1)).to(torch.bfloat16)
    out = _run(library, projection, x, warps, chunks)
    reference = projection.reference(x)
    assert not out.isnan().any()  # every output written
    assert nf4_kernels.matches_reference(out, reference), (out.float() - reference.float()).abs().max()


def test_the_plain_linear_rounding_is_kept(tmp_path_factory):
    """The lm_head-style projection (round_lora_first off): the float32 sum rounded once."""
    library = _build(tmp_path_factory, 256, 8, 1)
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
    library = _build(tmp_path_factory, k, 8, 2, nf4_xtab.SILU_MUL)
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
    library = _build(tmp_path_factory, k, warps, chunks, nf4_xtab.ADD_NORM)
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


@pytest.mark.parametrize(("parts", "k", "warps", "chunks"), [([256, 64, 64], 512, 8, 2), ([160, 160], 256, 16, 1)])
def test_the_one_byte_absmax_gives_the_float32_absmax_results_bit_for_bit(tmp_path_factory, parts, k, warps, chunks):
    """COMPACT_ABSMAX: bitsandbytes' one-byte absmax, decoded in the kernel, multiplies exactly as the
    float32 values it stands for (the same output bits), each part with its own second-level values."""
    projection = _projection(parts, k, seed=21, compact=True)
    x = torch.randn((1, k), generator=torch.Generator().manual_seed(22)).to(torch.bfloat16)
    out = _run(_build(tmp_path_factory, k, warps, chunks, compact=True), projection, x, warps, chunks)
    as_float32 = NF4Projection(replace(projection.weight, compact=None), projection.lora)
    expected = _run(_build(tmp_path_factory, k, warps, chunks), as_float32, x, warps, chunks)
    assert not out.isnan().any()
    assert torch.equal(out, expected)
    assert nf4_kernels.matches_reference(out, projection.reference(x))


@pytest.mark.parametrize(("prep", "warps"), [(nf4_xtab.PLAIN, 8), (nf4_xtab.ADD_NORM, 16)])
def test_qkv_rotates_q_and_k_and_writes_the_kv_slot_inside_the_launch(tmp_path_factory, prep, warps):
    """The rope epilogue (q/k/v at one row): each block finishes whole heads, q comes back rotated, k
    rotated and v go to the row's slot of the paged pool: the bits `_rope_decode` gives for the plain
    launch's output, and no other pool value touched."""
    shape = nf4_xtab.RopeShape(num_heads=4, num_kv_heads=2, head_dim=64, kv_block=4)
    k, chunks = 512, 4  # 2 slices; 4 chunks of 128 rows: two heads a chunk, one a block
    projection = _projection([256, 128, 128], k, seed=31)
    g = torch.Generator().manual_seed(32)
    x = torch.randn((1, k), generator=g).to(torch.bfloat16)
    angles = torch.rand((16, 32), generator=g) * 6
    cos = torch.cat((angles.cos(), angles.cos()), dim=1).to(torch.bfloat16)
    sin = torch.cat((angles.sin(), angles.sin()), dim=1).to(torch.bfloat16)
    positions = torch.tensor([9])  # page 2, offset 1
    table = torch.tensor([[3, 5, 1, 0]], dtype=torch.int32)  # page 2 is pool block 1
    pools = [torch.full((6, 2, 4, 64), float("nan"), dtype=torch.bfloat16) for _ in range(2)]
    rope = nf4_xtab.RopeWrite(shape, cos, sin, positions, table, *pools)
    extra: dict = {}
    if prep == nf4_xtab.ADD_NORM:
        extra = dict(residual=(torch.randn((1, k), generator=g) * 4).to(torch.bfloat16),
                     norm_weight=(1 + 0.1 * torch.randn((k,), generator=g)).to(torch.bfloat16), eps=1e-5)
        extra["residual_out"] = torch.empty((1, k), dtype=torch.bfloat16)
    q = _run(_build(tmp_path_factory, k, warps, chunks, prep, rope=shape), projection, x, warps, chunks,
             rope=rope, **extra)
    if "residual_out" in extra:
        extra["residual_out"] = torch.empty((1, k), dtype=torch.bfloat16)
    y = _run(_build(tmp_path_factory, k, warps, chunks, prep), projection, x, warps, chunks, **extra)
    expected_q, expected_k, expected_v = _rope_decode(y, cos, sin, positions, 4, 2, 64)
    assert torch.equal(q, expected_q.reshape(1, -1))
    assert not torch.equal(q, y[:, :256])  # rotated, not merely copied
    k_pool, v_pool = pools
    assert torch.equal(k_pool[1, :, 1], expected_k[0]) and torch.equal(v_pool[1, :, 1], expected_v[0])
    k_pool[1, :, 1] = float("nan")
    v_pool[1, :, 1] = float("nan")
    assert k_pool.isnan().all() and v_pool.isnan().all()  # nothing else written


def test_the_rope_epilogue_needs_whole_heads_per_block():
    shape = nf4_xtab.RopeShape(num_heads=32, num_kv_heads=8, head_dim=128, kv_block=32)
    assert nf4_xtab.rope_fits(6144, 4096, 8, 8, shape)  # Mistral-7B on 132 SMs: 6 heads a chunk, 16 blocks
    assert nf4_xtab.rope_fits(6144, 4096, 8, 3, shape)  # 16 heads a chunk: one for each of its 16 blocks
    assert not nf4_xtab.rope_fits(6144, 4096, 8, 2, shape)  # 24 heads a chunk: more than its 16 blocks
    assert not nf4_xtab.rope_fits(6144, 4096, 8, 5, shape)  # chunks not in whole rows
    assert not nf4_xtab.rope_fits(6144, 4096, 8, 64, shape)  # 96 rows a chunk: not whole heads
    assert not nf4_xtab.rope_fits(4096, 4096, 8, 8, shape)  # not q/k/v's rows
    with pytest.raises(ValueError, match="no rope epilogue"):  # never a kernel text that splits heads
        nf4_xtab.source(NF4_CODE, 4096, 8, RANK, 64, nf4_xtab.PLAIN, rope=shape)


def test_o_combines_the_attention_splits_inside_the_launch(tmp_path_factory):
    """ATTN_COMBINE: o's input is the split attention's partials of the row; the launch combines the
    splits that hold tokens as `paged_decode_reduce` does (log-sum-exp weights, float32, one rounding
    to bf16) and never reads the others (NaN there)."""
    shape = nf4_xtab.AttentionShape(kv_heads=2, group=2, splits=5, head_dim=128, kv_block=4, pages_per_split=2)
    k = 2 * 2 * 128
    projection = _projection([128], k, seed=41)
    g = torch.Generator().manual_seed(42)
    positions = torch.tensor([20])  # 21 tokens: 6 pages, 3 of the 5 splits
    acc = torch.randn((1, 2, 5, 2, 128), generator=g) * 3
    ml = torch.stack((torch.randn((1, 2, 5, 2), generator=g) * 4, torch.rand((1, 2, 5, 2), generator=g) * 9 + 1), -1)
    acc[:, :, 3:] = float("nan")
    ml[:, :, 3:] = float("nan")
    top = ml[..., :3, :, 0].amax(dim=2, keepdim=True)
    weights = torch.exp(ml[..., :3, :, 0] - top)
    combined = (acc[:, :, :3] * weights[..., None]).sum(2) / (ml[..., :3, :, 1] * weights).sum(2)[..., None]
    attention_out = combined.reshape(1, k).to(torch.bfloat16)  # [1, KV, group, D]: head kvh * group + g
    partials = nf4_xtab.AttentionPartials(shape, acc, ml, positions)
    library = _build(tmp_path_factory, k, 8, 2, nf4_xtab.ATTN_COMBINE, attention=shape)
    out = _run(library, projection, acc.reshape(1, -1), 8, 2, attention=partials)
    reference = projection.reference(attention_out)
    assert not out.isnan().any()
    assert nf4_kernels.matches_reference(out, reference), (out.float() - reference.float()).abs().max()
    plain = _run(_build(tmp_path_factory, k, 8, 2), projection, attention_out, 8, 2)
    assert (out == plain).float().mean().item() > 0.9  # the same input but for a rounding step here and there
