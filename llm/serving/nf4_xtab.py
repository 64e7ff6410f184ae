"""The one-row `nf4` decode kernel that never decodes a weight: tables of x instead ("xtab").

Every other decode kernel turns each 4-bit code into a bf16 weight (a table lookup, a product with
the absmax, a rounding) before it multiplies: ~3.75 instructions per weight, which bounds them well
below the memory's speed (run 23: 1.65 TB/s). One row of x allows the opposite: a byte of the
packed weights holds two codes for two inputs, so for every pair of inputs (2p, 2p + 1) and every
byte value b the block tabulates once

    T_p[b] = x[2p] * code[b >> 4] + x[2p + 1] * code[b & 15]        (float32; bitsandbytes' high
                                                                     nibble is the first value)

and a row's product over its 64-value absmax block is absmax * sum of T_p[byte] over its 32 bytes:
one shared-memory load and one add per two weights. The weights are bitsandbytes' bytes and
float32 absmax as stored; the products are exact float32 ones of the same code values (no bf16
weight rounding at all: the function is the real-valued NF4 weight times x, summed in float32).

Layout, per block: one 256-input slice of K (128 pairs) for a chunk of rows. Lane L of every warp
reads the word of bytes 4L..4L+3 of each row, so it only ever looks up pairs 4L..4L+3; their four
256-entry tables sit in shared-memory bank L (128 KB per block), and 32 lanes' random bytes never
meet in a bank. A lane sums its 8 inputs of 32 rows (one 128-byte line of weights per row; the next
32 rows' words load while it does), and a reduce-scatter over the warp's shuffles gives each lane
one row's slice sum: first over the 8 lanes of an absmax block (then 4 rows per lane, each scaled
once), then over the 4 blocks. The blocks also compute the LoRA's A product over their slice (a
share of the ranks each), so one launch does the whole projection. The slices' sums meet in global
memory: every block waits for all the others (all are resident: one per SM, grid <= SMs), then
finishes 1 / slices of its chunk's rows, adding the slices' sums in a fixed order (the same bits
every launch) and the LoRA's `B` product with PEFT's roundings.

The launch may also prepare its input itself (XPREP, `prepare_x`), so that the decode step's element-wise
pieces before a projection cost no launch of their own: the residual add and MistralRMSNorm before q/k/v
and gate/up (every block sums the whole row's squares in the same order, so all slices scale by the same
bits; chunk 0 writes the residual stream's next value), `silu(gate) * up` before down. Each op rounds to
bf16 as eager PyTorch's does (run 32: the one-row step 2.69 -> 2.46 ms).

How many weights are on the way is a layout choice (`XtabLayout`): AHEAD 2 keeps a warp's loads two row
groups ahead of its lookups (8 warps' registers). Runs 36-38 also built and run 39 timed weights staged in
shared memory or asked into L2 before the wait, the next launch's weights asked into L2, and launches linked
by flags instead of grid waits: each slower than the plain layouts, and retired (bench/NOTES.md, run 39).
A timeline build (`timeline`) stamps each block's phases for bench/xtab_timeline.py.

tests/test_nf4_xtab_emulated.py runs this CUDA text on the CPU (tests/fakes/cuda_emulation.hpp, both
phases as separate launches); tests/gpu runs it on a GPU.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from llm.serving import programmatic_launch
from llm.serving.nf4_mma import DEVICE_HELPERS

if TYPE_CHECKING:
    from llm.serving.nf4 import LoraParts, NF4Matrix

logger = logging.getLogger(__name__)

SLICE = 256  # inputs per block: 32 lanes x one 32-bit word (8 inputs) of each row
ROW_GROUP = 32  # rows a warp sums at a time (one per lane after the reduce-scatter)
TABLE_BYTES = 4 * 256 * 32 * 4  # 4 pairs per lane, 256 byte values, 32 lanes, float32
WARP_CHOICES = (8, 16)
AHEAD_CHOICES = (1, 2)  # row groups a warp's weight loads run ahead of its lookups
STATIC_SHARED_BYTES = 1024  # t_sum, the norm's warp sums, the timeline's sink: below this
MAX_PARTS = 3  # LoRA parts of a fused projection (q/k/v)
# What the kernel does to its input before tabulating it (XPREP in the CUDA text, `prepare_x`)
PLAIN, SILU_MUL, ADD_NORM = 0, 1, 2
PREPS = (PLAIN, SILU_MUL, ADD_NORM)


@dataclass(frozen=True)
class XtabLayout:
    """How a launch keeps weights on the way: warps per block, and row groups a warp's loads run ahead of
    its lookups (`ahead`)."""

    warps: int = 16
    ahead: int = 1

    @property
    def label(self) -> str:
        """"16x1", "8x2": warps x groups ahead."""
        return f"{self.warps}x{self.ahead}"

    @property
    def valid(self) -> bool:
        return self.warps in WARP_CHOICES and self.ahead in AHEAD_CHOICES

    @classmethod
    def parse(cls, label: str) -> XtabLayout:
        """The layout a `label` names ("16x1", "8x2"); ValueError for anything else."""
        match = re.fullmatch(r"(\d+)x(\d+)", label.strip())
        layout = cls(int(match[1]), int(match[2])) if match else None
        if layout is None or not layout.valid:
            raise ValueError(f"no layout {label!r}: WARPSxAHEAD, warps one of {WARP_CHOICES}, ahead one of "
                             f"{AHEAD_CHOICES} (e.g. 16x1 or 8x2)")
        return layout


# What the tuner times (run 39: 8x2 a little ahead of 16x1 for gate/up in the timeline, so timed too)
SERVED_LAYOUTS = (XtabLayout(8), XtabLayout(16), XtabLayout(8, 2))
# bench/xtab_timeline.py's stamps per block (int64): (ns, cycles) at each point, the SM last
# (`nf4_mma.DEVICE_HELPERS`' STAMP)
TIMELINE_POINTS = 9
TIMELINE_SLOTS = 2 * TIMELINE_POINTS + 1

_SOURCE = r"""
constexpr int K = KDIM;
constexpr int SLICES = K / 256;
constexpr int ROW_WORDS = K / 8;   // 32-bit words of packed bytes per row
constexpr int ROW_BLOCKS = K / 64;  // absmax values per row
constexpr int TABLE_WORDS = 4 * 256 * 32;

