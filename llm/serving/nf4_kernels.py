"""Triton kernels for `nf4` mode: bitsandbytes' packed NF4 weights read as they are (CUDA; on a CPU
only through Triton's interpreter, which tests/test_nf4_triton_interpreted.py uses).

- `dequantize(packed, absmax, code)`: bf16(code[nibble] * absmax) for every value, bit for bit
  `bitsandbytes.functional.dequantize_4bit` (float32 product, one round-to-nearest-even to bf16).
- `nf4_prompt_linear(x, weight, lora, ...)`: the same function for a prompt's rows: the LoRA's `A`
  product in one split-K kernel reading bf16 x (`lora_a_prompt`), each chunk of weight rows
  dequantized for cuBLAS, then one kernel adds the LoRA's `B` product with PEFT's roundings and
  writes the chunk's columns of the output. Both LoRA kernels multiply float32 on the tensor cores
  as three TF32 products (float32's accuracy); or, up to `llm.serving.nf4.EXACT_PROMPT_ROWS` rows, PEFT's own
  float32 A and B products (cuBLAS) and one kernel for the scaling and roundings: the seed's bits.
- `nf4_lora_linear(x, weight, lora)`: y = x @ dequant(W).T + LoRA for 1..16 rows (a decode step).
  The weight bytes are streamed once: each tile is dequantized in registers (the same bf16 values)
  and multiplied with float32 accumulation - a multiply-reduce for up to 4 rows, `tl.dot` on a
  16-row tile above. The LoRA's `A` product (float32, shared by the fused q/k/v or gate/up parts)
  is one small split-K kernel before; its `B` product, the scaling and PEFT's roundings (base
  output to bf16, LoRA output to bf16, their sum to bf16) are the GEMV's epilogue.
- The "lut" kernels (the fast ones) never look a value up in memory: per 64-value block, each thread
  computes the 16 possible weights once (`bf16(code[i] * absmax)`, the same float32 product and
  rounding) into registers, split into a low-byte and a high-byte table, and then decodes 8
  nibbles at a time with `prmt` byte permutes (PTX, `lut_asm`): ~8 instructions per weight, table
  and multiply-add included (SASS), where the code-table gather kernels take ~21. They serve one
  row (a GEMV), 2-16 rows (a 64-row warpgroup-MMA tile) and prompt-time dequantization.
- The "mma" configurations run `llm.serving.nf4_mma`'s CUDA C++ kernel (the same tables and permutes, the
  decoded weights fed straight into tensor-core `mma.sync`): one kernel for 1..16 rows whose cost
  hardly grows with the rows. One LoRA `A` kernel before it (`mma_inputs`) writes x in its operand
  order and t = x @ A.T whole (its last program per rank block adds the groups up); the "f"
  configurations do both in the same launch (`nf4_mma.nf4_mma_linear` without `inputs`, run 18). Run 12 served
  it for every projection and batch size but one (`o` at one row: the LUT GEMV). Where it runs,
  2-16 rows time it alone; the Triton kernels above are the fallback where it cannot (no NVRTC,
  a GPU older than sm_80, or a failed check) and the default for an untuned weight.
- `NF4Plan`: per (projection, batch bucket), the fastest kernel configuration, timed at start-up
  over all layers' weights among those that match the reference path.

On the CPU Triton is absent: `available()` is False and `llm.serving.nf4` keeps its PyTorch path.
"""

# Triton kernel arguments are pointers / ints typed by Triton itself, not Python annotations.
# ruff: noqa: ANN001

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from llm.serving import nf4_mma, nf4_xtab, tuning_cache
from llm.serving.triton_kernels import after_previous_kernels, graph_time_ms, programmatic_options

if TYPE_CHECKING:
    from llm.serving.nf4 import LoraParts, NF4Matrix, NF4Projection

logger = logging.getLogger(__name__)

try:  # Triton ships with CUDA builds of PyTorch only.
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # noqa: BLE001 - any import failure means "no Triton path"
    _HAVE_TRITON = False


def available(device: torch.device | str) -> bool:
    return _HAVE_TRITON and torch.device(device).type == "cuda" and torch.cuda.is_available()


