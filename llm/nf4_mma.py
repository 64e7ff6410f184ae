"""The `nf4` decode kernel on tensor cores: bitsandbytes' packed NF4 bytes as they are, 1..16 rows.

A CUDA C++ kernel, compiled at start-up with NVRTC (`torch.cuda._compile_kernel`), because it needs
what Triton does not let a kernel choose: which lane holds which weight of an `mma.sync` operand.

One `mma.m16n8k16` multiplies 16 rows of x (padded with zeros) by 8 output features x 16 inputs.
The reduction order over k is free as long as x and W use the same one, so the kernel picks it to
suit the weights: in a group of 256 inputs, the lane (g, t) of a warp supplies, for feature g, the 4
values of each of 16 MMAs from one 64-value absmax block (block t), 32 contiguous bytes of its row
as bitsandbytes stored them. So each lane:
- loads its 32 bytes and one absmax (no repacking at load time),
- builds that block's 16 possible weights once, `cvt.rn.bf16x2(code[i] * absmax)` (the float32
  product and single rounding of `dequantize_4bit`, so the weights are bit for bit bitsandbytes'),
  as a low-byte and a high-byte table (`llm.nf4_kernels.lut_asm` does the same in Triton),
- turns each 32-bit word (8 nibbles) into two MMAs' B operands with 8 `prmt` byte permutes,
- reads the matching x values with one coalesced load per MMA: the LoRA `A` kernel, which reads x
  anyway, also writes it in this operand order.
The same kernel serves 1 and 16 rows for the same weight traffic. The warps of a block split K and
add up through shared memory; the epilogue adds the LoRA's `B` product with PEFT's roundings
(float32 `B @ t * scaling`, rounded to bf16 and added to the bf16 base output), as the Triton
kernels' epilogue does.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from llm.nf4 import LoraParts, NF4Matrix

GROUP = 256  # inputs per lane group: 4 absmax blocks of 64, one per lane of a quad
TILE_N = 16  # output features per block (one MMA's m)
WARP_CHOICES = (4, 8, 16)

_SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 s) {
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(s));
    return d;
}

// entry `lo` in the low half, as cvt.rn.bf16x2.f32 d, hi, lo puts it
__device__ __forceinline__ u32 bf16x2(float lo, float hi) {
    u32 d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

__device__ __forceinline__ u16 bf16(float v) {
    u16 d;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(d) : "f"(v));
    return d;
}

// (a & b) | c in one instruction
__device__ __forceinline__ u32 and_or(u32 a, u32 b, u32 c) {
    u32 d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// Weights are read once: past L1, which keeps x (read by every block) instead
__device__ __forceinline__ uint4 load_streaming(const uint4* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ float f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ void mma(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One 32-bit word's half (4 values: 4h..4h+3) as two bf16x2 MMA registers, from the block's tables.
__device__ __forceinline__ void decode_half(const u32 (&L)[4], const u32 (&H)[4], u32 sel, u32 pick, u32& first,
                                            u32& second) {
    const u32 lo = prmt(prmt(L[0], L[1], sel), prmt(L[2], L[3], sel), pick);
    const u32 hi = prmt(prmt(H[0], H[1], sel), prmt(H[2], H[3], sel), pick);
    first = prmt(lo, hi, 0x4051u);   // values 4h, 4h + 1
    second = prmt(lo, hi, 0x6273u);  // values 4h + 2, 4h + 3
}

// The 16 weights one absmax block can hold, bf16(code[i] * absmax), as low bytes L and high bytes H
__device__ __forceinline__ void block_tables(float scale, u32 (&L)[4], u32 (&H)[4]) {
    u32 q[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) q[i] = bf16x2(__fmul_rn(scale, CODE[2 * i]), __fmul_rn(scale, CODE[2 * i + 1]));
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        L[i] = prmt(q[2 * i], q[2 * i + 1], 0x6420u);
        H[i] = prmt(q[2 * i], q[2 * i + 1], 0x7531u);
    }
}

// A = W (16 features x 16 inputs), B = x.T (16 inputs x 8 rows of x). Lane (g, t) holds features g
// and g + 8 and x row g; blocks of 16 features, WARPS warps splitting K.
extern "C" __global__ void __launch_bounds__(WARPS * 32)
nf4_mma_kernel(const uint4* __restrict__ words, const float* __restrict__ absmax, const uint2* __restrict__ xq,
               const float* __restrict__ t_part, const float* __restrict__ lora_b, u16* __restrict__ y,
               int M, int K, int ldy, double scaling, int seg1, int seg2, int RT, int t_splits,
               int round_lora_first) {
    constexpr int SETS = ROWS / 8;  // MMAs per A operand: x rows 0-7, 8-15
    __shared__ float partial[WARPS][32][4 * SETS];
    __shared__ float t_sum[ROWS][RANK];
    __shared__ float b_tile[16][RANK];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * 16;
    const int groups = K >> 8;
    // a feature's lane data: bytes 128 * group + 32 * t of its row (two uint4), absmax block 4 * group + t
    const uint4* words_low = words + (size_t)(n0 + g) * (K >> 5) + 2 * t;
    const uint4* words_high = words_low + (size_t)8 * (K >> 5);
    const float* absmax_low = absmax + (size_t)(n0 + g) * (K >> 6) + t;
    const float* absmax_high = absmax_low + (size_t)8 * (K >> 6);
    // x in operand order (written by the LoRA A kernel): per (group, set of 8 rows, MMA), each
    // lane's 4 values, in lane order. Lanes of rows past M (whose outputs are never stored) read
    // row 0's, so that a load of few rows touches few sectors.
    const uint2* x_lane[SETS];
#pragma unroll
    for (int set = 0; set < SETS; ++set) x_lane[set] = xq + (8 * set + g < M ? set * 16 * 32 + lane : t);

    // The LoRA's inputs first, so that their loads overlap the weights': this block's 16 rows of B
    // (contiguous) and t = x @ A.T for its part, the split-K partial sums added up.
    const int part = (n0 >= seg1) + (n0 >= seg2);
    for (int i = threadIdx.x; i < 16 * RANK; i += WARPS * 32) b_tile[i / RANK][i % RANK] = lora_b[(size_t)n0 * RANK + i];
    for (int i = threadIdx.x; i < M * RANK; i += WARPS * 32) {
        const int m = i / RANK, r = i % RANK;
        float sum = 0.f;
#pragma unroll 16
        for (int split = 0; split < t_splits; ++split) sum += t_part[(split * M + m) * RT + part * RANK + r];
        t_sum[m][r] = sum;
    }

    float acc[SETS][4];
#pragma unroll
    for (int set = 0; set < SETS; ++set) acc[set][0] = acc[set][1] = acc[set][2] = acc[set][3] = 0.f;
    int group = warp;
    uint4 w[4] = {};
    float scale_low = 0.f, scale_high = 0.f;
    if (group < groups) {
        w[0] = load_streaming(words_low + 8 * group);
        w[1] = load_streaming(words_low + 8 * group + 1);
        w[2] = load_streaming(words_high + 8 * group);
        w[3] = load_streaming(words_high + 8 * group + 1);
        scale_low = __ldg(absmax_low + 4 * group);
        scale_high = __ldg(absmax_high + 4 * group);
    }
    for (; group < groups; group += WARPS) {
        const int next = group + WARPS;
        uint4 nw[4] = {};
        float next_low = 0.f, next_high = 0.f;
        if (next < groups) {  // the next group's bytes are in flight while this one computes
            nw[0] = load_streaming(words_low + 8 * next);
            nw[1] = load_streaming(words_low + 8 * next + 1);
            nw[2] = load_streaming(words_high + 8 * next);
            nw[3] = load_streaming(words_high + 8 * next + 1);
            next_low = __ldg(absmax_low + 4 * next);
            next_high = __ldg(absmax_high + 4 * next);
        }
        u32 L_low[4], H_low[4], L_high[4], H_high[4];
        block_tables(scale_low, L_low, H_low);
        block_tables(scale_high, L_high, H_high);
        const u32 low[8] = {w[0].x, w[0].y, w[0].z, w[0].w, w[1].x, w[1].y, w[1].z, w[1].w};
        const u32 high[8] = {w[2].x, w[2].y, w[2].z, w[2].w, w[3].x, w[3].y, w[3].z, w[3].w};
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            // nibble p of a word is value p ^ 1 (bitsandbytes: high nibble first); nibble p picks
            // byte p of the entries-0..7 lookup or, by its bit 3, of the entries-8..15 one
            const u32 sel_low = low[i] & 0x77777777u, pick_low = and_or(low[i] >> 1, 0x44444444u, 0x32103210u);
            const u32 sel_high = high[i] & 0x77777777u, pick_high = and_or(high[i] >> 1, 0x44444444u, 0x32103210u);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                u32 a0, a1, a2, a3;
                decode_half(L_low, H_low, h ? sel_low >> 16 : sel_low, h ? pick_low >> 16 : pick_low, a0, a2);
                decode_half(L_high, H_high, h ? sel_high >> 16 : sel_high, h ? pick_high >> 16 : pick_high, a1, a3);
#pragma unroll
                for (int set = 0; set < SETS; ++set) {
                    const uint2 b = __ldg(x_lane[set] + group * (2 * 16 * 32) + (2 * i + h) * 32);
                    mma(acc[set], a0, a1, a2, a3, b.x, b.y);
                }
            }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) w[j] = nw[j];
        scale_low = next_low;
        scale_high = next_high;
    }

#pragma unroll
    for (int set = 0; set < SETS; ++set)
#pragma unroll
        for (int i = 0; i < 4; ++i) partial[warp][lane][4 * set + i] = acc[set][i];
    __syncthreads();
    for (int i = threadIdx.x; i < M * 16; i += WARPS * 32) {
        const int m = i >> 4, f = i & 15;
        // D[f][m] (set m / 8) sits in lane (f % 8) * 4 + (m % 8) / 2, register (f / 8) * 2 + m % 2
        const int lane_of = (f & 7) * 4 + ((m & 7) >> 1), reg = 4 * (m >> 3) + (f >> 3) * 2 + (m & 1);
        float base = 0.f;
#pragma unroll
        for (int v = 0; v < WARPS; ++v) base += partial[v][lane_of][reg];
        float u = 0.f;
#pragma unroll
        for (int r = 0; r < RANK; ++r) u += b_tile[f][r] * t_sum[m][r];
        u *= (float)scaling;
        const float rounded_base = f32(bf16(base));
        const u16 out = round_lora_first ? bf16(rounded_base + f32(bf16(u))) : bf16(rounded_base + u);
        y[(size_t)m * ldy + n0 + f] = out;
    }
}
"""