// Weights are read once: past L1
#ifndef NF4_EMULATE
__device__ __forceinline__ u32 load_word(const u32* p) {
    u32 v;
    asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}
#else
inline u32 load_word(const u32* p) { return __ldg(p); }
#endif

// Pair table q's entry for byte q of `word`, for this lane (its bank)
#define LOOKUP(q, shifted) \
    (*(const float*)((const char*)table + (q) * 32768 + and_or((shifted), 0x7F80u, lane4)))

#ifndef NF4_EMULATE
// 8 values an earlier kernel wrote, read from L2 and never before previous_kernels_done(): a plain
// load from a `const __restrict__` pointer may be hoisted above that wait (the pointer promises
// the data never changes), and once the kernel before lets this one start early (the x-table kernels
// chained, run 32) it then reads the values of the step before.
__device__ __forceinline__ uint4 load_x8(const u16* p) {
    uint4 v;
    asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
    return v;
}
#define reciprocal_sqrt rsqrtf
#else
inline uint4 load_x8(const u16* p) { return __ldg((const uint4*)p); }
inline float reciprocal_sqrt(float v) { return 1.0f / std::sqrt(v); }
#endif

// The bf16 pair (lo, hi) of a word, each op rounded to bf16 as PyTorch's eager ops round it
__device__ __forceinline__ u32 pack(u16 lo, u16 hi) { return (u32)lo | ((u32)hi << 16); }
__device__ __forceinline__ u16 bf16_add(u16 a, u16 b) { return bf16(f32(a) + f32(b)); }
__device__ __forceinline__ u16 bf16_mul(u16 a, u16 b) { return bf16(f32(a) * f32(b)); }
// F.silu's CUDA kernel: x / (1 + exp(-x)) in float32, IEEE division, accurate expf
__device__ __forceinline__ u16 silu_mul(u16 gate, u16 up) {
    const float g = f32(gate);
    return bf16_mul(bf16(g / (1.0f + expf(-g))), up);
}