@dataclass(frozen=True)
class NF4Config:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    # "gather": the code table read per value; "lut": prmt register lookups. "_dot": a 16-row
    # tl.dot tile (any 1..16 rows), else multiply-adds on the CUDA cores (1..4 rows). "mma": the
    # CUDA C++ tensor-core kernel of `llm.serving.nf4_mma` (any 1..16 rows; block_k is its lane group).
    # "xtab": the one-row kernel of `llm.serving.nf4_xtab` (tables of x; block_k is its K slice).
    kind: str = "gather"
    xperm: bool = False  # lut GEMV: x read value-major (written by the LoRA A kernel)
    prefetch_x: bool = False  # mma: each warp prefetches its next group's x into L1
    fuse_a: bool = False  # mma: the LoRA A product in the same launch (`nf4_mma.nf4_mma_linear`)
    shared_lookups: int = 0  # mma: a lane's absmax blocks per group decoded through shared memory ("t1".."t4")
    k_splits: int = 1  # mma: blocks per feature tile, each over a part of K ("k2".."k8")

    @property
    def dot(self) -> bool:
        return self.kind.endswith("_dot")

    @property
    def label(self) -> str:
        suffix = ("x" if self.xperm else "") + ("p" if self.prefetch_x else "") + ("f" if self.fuse_a else "")
        suffix += f"t{self.shared_lookups}" if self.shared_lookups else ""
        suffix += f"k{self.k_splits}" if self.k_splits > 1 else ""
        return f"{self.kind}_{self.block_n}x{self.block_k}w{self.num_warps}s{self.num_stages}{suffix}"

    @property
    def xtab_layout(self) -> nf4_xtab.XtabLayout:
        """An x-table configuration's layout: its warps and row groups ahead (num_warps, num_stages)."""
        if self.kind != "xtab":
            raise ValueError(f"{self.label} is not an x-table configuration")
        return nf4_xtab.XtabLayout(self.num_warps, self.num_stages)

    def fits_kernel(self, rows: int, rank: int) -> bool:
        """Whether its kernel exists for `rows` rows of x and this LoRA rank: a tensor-core kernel's
        shared memory must fit (the shared code pairs take 32 KB of the 48)."""
        if self.kind == "xtab":
            return rows == 1 and rank % 4 == 0
        return self.kind != "mma" or nf4_mma.fits(rows, rank, self.num_warps, self.block_n // nf4_mma.TILE_N,
                                                  self.fuse_a, self.shared_lookups)

    def fits(self, n: int, k: int, boundaries: Sequence[int]) -> bool:
        return (k % self.block_k == 0 and (k // self.block_k) % self.k_splits == 0 and n % self.block_n == 0
                and all(b % self.block_n == 0 for b in boundaries))


# Few on purpose: each is a Triton compile at start-up. Run 11 (bench/NOTES.md) timed more; these
# are the ones that won somewhere, plus the unmeasured "x" variants.
FMA_CONFIGS = (  # 2-4 rows, reading the code table per value
    NF4Config(4, 512, 4, 2),
    NF4Config(8, 256, 4, 2),
)
# 1 row; block_k spans 32-value slices, one per thread, each thread holding block_n rows of its slices.
LUT_GEMV_CONFIGS = (
    NF4Config(8, 4096, 4, 1, kind="lut"),
    NF4Config(16, 4096, 8, 1, kind="lut"),
    NF4Config(8, 2048, 2, 1, kind="lut"),
    NF4Config(8, 4096, 4, 1, kind="lut", xperm=True),
    NF4Config(16, 4096, 8, 1, kind="lut", xperm=True),
    NF4Config(8, 2048, 2, 1, kind="lut", xperm=True),
)
LUT_DOT_CONFIGS = (  # 2-16 rows; 64-row tiles take Hopper's warpgroup MMA (wide shared stores)
    NF4Config(64, 256, 4, 2, kind="lut_dot"),
    NF4Config(64, 128, 4, 2, kind="lut_dot"),
)
# 1..16 rows, where NVRTC and sm_80+ are there (llm.serving.nf4_mma); num_warps split K inside a block,
# block_n = 16 features per tile x tiles per warp, num_stages = groups of weights in registers ahead
# of the one computed; "p": x prefetched into L1; "f": the LoRA A product fused into the same launch;
# "tN": N of each lane's absmax blocks per group decoded through the shared code pairs; "kN": K split
# across N blocks per feature tile (`k_split_variants`). Run 13 retired
# the cp.async pipeline (10-30 % slower everywhere). These are the layouts within 2 % of the fastest
# for some projection and rows bucket in runs 22-23 (bench/NOTES.md, run 23): each is one NVRTC compile
# per row tile and K at start-up.
MMA_CONFIGS = tuple(
    NF4Config(nf4_mma.TILE_N * tiles, nf4_mma.GROUP, warps, ahead, kind="mma", prefetch_x=prefetch, fuse_a=fuse,
              shared_lookups=lookups)
    for warps, tiles, ahead, prefetch, fuse, lookups in (
        (4, 1, 1, False, False, 0), (8, 1, 1, False, False, 0), (4, 2, 1, False, False, 0),
        (4, 2, 1, True, False, 0), (4, 1, 2, True, False, 0),
        (8, 1, 1, False, True, 0), (16, 1, 1, False, True, 0), (4, 2, 1, False, True, 0), (4, 2, 1, True, True, 0),
        (4, 1, 2, False, True, 0), (8, 1, 2, False, True, 0),
        (8, 1, 1, False, True, 1), (8, 1, 1, False, True, 2), (16, 1, 1, False, True, 1),
        (4, 2, 1, False, True, 2), (4, 2, 1, False, True, 3), (4, 2, 1, True, True, 2), (4, 2, 1, True, True, 3),
        (4, 1, 2, False, True, 2), (8, 1, 2, False, True, 1), (8, 2, 1, False, True, 3),
    )
) + (
    # K split across two blocks per feature tile: `down` at one row 23.4 against the served 24.3 us a
    # layer (run 24, `bench/nf4_kernels.py 1 --k-splits`); no K split won `o` (8.5 us unsplit, 10.7 split)
    NF4Config(32, nf4_mma.GROUP, 8, 1, kind="mma", prefetch_x=True, fuse_a=True, shared_lookups=2, k_splits=2),
    # The LoRA A product in its own kernel before it, 16 warps: pruned after run 23 (`o` at one row 11.2
    # us a layer against 9.6 fused), timed again because the A kernels now launch programmatically
    # and the tensor-core kernel's first weight loads overlap them (with 8 warps, run 24: 11.3 us with
    # the A kernel against 13.9 fused). Run 25's tuner served it for `o` and q/k/v at 2 rows.
    NF4Config(16, nf4_mma.GROUP, 16, 1, kind="mma"),
)


def variants(config: NF4Config, rows: int, rank: int) -> list[NF4Config]:
    """A tensor-core layout with 1 .. 2 x tiles of each lane's absmax blocks decoded through the
    shared code pairs (those it does not have), where their shared memory fits."""
    tiles = config.block_n // nf4_mma.TILE_N
    others = (replace(config, shared_lookups=n) for n in range(1, 2 * tiles + 1) if n != config.shared_lookups)
    return [v for v in others if v.fits_kernel(rows, rank)]


def k_split_variants(config: NF4Config, n: int, k: int, boundaries: Sequence[int], rows: int,
                     rank: int) -> list[NF4Config]:
    """A tensor-core layout with K split across 2-8 blocks per feature tile and 4-16 warps per block,
    where every warp has a group of its own (and at most 64 warps share a tile): more, smaller blocks
    for the narrow projections. Their float32 sums add up in another order than the layout's own, so
    their bits may differ from it by a rounding; the reference path bounds both."""
    if config.kind != "mma":
        return []
    groups = k // config.block_k
    variants = (replace(config, num_warps=warps, k_splits=k_splits)
                for k_splits in nf4_mma.K_SPLIT_CHOICES[1:] for warps in nf4_mma.WARP_CHOICES
                if warps <= groups // k_splits and warps * k_splits <= 64)
    return [v for v in variants if v.fits(n, k, boundaries) and v.fits_kernel(rows, rank)]


# 1 row, where NVRTC and 128 KB of shared memory per block are there (llm.serving.nf4_xtab): num_warps
# per block, num_stages the row groups of weights each warp has in flight (`ahead`); block_n is the
# warp's 32-row group, block_k the 256-input slice.
def _xtab_config(layout: nf4_xtab.XtabLayout) -> NF4Config:
    return NF4Config(nf4_xtab.ROW_GROUP, nf4_xtab.SLICE, layout.warps, layout.ahead, kind="xtab")


XTAB_CONFIGS = tuple(_xtab_config(layout) for layout in nf4_xtab.SERVED_LAYOUTS)


def time_xtab_layouts(layouts: Sequence[nf4_xtab.XtabLayout]) -> None:
    """The x-table layouts the tuner times from now on, instead of `nf4_xtab.SERVED_LAYOUTS` (the bench's
    `--xtab-layouts`, to serve untimed candidates end to end; a tuning cache's key does not tell them apart)."""
    global XTAB_CONFIGS
    XTAB_CONFIGS = tuple(_xtab_config(layout) for layout in layouts)


def _xtab_configs(n: int, k: int, boundaries: Sequence[int]) -> list[NF4Config]:
    if not nf4_xtab.available("cuda"):
        return []
    if nf4_xtab.chunks_for(n, k, nf4_xtab.sm_count(torch.device("cuda"))) is None:
        return []
    return [c for c in XTAB_CONFIGS if c.fits(n, k, boundaries) and len(boundaries) < nf4_xtab.MAX_PARTS]


# Only where nothing above fits (small models, e.g. the tests' tiny one).
SMALL_CONFIGS = (NF4Config(16, 64, 4, 1, kind="gather_dot"),)
MAX_ROWS = 16


def _candidates(rows: int, n: int, k: int, boundaries: Sequence[int], mma: bool | None = None) -> list[NF4Config]:
    """The configurations the tuner times for this weight and rows bucket. Where the tensor-core
    kernel runs (`mma`, by default: NVRTC and sm_80+ here), 2-16 rows take it alone: in run 12 it
    was 1.7-4.4 x as fast as every Triton kernel there. With `mma=False`, the Triton kernels: the
    tuner's fallback when no MMA configuration compiles or matches the reference on this GPU."""
    mma = _mma_available() if mma is None else mma
    block_m = _block_m(rows)
    mma_configs = [c for c in MMA_CONFIGS if c.fits(n, k, boundaries)] if mma else []
    if mma_configs and block_m > 1:
        return mma_configs
    if block_m == 1:
        configs = LUT_GEMV_CONFIGS + tuple(_xtab_configs(n, k, boundaries) if mma else ())
    elif block_m == MAX_ROWS:
        configs = LUT_DOT_CONFIGS
    else:
        configs = FMA_CONFIGS + LUT_DOT_CONFIGS
    fitting = [c for c in configs if c.fits(n, k, boundaries)] + mma_configs
    # The small fallback is a 16-row tile: it serves any row count.
    return fitting or [c for c in SMALL_CONFIGS if c.fits(n, k, boundaries)]


def all_configs(rows: int, n: int, k: int, boundaries: Sequence[int], rank: int) -> list[NF4Config]:
    """Every configuration that can run this weight and LoRA rank at this row count: the served
    candidates and the Triton fallbacks (the GPU tests and the kernel bench check and time them all)."""
    both = _candidates(rows, n, k, boundaries) + _candidates(rows, n, k, boundaries, mma=False)
    return [c for c in dict.fromkeys(both) if c.fits_kernel(rows, rank)]


def _mma_available() -> bool:
    return nf4_mma.available("cuda")


def supports(n: int, k: int, boundaries: Sequence[int], rank: int) -> bool:
    """Some configuration fits this weight for every row count, and the rank is a power of two."""
    return rank > 0 and rank & (rank - 1) == 0 and all(_candidates(r, n, k, boundaries) for r in (1, MAX_ROWS))


def _block_m(rows: int) -> int:
    return 1 if rows == 1 else 2 if rows == 2 else 4 if rows <= 4 else MAX_ROWS


LUT_WORDS = 4  # 32-bit words per asm call (32 values, half a block): one absmax, its table built once


def lut_asm(code: Sequence[float], words: int = LUT_WORDS) -> str:
    """PTX decoding `words` words of packed NF4 (8 values each) that share one absmax.

    Operands (4 words): outputs $0..$31 (value i of word j at j * 8 + i: the float32 bit pattern of its
    bf16 weight), then the words $32..$35, then the absmax's bit pattern $36.
    First the 16 weights this block can hold, `cvt.rn.bf16x2(code[i] * absmax)` (float32 product,
    one round-to-nearest-even: bitsandbytes' own arithmetic), as a low-byte table L0..L3 and a
    high-byte table H0..H3 (byte e of the pair (L0, L1) is entry e's low byte, (L2, L3) entries 8-15).
    Then per word: `prmt` picks 4 bytes out of 8 by the nibbles' low 3 bits, twice (entries 0-7 and
    8-15), and a third `prmt` keeps the right one by each nibble's bit 3.

    bitsandbytes packs value 2j in the high nibble of byte j, 2j + 1 in the low one: nibble p of a
    little-endian word is value p ^ 1."""
    import struct

    if len(code) != 16:
        raise ValueError("an NF4 code table has 16 entries")
    hexes = [f"0f{struct.unpack('<I', struct.pack('<f', float(v)))[0]:08X}" for v in code]
    scale = 8 * words + words
    lines = [
        "{",
        ".reg .f32 sf, p<16>;",
        ".reg .b32 q<8>, L<4>, H<4>, sel, hs, a, b, lo, hi, P;",
        f"mov.b32 sf, ${scale};",
    ]
    lines += [f"mul.rn.f32 p{i}, sf, {hexes[i]};" for i in range(16)]
    lines += [f"cvt.rn.bf16x2.f32 q{i}, p{2 * i + 1}, p{2 * i};" for i in range(8)]  # entry 2i in the low half
    for t in range(4):
        lines += [f"prmt.b32 L{t}, q{2 * t}, q{2 * t + 1}, 0x6420;", f"prmt.b32 H{t}, q{2 * t}, q{2 * t + 1}, 0x7531;"]
    for word in range(words):
        lines += [
            f"and.b32 sel, ${8 * words + word}, 0x77777777;",
            f"shr.b32 hs, ${8 * words + word}, 1;",
            "and.b32 hs, hs, 0x44444444;",
            "or.b32 hs, hs, 0x32103210;",  # nibble p selects byte p of the low or (bit 3) the high lookup
        ]
        for half in range(2):
            if half:
                lines += ["shr.b32 sel, sel, 16;", "shr.b32 hs, hs, 16;"]
            lines += [
                "prmt.b32 a, L0, L1, sel;", "prmt.b32 b, L2, L3, sel;", "prmt.b32 lo, a, b, hs;",
                "prmt.b32 a, H0, H1, sel;", "prmt.b32 b, H2, H3, sel;", "prmt.b32 hi, a, b, hs;",
            ]
            for pair, selector in ((0, "0x4051"), (2, "0x6273")):
                value = 4 * half + pair  # P = value | value + 1 << 16, a bf16 pair (value sits in nibble value ^ 1)
                lines += [
                    f"prmt.b32 P, lo, hi, {selector};",
                    f"shl.b32 ${word * 8 + value}, P, 16;",
                    f"and.b32 ${word * 8 + value + 1}, P, 0xFFFF0000;",
                ]
    lines.append("}")
    return "\n".join(lines)


LUT_DEQUANT_ROWS, LUT_DEQUANT_COLS = 16, 256


def lut_constraints(words: int = LUT_WORDS) -> str:
    """`lut_asm(code, words)`'s operand constraints: 8 values out per word, the words and the absmax in."""
    return ",".join(["=r"] * (8 * words) + ["r"] * (words + 1))


LUT_CONSTRAINTS = lut_constraints()


def _lut_asm_for(code: torch.Tensor, words: int = LUT_WORDS) -> str:
    return _lut_asm_of(nf4_mma.code_values(code), words)


@functools.cache
def _lut_asm_of(values: tuple[float, ...], words: int) -> str:  # one per distinct table, not per layer's copy
    return lut_asm(values, words)


if _HAVE_TRITON:

    @triton.jit
    def _dequant_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n_bytes, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_bytes
        byte = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
        scale = tl.load(absmax_ptr + offs // 32, mask=mask, other=0.0)  # 64 values = 32 bytes per block
        hi = (tl.load(code_ptr + (byte >> 4)) * scale).to(out_ptr.dtype.element_ty)
        lo = (tl.load(code_ptr + (byte & 15)) * scale).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + 2 * offs, hi, mask=mask)
        tl.store(out_ptr + 2 * offs + 1, lo, mask=mask)

    @triton.jit
    def _fragment_offsets(m, k):
        """Where x[m, k] goes in the tensor-core kernel's x buffer (`llm.serving.nf4_mma`): each warp-wide
        load there is 256 contiguous bytes, the 4 values of every lane's MMA operand in lane order."""
        lane = (m % 8) * 4 + (k % 256) // 64
        return (((k // 256) * 2 + m // 8) * 16 + (k % 64) // 4) * 128 + lane * 4 + k % 4

    @triton.jit
    def _lora_a_fma_kernel(
        x_ptr, a_ptr, t_ptr, xperm_ptr, xq_ptr, M, K, RT, stride_x, K_PER_SPLIT,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, WRITE_XPERM: tl.constexpr,
        WRITE_XQ: tl.constexpr, GDC: tl.constexpr,
    ):
        # t[split, m, r] = sum over this split's K range of float32(x[m, k]) * a[r, k], for M <= 4.
        # WRITE_XPERM (one row): also float32(x) value-major for the LUT GEMV, xperm[(k % 32) * (K / 32)
        # + k / 32]: its threads, one per 32-value slice, then read each value index coalesced.
        # WRITE_XQ: also x in the tensor-core kernel's operand order (_fragment_offsets).
        after_previous_kernels(GDC)
        pid_r = tl.program_id(0)
        split = tl.program_id(1)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_k = tl.arange(0, BLOCK_K)
        r_mask = offs_r < RT
        a_rows = a_ptr + offs_r[:, None].to(tl.int64) * K
        acc0 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        k_start = split * K_PER_SPLIT
        for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
            k = k0 + offs_k
            a = tl.load(a_rows + k[None, :], mask=r_mask[:, None], other=0.0)
            x0 = tl.load(x_ptr + k)
            acc0 += a * x0.to(tl.float32)[None, :]
            if WRITE_XPERM:
                tl.store(xperm_ptr + (k % 32) * (K // 32) + k // 32, x0.to(tl.float32), mask=(k >= 0) & (pid_r == 0))
            if WRITE_XQ:
                tl.store(xq_ptr + _fragment_offsets(0, k), x0, mask=(k >= 0) & (pid_r == 0))
            if BLOCK_M > 1:
                x1 = tl.load(x_ptr + stride_x + k, mask=(k >= 0) & (M > 1), other=0.0)
                acc1 += a * x1.to(tl.float32)[None, :]
                if WRITE_XQ:
                    tl.store(xq_ptr + _fragment_offsets(1, k), x1, mask=(k >= 0) & (pid_r == 0) & (M > 1))
            if BLOCK_M > 2:
                x2 = tl.load(x_ptr + 2 * stride_x + k, mask=(k >= 0) & (M > 2), other=0.0)
                x3 = tl.load(x_ptr + 3 * stride_x + k, mask=(k >= 0) & (M > 3), other=0.0)
                acc2 += a * x2.to(tl.float32)[None, :]
                acc3 += a * x3.to(tl.float32)[None, :]
                if WRITE_XQ:
                    tl.store(xq_ptr + _fragment_offsets(2, k), x2, mask=(k >= 0) & (pid_r == 0) & (M > 2))
                    tl.store(xq_ptr + _fragment_offsets(3, k), x3, mask=(k >= 0) & (pid_r == 0) & (M > 3))
        t_row = t_ptr + split * M * RT + offs_r
        tl.store(t_row, tl.sum(acc0, axis=1), mask=r_mask)
        if BLOCK_M > 1:
            tl.store(t_row + RT, tl.sum(acc1, axis=1), mask=r_mask & (M > 1))
        if BLOCK_M > 2:
            tl.store(t_row + 2 * RT, tl.sum(acc2, axis=1), mask=r_mask & (M > 2))
            tl.store(t_row + 3 * RT, tl.sum(acc3, axis=1), mask=r_mask & (M > 3))

    @triton.jit
    def _lora_a_mma_kernel(
        x_ptr, a_ptr, part_ptr, t_ptr, arrivals_ptr, xq_ptr, M, K, RT, stride_x,
        XQ_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, GROUPS_P2: tl.constexpr, GDC: tl.constexpr,
    ):
        # The tensor-core kernel's inputs besides the weights, one 256-input group per program:
        # - t = float32(x) @ A.T, whole: each program stores its group's partial sums, and the last
        #   of an r block to arrive adds all groups' up in group order (the same result whichever
        #   program is last) and resets its arrival count for the next call;
        # - x in operand order (nf4_mma.operand_order): the [XQ_ROWS, 256] tile, rows 8 set + g and
        #   inputs 64 t + 4 step + j, is the contiguous [set, step, g, t, j] run at 4096 * group.
        after_previous_kernels(GDC)
        pid_r = tl.program_id(0)
        group = tl.program_id(1)
        groups = tl.num_programs(1)
        if pid_r == 0:
            offs_q = tl.arange(0, XQ_ROWS)
            offs_g = group * 256 + tl.arange(0, 256)
            tile = tl.load(x_ptr + offs_q[:, None] * stride_x + offs_g[None, :], mask=offs_q[:, None] < M, other=0.0)
            tile = tl.permute(tl.reshape(tile, (XQ_ROWS // 8, 8, 4, 16, 4)), (0, 3, 1, 2, 4))
            tl.store(xq_ptr + group * 4096 + tl.arange(0, XQ_ROWS * 256), tl.reshape(tile, (XQ_ROWS * 256,)))
        offs_m = tl.arange(0, 16)  # 5..16 rows
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        m_mask = offs_m < M
        r_mask = offs_r < RT
        products = tl.zeros((16, BLOCK_R, 64), dtype=tl.float32)  # added up across threads once, at the end
        for c in tl.static_range(4):
            offs_k = group * 256 + c * 64 + tl.arange(0, 64)
            x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=m_mask[:, None], other=0.0)
            a = tl.load(a_ptr + offs_r[:, None].to(tl.int64) * K + offs_k[None, :], mask=r_mask[:, None], other=0.0)
            products += x.to(tl.float32)[:, None, :] * a[None, :, :]
        part = tl.sum(products, axis=2)
        out_mask = m_mask[:, None] & r_mask[None, :]
        tl.store(part_ptr + (group * M + offs_m[:, None]) * RT + offs_r[None, :], part, mask=out_mask)
        tl.debug_barrier()  # every thread's partial sums stored before the release below
        arrived = tl.atomic_add(arrivals_ptr + pid_r, 1, sem="acq_rel", scope="gpu")
        if arrived == groups - 1:
            offs_s = tl.arange(0, GROUPS_P2)
            parts = tl.load(part_ptr + (offs_s[:, None, None] * M + offs_m[None, :, None]) * RT + offs_r[None, None, :],
                            mask=(offs_s[:, None, None] < groups) & out_mask[None, :, :], other=0.0,
                            cache_modifier=".cg")
            tl.store(t_ptr + offs_m[:, None] * RT + offs_r[None, :], tl.sum(parts, axis=0), mask=out_mask)
            tl.atomic_xchg(arrivals_ptr + pid_r, 0)

    @triton.jit
    def _lora_b_out_kernel(
        base_ptr, t_ptr, b_ptr, out_ptr, M, N_CHUNK, col0, stride_base, stride_out, RT, scaling, SEG1, SEG2,
        RANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROUND_LORA_FIRST: tl.constexpr,
    ):
        # A prompt's output columns col0.. (a dequantized chunk's cuBLAS product `base`): base + the
        # LoRA's B product with PEFT's roundings, written straight into the full output (no float32
        # [rows, N] intermediates, no concatenation). Tiles never straddle two LoRA parts.
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n0 = col0 + tl.program_id(1) * BLOCK_N
        part = (n0 >= SEG1).to(tl.int32) + (n0 >= SEG2).to(tl.int32)
        offs_r = tl.arange(0, RANK)
        m_mask = offs_m < M
        j_mask = offs_j < N_CHUNK
        t = tl.load(t_ptr + offs_m[:, None] * RT + part * RANK + offs_r[None, :], mask=m_mask[:, None], other=0.0)
        b = tl.load(b_ptr + (col0 + offs_j)[:, None].to(tl.int64) * RANK + offs_r[None, :], mask=j_mask[:, None],
                    other=0.0)
        # float32 on the tensor cores, split in three TF32 products: float32's accuracy (the
        # product rounds to bf16 next) at a fraction of the CUDA-core multiply-adds' time
        u = tl.dot(t.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="tf32x3") * scaling
        mask = m_mask[:, None] & j_mask[None, :]
        base = tl.load(base_ptr + offs_m[:, None].to(tl.int64) * stride_base + offs_j[None, :], mask=mask, other=0.0)
        tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_out + (col0 + offs_j)[None, :],
                 _finish(base, u, ROUND_LORA_FIRST), mask=mask)

    @triton.jit
    def _lora_u_out_kernel(
        base_ptr, u_ptr, out_ptr, M, N, stride_base, stride_u, stride_out, scaling,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROUND_LORA_FIRST: tl.constexpr,
    ):
        # A prompt's output columns (a dequantized chunk's cuBLAS product `base`): base + u * scaling
        # with PEFT's roundings, where u is PEFT's own float32 B product (cuBLAS: the seed's bits).
        # Launched without floating-point contraction: PEFT rounds the scaled product before the sum.
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        rows = offs_m[:, None].to(tl.int64)
        u = tl.load(u_ptr + rows * stride_u + offs_n[None, :], mask=mask, other=0.0)
        base = tl.load(base_ptr + rows * stride_base + offs_n[None, :], mask=mask, other=0.0)
        tl.store(out_ptr + rows * stride_out + offs_n[None, :], _finish(base, u * scaling, ROUND_LORA_FIRST), mask=mask)

    @triton.jit
    def _lora_a_split_kernel(
        x_ptr, a_ptr, t_ptr, M, K, stride_x, RT, K_PER_SPLIT,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # One split's partial t = x @ A.T, every part at once: bf16 x read as it is (exact in TF32),
        # float32 A split in TF32 products, float32 sums - what PEFT's float32 product of x cast to
        # float32 computes, without the cast's copy or a thin float32 GEMM. Split-K: a prompt chunk
        # (let alone a decode batch) has too few row blocks to fill the GPU.
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        split = tl.program_id(1)
        offs_r = tl.arange(0, BLOCK_R)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        r_mask = offs_r < RT
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(split * K_PER_SPLIT, (split + 1) * K_PER_SPLIT, BLOCK_K):
            x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_x + (k0 + offs_k)[None, :],
                        mask=m_mask[:, None], other=0.0)
            a = tl.load(a_ptr + offs_r[None, :] * K + (k0 + offs_k)[:, None], mask=r_mask[None, :], other=0.0)
            acc = tl.dot(x.to(tl.float32), a, acc, input_precision="tf32x3")
        tl.store(t_ptr + (split * M + offs_m[:, None]).to(tl.int64) * RT + offs_r[None, :], acc,
                 mask=m_mask[:, None] & r_mask[None, :])

    @triton.jit
    def _dequant_tile(packed_ptr, absmax_ptr, code_ptr, rows, k0, offs_b, K):
        """A [rows, BLOCK_K/2] tile of bytes as its high and low values: bf16(code[nibble] * absmax)."""
        byte = tl.load(packed_ptr + rows[:, None] * (K // 2) + (k0 // 2 + offs_b)[None, :]).to(tl.int32)
        # 64 values = 32 bytes share an absmax: neighbouring lanes read the same word (a broadcast).
        scale = tl.load(absmax_ptr + rows[:, None] * (K // 64) + ((k0 // 2 + offs_b) // 32)[None, :])
        w_hi = (tl.load(code_ptr + (byte >> 4)) * scale).to(tl.bfloat16)
        w_lo = (tl.load(code_ptr + (byte & 15)) * scale).to(tl.bfloat16)
        return w_hi, w_lo

    @triton.jit
    def _row_fma(acc, x_ptr, stride_x, m, M, k0, offs_k, w_hi, w_lo, HALF: tl.constexpr):
        # x read contiguously, then split into the values the high and low nibbles multiply
        x = tl.load(x_ptr + m * stride_x + k0 + offs_k, mask=(offs_k >= 0) & (m < M), other=0.0).to(tl.float32)
        x_even, x_odd = tl.split(tl.reshape(x, (HALF, 2)))
        return acc + w_hi.to(tl.float32) * x_even[None, :] + w_lo.to(tl.float32) * x_odd[None, :]

    @triton.jit
    def _finish(base, u, ROUND_LORA_FIRST: tl.constexpr):
        if ROUND_LORA_FIRST:  # PEFT's bnb layer: LoRA output to bf16, then the bf16 sum
            return (base.to(tl.float32) + u.to(tl.bfloat16).to(tl.float32)).to(tl.bfloat16)
        return (base.to(tl.float32) + u).to(tl.bfloat16)  # PEFT's plain Linear: one rounding

    @triton.jit
    def _row_out(row_sum, m, M, t_ptr, RT, part, b, offs_r, offs_n, y_ptr, stride_y, scaling,
                 T_SPLITS: tl.constexpr, RANK: tl.constexpr, ROUND_LORA_FIRST: tl.constexpr):
        valid = m < M
        base = row_sum.to(tl.bfloat16)
        t = tl.zeros((RANK,), dtype=tl.float32)
        for split in range(T_SPLITS):
            t += tl.load(t_ptr + split * M * RT + m * RT + part * RANK + offs_r, mask=(offs_r >= 0) & valid, other=0.0)
        u = tl.sum(b * t[None, :], axis=1) * scaling
        tl.store(y_ptr + m * stride_y + offs_n, _finish(base, u, ROUND_LORA_FIRST), mask=(offs_n >= 0) & valid)

    @triton.jit
    def _dot_out(base, n0, offs_n, rows, offs_m, m_mask, M, t_ptr, RT, b_ptr, y_ptr, stride_y, scaling, SEG1,
                 SEG2, T_SPLITS: tl.constexpr, RANK: tl.constexpr, ROUND_LORA_FIRST: tl.constexpr):
        """Store a 16-row tile: the bf16 base [16, BLOCK_N] plus the LoRA's B product (float32, exact
        products as PEFT's float32 LoRA), with PEFT's roundings."""
        part = (n0 >= SEG1).to(tl.int32) + (n0 >= SEG2).to(tl.int32)
        offs_r = tl.arange(0, RANK)
        t = tl.zeros((16, RANK), dtype=tl.float32)
        for split in range(T_SPLITS):
            t += tl.load(t_ptr + split * M * RT + offs_m[:, None] * RT + part * RANK + offs_r[None, :],
                         mask=m_mask[:, None], other=0.0)
        b = tl.load(b_ptr + rows[:, None] * RANK + offs_r[None, :])
        u = tl.dot(t, tl.trans(b), input_precision="ieee") * scaling
        tl.store(y_ptr + offs_m[:, None] * stride_y + offs_n[None, :], _finish(base, u, ROUND_LORA_FIRST),
                 mask=m_mask[:, None])

    @triton.jit
    def _nf4_gemv_kernel(
        x_ptr, packed_ptr, absmax_ptr, code_ptr, t_ptr, b_ptr, y_ptr,
        M, N, K, stride_x, stride_y, scaling, SEG1, SEG2, RT,
        T_SPLITS: tl.constexpr, RANK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROUND_LORA_FIRST: tl.constexpr,
    ):
        # 1..4 rows: multiply-reduce on the CUDA cores, one 2-D accumulator per row
        HALF: tl.constexpr = BLOCK_K // 2
        n0 = tl.program_id(0) * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_b = tl.arange(0, HALF)
        offs_k = tl.arange(0, BLOCK_K)
        rows = offs_n.to(tl.int64)
        acc0 = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w_hi, w_lo = _dequant_tile(packed_ptr, absmax_ptr, code_ptr, rows, k0, offs_b, K)
            acc0 = _row_fma(acc0, x_ptr, stride_x, 0, M, k0, offs_k, w_hi, w_lo, HALF)
            if BLOCK_M > 1:
                acc1 = _row_fma(acc1, x_ptr, stride_x, 1, M, k0, offs_k, w_hi, w_lo, HALF)
            if BLOCK_M > 2:
                acc2 = _row_fma(acc2, x_ptr, stride_x, 2, M, k0, offs_k, w_hi, w_lo, HALF)
                acc3 = _row_fma(acc3, x_ptr, stride_x, 3, M, k0, offs_k, w_hi, w_lo, HALF)
        # LoRA epilogue. A tile never straddles two fused parts (BLOCK_N divides their boundaries).
        part = (n0 >= SEG1).to(tl.int32) + (n0 >= SEG2).to(tl.int32)
        offs_r = tl.arange(0, RANK)
        b = tl.load(b_ptr + rows[:, None] * RANK + offs_r[None, :])
        _row_out(tl.sum(acc0, axis=1), 0, M, t_ptr, RT, part, b, offs_r, offs_n, y_ptr, stride_y, scaling,
                 T_SPLITS, RANK, ROUND_LORA_FIRST)
        if BLOCK_M > 1:
            _row_out(tl.sum(acc1, axis=1), 1, M, t_ptr, RT, part, b, offs_r, offs_n, y_ptr, stride_y, scaling,
                     T_SPLITS, RANK, ROUND_LORA_FIRST)
        if BLOCK_M > 2:
            _row_out(tl.sum(acc2, axis=1), 2, M, t_ptr, RT, part, b, offs_r, offs_n, y_ptr, stride_y, scaling,
                     T_SPLITS, RANK, ROUND_LORA_FIRST)
            _row_out(tl.sum(acc3, axis=1), 3, M, t_ptr, RT, part, b, offs_r, offs_n, y_ptr, stride_y, scaling,
                     T_SPLITS, RANK, ROUND_LORA_FIRST)

    @triton.jit
    def _nf4_dot_kernel(
        x_ptr, packed_ptr, absmax_ptr, code_ptr, t_ptr, b_ptr, y_ptr,
        M, N, K, stride_x, stride_y, scaling, SEG1, SEG2, RT,
        T_SPLITS: tl.constexpr, RANK: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROUND_LORA_FIRST: tl.constexpr,
    ):
        # 5..16 rows: the dequantized tile (high/low values interleaved back) into tl.dot
        HALF: tl.constexpr = BLOCK_K // 2
        n0 = tl.program_id(0) * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, 16)
        offs_b = tl.arange(0, HALF)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        rows = offs_n.to(tl.int64)
        x_rows = x_ptr + offs_m[:, None] * stride_x
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w_hi, w_lo = _dequant_tile(packed_ptr, absmax_ptr, code_ptr, rows, k0, offs_b, K)
            w = tl.reshape(tl.join(w_hi, w_lo), (BLOCK_N, BLOCK_K))
            x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_mask[:, None], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
        _dot_out(acc.to(tl.bfloat16), n0, offs_n, rows, offs_m, m_mask, M, t_ptr, RT, b_ptr, y_ptr, stride_y,
                 scaling, SEG1, SEG2, T_SPLITS, RANK, ROUND_LORA_FIRST)

    @triton.jit
    def _nf4_prompt_base_kernel(
        x_ptr, words_ptr, absmax_ptr, code_ptr, out_ptr, M, N, K, stride_x, stride_out, k_per_split,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SLICE: tl.constexpr,
        SPLIT_OUT: tl.constexpr, ASM: tl.constexpr, CONSTRAINTS: tl.constexpr, INTERPRETED: tl.constexpr,
    ):
        # A prompt's base product x @ dequant(W).T with cuBLAS's bits (`prompt_base`): each weight tile
        # decoded in registers by the decode kernels' table lookups (`lut_asm`: bitsandbytes' values,
        # bf16(code[nibble] * absmax), from 32-bit words, no per-value loads), one SLICE of a row's values
        # per thread, and multiplied on the tensor cores over K in order, as cuBLAS's kernels do, W as the
        # first operand (W @ x.T, a [BLOCK_N, BLOCK_M] tile) as cuBLAS lays out short prompts (run 47: x
        # first did not give its bits). program_id(2) takes one of cuBLAS's K splits, whose float32 partial
        # products a second kernel adds in order (SPLIT_OUT); else the bf16 product is stored.
        tl.static_assert(BLOCK_K == 64)  # one absmax block per row and step
        WORDS: tl.constexpr = SLICE // 8
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(2)
        offs_k = tl.arange(0, BLOCK_K)
        offs_h = tl.arange(0, BLOCK_K // SLICE)
        m_mask = offs_m < M
        rows = offs_n.to(tl.int64)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        k_start = split * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        word_at = words_ptr + rows[:, None] * (K // 8) + (k_start // 8 + offs_h * WORDS)[None, :]
        scale_at = absmax_ptr + rows[:, None] * (K // 64) + (k_start // 64)
        # Each step's words and absmax are asked for one step ahead: the decode depends on them, so
        # Triton's pipelining (for loads feeding tl.dot only) would leave every step waiting on memory
        everywhere = (offs_h >= 0)[None, :]
        words = _load_words(word_at, everywhere, WORDS)
        scale = tl.load(scale_at + 0 * offs_h[None, :])
        for k0 in range(k_start, k_end, BLOCK_K):
            step_words = words
            step_scale = scale
            ahead = k0 + BLOCK_K - k_start
            more = everywhere & (k0 + BLOCK_K < k_end)
            words = _load_words(word_at + ahead // 8, more, WORDS)
            scale = tl.load(scale_at + ahead // 64 + 0 * offs_h[None, :], mask=more, other=0.0)
            values = _decode_words(step_words, step_scale, code_ptr, ASM, CONSTRAINTS, INTERPRETED, WORDS)
            if SLICE == 32:
                w = _lut_tile(values, BLOCK_N, BLOCK_K)
            elif SLICE == 16:
                w = _lut_tile16(values, BLOCK_N, BLOCK_K)
            else:
                w = _lut_tile8(values, BLOCK_N, BLOCK_K)
            kk = k0 + offs_k
            xt = tl.load(x_ptr + offs_m[None, :].to(tl.int64) * stride_x + kk[:, None], mask=m_mask[None, :], other=0.0)
            if INTERPRETED:  # Triton's interpreter (numpy) multiplies no bf16 tiles
                acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(w, xt, acc)
        product = tl.trans(acc)
        if SPLIT_OUT:
            at = (split * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
            tl.store(out_ptr + at, product, mask=m_mask[:, None])
        else:
            at = offs_m[:, None].to(tl.int64) * stride_out + offs_n[None, :]
            tl.store(out_ptr + at, product.to(tl.bfloat16), mask=m_mask[:, None])

    @triton.jit
    def _load_words(at, mask, WORDS: tl.constexpr):
        """A slice's WORDS consecutive 32-bit words (8 values each) from `at`, as a tuple."""
        if WORDS == 4:
            words = (tl.load(at, mask=mask, other=0), tl.load(at + 1, mask=mask, other=0),
                     tl.load(at + 2, mask=mask, other=0), tl.load(at + 3, mask=mask, other=0))
        elif WORDS == 2:
            words = (tl.load(at, mask=mask, other=0), tl.load(at + 1, mask=mask, other=0))
        else:
            words = (tl.load(at, mask=mask, other=0),)
        return words

    @triton.jit
    def _split_sum_kernel(partial_ptr, out_ptr, M, N, splits, stride_out, BLOCK: tl.constexpr):
        # out = bf16(partial[0] + partial[1] + ...), added in order as cuBLAS's split-K reduction adds them
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M * N
        total = tl.load(partial_ptr + offs, mask=mask, other=0.0)
        for split in range(1, splits):
            total += tl.load(partial_ptr + split * M * N + offs, mask=mask, other=0.0)
        tl.store(out_ptr + (offs // N).to(tl.int64) * stride_out + offs % N, total.to(tl.bfloat16), mask=mask)

    @triton.jit
    def _lut_decode(word, scale, ASM: tl.constexpr, CONSTRAINTS: tl.constexpr):
        """Pointers to the first word of 32-value slices (and to their absmax) -> 32 tensors of the
        same shape: value i of word j at j * 8 + i (float32 bit patterns of the bf16 weights). Each
        slice is one thread's: its table is built once."""
        return _decode_words((tl.load(word), tl.load(word + 1), tl.load(word + 2), tl.load(word + 3)),
                             tl.load(scale), None, ASM, CONSTRAINTS, False)

    @triton.jit
    def _decode_words(words, scale, code_ptr, ASM: tl.constexpr, CONSTRAINTS: tl.constexpr,
                      INTERPRETED: tl.constexpr, WORDS: tl.constexpr = 4):
        """`_lut_decode` of loaded words (a tuple of WORDS tensors: 4, 2 or 1, as `lut_asm(code, WORDS)`
        takes them) and their absmax: 8 * WORDS tensors. INTERPRETED: the same values from the code table in
        memory, for Triton's interpreter, which runs no PTX."""
        if INTERPRETED:
            a = _emulated_word(words[0], scale, code_ptr)
            if WORDS == 4:
                b = _emulated_word(words[1], scale, code_ptr)
                c = _emulated_word(words[2], scale, code_ptr)
                d = _emulated_word(words[3], scale, code_ptr)
                values = (a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
                          c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7])
            elif WORDS == 2:
                b = _emulated_word(words[1], scale, code_ptr)
                values = (a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7])
            else:
                values = a
        elif WORDS == 4:
            values = tl.inline_asm_elementwise(
                ASM, CONSTRAINTS, [words[0], words[1], words[2], words[3], scale.to(tl.uint32, bitcast=True)],
                dtype=(tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32,
                       tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32,
                       tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32,
                       tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32),
                is_pure=True, pack=1,
            )
        elif WORDS == 2:
            values = tl.inline_asm_elementwise(
                ASM, CONSTRAINTS, [words[0], words[1], scale.to(tl.uint32, bitcast=True)],
                dtype=(tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32,
                       tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32),
                is_pure=True, pack=1,
            )
        else:
            values = tl.inline_asm_elementwise(
                ASM, CONSTRAINTS, [words[0], scale.to(tl.uint32, bitcast=True)],
                dtype=(tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32, tl.uint32),
                is_pure=True, pack=1,
            )
        return values

    @triton.jit
    def _emulated_word(word, scale, code_ptr):
        return (_emulated_value(word, 0, scale, code_ptr), _emulated_value(word, 1, scale, code_ptr),
                _emulated_value(word, 2, scale, code_ptr), _emulated_value(word, 3, scale, code_ptr),
                _emulated_value(word, 4, scale, code_ptr), _emulated_value(word, 5, scale, code_ptr),
                _emulated_value(word, 6, scale, code_ptr), _emulated_value(word, 7, scale, code_ptr))

    @triton.jit
    def _emulated_value(word, i: tl.constexpr, scale, code_ptr):
        # value i of a word sits in nibble i ^ 1 (bitsandbytes: value 2j in the high nibble of byte j)
        nibble = (word >> (4 * (i ^ 1))) & 15
        return (tl.load(code_ptr + nibble) * scale).to(tl.bfloat16).to(tl.float32).to(tl.uint32, bitcast=True)

    @triton.jit
    def _slice_pointers(words_ptr, absmax_ptr, rows, k0, offs_h, row_words, row_blocks):
        """[N, H] pointers to slice h of each row from column k0 (an absmax per 64 values = 2 slices)."""
        word = words_ptr + rows[:, None] * row_words + (k0 // 8 + offs_h * 4)[None, :]
        scale = absmax_ptr + rows[:, None] * row_blocks + (k0 // 64 + offs_h // 2)[None, :]
        return word, scale

    @triton.jit
    def _f32(bits):
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _lut_row_fma(acc, x_row, x_offs, values, V_STRIDE: tl.constexpr):
        # x_offs: [H, 1] offsets of each slice's first x value; value v (= 8j + i: value i of word j)
        # is V_STRIDE further per v (1 as x comes, K / 32 value-major)
        for v in tl.static_range(32):
            acc += tl.load(x_row + x_offs + v * V_STRIDE).to(tl.float32) * _f32(values[v])
        return acc

    @triton.jit
    def _bf16(bits):
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)  # exact: they are bf16 values

    @triton.jit
    def _lut_tile(values, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The 32 value tensors [N, H] as one bf16 [N, BLOCK_K] tile (value v = 8j + i of slice h at
        column 32h + v). `tl.join` appends its axis as the fastest one, so the pairs are joined from
        the highest bit of v down: the last join separates even and odd v."""
        p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15 = (
            tl.join(_bf16(values[0]), _bf16(values[16])),
            tl.join(_bf16(values[1]), _bf16(values[17])),
            tl.join(_bf16(values[2]), _bf16(values[18])),
            tl.join(_bf16(values[3]), _bf16(values[19])),
            tl.join(_bf16(values[4]), _bf16(values[20])),
            tl.join(_bf16(values[5]), _bf16(values[21])),
            tl.join(_bf16(values[6]), _bf16(values[22])),
            tl.join(_bf16(values[7]), _bf16(values[23])),
            tl.join(_bf16(values[8]), _bf16(values[24])),
            tl.join(_bf16(values[9]), _bf16(values[25])),
            tl.join(_bf16(values[10]), _bf16(values[26])),
            tl.join(_bf16(values[11]), _bf16(values[27])),
            tl.join(_bf16(values[12]), _bf16(values[28])),
            tl.join(_bf16(values[13]), _bf16(values[29])),
            tl.join(_bf16(values[14]), _bf16(values[30])),
            tl.join(_bf16(values[15]), _bf16(values[31])),
        )
        return tl.reshape(_join_eight(tl.join(p0, p8), tl.join(p1, p9), tl.join(p2, p10), tl.join(p3, p11),
                                      tl.join(p4, p12), tl.join(p5, p13), tl.join(p6, p14), tl.join(p7, p15)),
                          (BLOCK_N, BLOCK_K))

    @triton.jit
    def _lut_tile16(values, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """`_lut_tile` for 16-value slices (`lut_asm(code, 2)`): value v of slice h at column 16h + v."""
        p0, p1, p2, p3, p4, p5, p6, p7 = (
            tl.join(_bf16(values[0]), _bf16(values[8])),
            tl.join(_bf16(values[1]), _bf16(values[9])),
            tl.join(_bf16(values[2]), _bf16(values[10])),
            tl.join(_bf16(values[3]), _bf16(values[11])),
            tl.join(_bf16(values[4]), _bf16(values[12])),
            tl.join(_bf16(values[5]), _bf16(values[13])),
            tl.join(_bf16(values[6]), _bf16(values[14])),
            tl.join(_bf16(values[7]), _bf16(values[15])),
        )
        return tl.reshape(_join_eight(p0, p1, p2, p3, p4, p5, p6, p7), (BLOCK_N, BLOCK_K))

    @triton.jit
    def _lut_tile8(values, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """`_lut_tile` for 8-value slices (`lut_asm(code, 1)`): value v of slice h at column 8h + v."""
        return tl.reshape(_join_eight(_bf16(values[0]), _bf16(values[1]), _bf16(values[2]), _bf16(values[3]),
                                      _bf16(values[4]), _bf16(values[5]), _bf16(values[6]), _bf16(values[7])),
                          (BLOCK_N, BLOCK_K))

    @triton.jit
    def _join_eight(p0, p1, p2, p3, p4, p5, p6, p7):
        """Tensor i (bits b2 b1 b0 of its slice index) as the last axes (b2, b1, b0): joined from the
        highest bit down, as `tl.join` appends its axis as the fastest one."""
        q0, q1, q2, q3 = tl.join(p0, p4), tl.join(p1, p5), tl.join(p2, p6), tl.join(p3, p7)
        r0, r1 = tl.join(q0, q2), tl.join(q1, q3)
        return tl.join(r0, r1)

    @triton.jit
    def _lut_dequant_kernel(words_ptr, absmax_ptr, out_ptr, K, row_words, row_blocks, ASM: tl.constexpr,
                            CONSTRAINTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        k0 = tl.program_id(1) * BLOCK_K
        word, scale = _slice_pointers(words_ptr, absmax_ptr, rows, k0, tl.arange(0, BLOCK_K // 32), row_words,
                                      row_blocks)
        tile = _lut_tile(_lut_decode(word, scale, ASM, CONSTRAINTS), BLOCK_N, BLOCK_K)
        tl.store(out_ptr + rows[:, None] * K + (k0 + tl.arange(0, BLOCK_K))[None, :], tile)

    @triton.jit
    def _nf4_lut_gemv_kernel(
        x_ptr, words_ptr, absmax_ptr, t_ptr, b_ptr, y_ptr,
        M, N, stride_y, scaling, SEG1, SEG2, RT,
        K: tl.constexpr, T_SPLITS: tl.constexpr, RANK: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, ROUND_LORA_FIRST: tl.constexpr, ASM: tl.constexpr, CONSTRAINTS: tl.constexpr,
        XPERM: tl.constexpr,
    ):
        # One row (more rows measured faster on the code-table kernels and the MMA tile): every thread
        # decodes its 32-value slices once and multiply-adds them.
        # Tiles are [slices, rows]: with no contiguous axis to go by, Triton spreads the threads along
        # the first one, so each thread holds all BLOCK_N rows of its slices and reuses its x values.
        # K is a constant: the rows' addresses become immediate offsets of one base (fewer registers).
        H: tl.constexpr = BLOCK_K // 32
        n0 = tl.program_id(0) * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        rows = offs_n.to(tl.int64)
        offs_h = tl.arange(0, H)
        if XPERM:  # x value-major (float32): value v of slice h at v * K / 32 + h, coalesced
            x_offs = offs_h[:, None]
            V_STRIDE: tl.constexpr = K // 32
            K_SCALE: tl.constexpr = 32
        else:
            x_offs = (offs_h * 32)[:, None]
            V_STRIDE: tl.constexpr = 1
            K_SCALE: tl.constexpr = 1
        word = words_ptr + rows[None, :] * (K // 8) + (offs_h * 4)[:, None]
        scale = absmax_ptr + rows[None, :] * (K // 64) + (offs_h // 2)[:, None]
        acc = tl.zeros((H, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            values = _lut_decode(word + k0 // 8, scale + k0 // 64, ASM, CONSTRAINTS)
            acc = _lut_row_fma(acc, x_ptr + k0 // K_SCALE, x_offs, values, V_STRIDE)
        part = (n0 >= SEG1).to(tl.int32) + (n0 >= SEG2).to(tl.int32)
        offs_r = tl.arange(0, RANK)
        b = tl.load(b_ptr + rows[:, None] * RANK + offs_r[None, :])
        _row_out(tl.sum(acc, axis=0), 0, M, t_ptr, RT, part, b, offs_r, offs_n, y_ptr, stride_y, scaling,
                 T_SPLITS, RANK, ROUND_LORA_FIRST)

    @triton.jit
    def _nf4_lut_dot_kernel(
        x_ptr, words_ptr, absmax_ptr, t_ptr, b_ptr, y_ptr,
        M, N, K, stride_x, stride_y, scaling, SEG1, SEG2, RT, row_words, row_blocks,
        T_SPLITS: tl.constexpr, RANK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        ROUND_LORA_FIRST: tl.constexpr, ASM: tl.constexpr, CONSTRAINTS: tl.constexpr,
    ):
        # 2..16 rows: the decoded tile into tl.dot, as its left operand (w @ x.T): the tile is K-major
        # as decoded, so it goes to shared memory in wide stores.
        n0 = tl.program_id(0) * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, 16)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        rows = offs_n.to(tl.int64)
        x_rows = x_ptr + offs_m[:, None] * stride_x
        acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            word, scale = _slice_pointers(words_ptr, absmax_ptr, rows, k0, tl.arange(0, BLOCK_K // 32), row_words,
                                          row_blocks)
            w = _lut_tile(_lut_decode(word, scale, ASM, CONSTRAINTS), BLOCK_N, BLOCK_K)
            x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_mask[:, None], other=0.0)
            acc = tl.dot(w, tl.trans(x), acc)
        _dot_out(tl.trans(acc).to(tl.bfloat16), n0, offs_n, rows, offs_m, m_mask, M, t_ptr, RT, b_ptr, y_ptr,
                 stride_y, scaling, SEG1, SEG2, T_SPLITS, RANK, ROUND_LORA_FIRST)


def dequantize(
    packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """bf16(code[nibble] * absmax) for every value."""
    n, half = packed.shape
    out = torch.empty((n, half * 2), dtype=dtype, device=packed.device)
    if dtype == torch.bfloat16 and n % LUT_DEQUANT_ROWS == 0 and (half * 2) % LUT_DEQUANT_COLS == 0:
        k = half * 2
        _lut_dequant_kernel[(n // LUT_DEQUANT_ROWS, k // LUT_DEQUANT_COLS)](
            packed.view(torch.int32), absmax, out, k, k // 8, k // 64, ASM=_lut_asm_for(code),
            CONSTRAINTS=LUT_CONSTRAINTS,
            BLOCK_N=LUT_DEQUANT_ROWS, BLOCK_K=LUT_DEQUANT_COLS, num_warps=4)
        return out
    n_bytes = packed.numel()
    block = 1024
    _dequant_kernel[(triton.cdiv(n_bytes, block),)](packed, absmax, code, out, n_bytes, BLOCK=block)
    return out


class NF4Plan:
    """The configuration per (projection shape, rows bucket), chosen by timing at start-up."""

    def __init__(self) -> None:
        self._choice: dict[tuple[int, int, int], NF4Config] = {}
        # Where dequantizing into cuBLAS (the prompt path) measured faster than the fused kernel.
        self._reference: set[tuple[int, int, int]] = set()
        self.timings_ms: dict[str, float] = {}

    def use_reference(self, rows: int, n: int, k: int) -> bool:
        return (_block_m(rows), n, k) in self._reference

    def get(self, rows: int, n: int, k: int) -> NF4Config | None:
        return self._choice.get((_block_m(rows), n, k))

    def set(self, rows: int, n: int, k: int, config: NF4Config) -> None:
        self._choice[(_block_m(rows), n, k)] = config

    def summary(self) -> dict[str, str]:
        return {f"m{m}_{n}x{k}": "dequant+cublas" if (m, n, k) in self._reference else c.label
                for (m, n, k), c in sorted(self._choice.items())}


PLAN = NF4Plan()
CANDIDATE_MS: dict[str, float] = {}  # every config the tuner timed (ms per step, all layers): the bench reports it


def default_config(rows: int, n: int, k: int, boundaries: Sequence[int]) -> NF4Config:
    """For a weight the tuner did not see: a Triton kernel (the CUDA one is served only once the tuner
    has checked it on this GPU)."""
    candidates = _candidates(rows, n, k, boundaries, mma=False)
    if not candidates:
        raise ValueError(f"no NF4 kernel configuration fits a {n}x{k} weight")
    return candidates[0]


def lora_a_product(
    x: torch.Tensor, lora: LoraParts, block_m: int, dot: bool, xperm: torch.Tensor | None = None,
    max_splits: int = 16, block_r: int = 16, xq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Partial sums (split-K) of x @ A.T in float32, [splits, rows, sum of ranks]; the GEMV's epilogue
    adds the splits up. With `xperm` (one row), x is also written there value-major (float32); with
    `xq` (1-4 rows), in the tensor-core kernel's operand order."""
    m, k = x.shape
    rt = lora.a.shape[0]
    a_block_k = 128 if k % 128 == 0 else 64
    splits = next(s for s in (16, 8, 4, 2, 1) if s <= max_splits and k % (s * a_block_k) == 0)
    t = torch.empty((splits, m, rt), dtype=torch.float32, device=x.device)
    if dot:
        if xq is not None:
            raise ValueError("x in operand order comes from the multiply-add kernel (1-4 rows) only")
        _lora_a_split(x, lora, t, splits)
    else:
        _lora_a_fma_kernel[(triton.cdiv(rt, block_r), splits)](
            x, lora.a, t, t if xperm is None else xperm, t if xq is None else xq, m, k, rt, x.stride(0), k // splits,
            BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=a_block_k, WRITE_XPERM=xperm is not None,
            WRITE_XQ=xq is not None, num_warps=4, **programmatic_options(x.device),
        )
    return t, splits


MMA_LORA_BLOCK_R = 8  # ranks per LoRA `A` program of the tensor-core path: enough programs to fill the GPU
T_SUM_BYTES = 16 << 20  # 1-4 rows: what all tensor-core blocks together may read of the split-K partial sums


def lora_splits_cap(rows: int, n: int, rank: int) -> int:
    """1-4 rows: at most this many LoRA `A` split-K partial sums (a power of two, 1..16). Every block
    of the tensor-core kernel adds them up for its rows, so their traffic grows with blocks x rows x
    splits, while more splits keep the A product's own blocks busy."""
    per_split = (n // nf4_mma.TILE_N) * rows * rank * 4
    cap = 16
    while cap > 1 and cap * per_split > T_SUM_BYTES:
        cap //= 2
    return cap


def mma_inputs(x: torch.Tensor, n: int, lora: LoraParts) -> tuple[torch.Tensor, torch.Tensor]:
    """What the tensor-core kernel reads besides the weights, from one LoRA `A` kernel: x in its
    operand order (16 * K values) and t = float32(x) @ A.T as split-K partial sums [splits, rows,
    sum of ranks], which the kernel adds up.
    - 1-4 rows: a few splits (the partial-sum traffic bound above), the multiply-add kernel (run 13:
      2-3 us, where whole sums cost 5).
    - 5-16 rows: t whole, one program per 256-input group and rank block, the groups' sums added up
      by the last program of each rank block to finish (run 13: 11-16 us, where the split kernel
      took 9-29 with the few splits every block can afford to add up)."""
    m, k = x.shape
    rt = lora.a.shape[0]
    xq = torch.empty((16 * k,), dtype=torch.bfloat16, device=x.device)
    if m <= 4:
        t, _ = lora_a_product(x, lora, _block_m(m), False, max_splits=lora_splits_cap(m, n, lora.rank),
                              block_r=MMA_LORA_BLOCK_R, xq=xq)
        return xq, t
    groups = k // nf4_mma.GROUP
    r_blocks = triton.cdiv(rt, MMA_LORA_BLOCK_R)
    arrivals = lora.counters("arrivals", r_blocks, x.device)
    part = torch.empty((groups, m, rt), dtype=torch.float32, device=x.device)
    t = torch.empty((1, m, rt), dtype=torch.float32, device=x.device)
    _lora_a_mma_kernel[(r_blocks, groups)](
        x, lora.a, part, t, arrivals, xq, m, k, rt, x.stride(0),
        XQ_ROWS=8 if m <= 8 else 16, BLOCK_R=MMA_LORA_BLOCK_R, GROUPS_P2=triton.next_power_of_2(groups), num_warps=4,
        **programmatic_options(x.device),
    )
    return xq, t


PROMPT_TILE = 64  # rows and output columns per program of the prompt path's LoRA B kernel


def prompt_path_fits(boundaries: Sequence[int]) -> bool:
    """The prompt path's tiles never straddle two LoRA parts (original projections)."""
    return all(b % PROMPT_TILE == 0 for b in boundaries)


PROMPT_A_ROWS = 64  # rows per program of the split-K LoRA A kernel (prompts, and the Triton dot kernels)
PROMPT_A_K = 64
PROMPT_A_PROGRAMS = 256  # enough split-K programs to fill the GPU


def _lora_a_split(x: torch.Tensor, lora: LoraParts, partial: torch.Tensor, splits: int) -> None:
    """partial[split] = x @ A.T over the split's share of K ([splits, rows, sum of ranks], float32)."""
    m, k = x.shape
    rt = lora.a.shape[0]
    _lora_a_split_kernel[(triton.cdiv(m, PROMPT_A_ROWS), splits)](
        x, lora.a, partial, m, k, x.stride(0), rt, k // splits,
        BLOCK_M=PROMPT_A_ROWS, BLOCK_R=max(16, triton.next_power_of_2(rt)), BLOCK_K=PROMPT_A_K, num_warps=4,
    )


def lora_a_prompt(x: torch.Tensor, lora: LoraParts) -> torch.Tensor:
    """t = x @ A.T in float32 for a prompt's bf16 rows ([rows, sum of ranks]): every part's
    low-rank input at once, PEFT's product, as split-K partial sums added up in split order
    (float32 A where K tiles evenly; PEFT's own call otherwise)."""
    m, k = x.shape
    rt = lora.a.shape[0]
    if lora.a.dtype != torch.float32 or x.dtype != torch.bfloat16 or k % PROMPT_A_K or x.stride(1) != 1:
        return F.linear(x.to(lora.a.dtype), lora.a)
    row_blocks = triton.cdiv(m, PROMPT_A_ROWS)
    fitting = [s for s in (1, 2, 4, 8, 16, 32) if k % (s * PROMPT_A_K) == 0]
    splits = next((s for s in fitting if row_blocks * s >= PROMPT_A_PROGRAMS), fitting[-1])
    partial = torch.empty((splits, m, rt), dtype=torch.float32, device=x.device)
    _lora_a_split(x, lora, partial, splits)
    return partial[0] if splits == 1 else partial.sum(0)


# Prompts of up to this many rows may take the fused prompt base kernel (`prompt_base`), where the plan
# found cuBLAS's bits and measured it faster than dequantizing for cuBLAS.
FUSED_PROMPT_MAX_ROWS = 512
# Off: run 47 (H100) found cuBLAS's bits for every prompt shape of the 7B (6 row counts x 4 projections)
# but that kernel 7-20 x slower than dequantize + cuBLAS (per-value byte loads and code gathers); planning
# it at start-up would only add its compiles. Its decode is now the decode kernels' register lookups on
# 32-bit words (a quarter of the instructions offline, run 48), not yet timed: turn this on where
# tests/gpu/test_nf4_prompt_base.py prints it faster.
SERVE_FUSED_PROMPT_BASE = False
PROMPT_BASE_N = 64  # output columns per program of the fused prompt base kernel
PROMPT_BASE_K = 64  # K per step: an absmax block; cuBLAS's K splits are multiples of it (run 47)
# Warps per program the planner tries: 4 decode a row's 64 values a step in two 32-value slices, 8 in four
# 16-value slices, 16 in eight 8-value ones (each thread's table built for fewer values, more threads per
# weight tile: prompts of few rows have few programs, N / 64 per K split, 64 for q on 132 SMs)
PROMPT_BASE_WARPS = (4, 8, 16)
MAX_BASE_SPLITS = 16


@dataclass(frozen=True)
class PromptBasePlan:
    """The K split with which the fused prompt base gives cuBLAS's bits for one shape, its fastest warps
    per program, and whether it measured faster than dequantizing for cuBLAS (only then is it served)."""

    splits: int
    k_per_split: int
    warps: int
    faster: bool


# (rows, n, k, device index) -> the shape's plan; None where no split gave cuBLAS's bits
PROMPT_BASE_PLANS: dict[tuple[int, int, int, int | None], PromptBasePlan | None] = {}
PROMPT_BASE_REPORT: dict[str, dict] = {}


def _prompt_base_rows(m: int) -> int:
    """BLOCK_M: one row tile for a short prompt (each weight tile dequantized once)."""
    return 32 if m <= 32 else 64 if m <= 64 else 128


def base_split_candidates(k: int) -> list[tuple[int, int]]:
    """(splits, K per split) that cuBLAS's split-K kernels may use for K: none first, then 2..16 parts of
    ceil(K / parts) rounded up to whole 64-value steps, or one step more (run 47: 3 x 1,408 of 4,096,
    3 x 4,800 and 4 x 3,584 of 14,336)."""
    found = [(1, k)]
    for splits in range(2, MAX_BASE_SPLITS + 1):
        steps = -(-k // (splits * PROMPT_BASE_K))  # ceil(ceil(k / splits) / 64) = ceil(k / (64 splits))
        for extra in (0, 1):
            per = (steps + extra) * PROMPT_BASE_K
            if (splits - 1) * per < k and (splits, per) not in found:
                found.append((splits, per))
    return found


def _part(weight: NF4Matrix, start: int, end: int) -> NF4Matrix:
    from llm.serving.nf4 import NF4Matrix

    return NF4Matrix(packed=weight.packed[start:end], absmax=weight.absmax[start:end], code=weight.code)


def prompt_base(x: torch.Tensor, weight: NF4Matrix, splits: int, k_per_split: int, warps: int = PROMPT_BASE_WARPS[0],
                out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ dequant(W).T in bf16 for a prompt's rows, each weight tile dequantized in registers, K in
    `splits` parts of `k_per_split` added in order: with the split cuBLAS picks for this shape, its bits
    (`plan_prompt_base`). `warps`: one of PROMPT_BASE_WARPS. `out`: a [rows, N] view (row stride free)
    to write into."""
    if warps not in PROMPT_BASE_WARPS:
        raise ValueError(f"the fused prompt base runs {PROMPT_BASE_WARPS} warps per program, not {warps}")
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=torch.bfloat16, device=x.device) if out is None else out
    block_m = _prompt_base_rows(m)
    grid = (triton.cdiv(m, block_m), n // PROMPT_BASE_N, splits)
    # Triton's interpreter (TRITON_INTERPRET=1 at import) builds no JITFunction: there the decode is emulated
    interpreted = not isinstance(_nf4_prompt_base_kernel, triton.runtime.JITFunction)
    slice_words = 16 // warps  # one slice per thread: 64 rows x 64 values a step = 32 x warps slices of 8 words
    common = dict(BLOCK_M=block_m, BLOCK_N=PROMPT_BASE_N, BLOCK_K=PROMPT_BASE_K, SLICE=8 * slice_words,
                  num_warps=warps, num_stages=3, ASM="" if interpreted else _lut_asm_for(weight.code, slice_words),
                  CONSTRAINTS=lut_constraints(slice_words), INTERPRETED=interpreted)
    words = weight.packed.view(torch.int32)
    if splits == 1:
        _nf4_prompt_base_kernel[grid](x, words, weight.absmax, weight.code, out, m, n, k, x.stride(0),
                                      out.stride(0), k, SPLIT_OUT=False, **common)
        return out
    partial = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    _nf4_prompt_base_kernel[grid](x, words, weight.absmax, weight.code, partial, m, n, k, x.stride(0),
                                  n, k_per_split, SPLIT_OUT=True, **common)
    _split_sum_kernel[(triton.cdiv(m * n, 1024),)](partial, out, m, n, splits, out.stride(0), BLOCK=1024,
                                                   num_warps=4)
    return out


def plan_prompt_base(m: int, weight: NF4Matrix) -> PromptBasePlan | None:
    """The fused prompt base's plan for `m` rows of this weight (an original projection's rows), or None:
    found once per shape by running cuBLAS (F.linear over the dequantized weight, as the seed) and the
    fused kernel with every candidate K split on random rows, keeping the first with the same bits, then
    timing cuBLAS and every warps per program that gives those bits too. Never during a CUDA graph
    capture (there: None, unplanned)."""
    n, k = weight.shape
    device = weight.packed.device
    key = (m, n, k, device.index)
    if key in PROMPT_BASE_PLANS:
        return PROMPT_BASE_PLANS[key]
    if (not available(device) or m > FUSED_PROMPT_MAX_ROWS or n % PROMPT_BASE_N or k % PROMPT_BASE_K
            or torch.cuda.is_current_stream_capturing()):
        return None
    generator = torch.Generator(device=device).manual_seed(m * 31 + n)
    x = torch.randn((m, k), generator=generator, device=device).to(torch.bfloat16)
    reference = F.linear(x, weight.dequantize(torch.bfloat16))
    split, report = None, {"rows": m, "n": n, "k": k}
    try:
        split = next((s for s in base_split_candidates(k) if torch.equal(prompt_base(x, weight, *s), reference)), None)
    except Exception as error:  # noqa: BLE001 - e.g. Triton refusing the kernel here: dequantize for cuBLAS
        report["error"] = repr(error)[:200]
    plan = None
    if split is not None:
        fused_ms, other_bits = {}, []
        for warps in PROMPT_BASE_WARPS:
            try:
                if warps == PROMPT_BASE_WARPS[0] or torch.equal(prompt_base(x, weight, *split, warps), reference):
                    fused_ms[warps] = graph_time_ms(lambda w=warps: prompt_base(x, weight, *split, w))
                else:
                    other_bits.append(warps)
            except Exception as error:  # noqa: BLE001 - another layout Triton refuses here: the others stay
                report[f"error_w{warps}"] = repr(error)[:200]
        if other_bits:
            report["warps_without_cublas_bits"] = other_bits
        warps = min(fused_ms, key=fused_ms.get)
        cublas_ms = graph_time_ms(lambda: F.linear(x, weight.dequantize(torch.bfloat16)))
        plan = PromptBasePlan(*split, warps=warps, faster=fused_ms[warps] < cublas_ms)
        report.update(splits=split[0], k_per_split=split[1], warps=warps,
                      fused_ms={str(w): round(ms, 4) for w, ms in fused_ms.items()},
                      dequantize_cublas_ms=round(cublas_ms, 4))
    report["cublas_bits"] = plan is not None
    report["fused"] = plan is not None and plan.faster
    PROMPT_BASE_REPORT[f"m{m}_{n}x{k}"] = report
    logger.info("nf4 prompt base %s: %s", f"m{m}_{n}x{k}", report)
    PROMPT_BASE_PLANS[key] = plan
    return plan


def plan_prompt_bases(groups: dict[str, list[NF4Projection]], rows: Sequence[int]) -> dict[str, dict]:
    """Plan the fused prompt base (`plan_prompt_base`) for every prompt row count in `rows` (the prefill
    buckets' rows per call) and every original projection of the first layer's groups, before any
    CUDA graph capture; returns the plans' report (by "m{rows}_{n}x{k}"). Nothing while the fused base
    is not served (`SERVE_FUSED_PROMPT_BASE`)."""
    if not SERVE_FUSED_PROMPT_BASE:
        return {}
    for m in sorted({r for r in rows if r <= FUSED_PROMPT_MAX_ROWS}):
        for projections in groups.values():
            first = projections[0]
            for start, end, _ in first.lora.segments:
                plan_prompt_base(m, _part(first.weight, start, end))
    return dict(PROMPT_BASE_REPORT)


def _fused_prompt_base(x: torch.Tensor, weight: NF4Matrix, lora: LoraParts) -> torch.Tensor | None:
    """The whole projection's base product through the fused kernel, each original projection (LoRA
    part) with its own split; None unless it is served and every part's plan is faster."""
    if not SERVE_FUSED_PROMPT_BASE:
        return None
    parts = []
    for start, end, _ in lora.segments:
        part = _part(weight, start, end)
        plan = plan_prompt_base(x.shape[0], part)
        if plan is None or not plan.faster:
            return None
        parts.append((start, end, part, plan))
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=torch.bfloat16, device=x.device)
    for start, end, part, plan in parts:
        prompt_base(x, part, plan.splits, plan.k_per_split, plan.warps, out=out[:, start:end])
    return out


def nf4_prompt_linear(
    x: torch.Tensor, weight: NF4Matrix, lora: LoraParts, round_lora_first: bool, pefts_products: bool = False,
) -> torch.Tensor:
    """y = x @ dequant(W).T + scaling * B(A(x)) with PEFT's roundings, for a prompt's many rows, one
    original projection (LoRA part) at a time as the seed's modules multiply: its base product (the
    fused kernel where `plan_prompt_base` found cuBLAS's bits and a faster kernel, else its whole weight
    dequantized for cuBLAS: cuBLAS's kernel and K split depend on N, so a part's rows are never split)
    and the LoRA's B product summed into the output by one kernel.
    `pefts_products`: the LoRA's A and B products are PEFT's own cuBLAS float32 calls, one pair per
    original projection, then one kernel scales, rounds and adds: the seed's bits (run 20). Otherwise
    one kernel computes every part's A product and both products run on the tensor cores as three
    TF32 products (float32's accuracy, not cuBLAS's bits; faster)."""
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if pefts_products:
        t_parts = lora.a_products(x)
    else:
        t = lora_a_prompt(x, lora)
        seg1, seg2 = lora.part_starts(n)
    fused = _fused_prompt_base(x, weight, lora)
    for index, (start, end, _) in enumerate(lora.segments):
        cols = end - start
        base = fused[:, start:end] if fused is not None else F.linear(x, weight.dequantize(x.dtype, slice(start, end)))
        if not pefts_products:
            _lora_b_out_kernel[(triton.cdiv(m, PROMPT_TILE), triton.cdiv(cols, PROMPT_TILE))](
                base, t, lora.b, out, m, cols, start, base.stride(0), out.stride(0), t.shape[1], lora.scaling, seg1,
                seg2, RANK=lora.rank, BLOCK_M=PROMPT_TILE, BLOCK_N=PROMPT_TILE, ROUND_LORA_FIRST=round_lora_first,
                num_warps=4,
            )
            continue
        u = F.linear(t_parts[index], lora.b[start:end])
        _lora_u_out_kernel[(triton.cdiv(m, PROMPT_TILE), triton.cdiv(cols, PROMPT_TILE))](
            base, u, out[:, start:], m, cols, base.stride(0), u.stride(0), out.stride(0),
            lora.scaling, BLOCK_M=PROMPT_TILE, BLOCK_N=PROMPT_TILE, ROUND_LORA_FIRST=round_lora_first,
            num_warps=4, enable_fp_fusion=False,
        )
    return out


def nf4_lora_linear(
    x: torch.Tensor,
    weight: NF4Matrix,
    lora: LoraParts,
    round_lora_first: bool = True,
    config: NF4Config | None = None,
) -> torch.Tensor:
    """y = x @ dequant(W).T + scaling * B(A(x)) with PEFT's roundings, for 1..16 rows of x."""
    m, k = x.shape
    n = weight.packed.shape[0]
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"the NF4 kernel takes 1..{MAX_ROWS} rows, got {m}")
    config = config or PLAN.get(m, n, k) or default_config(m, n, k, lora.boundaries)
    x = x.contiguous()
    rt = lora.a.shape[0]
    block_m = _block_m(m)
    seg1, seg2 = lora.part_starts(n)
    if config.kind == "xtab":
        return nf4_xtab.nf4_xtab_linear(x, weight, lora, seg1, seg2, round_lora_first, config.xtab_layout,
                                        nf4_mma.code_values(weight.code))
    if config.kind == "mma":
        warps, tiles, prefetch_x, ahead, fuse_a, shared_lookups, k_splits = mma_layout(config)
        return nf4_mma.nf4_mma_linear(x, weight, lora, seg1, seg2, round_lora_first, warps, tiles, prefetch_x, ahead,
                                      inputs=None if fuse_a else mma_inputs(x, n, lora),
                                      shared_lookups=shared_lookups, k_splits=k_splits)
    xperm = torch.empty((k,), dtype=torch.float32, device=x.device) if config.xperm else None
    t, splits = lora_a_product(x, lora, block_m, config.dot, xperm)
    y = torch.empty((m, n), dtype=torch.bfloat16, device=x.device)
    args = (x, weight.packed, weight.absmax, weight.code, t, lora.b, y,
            m, n, k, x.stride(0), y.stride(0), lora.scaling, seg1, seg2, rt)
    grid = (n // config.block_n,)
    if config.kind.startswith("lut"):
        words = weight.packed.view(torch.int32)
        asm = _lut_asm_for(weight.code)
        common = dict(T_SPLITS=splits, RANK=lora.rank, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                      ROUND_LORA_FIRST=round_lora_first, ASM=asm, CONSTRAINTS=LUT_CONSTRAINTS,
                      num_warps=config.num_warps, num_stages=config.num_stages)
        if config.dot:
            _nf4_lut_dot_kernel[grid](x, words, weight.absmax, t, lora.b, y, m, n, k, x.stride(0), y.stride(0),
                                      lora.scaling, seg1, seg2, rt, k // 8, k // 64, **common)
        else:
            _nf4_lut_gemv_kernel[grid](x if xperm is None else xperm, words, weight.absmax, t, lora.b, y, m, n,
                                       y.stride(0), lora.scaling, seg1, seg2, rt, K=k, XPERM=xperm is not None,
                                       **common)
        return y
    if config.dot:
        _nf4_dot_kernel[grid](*args, T_SPLITS=splits, RANK=lora.rank, BLOCK_N=config.block_n,
                              BLOCK_K=config.block_k, ROUND_LORA_FIRST=round_lora_first,
                              num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        _nf4_gemv_kernel[grid](*args, T_SPLITS=splits, RANK=lora.rank, BLOCK_M=block_m, BLOCK_N=config.block_n,
                               BLOCK_K=config.block_k, ROUND_LORA_FIRST=round_lora_first,
                               num_warps=config.num_warps, num_stages=config.num_stages)
    return y


def _one_row_xtab(rows: int, weight: NF4Matrix) -> NF4Config | None:
    """The x-table layout where the plan serves it for one row of this weight, else None."""
    if rows != 1:
        return None
    config = PLAN.get(1, *weight.shape)
    return config if config is not None and config.kind == "xtab" else None


def nf4_after_silu_mul(gate_up: torch.Tensor, weight: NF4Matrix, lora: LoraParts,
                       round_lora_first: bool = True) -> torch.Tensor | None:
    """`nf4_lora_linear` of `silu(gate) * up` for gate_up = [gate | up], the element-wise step inside
    the one-row x-table launch; None where the plan does not serve that kernel here."""
    config = _one_row_xtab(gate_up.shape[0], weight)
    if config is None:
        return None
    return nf4_xtab.nf4_xtab_after_silu_mul(gate_up, weight, lora, *lora.part_starts(weight.shape[0]),
                                            round_lora_first, config.xtab_layout, nf4_mma.code_values(weight.code))


def nf4_after_add_norm(residual: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                       weight: NF4Matrix, lora: LoraParts,
                       round_lora_first: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(residual + delta, `nf4_lora_linear` of its MistralRMSNorm), the add and the norm inside the
    one-row x-table launch; None where the plan does not serve that kernel here."""
    config = _one_row_xtab(residual.shape[0], weight)
    if config is None:
        return None
    return nf4_xtab.nf4_xtab_after_add_norm(residual, delta, norm_weight, eps, weight, lora,
                                            *lora.part_starts(weight.shape[0]), round_lora_first,
                                            config.xtab_layout, nf4_mma.code_values(weight.code))


def matches_reference(out: torch.Tensor, reference: torch.Tensor) -> bool:
    """Within one bf16 rounding step of the reference path's largest output: only the float32
    summation order differs (tests/gpu asserts the same bound)."""
    tolerance = 2 * reference.float().abs().max().item() * 2**-8
    return (out.float() - reference.float()).abs().max().item() <= tolerance


def _fastest(name: str, group: list, rows: int, candidates: Sequence[NF4Config], x: torch.Tensor,
             reference: torch.Tensor, replays: int) -> tuple[float, NF4Config] | None:
    """The fastest of `candidates` over all layers of `group`, among those that compile here and
    match the reference path on the first layer."""
    first = group[0]
    best: tuple[float, NF4Config] | None = None
    for config in candidates:
        if not config.fits_kernel(rows, first.lora.rank):
            continue  # its shared memory does not fit this rank
        try:
            out = nf4_lora_linear(x, first.weight, first.lora, first.round_lora_first, config)
            if not matches_reference(out, reference):
                logger.warning("nf4 config %s computes wrong results for %s here; skipped", config.label, name)
                continue
            ms = graph_time_ms(lambda c=config: [
                nf4_lora_linear(x, p.weight, p.lora, p.round_lora_first, c) for p in group
            ], replays)
        except (nf4_mma.MmaUnavailable, nf4_xtab.XtabUnavailable):
            continue  # logged once, where the compile failed
        except Exception as error:  # noqa: BLE001 - a config that cannot compile here
            logger.warning("nf4 config %s failed for %s: %r", config.label, name, error)
            continue
        CANDIDATE_MS[f"{name}_m{rows}_{config.label}"] = round(ms, 3)
        if best is None or ms < best[0]:
            best = (ms, config)
    return best


def mma_layout(config: NF4Config) -> tuple[int, int, bool, int, bool, int, int]:
    """A tensor-core configuration as the kernel takes it: (warps, tiles, prefetch_x, ahead, fuse_a,
    shared_lookups, k_splits), for `nf4_mma.nf4_mma_linear` and `nf4_mma.precompile` alike."""
    return (config.num_warps, config.block_n // nf4_mma.TILE_N, config.prefetch_x, config.num_stages, config.fuse_a,
            config.shared_lookups, config.k_splits)


# The input preparations each projection's x-table kernel is launched with (`nf4.NF4Layer`'s steps
# that fold the element-wise pieces before it into its launch); PLAIN is also what the tuner times.
XTAB_PREPS = {"qkv": (nf4_xtab.PLAIN, nf4_xtab.ADD_NORM), "gate_up": (nf4_xtab.PLAIN, nf4_xtab.ADD_NORM),
              "down": (nf4_xtab.PLAIN, nf4_xtab.SILU_MUL)}


def _xtab_requests(name: str, projection: NF4Projection, config: NF4Config) -> list[tuple]:
    """An x-table configuration as `nf4_xtab.precompile` takes it for this projection, one request
    per input preparation it serves with."""
    device = projection.weight.packed.device
    n, k = projection.weight.shape
    head = (nf4_mma.code_values(projection.weight.code), device, k, projection.lora.rank,
            nf4_xtab.chunks_for(n, k, nf4_xtab.sm_count(device)))
    return [(*head, prep, config.xtab_layout) for prep in XTAB_PREPS.get(name, (nf4_xtab.PLAIN,))]


def precompile_candidates(projections: dict[str, list], buckets: Sequence[int], threads: int) -> int:
    """Compile every tensor-core kernel the tuner is about to time, on `threads` threads at once;
    returns how many were compiled."""
    if threads <= 1 or not projections or not _mma_available():
        return 0
    requests, xtab_requests = [], []
    for name, group in projections.items():
        first = group[0]
        n, k = first.weight.shape
        for rows in buckets:
            candidates = _candidates(rows, n, k, first.lora.boundaries)
            requests += [(first.weight.code, rows, k, first.lora.rank, mma_layout(c))
                         for c in candidates if c.kind == "mma" and c.fits_kernel(rows, first.lora.rank)]
            xtab_requests += [request for c in candidates
                              if c.kind == "xtab" and c.fits_kernel(rows, first.lora.rank)
                              for request in _xtab_requests(name, first, c)]
    return nf4_mma.precompile(requests, threads) + nf4_xtab.precompile(xtab_requests, threads)


def default_compile_threads() -> int:
    """NVRTC compiles at once during the tuning: the cores there are, up to 8 (each takes a few
    hundred MB of host memory)."""
    return max(1, min(8, os.cpu_count() or 1))


def tuning_facts(projections: dict[str, list], buckets: Sequence[int]) -> dict[str, object]:
    """What the tuner's choice depends on: the GPU, the software, the kernels' source, the weight
    shapes and the batch buckets (`llm.serving.tuning_cache.plan_key` digests them)."""
    from llm.serving import programmatic_launch, triton_kernels

    device = next(iter(projections.values()))[0].weight.packed.device
    sources = [Path(module.__file__) for module in (nf4_mma, nf4_xtab, programmatic_launch, triton_kernels)]
    sources.append(Path(__file__))
    return {
        "gpu": torch.cuda.get_device_name(device),
        "capability": list(torch.cuda.get_device_capability(device)),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__ if _HAVE_TRITON else None,
        "tensor_core_kernel": _mma_available(),
        "kernels": tuning_cache.source_digest(sources),
        "buckets": list(buckets),
        "projections": {name: {"shape": list(group[0].weight.shape), "boundaries": list(group[0].lora.boundaries),
                               "rank": group[0].lora.rank, "round_lora_first": group[0].round_lora_first,
                               "layers": len(group)}
                        for name, group in projections.items()},
    }


def _serve_stored_plan(projections: dict[str, list], buckets: Sequence[int], stored: dict,
                       compile_threads: int) -> tuple[str | None, int]:
    """Serve a plan an earlier start timed, once each layout it names compiles here and matches the
    reference path on the first layer (as the tuner checks its own). Returns (None when it serves,
    else why not: then nothing of it is served; the kernels compiled ahead)."""
    choices = stored.get("choices")
    if not isinstance(choices, dict):
        return "it holds no choices", 0
    chosen: list[tuple[str, list, int, NF4Config | None, bool]] = []
    for name, group in projections.items():
        first = group[0]
        n, k = first.weight.shape
        boundaries, rank = first.lora.boundaries, first.lora.rank
        for rows in buckets:
            if not _candidates(rows, n, k, boundaries):
                continue
            entry = choices.get(name, {}).get(str(rows)) if isinstance(choices.get(name), dict) else None
            if not isinstance(entry, dict):
                return f"it has no layout for {name} at {rows} rows", 0
            label, config = entry.get("config"), None
            if label is not None:
                config = next((c for c in all_configs(rows, n, k, boundaries, rank) if c.label == label), None)
                if config is None:
                    return f"its layout {label} for {name} at {rows} rows is not one this version serves", 0
            chosen.append((name, group, rows, config, bool(entry.get("dequant_cublas"))))
    requests = [(group[0].weight.code, rows, group[0].weight.shape[1], group[0].lora.rank, mma_layout(config))
                for _, group, rows, config, _ in chosen if config is not None and config.kind == "mma"]
    compiled = nf4_mma.precompile(requests, compile_threads) if requests and compile_threads > 1 else 0
    xtab_requests = [request for name, group, _, config, _ in chosen if config is not None and config.kind == "xtab"
                     for request in _xtab_requests(name, group[0], config)]
    if xtab_requests and compile_threads > 1:
        compiled += nf4_xtab.precompile(xtab_requests, compile_threads)
    for name, group, rows, config, _ in chosen:
        if config is None:
            continue
        first = group[0]
        x = torch.randn((rows, first.weight.shape[1]), dtype=torch.bfloat16, device=first.weight.packed.device)
        try:
            out = nf4_lora_linear(x, first.weight, first.lora, first.round_lora_first, config)
        except Exception as error:  # noqa: BLE001 - a layout that cannot run here any more
            return f"its layout {config.label} for {name} at {rows} rows fails here ({type(error).__name__})", compiled
        if not matches_reference(out, first.reference(x)):
            return f"its layout {config.label} for {name} at {rows} rows no longer matches the reference path", compiled
    for _, group, rows, config, dequant_cublas in chosen:
        n, k = group[0].weight.shape
        if config is not None:
            PLAN.set(rows, n, k, config)
        if dequant_cublas:
            PLAN._reference.add((rows, n, k))
    timings = stored.get("timings_ms")
    PLAN.timings_ms.update(timings if isinstance(timings, dict) else {})
    return None, compiled


def tune(projections: dict[str, list], rows_buckets: Sequence[int], replays: int = 5,
         compile_threads: int | None = None, cache: Path | None = None) -> dict[str, object]:
    """Per (projection, rows bucket), time every fitting config - and, for batched rows, dequantize +
    cuBLAS - over all layers' weights inside a CUDA graph (so neither launch overhead nor the L2
    cache flatters anyone); keep the fastest of those that match the reference path on the first
    layer (a config this GPU or Triton gets wrong is never served). Where no tensor-core config
    does, the Triton ones are timed instead. The tensor-core kernels are compiled first, on
    `compile_threads` threads (`default_compile_threads()` if None; 1: each at its first launch).

    With `cache` (a JSON file, `llm.serving.tuning_cache`), a plan an earlier start stored for the
    same GPU, software, kernel source and shapes is served instead, after the same reference check
    of each layout it names (seconds instead of the whole tuning); a fresh tuning is stored there."""
    compile_threads = default_compile_threads() if compile_threads is None else compile_threads
    started = time.perf_counter()
    buckets = sorted({_block_m(r) for r in rows_buckets})
    key = tuning_cache.plan_key(tuning_facts(projections, buckets)) if cache is not None else None
    cache_state = "off"
    if cache is not None and key is not None:
        cache_state = "miss"
        stored = tuning_cache.load_plan(cache, key)
        if stored is not None:
            why_not, compiled = _serve_stored_plan(projections, buckets, stored, compile_threads)
            if why_not is None:
                seconds = round(time.perf_counter() - started, 1)
                logger.info("nf4 kernels: serving the layouts timed at %s for this GPU and kernel version (from %s, "
                            "each checked against the reference path in %.1f s); delete the file to time them again",
                            stored.get("saved_at", "an earlier start"), cache, seconds)
                return {**PLAN.summary(), "ms_per_step_all_layers": dict(PLAN.timings_ms), "tune_s": seconds,
                        "tuning_cache": "hit", "tuned_at": stored.get("saved_at"),
                        "precompiled_kernels": compiled,
                        "compile_threads": compile_threads}
            cache_state = "stale"
            logger.warning("nf4 tuning cache %s: the stored plan is not served (%s); timing the kernels again",
                           cache, why_not)
    # the operator's line for the silent minute or two that follows (run 25: 34-107 s on an H200)
    logger.info("nf4: timing the kernel layouts for %d projections x %d batch sizes to serve the fastest "
                "(up to a minute or two: each layout is compiled first, %d at a time)%s", len(projections),
                len(buckets), compile_threads, f"; the choice is saved to {cache} for the next start" if cache else "")
    compiled = precompile_candidates(projections, buckets, compile_threads)
    compile_s = round(time.perf_counter() - started, 1)
    seconds_per_projection: dict[str, float] = {}  # where the rest of the start-up time goes
    choices: dict[str, dict[str, dict]] = {}  # what the cache keeps: per projection and rows bucket
    for name, group in projections.items():
        projection_started = time.perf_counter()
        first = group[0]
        n, k = first.weight.shape
        boundaries = first.lora.boundaries
        for rows in buckets:
            candidates = _candidates(rows, n, k, boundaries)
            if not candidates:
                continue
            x = torch.randn((rows, k), dtype=torch.bfloat16, device=first.weight.packed.device)
            reference = first.reference(x)
            best = _fastest(name, group, rows, candidates, x, reference, replays)
            if best is None and any(c.kind == "mma" for c in candidates):
                if nf4_mma.disabled_reason() is None:
                    logger.warning("nf4: no tensor-core kernel matches the reference for %s at %d rows here; "
                                   "timing the Triton ones", name, rows)
                best = _fastest(name, group, rows, _candidates(rows, n, k, boundaries, mma=False), x, reference,
                                replays)
            if best is not None:
                PLAN.set(rows, n, k, best[1])
                PLAN.timings_ms[f"{name}_m{rows}"] = round(best[0], 3)
            if rows > 1:  # batched rows: dequantize + cuBLAS (the prompt path) may beat the fused kernel
                ms = graph_time_ms(lambda x=x, group=group: [p.prompt(x) for p in group], replays)
                PLAN.timings_ms[f"{name}_m{rows}_dequant_cublas"] = round(ms, 3)
                if best is None or ms < best[0]:
                    PLAN._reference.add((rows, n, k))
            choices.setdefault(name, {})[str(rows)] = {"config": best[1].label if best is not None else None,
                                                      "dequant_cublas": PLAN.use_reference(rows, n, k)}
            torch.cuda.empty_cache()
        seconds_per_projection[name] = round(time.perf_counter() - projection_started, 1)
    summary = PLAN.summary()
    choices_made = [label for key, label in summary.items() if key.startswith("m")]
    tensor_core = sum(label.startswith("mma") for label in choices_made)
    seconds = round(time.perf_counter() - started, 1)
    logger.info("nf4 kernels tuned in %.1f s (%.1f s compiling %d kernels on %d threads first): the tensor-core "
                "kernel serves %d of %d projection x batch-size choices%s", seconds, compile_s, compiled,
                compile_threads, tensor_core, len(choices_made),
                f" (off: {nf4_mma.disabled_reason()})" if nf4_mma.disabled_reason() else "")
    if cache is not None and key is not None:
        tuning_cache.store_plan(cache, key, {"choices": choices, "timings_ms": dict(PLAN.timings_ms),
                                             "tune_s": seconds})
    return {**summary, "ms_per_step_all_layers": dict(PLAN.timings_ms), "tune_s": seconds,
            "compile_threads": compile_threads, "precompiled_kernels": compiled, "precompile_s": compile_s,
            "tune_s_per_projection": seconds_per_projection, "tuning_cache": cache_state}