def source(code: Sequence[float], warps: int, rows: int, rank: int) -> str:
    """The kernel's CUDA source for one NF4 code table, warps per block, row tile (8 or 16) and rank."""
    if len(code) != 16:
        raise ValueError("an NF4 code table has 16 entries")
    if warps not in WARP_CHOICES or rows not in (8, 16) or rank <= 0:
        raise ValueError(f"no nf4 MMA kernel for {warps} warps, {rows} rows, rank {rank}")
    # exact: hexadecimal literals of the float32 values
    values = ", ".join(f"{struct.unpack('<f', struct.pack('<f', float(v)))[0].hex()}f" for v in code)
    header = (f"#define WARPS {warps}\n#define ROWS {rows}\n#define RANK {rank}\n"
              f"__device__ __constant__ float CODE_TABLE[16] = {{{values}}};\n#define CODE CODE_TABLE\n")
    return header + _SOURCE


def available(device: torch.device | str) -> bool:
    """Tensor-core MMA (sm_80 or newer) and NVRTC through PyTorch."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or not hasattr(torch.cuda, "_compile_kernel"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


_KERNELS: dict[tuple, Callable] = {}
_CODE_VALUES: dict[tuple[int | None, int], tuple[float, ...]] = {}


def _kernel(code: torch.Tensor, warps: int, rows: int, rank: int) -> Callable:
    # Every layer holds its own copy of the (same) code table: one compile per distinct table. The
    # values are read once per address, before any graph capture (the tuner runs every layer first):
    # reading them back inside a capture is not allowed.
    address = (code.device.index, code.data_ptr())
    if address not in _CODE_VALUES:
        _CODE_VALUES[address] = tuple(code.tolist())
    key = (code.device.index, _CODE_VALUES[address], warps, rows, rank)
    if key not in _KERNELS:
        with torch.cuda.device(code.device):
            _KERNELS[key] = torch.cuda._compile_kernel(source(key[1], warps, rows, rank), "nf4_mma_kernel")
    return _KERNELS[key]


T_SUM_BYTES = 16 << 20  # what all blocks together may read of the LoRA A partial sums, per call


def lora_splits_cap(rows: int, n: int, rank: int) -> int:
    """At most this many LoRA `A` split-K partial sums (a power of two, 1..16): every block of the
    kernel adds them up for its rows, so their traffic grows with blocks x rows x splits, while
    more splits keep the A product's own blocks busy."""
    per_split = (n // TILE_N) * rows * rank * 4
    cap = 16
    while cap > 1 and cap * per_split > T_SUM_BYTES:
        cap //= 2
    return cap


def nf4_mma_linear(
    xq: torch.Tensor,
    m: int,
    weight: NF4Matrix,
    lora: LoraParts,
    t: torch.Tensor,
    round_lora_first: bool,
    warps: int,
) -> torch.Tensor:
    """y = x @ dequant(W).T + scaling * B(t) with PEFT's roundings, for the m rows of x that `xq`
    holds in operand order (16 * K values, `llm.nf4_kernels._fragment_offsets`); `t` holds the
    split-K partial sums of x @ A.T ([splits, rows, sum of ranks], float32)."""
    n, k = weight.shape
    boundaries = [start for start, _, _ in lora.segments[1:]]
    seg1 = boundaries[0] if len(boundaries) > 0 else n
    seg2 = boundaries[1] if len(boundaries) > 1 else n
    rows = 8 if m <= 8 else 16
    kernel = _kernel(weight.code, warps, rows, lora.rank)
    y = torch.empty((m, n), dtype=torch.bfloat16, device=xq.device)
    kernel(grid=(n // TILE_N, 1, 1), block=(warps * 32, 1, 1),
           args=[weight.packed, weight.absmax, xq, t, lora.b, y, m, k, y.stride(0), float(lora.scaling),
                 seg1, seg2, lora.a.shape[0], t.shape[0], int(round_lora_first)])
    return y