// This lane's 8 inputs of the slice, as 4 bf16 pairs: by XPREP,
// 0: x as it is;
// 1: `silu(gate) * up` of the gate/up projection's output x = [gate | up] (the MLP's down input);
// 2: `norm_weight * rms_norm(residual + x)` (MistralRMSNorm: statistics in float32 over all K, then
//    each op rounded to bf16), the residual stream's new value written to residual_out by chunk 0.
//    Every block sums the squares in the same order, so every slice scales by the same bits.
//    `norm_weight8` is this lane's 8 norm weights, loaded before the wait (they are weights).
__device__ __forceinline__ void prepare_x(u32 (&xw)[4], const u16* x, const u16* residual, uint4 norm_weight8,
                                          u16* residual_out, float eps, int slice, int lane, int warp, int chunk) {
    const int at = slice * 256 + 8 * lane;
#if XPREP == 0
    const uint4 xs = load_x8(x + at);
    xw[0] = xs.x; xw[1] = xs.y; xw[2] = xs.z; xw[3] = xs.w;
#elif XPREP == 1
    const uint4 gs = load_x8(x + at), us = load_x8(x + K + at);
    const u32 g[4] = {gs.x, gs.y, gs.z, gs.w}, u[4] = {us.x, us.y, us.z, us.w};
#pragma unroll
    for (int q = 0; q < 4; ++q)
        xw[q] = pack(silu_mul((u16)(g[q] & 0xFFFFu), (u16)(u[q] & 0xFFFFu)),
                     silu_mul((u16)(g[q] >> 16), (u16)(u[q] >> 16)));
#else
    __shared__ float warp_squares[WARPS];
    // This lane's own inputs first, so that their L2 round trip overlaps the sum of squares' one
    const uint4 hs = load_x8(residual + at), ds = load_x8(x + at);
    float squares = 0.f;
    for (int i = 8 * (int)threadIdx.x; i < K; i += 8 * WARPS * 32) {
        const uint4 hs = load_x8(residual + i), ds = load_x8(x + i);
        const u32 h[4] = {hs.x, hs.y, hs.z, hs.w}, d[4] = {ds.x, ds.y, ds.z, ds.w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const float lo = f32(bf16_add((u16)(h[q] & 0xFFFFu), (u16)(d[q] & 0xFFFFu)));
            const float hi = f32(bf16_add((u16)(h[q] >> 16), (u16)(d[q] >> 16)));
            squares += lo * lo;
            squares += hi * hi;
        }
    }
#pragma unroll
    for (int mask = 16; mask >= 1; mask >>= 1) squares += __shfl_xor_sync(0xFFFFFFFFu, squares, mask);
    if (lane == 0) warp_squares[warp] = squares;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) total += warp_squares[w];
    const float inverse = reciprocal_sqrt(total / (float)K + eps);
    const uint4 ws = norm_weight8;
    const u32 h[4] = {hs.x, hs.y, hs.z, hs.w}, d[4] = {ds.x, ds.y, ds.z, ds.w}, w[4] = {ws.x, ws.y, ws.z, ws.w};
    u32 sums[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const u16 lo = bf16_add((u16)(h[q] & 0xFFFFu), (u16)(d[q] & 0xFFFFu));
        const u16 hi = bf16_add((u16)(h[q] >> 16), (u16)(d[q] >> 16));
        sums[q] = pack(lo, hi);
        xw[q] = pack(bf16_mul((u16)(w[q] & 0xFFFFu), bf16(f32(lo) * inverse)),
                     bf16_mul((u16)(w[q] >> 16), bf16(f32(hi) * inverse)));
    }
    if (chunk == 0 && warp == 0) *(uint4*)(residual_out + at) = make_uint4(sums[0], sums[1], sums[2], sums[3]);
#endif
}

// counters: [0] blocks whose sums are stored, [1] blocks done; the last one zeroes both.
// phases: 1 = this block's slice sums (and its share of the LoRA's A product over the slice), 2 =
// finish 1 / SLICES of the chunk's rows; a GPU launch runs both (3), every block of the grid waiting
// for all the others in between (all are resident: one per SM, grid <= SMs).
extern "C" __global__ void __launch_bounds__(WARPS * 32, 1)
nf4_xtab_kernel(const u32* __restrict__ words, const float* __restrict__ absmax, const u16* x,
                const float* __restrict__ lora_a, const float* __restrict__ lora_b, u16* __restrict__ y,
                float* __restrict__ partial, float* __restrict__ t_partial, int* __restrict__ counters, int N,
                int seg1, int seg2, int RT, double scaling, int round_lora_first, int phases,
                const u16* residual, const u16* __restrict__ norm_weight, u16* __restrict__ residual_out,
                double eps TIMELINE_PARAM) {
    STAMP(0);
#ifdef NF4_EMULATE
    static float table[TABLE_WORDS];
#else
    extern __shared__ float table[];  // pair q of lane L, byte b: word (q * 256 + b) * 32 + L
#endif
    __shared__ float t_sum[3][RANK];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 lane4 = (u32)lane * 4u;
    const int slice = blockIdx.x % SLICES, chunk = blockIdx.x / SLICES;
    const int chunk_rows = N / CHUNKS;  // a multiple of 32
    const int row0 = chunk * chunk_rows;
    const int groups = chunk_rows / 32;

    if (phases & 1) {
        const u32* lane_words = words + (size_t)row0 * ROW_WORDS + slice * 32 + lane;
        // Lane (hi2, lo3): the 64-value absmax block hi2 of this slice; after the first half of the
        // reduce-scatter it holds rows 4 lo3 .. 4 lo3 + 3 of the group, summed over its block's 8 lanes
        const int hi2 = lane >> 3, lo3 = lane & 7;
        const float* lane_absmax = absmax + (size_t)(row0 + 4 * lo3) * ROW_BLOCKS + slice * 4 + hi2;
        // Everything that does not depend on the kernel before this one is loaded before waiting for
        // it: the first row group's weights and absmax, the first LoRA A rank and the norm weights.
        // AHEAD 2 (8 warps: 255 registers): the warp's next group's words too, so that its loads stay
        // two groups ahead of the lookups
        u32 w[32];
#if AHEAD == 2
        u32 w_next[32];
#endif
        float scale[4] = {0.f, 0.f, 0.f, 0.f};
        if (warp < groups) {
#pragma unroll
            for (int j = 0; j < 32; ++j) w[j] = load_word(lane_words + (size_t)(warp * 32 + j) * ROW_WORDS);
#pragma unroll
            for (int i = 0; i < 4; ++i) scale[i] = __ldg(lane_absmax + (size_t)(warp * 32 + i) * ROW_BLOCKS);
        }
#if AHEAD == 2
        if (warp + WARPS < groups) {
#pragma unroll
            for (int j = 0; j < 32; ++j)
                w_next[j] = load_word(lane_words + (size_t)((warp + WARPS) * 32 + j) * ROW_WORDS);
        }
#endif
        const int first_rank = chunk + CHUNKS * warp;  // this warp's LoRA A ranks: first_rank + CHUNKS WARPS i
        float4 first_a0 = make_float4(0.f, 0.f, 0.f, 0.f), first_a1 = first_a0;
        if (first_rank < RT) {
            const float4* a = (const float4*)(lora_a + (size_t)first_rank * K + slice * 256 + 8 * lane);
            first_a0 = __ldg(a);
            first_a1 = __ldg(a + 1);
        }
#if XPREP == 2
        const uint4 norm_weight8 = __ldg((const uint4*)(norm_weight + slice * 256 + 8 * lane));
#else
        const uint4 norm_weight8 = make_uint4(0u, 0u, 0u, 0u);
#endif
        previous_kernels_done();  // x
        STAMP(1);
        {
            // This lane's pairs 4 lane + q: inputs 8 lane + 2q (high nibble) and + 1 (low nibble)
            u32 xw[4];
            prepare_x(xw, x, residual, norm_weight8, residual_out, (float)eps, slice, lane, warp, chunk);
            STAMP_AFTER(2, xw[0] ^ xw[3]);
            float high[4], low[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                high[q] = f32((u16)(xw[q] & 0xFFFFu));
                low[q] = f32((u16)(xw[q] >> 16));
            }
            // Entry i of this thread: word warp + WARPS i, i.e. pair table (WARPS i) / 256, high code
            // ((WARPS i) % 256) / 16 (both known at compile time) and low code warp + (WARPS i) % 16
            float low_term[4][16 / WARPS];
#pragma unroll
            for (int q = 0; q < 4; ++q)
#pragma unroll
                for (int j = 0; j < 16 / WARPS; ++j) low_term[q][j] = low[q] * CODE[warp + WARPS * j];
#pragma unroll
            for (int i = 0; i < 1024 / WARPS; ++i) {
                const int q = (WARPS * i) >> 8;
                table[(warp + WARPS * i) * 32 + lane] =
                    high[q] * CODE[((WARPS * i) & 255) >> 4] + low_term[q][((WARPS * i) & 15) / WARPS];
            }
            STAMP(3);
            // The LoRA's A product over this slice, ranks chunk, chunk + CHUNKS, ...: a warp per rank,
            // 8 inputs per lane
            for (int r = first_rank; r < RT; r += CHUNKS * WARPS) {
                const float4* a = (const float4*)(lora_a + (size_t)r * K + slice * 256 + 8 * lane);
                const float4 a0 = r == first_rank ? first_a0 : __ldg(a);
                const float4 a1 = r == first_rank ? first_a1 : __ldg(a + 1);
                float dot = a0.x * high[0] + a0.y * low[0] + a0.z * high[1] + a0.w * low[1] + a1.x * high[2]
                            + a1.y * low[2] + a1.z * high[3] + a1.w * low[3];
#pragma unroll
                for (int mask = 16; mask >= 1; mask >>= 1) dot += __shfl_xor_sync(0xFFFFFFFFu, dot, mask);
                if (lane == 0) t_partial[slice * RT + r] = dot;
            }
            STAMP(4);
        }
        __syncthreads();
        STAMP(5);
        // One step of the reduce-scatter: of `len` values, the lanes with `mask` set keep the upper half
        auto halve = [&](float (&v)[32], int len, int mask) {
            const bool upper = (lane & mask) != 0;
#pragma unroll
            for (int i = 0; i < len / 2; ++i) {
                const float send = upper ? v[i] : v[i + len / 2];
                const float keep = upper ? v[i + len / 2] : v[i];
                v[i] = keep + __shfl_xor_sync(0xFFFFFFFFu, send, mask);
            }
        };
        // One row group from `words`, which then load group `refill` (if any) while it computes
        auto sum_group = [&](u32 (&words)[32], int group, int refill) {
            const int next = group + WARPS;
            float next_scale[4];
            if (next < groups) {
#pragma unroll
                for (int i = 0; i < 4; ++i) next_scale[i] = __ldg(lane_absmax + (size_t)(next * 32 + i) * ROW_BLOCKS);
            }
            float v[32];
#pragma unroll
            for (int j = 0; j < 32; ++j) {
                const u32 word = words[j];
                const float pair01 = LOOKUP(0, shift_left_on_fma(word, 7)) + LOOKUP(1, shift_right_on_fma(word, 1));
                const float pair23 = LOOKUP(2, shift_right_on_fma(word, 9)) + LOOKUP(3, shift_right_on_fma(word, 17));
                v[j] = pair01 + pair23;
                // a later group's row j streams in while this group computes
                if (refill < groups) words[j] = load_word(lane_words + (size_t)(refill * 32 + j) * ROW_WORDS);
            }
            halve(v, 32, 4);
            halve(v, 16, 2);
            halve(v, 8, 1);  // rows 4 lo3 + i, i < 4, summed over the block's 8 lanes
#pragma unroll
            for (int i = 0; i < 4; ++i) v[i] *= scale[i];
            halve(v, 4, 8);
            halve(v, 2, 16);  // row 4 lo3 + 2 (lane bit 3) + (lane bit 4), over all 32 lanes
            const int row = group * 32 + 4 * lo3 + 2 * ((lane >> 3) & 1) + ((lane >> 4) & 1);
            partial[(size_t)slice * N + row0 + row] = v[0];
            if (next < groups) {
#pragma unroll
                for (int i = 0; i < 4; ++i) scale[i] = next_scale[i];
            }
        };
#if AHEAD == 2
        for (int group = warp; group < groups; group += 2 * WARPS) {
            sum_group(w, group, group + 2 * WARPS);
            if (group + WARPS < groups) sum_group(w_next, group + WARPS, group + 3 * WARPS);
        }
#else
        for (int group = warp; group < groups; group += WARPS) sum_group(w, group, group + WARPS);
#endif
    }
    if (phases & 2) {
        // This thread's row of the chunk, if any, and its B row: loaded while the other blocks finish
        const int share = (chunk_rows + SLICES - 1) / SLICES;
        const int r = slice * share + (int)threadIdx.x;
        const bool mine = (int)threadIdx.x < share && r < chunk_rows;
        const int row = row0 + (mine ? r : 0);
        float4 b[RANK / 4];
#pragma unroll
        for (int r4 = 0; r4 < RANK / 4; ++r4)
            b[r4] = mine ? __ldg((const float4*)(lora_b + (size_t)row * RANK) + r4) : make_float4(0.f, 0.f, 0.f, 0.f);
#ifndef NF4_EMULATE
        if (phases & 1) {  // every block has stored its sums
            __threadfence();
            __syncthreads();
            STAMP(6);
            if (threadIdx.x == 0) {
                atomicAdd(&counters[0], 1);
                // a block that never arrives (the grid not resident after all) is an error, not a hang
                long long spins = 0;
                while (load_acquire(&counters[0]) < (int)gridDim.x) {
                    __nanosleep(32);
                    if (++spins > (1LL << 25)) __trap();
                }
            }
            __syncthreads();
            STAMP(7);
        }
#endif
        // Only now: a kernel started early could otherwise hold the SM a block of this grid still waits for
        next_kernel_may_start();
        for (int i = threadIdx.x; i < RT; i += WARPS * 32) {
            float sum = 0.f;
#pragma unroll
            for (int s = 0; s < SLICES; ++s) sum += __ldcg(&t_partial[s * RT + i]);
            t_sum[i / RANK][i % RANK] = sum;
        }
        // (A chunk's share beyond one row per thread, in the small test shapes: further rows in turn.)
        float base = 0.f;
        if (mine) {
#pragma unroll
            for (int s = 0; s < SLICES; ++s) base += __ldcg(&partial[(size_t)s * N + row]);
        }
        __syncthreads();
        for (int i = threadIdx.x; i < share && slice * share + i < chunk_rows; i += WARPS * 32) {
            const int at = row0 + slice * share + i;
            if (i != (int)threadIdx.x) {
                base = 0.f;
                for (int s = 0; s < SLICES; ++s) base += __ldcg(&partial[(size_t)s * N + at]);
#pragma unroll
                for (int r4 = 0; r4 < RANK / 4; ++r4) b[r4] = __ldg((const float4*)(lora_b + (size_t)at * RANK) + r4);
            }
            const int part = (at >= seg1) + (at >= seg2);
            float u = 0.f;
#pragma unroll
            for (int r4 = 0; r4 < RANK / 4; ++r4) {
                u += b[r4].x * t_sum[part][4 * r4];
                u += b[r4].y * t_sum[part][4 * r4 + 1];
                u += b[r4].z * t_sum[part][4 * r4 + 2];
                u += b[r4].w * t_sum[part][4 * r4 + 3];
            }
            u *= (float)scaling;
            const float rounded_base = f32(bf16(base));
            y[at] = round_lora_first ? bf16(rounded_base + f32(bf16(u))) : bf16(rounded_base + u);
        }
#ifndef NF4_EMULATE
        if (phases & 1) {  // the last block to leave zeroes the counters for the next launch
            __syncthreads();
            if (threadIdx.x == 0 && atomicAdd(&counters[1], 1) == (int)gridDim.x - 1) {
                counters[0] = 0;
                counters[1] = 0;
            }
            STAMP(8);
        }
#endif
    }
}
"""


def source(code: Sequence[float], k: int, rank: int, chunks: int, prep: int = PLAIN,
           layout: XtabLayout = XtabLayout(), timeline: bool = False) -> str:
    """The kernel's CUDA text for one NF4 code table, K, LoRA rank, row chunks, input preparation
    (PLAIN, SILU_MUL or ADD_NORM) and layout; `timeline`: with the bench's phase stamps (one more
    kernel argument)."""
    if len(code) != 16:
        raise ValueError("an NF4 code table has 16 entries")
    if k <= 0 or k % SLICE or rank <= 0 or rank % 4 or chunks <= 0 or prep not in PREPS or not layout.valid:
        raise ValueError(f"no nf4 xtab kernel for K {k}, rank {rank}, {chunks} chunks, prep {prep}, layout {layout}")
    values = ", ".join(f"{struct.unpack('<f', struct.pack('<f', float(v)))[0].hex()}f" for v in code)
    header = (f"#define KDIM {k}\n#define WARPS {layout.warps}\n#define RANK {rank}\n#define CHUNKS {chunks}\n"
              f"#define XPREP {prep}\n#define AHEAD {layout.ahead}\n"
              + (f"#define NF4_TIMELINE 1\n#define TIMELINE_SLOTS {TIMELINE_SLOTS}\n" if timeline else "")
              + f"__device__ __constant__ float CODE_TABLE[16] = {{{values}}};\n#define CODE CODE_TABLE\n")
    return header + DEVICE_HELPERS + _SOURCE


def chunks_for(n: int, k: int, sms: int) -> int | None:
    """Row chunks per slice: the most that keep every block resident at once (slices x chunks <= SMs,
    one block per SM) with whole 32-row groups per chunk; None where none does."""
    slices = k // SLICE
    if k % SLICE or n % ROW_GROUP or slices > sms:
        return None
    groups = n // ROW_GROUP
    return max((c for c in range(1, sms // slices + 1) if groups % c == 0), default=None)


class XtabUnavailable(RuntimeError):
    """The kernel cannot be compiled or configured here: already logged once."""


_DISABLED: str | None = None
_KERNELS: dict[tuple, Callable] = {}


def available(device: torch.device | str) -> bool:
    """NVRTC through PyTorch, 128 KB of shared memory per block, and no compile has failed."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or not hasattr(torch.cuda, "_compile_kernel"):
        return False
    optin = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0)
    return _DISABLED is None and optin >= TABLE_BYTES + STATIC_SHARED_BYTES


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _key(code: tuple[float, ...], device: torch.device, k: int, rank: int, chunks: int, prep: int,
         layout: XtabLayout, timeline: bool = False) -> tuple:
    return (device.index, code, k, rank, chunks, prep, layout) + (("timeline",) if timeline else ())


def precompile(requests: Sequence[tuple], threads: int) -> int:
    """Compile the kernels of `requests` ((code, device, k, rank, chunks, prep, layout[, timeline]), as
    `_kernel` takes them) on `threads` threads at once, as `llm.serving.nf4_mma.precompile` does for its own;
    returns how many. A kernel that fails here compiles (and reports) at its first launch
    instead."""
    from llm.serving.nf4_mma import _nvrtc_steps

    steps = _nvrtc_steps()
    missing = list(dict.fromkeys(r for r in requests if _key(*r) not in _KERNELS))
    if steps is None or _DISABLED is not None or not missing:
        return 0
    nvrtc_compile, load_module = steps

    def compile_one(request: tuple) -> tuple[bytes, str] | Exception:
        code, device, k, rank, chunks, prep, layout, *builds = request
        capability = "{}{}".format(*torch.cuda.get_device_capability(device))
        try:
            return nvrtc_compile(source(code, k, rank, chunks, prep, layout, *builds), "nf4_xtab_kernel",
                                 compute_capability=capability)
        except Exception as error:  # noqa: BLE001 - compiled again (and reported) at its first launch
            return error

    compiled = 0
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="nf4-xtab-nvrtc") as pool:
        for request, binary in zip(missing, pool.map(compile_one, missing), strict=True):
            device = request[1]
            if isinstance(binary, Exception):
                continue
            try:
                with torch.cuda.device(device):
                    kernel = load_module(binary[0], [binary[1]])[binary[1]]
                    kernel.set_shared_memory_config(TABLE_BYTES)
            except Exception:  # noqa: BLE001 - as above
                continue
            _KERNELS[_key(*request)] = kernel
            compiled += 1
    return compiled


def _kernel(code: tuple[float, ...], device: torch.device, k: int, rank: int, chunks: int, prep: int,
            layout: XtabLayout, timeline: bool = False) -> Callable:
    global _DISABLED
    key = _key(code, device, k, rank, chunks, prep, layout, timeline)
    if key not in _KERNELS:
        if _DISABLED is not None:
            raise XtabUnavailable(_DISABLED)
        try:
            with torch.cuda.device(device):
                kernel = torch.cuda._compile_kernel(source(code, k, rank, chunks, prep, layout, timeline),
                                                    "nf4_xtab_kernel")
                kernel.set_shared_memory_config(TABLE_BYTES)
        except Exception as error:  # noqa: BLE001 - NVRTC missing or refusing: any failure means "not here"
            _DISABLED = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            logger.warning("nf4: the x-table kernel cannot be compiled here (%s); the other kernels serve", _DISABLED)
            raise XtabUnavailable(_DISABLED) from error
        _KERNELS[key] = kernel
    return _KERNELS[key]


def nf4_xtab_linear(x: torch.Tensor, weight: NF4Matrix, lora: LoraParts, seg1: int, seg2: int,
                    round_lora_first: bool, layout: XtabLayout, code: tuple[float, ...],
                    timeline: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T + scaling * B(A(x)) with PEFT's roundings, for one row of x ([1, K], bf16), in one
    launch (the LoRA's A product included). `timeline` (the bench's): int64 [blocks, TIMELINE_SLOTS]
    that the launch stamps (`source`'s timeline build)."""
    if x.shape[0] != 1:
        raise ValueError(f"the x-table kernel takes one row, got {x.shape[0]}")
    return _launch(PLAIN, x, weight, lora, seg1, seg2, round_lora_first, layout, code, timeline=timeline)


def nf4_xtab_after_silu_mul(gate_up: torch.Tensor, weight: NF4Matrix, lora: LoraParts, seg1: int, seg2: int,
                            round_lora_first: bool, layout: XtabLayout, code: tuple[float, ...],
                            timeline: torch.Tensor | None = None) -> torch.Tensor:
    """As `nf4_xtab_linear` of `silu(gate) * up` (each op rounded to bf16, as eager PyTorch does) for
    one row of gate_up = [gate | up] ([1, 2K]), the element-wise step done inside the launch."""
    if gate_up.shape[0] != 1 or gate_up.shape[1] != 2 * weight.shape[1]:
        raise ValueError(f"the x-table kernel takes one [1, 2K] gate/up row, got {list(gate_up.shape)}")
    return _launch(SILU_MUL, gate_up, weight, lora, seg1, seg2, round_lora_first, layout, code, timeline=timeline)


def nf4_xtab_after_add_norm(residual: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                            weight: NF4Matrix, lora: LoraParts, seg1: int, seg2: int, round_lora_first: bool,
                            layout: XtabLayout, code: tuple[float, ...],
                            timeline: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, y): h = residual + delta (the residual stream's next value) and y as `nf4_xtab_linear` of
    MistralRMSNorm(h) with `norm_weight`, for one row, the add and the norm done inside the launch."""
    if residual.shape != delta.shape or residual.shape[0] != 1 or norm_weight.shape != (residual.shape[1],):
        raise ValueError(f"no add-and-norm for residual {list(residual.shape)}, delta {list(delta.shape)}, "
                         f"norm weight {list(norm_weight.shape)}")
    h = torch.empty_like(residual)
    y = _launch(ADD_NORM, delta, weight, lora, seg1, seg2, round_lora_first, layout, code,
                residual=_aligned(residual), norm_weight=_aligned(norm_weight), residual_out=h, eps=eps,
                timeline=timeline)
    return h, y


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned: the kernel reads 8 bf16 values at a time."""
    if not x.is_contiguous() or x.data_ptr() % 16:
        return x.clone(memory_format=torch.contiguous_format)
    return x


def _launch(prep: int, x: torch.Tensor, weight: NF4Matrix, lora: LoraParts, seg1: int, seg2: int,
            round_lora_first: bool, layout: XtabLayout, code: tuple[float, ...], residual: torch.Tensor | None = None,
            norm_weight: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
            eps: float = 0.0, timeline: torch.Tensor | None = None) -> torch.Tensor:
    n, k = weight.shape
    chunks = chunks_for(n, k, sm_count(x.device))
    if chunks is None:
        raise ValueError(f"no x-table layout for a {n} x {k} weight on this GPU")
    x = _aligned(x)
    kernel = _kernel(code, x.device, k, lora.rank, chunks, prep, layout, timeline is not None)
    slices = k // SLICE
    rt = lora.a.shape[0]
    y = torch.empty((1, n), dtype=torch.bfloat16, device=x.device)
    partial = torch.empty((slices, n), dtype=torch.float32, device=x.device)
    t_partial = torch.empty((slices, rt), dtype=torch.float32, device=x.device)
    counters = lora.counters("xtab", 2, x.device)
    programmatic_launch.launch(
        kernel, (slices * chunks, 1, 1), (layout.warps * 32, 1, 1),
        [weight.packed, weight.absmax, x, lora.a, lora.b, y, partial, t_partial, counters, n, seg1, seg2, rt,
         float(lora.scaling), int(round_lora_first), 3, x if residual is None else residual,
         x if norm_weight is None else norm_weight, y if residual_out is None else residual_out, float(eps),
         *(() if timeline is None else (timeline,))],
        x.device, shared_bytes=TABLE_BYTES)
    return y
