"""The `nf4` decode kernel on tensor cores: bitsandbytes' packed NF4 bytes as they are, 1..16 rows.

A CUDA C++ kernel, compiled at start-up with NVRTC (`torch.cuda._compile_kernel`), because it needs
what Triton does not let a kernel choose: which lane holds which weight of an `mma.sync` operand.

One `mma.m16n8k16` multiplies 16 output features x 16 inputs of W (the A operand) by 8 rows of x
(B; a second MMA takes rows 9-16). The reduction order over k is free as long as x and W use the
same one, so the kernel picks it to suit the weights: in a group of 256 inputs, lane (g, t) of a
warp supplies, for features g and g + 8, the 4 values of each of 16 MMAs from one 64-value absmax
block (block t): 32 contiguous bytes of each row, as bitsandbytes stored them. So each lane:
- loads its 2 x 32 bytes and 2 absmax values (no repacking at load time),
- builds each block's 16 possible weights once, `cvt.rn.bf16x2(code[i] * absmax)` (the float32
  product and single rounding of `dequantize_4bit`, so the weights are bit for bit bitsandbytes'),
  as a low-byte and a high-byte table (`llm.serving.nf4_kernels.lut_asm` does the same in Triton); or, for
  `shared_lookups` of its blocks, multiplies each byte's two code values from a shared table by the
  absmax instead (the same products and rounding),
- turns each 32-bit word (8 nibbles) into two MMAs' A registers with 8 `prmt` byte permutes,
- reads the matching x values with one coalesced load per MMA: the LoRA `A` kernel, which reads x
  anyway, also writes it in this operand order (`operand_order`).
The decode is shared by all rows, so 1 and 16 rows cost nearly the same weight work. The warps of a
block split K and add up through shared memory; the epilogue adds the LoRA's `B` product with
PEFT's roundings (float32 `B @ t * scaling`, rounded to bf16 and added to the bf16 base output), as
the Triton kernels' epilogue does. Variants: 1 or 2 feature tiles per warp, 1 or 2 groups' weights
in registers ahead of the one computed (bytes in flight are what one row waits on), whether each
warp prefetches its next group's x into L1 (what batches of 9-16 rows wait on), and K split across
2-8 blocks per feature tile (the last to finish adds their sums in a fixed order).
On Hopper it is launched with programmatic dependent launch (`llm.serving.programmatic_launch`): its first
weight loads go out while the kernel before it finishes.
The LoRA `A` kernel before it (`llm.serving.nf4_kernels.mma_inputs`) leaves t as a few split-K partial
sums (1-4 rows) or whole (5-16 rows); the prologue adds the splits up. With FUSE_A
(`nf4_mma_linear` without `inputs`) there is no kernel before it: the launch's first blocks
compute t (and x in operand order, for more than one row) while the others start on their weights;
those wait on per-projection counters for x before their loop and for t before their epilogue. One
launch instead of two: the decode step went from 3.51 to 3.37 ms at one row, 5.01 to 4.75 ms at 16
(runs 17, 19).
tests/test_nf4_mma_emulated.py runs this CUDA text on the CPU; tests/gpu runs it on a GPU.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from llm.serving import programmatic_launch

if TYPE_CHECKING:
    from llm.serving.nf4 import LoraParts, NF4Matrix

logger = logging.getLogger(__name__)

GROUP = 256  # inputs per lane group: 4 absmax blocks of 64, one per lane of a quad
TILE_N = 16  # output features per tile (one MMA's m); a block has 1 or 2 tiles
WARP_CHOICES = (4, 8, 16)
TILE_CHOICES = (1, 2)  # 2: every x load feeds twice the MMAs (x traffic halved, more registers)
K_SPLIT_CHOICES = (1, 2, 4, 7, 8)  # blocks per feature tile, each over 1 / k_splits of K (7: K = 14,336)

DEVICE_HELPERS = r"""
typedef unsigned int u32;
typedef unsigned short u16;

// PTX helpers of the decode kernels' CUDA texts (this module's and llm.serving.nf4_xtab's). NF4_EMULATE
// (tests/fakes/cuda_emulation.hpp) swaps in plain C++ ones, so that the kernels' own text runs on a CPU.
#ifndef NF4_EMULATE
__device__ __forceinline__ u16 bf16(float v) {
    u16 d;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(d) : "f"(v));
    return d;
}

// a >> k as the high word of a * 2^(32 - k): an IMAD.HI on the FMA pipe, which this kernel leaves
// mostly idle, instead of a shift on the ALU pipe, which bounds it (3 of 24 ALU instructions per
// 16 x 16 weight tile, bench/nf4_mma_sass.py)
__device__ __forceinline__ u32 shift_right_on_fma(u32 a, int k) {
    u32 d;
    asm("mul.hi.u32 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(1u << (32 - k)));
    return d;
}

// a << k as a multiply on the FMA pipe (as shift_right_on_fma)
__device__ __forceinline__ u32 shift_left_on_fma(u32 a, int k) {
    u32 d;
    asm("mul.lo.u32 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(1u << k));
    return d;
}

// (a & b) | c in one instruction
__device__ __forceinline__ u32 and_or(u32 a, u32 b, u32 c) {
    u32 d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

__device__ __forceinline__ int load_acquire(const int* p) {
    int v;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// Programmatic dependent launch (sm_90+; launched with the attribute by `llm.serving.programmatic_launch`):
// this launch may start while the kernel before it finishes, so that its weight loads overlap that
// kernel's tail. Everything the kernels before it write (x, t, the counters' users) is read only
// after previous_kernels_done(); without the attribute it returns at once.
__device__ __forceinline__ void previous_kernels_done() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// The next kernel may be scheduled now: it waits for this one's results itself.
__device__ __forceinline__ void next_kernel_may_start() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}
#endif  // NF4_EMULATE

__device__ __forceinline__ float f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

// The timeline builds (NF4_TIMELINE; bench/xtab_timeline.py, bench/mma_timeline.py): thread 0 of every
// block stores the global nanosecond timer and its SM's cycle counter at the kernel's points
// (STAMP(point)) and its SM, so that a bench can say where a launch's time goes. A warp issues in order,
// so a point after an instruction that uses a loaded value (STAMP_AFTER's shared store) is stamped once
// that value has arrived.
#if defined(NF4_TIMELINE) && !defined(NF4_EMULATE)
#define TIMELINE_PARAM , unsigned long long* __restrict__ timeline
__device__ __forceinline__ void stamp(unsigned long long* timeline, int point) {
    if (threadIdx.x != 0) return;
    unsigned long long ns, cycles;
    unsigned sm;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns) : : "memory");
    asm volatile("mov.u64 %0, %%clock64;" : "=l"(cycles) : : "memory");
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    unsigned long long* mine = timeline + (size_t)blockIdx.x * TIMELINE_SLOTS;
    mine[2 * point] = ns;
    mine[2 * point + 1] = cycles;
    mine[TIMELINE_SLOTS - 1] = sm;
}
__device__ __forceinline__ void stamp_after(unsigned long long* timeline, int point, u32 value) {
    __shared__ volatile u32 sink;
    if (threadIdx.x == 0) sink = value;
    stamp(timeline, point);
}
#define STAMP(point) stamp(timeline, point)
#define STAMP_AFTER(point, value) stamp_after(timeline, point, value)
#else
#define TIMELINE_PARAM
#define STAMP(point)
#define STAMP_AFTER(point, value)
#endif
"""

_SOURCE = r"""
constexpr int SETS = (ROWS + 7) / 8;  // MMAs per A operand: x rows 0-7, 8-15
// x's uint2 (4 values) per 256-input group and per MMA step: in operand order (16 rows), or one row
// as it is
#if ROWS == 1
#define X_GROUP_STRIDE 64
#define X_STEP_STRIDE 1
#else
#define X_GROUP_STRIDE 1024
#define X_STEP_STRIDE 32
#endif

// PTX helpers. NF4_EMULATE (tests/fakes/cuda_emulation.hpp) swaps in plain C++ ones, so that the
// kernel's own text runs on a CPU in the tests.
#ifndef NF4_EMULATE
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

// Weights are read once: past L1, which keeps x (read by every block) instead. (Run 23 measured the
// alternatives to these half-sector loads: into L1, 0-3 % faster in some layouts and slower in
// others; lane pairs loading whole sectors and swapping halves, 3-10 % slower everywhere.)
__device__ __forceinline__ uint4 load_streaming(const uint4* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ void mma(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
#endif  // NF4_EMULATE

#ifndef NF4_EMULATE
template <class T>
__device__ __forceinline__ T load_plain(const T* p) { return *p; }
#endif

// x, its operand-order copy and t are written by the kernels before this launch (or, with FUSE_A, by
// its own A blocks) and read only after previous_kernels_done(): plain pointers and loads, never
// `const __restrict__` or __ldg, which let the compiler read them through the non-coherent path and
// hoist those loads above the wait (run 32: an x-table kernel did, and read the previous step's x
// once the kernel before it let it start early).
#if FUSE_A
#define XQ_POINTER uint2*
#define T_POINTER float*
#else
#define XQ_POINTER const uint2*
#define T_POINTER const float*
#endif

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

#if SHARED_LOOKUPS
// The code table's 256 byte pairs in shared memory (32 KB), for SHARED_LOOKUPS of a lane's absmax
// blocks per group: there a weight byte costs a shared load, two float32 products and one conversion
// (two ALU-pipe instructions for two weights) instead of four register-table permutes, so that the
// shared-memory pipe takes part of the ALU pipe's work (the busiest pipe in runs 17 and 22; run 23:
// 2-9 % faster in the two-tile layouts, slower in most one-tile ones at one row). Entry e holds (code[e >> 4], code[e & 15]) (bitsandbytes' high nibble is the first value)
// 16 times, copy c at byte 128 e + 8 c: lane l reads copy l % 16, so that a half-warp's 16 lanes read
// 16 different bank pairs whatever their bytes. fill_code_pairs stores two entries at a time (16 bytes):
// float2's own alignment (8) held only while no other shared variable came before it (the timeline
// build's `sink` moved it and the launch failed with a misaligned address).
__shared__ __align__(16) float2 code_pairs[256 * 16];

__device__ __forceinline__ void fill_code_pairs() {
    for (int i = threadIdx.x; i < 256 * 8; i += WARPS * 32) {
        const int e = i >> 3;
        ((float4*)code_pairs)[i] = make_float4(CODE[e >> 4], CODE[e & 15], CODE[e >> 4], CODE[e & 15]);
    }
    __syncthreads();
}

// A byte's two weights as one bf16x2 MMA register: the same float32 products and rounding as block_tables
__device__ __forceinline__ u32 decode_byte(u32 offset, float scale) {
    const float2 pair = *(const float2*)((const char*)code_pairs + offset);
    return bf16x2(__fmul_rn(scale, pair.x), __fmul_rn(scale, pair.y));
}

// decode_half's two registers, from the shared table: the word's bytes 2h and 2h + 1. A byte b's
// offset, ((word >> 8 b) & 0xFF) << 7 | copy, is a shift on the FMA pipe and one LOP3.
__device__ __forceinline__ void decode_half_shared(u32 word, int h, float scale, u32 copy, u32& first,
                                                   u32& second) {
    const u32 low = h ? shift_right_on_fma(word, 9) : shift_left_on_fma(word, 7);
    const u32 high = shift_right_on_fma(word, h ? 17 : 1);
    first = decode_byte(and_or(low, 0x7F80u, copy), scale);
    second = decode_byte(and_or(high, 0x7F80u, copy), scale);
}
#endif  // SHARED_LOOKUPS

#ifndef NF4_EMULATE
// A hint: the 128-byte line at p into L1, where a later load will find it
__device__ __forceinline__ void prefetch_l1(const void* p) { asm volatile("prefetch.global.L1 [%0];" ::"l"(p)); }

#endif  // NF4_EMULATE

#if FUSE_A
// With FUSE_A, the first `la_blocks` blocks of the launch compute the LoRA's A product (and x in
// operand order) while the others stream weights; these counters (per projection, zero between
// launches) say how far they are.
#define XQ_READY 0  // (256-input slice, row chunk) pieces of x written in operand order
#define T_READY 1   // (rank quad, row chunk) pieces of t = x @ A.T summed
#define DEPARTED 2  // weight blocks done reading t: the last one zeroes the counters for the next launch
#define QUAD_ARRIVALS 3  // per (rank quad, row chunk): slices whose partial sums are stored
// A_ROWS (rows of x per LoRA A unit) comes from `lora_a_unit_rows`, which the launch's block count uses too
#define A_ROW_CHUNKS (ROWS / A_ROWS)

// Waits (the whole block) until *counter >= target. Only the lowest-numbered blocks of the launch
// ever raise a counter, and the GPU starts blocks in order, so they are running or done. A wait
// that cannot end (counters left behind by a failed launch) traps after some seconds: an error
// for the operator instead of a hung GPU.
__device__ __forceinline__ void wait_until(const int* counter, int target) {
    if (threadIdx.x == 0) {
        long long spins = 0;
        while (load_acquire(counter) < target) {
            __nanosleep(32);
            if (++spins > (1LL << 25)) __trap();
        }
    }
    __syncthreads();
}

// One warp's unit of the LoRA's A product: ranks 4 quad .. 4 quad + 3 over inputs 256 slice ..
// + 255, for rows A_ROWS chunk .. + A_ROWS - 1 of x (lane l: inputs 8 l .. 8 l + 7). Slice partial
// sums go to `partial` ([slices, M, RT]); the last unit of a (rank quad, row chunk) adds them up in
// slice order into t ([M, RT]). Units of quad 0 first write their rows' slice of x in operand order.
// A unit's rows are loaded at once, with its A rows: one L2 round trip per unit. Per-unit row chunks
// (not every row in one unit) keep the chain before the weight blocks' epilogue short at 16 rows:
// each of a unit's row passes, and each batch of the final sum's loads, was one more round trip.
__device__ void lora_a_unit(const u16* x, int ldx, const float* lora_a, int M, int RT, int quad, int chunk,
                            int slice, uint2* xq, float* partial, float* t, int* counters) {
    constexpr int SLICES = KDIM >> 8;
    const int lane = threadIdx.x & 31;
    const int k0 = 256 * slice + 8 * lane, m0 = A_ROWS * chunk;
    uint4 v[A_ROWS];
#pragma unroll
    for (int c = 0; c < A_ROWS; ++c)
        v[c] = m0 + c < M ? *(const uint4*)(x + (size_t)(m0 + c) * ldx + k0) : make_uint4(0u, 0u, 0u, 0u);
    float4 a_rows[4][2];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const float4* row = (const float4*)(lora_a + (size_t)(4 * quad + r) * KDIM + k0);
        a_rows[r][0] = __ldg(row);
        a_rows[r][1] = __ldg(row + 1);
    }
    if (ROWS > 1 && quad == 0) {  // (one row: the weight blocks read x as it is)
        // x[m][k0 .. k0 + 7] are operand-order values j = 0..3 of steps 2 (lane % 8) and + 1 of
        // lane (m % 8, lane / 8) in set m / 8: [slice, set, step, g, t, j]
#pragma unroll
        for (int c = 0; c < A_ROWS; ++c) {
            const int m = m0 + c;
            uint2* out = xq + slice * 1024 + (m >> 3) * 512 + (2 * (lane & 7)) * 32 + (m & 7) * 4 + (lane >> 3);
            if (m < M) out[0] = make_uint2(v[c].x, v[c].y), out[32] = make_uint2(v[c].z, v[c].w);
        }
        __threadfence();
        __syncwarp();
        if (lane == 0) atomicAdd(&counters[XQ_READY], 1);
    }
    float s[4 * A_ROWS];  // the lane's share of (row m0 + c, rank 4 quad + r) at 4 c + r
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const float a[8] = {a_rows[r][0].x, a_rows[r][0].y, a_rows[r][0].z, a_rows[r][0].w,
                            a_rows[r][1].x, a_rows[r][1].y, a_rows[r][1].z, a_rows[r][1].w};
#pragma unroll
        for (int c = 0; c < A_ROWS; ++c) {
            const u32 words[4] = {v[c].x, v[c].y, v[c].z, v[c].w};
            float sum = 0.f;
#pragma unroll
            for (int j = 0; j < 8; ++j)
                sum = fmaf(__uint_as_float(j & 1 ? words[j >> 1] & 0xFFFF0000u : words[j >> 1] << 16), a[j], sum);
            s[4 * c + r] = sum;
        }
    }
    // 4 A_ROWS sums over the warp. Halving the values each lane holds at every step (the lanes with
    // bit `offset` keep the upper half) leaves value l >> (5 - log2(4 A_ROWS)) in lane l; plain
    // butterflies finish the steps left. (Either way each sum is the same butterfly tree over lanes.)
    int count = 4 * A_ROWS;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        if (count > 1) {
            const bool upper = lane & offset;
            count >>= 1;
#pragma unroll
            for (int i = 0; i < 2 * A_ROWS; ++i) {
                if (i < count) {
                    const float keep = upper ? s[i + count] : s[i], send = upper ? s[i] : s[i + count];
                    s[i] = keep + __shfl_xor_sync(0xFFFFFFFFu, send, offset);
                }
            }
        } else {
            s[0] += __shfl_xor_sync(0xFFFFFFFFu, s[0], offset);
        }
    }
    constexpr int SPREAD = 32 / (4 * A_ROWS);  // lanes holding each sum
    const int index = lane / SPREAD;
    if (lane % SPREAD == 0 && m0 + (index >> 2) < M)
        partial[((size_t)slice * M + m0 + (index >> 2)) * RT + 4 * quad + (index & 3)] = s[0];
    __threadfence();
    __syncwarp();
    int* arrivals = &counters[QUAD_ARRIVALS + quad * A_ROW_CHUNKS + chunk];
    int last = 0;
    if (lane == 0) last = atomicAdd(arrivals, 1) == SLICES - 1;
    if (__shfl_sync(0xFFFFFFFFu, last, 0)) {
        __threadfence();
        // the sum in slice order (the same bits whichever unit arrives last)
        const int m = m0 + (lane >> 2), column = 4 * quad + (lane & 3);
        if (lane < 4 * A_ROWS && m < M) {
            float sum = 0.f;
#if ROWS > 1
            // every slice's load in flight at once: at 16 rows this chain is what the weight blocks'
            // epilogue waits for (run 25: with the units' rework, the 16-row kernels 5-19 % faster)
            float p[SLICES];
#pragma unroll
            for (int s = 0; s < SLICES; ++s) p[s] = __ldcg(&partial[((size_t)s * M + m) * RT + column]);
#pragma unroll
            for (int s = 0; s < SLICES; ++s) sum += p[s];
#else
            // not at one row: there ptxas then schedules the weight loop of the shared-table layouts
            // otherwise, and they ran 5-30 % slower (run 25, calls 3 and 4)
#pragma unroll 8
            for (int s = 0; s < SLICES; ++s) sum += __ldcg(&partial[((size_t)s * M + m) * RT + column]);
#endif
            t[m * RT + column] = sum;
        }
        __threadfence();
        __syncwarp();
        if (lane == 0) {
            *arrivals = 0;
            atomicAdd(&counters[T_READY], 1);
        }
    }
}
#endif  // FUSE_A

// One group's weight bytes and absmax values, as one lane holds them
struct LaneGroup {
    uint4 w[2 * TILES][2];
    float scale[2 * TILES];
};

// One group of 256 inputs: each half's block tables (the register halves'), then 16 MMA steps (x
// values in operand order).
__device__ __forceinline__ void group_mma(const uint4 (&w)[2 * TILES][2], const float (&scale)[2 * TILES],
                                          const uint2* const (&x_lane)[SETS], int group,
                                          float (&acc)[TILES][SETS][4]) {
    constexpr int HALVES = 2 * TILES;
    constexpr int REGISTER_HALVES = HALVES - SHARED_LOOKUPS;  // the rest decode from the shared table
    u32 L[HALVES][4], H[HALVES][4];
#pragma unroll
    for (int q = 0; q < REGISTER_HALVES; ++q) block_tables(scale[q], L[q], H[q]);
#if SHARED_LOOKUPS
    const u32 copy = (threadIdx.x & 15) * 8;
#endif
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        // nibble p of a word is value p ^ 1 (bitsandbytes: high nibble first); nibble p picks
        // byte p of the entries-0..7 lookup or, by its bit 3, of the entries-8..15 one
        u32 word[HALVES], sel[HALVES], pick[HALVES];
#pragma unroll
        for (int q = 0; q < HALVES; ++q) {
            const uint4 v = w[q][i >> 2];
            word[q] = (i & 3) == 0 ? v.x : (i & 3) == 1 ? v.y : (i & 3) == 2 ? v.z : v.w;
            if (q < REGISTER_HALVES) {
                sel[q] = word[q] & 0x77777777u;
                pick[q] = and_or(shift_right_on_fma(word[q], 1), 0x44444444u, 0x32103210u);
            }
        }
        // half q's values 4h..4h+3 of this word as two MMA registers
        auto decode = [&](int q, int h, u32& first, u32& second) {
            if (q < REGISTER_HALVES) {
                decode_half(L[q], H[q], h ? shift_right_on_fma(sel[q], 16) : sel[q],
                            h ? shift_right_on_fma(pick[q], 16) : pick[q], first, second);
            } else {
#if SHARED_LOOKUPS
                decode_half_shared(word[q], h, scale[q], copy, first, second);
#endif
            }
        };
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            uint2 b[SETS];
#pragma unroll
            for (int set = 0; set < SETS; ++set) b[set] = load_plain(x_lane[set] + group * X_GROUP_STRIDE + (2 * i + h) * X_STEP_STRIDE);
#pragma unroll
            for (int j = 0; j < TILES; ++j) {
                u32 a0, a1, a2, a3;
                decode(2 * j, h, a0, a2);
                decode(2 * j + 1, h, a1, a3);
#pragma unroll
                for (int set = 0; set < SETS; ++set) mma(acc[j][set], a0, a1, a2, a3, b[set].x, b[set].y);
            }
        }
    }
}

// A = W (16 features x 16 inputs), B = x.T (16 inputs x 8 rows of x). Lane (g, t) holds features g
// and g + 8 of each of TILES 16-feature tiles, and x row g (+ 8 per set); WARPS warps split K.
// A maximum of threads only: a minimum of blocks per SM, even 1, lets ptxas take up to 255 registers
// (253 for the one-row two-tile kernel instead of 166: 2 blocks of 4 warps per SM instead of 3, 20 %
// slower in run 21), and holding that kernel to 128 registers for 4 blocks was 5 % slower (run 22).
extern "C" __global__ void __launch_bounds__(WARPS * 32)
nf4_mma_kernel(const uint4* __restrict__ words, const float* __restrict__ absmax, XQ_POINTER xq, T_POINTER t_part,
               const float* __restrict__ lora_b, u16* __restrict__ y, int M, int K_unused, int ldy, double scaling,
               int seg1, int seg2, int RT, int t_splits, int round_lora_first, const u16* x, int ldx,
               const float* __restrict__ lora_a, float* __restrict__ a_partial, int* __restrict__ counters,
               int la_blocks, float* __restrict__ split_sums, int* __restrict__ tile_arrivals TIMELINE_PARAM) {
    constexpr int HALVES = 2 * TILES;  // 8-feature halves of the block; half q is features 8 q + g
    constexpr int FEATURES = 16 * TILES;
    // One padding float per row keeps the epilogue's reads free of bank conflicts: a warp reads
    // one x row's 32 features, i.e. a column of b_tile and of partial (unpadded, 32-way and 8-way
    // conflicts: Nsight counted 83 % of the shared loads' wavefronts as conflicts at 16 rows).
    __shared__ float partial[WARPS][32][4 * SETS * TILES + 1];
    __shared__ float t_sum[ROWS][RANK];
    __shared__ float b_tile[FEATURES][RANK + 1];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    // K is compiled in (one kernel per K; the argument K_unused keeps the launch's signature), so
    // the lanes' row offsets become immediates
    constexpr int K = KDIM;
    const int groups = K >> 8;
    next_kernel_may_start();
    STAMP(0);
#if FUSE_A
    if ((int)blockIdx.x < la_blocks) {  // a LoRA A block: one unit per warp at a time
        previous_kernels_done();  // x
        STAMP(1);
        // quad 0's units first (x in operand order for the weight blocks), then by row chunk and slice
        const int quads = RT >> 2, units = quads * A_ROW_CHUNKS * groups;
        for (int unit = blockIdx.x * WARPS + warp; unit < units; unit += la_blocks * WARPS)
            lora_a_unit(x, ldx, lora_a, M, RT, unit / (A_ROW_CHUNKS * groups), unit / groups % A_ROW_CHUNKS,
                        unit % groups, xq, a_partial, t_part, counters);
        STAMP(7);
        return;
    }
    const int weight_block = blockIdx.x - la_blocks;
#else
    const int weight_block = blockIdx.x;
#endif
    // KSPLIT blocks share a feature tile, each over its own range of groups: more, smaller blocks for
    // the narrow projections (run 24: `down` at one row 4 % faster with 2, `o` slower with any).
    const int tile = weight_block / KSPLIT, split = weight_block % KSPLIT;
    const int n0 = tile * FEATURES;
    constexpr int SPLIT_GROUPS = (KDIM >> 8) / KSPLIT;
    const int first_group = split * SPLIT_GROUPS, end_group = first_group + SPLIT_GROUPS;
    // a feature's lane data: bytes 128 * group + 32 * t of its row (two uint4), absmax block 4 * group + t
    const uint4* lane_words[HALVES];
    const float* lane_absmax[HALVES];
#pragma unroll
    for (int q = 0; q < HALVES; ++q) {
        lane_words[q] = words + (size_t)(n0 + 8 * q + g) * (K >> 5) + 2 * t;
        lane_absmax[q] = absmax + (size_t)(n0 + 8 * q + g) * (K >> 6) + t;
    }
    // x in operand order (written by the LoRA A kernel): per (group, set of 8 rows, MMA), each
    // lane's 4 values, in lane order. Lanes of rows past M (whose outputs are never stored) read
    // row 0's, so that a load of few rows touches few sectors.
    const uint2* x_lane[SETS];
#if ROWS == 1
    x_lane[0] = (const uint2*)x + 16 * t;  // one row: x as it is (lane (g, t) reads inputs 64 t + 4 step ..)
#else
#pragma unroll
    for (int set = 0; set < SETS; ++set) x_lane[set] = xq + (8 * set + g < M ? set * 16 * 32 + lane : t);
#endif

    // The LoRA's inputs: this block's rows of B (contiguous) into shared memory, called once the first
    // weights are on their way (each store waits for its load: issued before the weights' loads, the
    // two round trips would come one after the other), and t = x @ A.T for its part.
    const int part = (n0 >= seg1) + (n0 >= seg2);
    auto load_b_tile = [&] {
        for (int i = threadIdx.x; i < FEATURES * RANK; i += WARPS * 32)
            b_tile[i / RANK][i % RANK] = lora_b[(size_t)n0 * RANK + i];
    };
    // t: the split-K partial sums added up (with FUSE_A, t whole, once the A blocks are done)
    auto load_t = [&] {
        for (int i = threadIdx.x; i < M * RANK; i += WARPS * 32) {
            const int m = i / RANK, r = i % RANK;
            float sum = 0.f;
#pragma unroll 16
            for (int split = 0; split < t_splits; ++split) sum += t_part[(split * M + m) * RT + part * RANK + r];
            t_sum[m][r] = sum;
        }
    };
#if SHARED_LOOKUPS
    fill_code_pairs();
#endif
    float acc[TILES][SETS][4];
#pragma unroll
    for (int j = 0; j < TILES; ++j)
#pragma unroll
        for (int set = 0; set < SETS; ++set) acc[j][set][0] = acc[j][set][1] = acc[j][set][2] = acc[j][set][3] = 0.f;
    // A group's bytes for this lane (zeros past the last group)
    auto fetch = [&](int grp) {
        LaneGroup lane_group;
        const bool any = grp < end_group;
#pragma unroll
        for (int q = 0; q < HALVES; ++q) {
            lane_group.w[q][0] = any ? load_streaming(lane_words[q] + 8 * grp) : make_uint4(0u, 0u, 0u, 0u);
            lane_group.w[q][1] = any ? load_streaming(lane_words[q] + 8 * grp + 1) : make_uint4(0u, 0u, 0u, 0u);
            lane_group.scale[q] = any ? __ldg(lane_absmax[q] + 4 * grp) : 0.f;
        }
        return lane_group;
    };
    // A group's x, from L2 into L1 before its loads: one line per lane, only the lines that hold
    // rows below M (rows 8 set + g, lane (g, t): half h of a step's 256 bytes holds rows 8 set + 4 h .. + 3).
    auto prefetch_x = [&](int grp) {
#if PREFETCH_X && ROWS == 1
        if (grp < end_group && lane < 4) prefetch_l1(x + grp * 256 + 64 * lane);
#elif PREFETCH_X
        if (grp < end_group) {
            const int step = lane >> 1, half = lane & 1;
#pragma unroll
            for (int set = 0; set < SETS; ++set)
                if (8 * set + 4 * half < M) prefetch_l1(xq + (grp * 2 + set) * (16 * 32) + step * 32 + half * 16);
        }
#endif
    };
    // The weights are the launch's own: their first loads go out before the kernels before it are
    // done; x and t (theirs) are read after.
    auto inputs_ready = [&] {
        previous_kernels_done();
        STAMP(1);
#if !FUSE_A
        load_t();
#elif ROWS > 1
        wait_until(&counters[XQ_READY], groups * A_ROW_CHUNKS);
#endif
        STAMP(2);
    };
#if AHEAD == 1
    // The next group's bytes in registers while this one computes.
    LaneGroup current = fetch(first_group + warp);
    load_b_tile();
    inputs_ready();
    for (int group = first_group + warp; group < end_group; group += WARPS) {
        const LaneGroup next = fetch(group + WARPS);
        prefetch_x(group + WARPS);
        group_mma(current.w, current.scale, x_lane, group, acc);
        current = next;
    }
#else
    // The next two groups' bytes in registers while this one computes (twice the bytes in flight).
    LaneGroup first = fetch(first_group + warp), second = fetch(first_group + warp + WARPS);
    load_b_tile();
    inputs_ready();
    for (int group = first_group + warp; group < end_group; group += 2 * WARPS) {
        const LaneGroup third = fetch(group + 2 * WARPS);
        prefetch_x(group + WARPS);
        group_mma(first.w, first.scale, x_lane, group, acc);
        if (group + WARPS >= end_group) break;
        const LaneGroup fourth = fetch(group + 3 * WARPS);
        prefetch_x(group + 2 * WARPS);
        group_mma(second.w, second.scale, x_lane, group + WARPS, acc);
        first = third;
        second = fourth;
    }
#endif

    STAMP_AFTER(3, __float_as_uint(acc[0][0][0]));  // warp 0's last MMA done
#if FUSE_A
    wait_until(&counters[T_READY], (RT >> 2) * A_ROW_CHUNKS);
    load_t();
#endif
    STAMP(4);
#pragma unroll
    for (int j = 0; j < TILES; ++j)
#pragma unroll
        for (int set = 0; set < SETS; ++set)
#pragma unroll
            for (int i = 0; i < 4; ++i) partial[warp][lane][(j * SETS + set) * 4 + i] = acc[j][set][i];
    __syncthreads();
    STAMP(5);
#if FUSE_A
    if (threadIdx.x == 0 && atomicAdd(&counters[DEPARTED], 1) == (int)gridDim.x - la_blocks - 1) {
        counters[XQ_READY] = 0;
        counters[T_READY] = 0;
        counters[DEPARTED] = 0;
    }
#endif
    // The block's sum over its warps for (row m, feature f)
    auto block_sum = [&](int m, int f) {
        const int j = f >> 4, ff = f & 15;
        // D[ff][m] of tile j (set m / 8) sits in lane (ff % 8) * 4 + (m % 8) / 2, register (ff / 8) * 2 + m % 2
        const int lane_of = (ff & 7) * 4 + ((m & 7) >> 1);
        const int reg = (j * SETS + (m >> 3)) * 4 + (ff >> 3) * 2 + (m & 1);
        float sum = 0.f;
#pragma unroll
        for (int v = 0; v < WARPS; ++v) sum += partial[v][lane_of][reg];
        return sum;
    };
#if KSPLIT > 1
    // Each block of the tile stores its sums ([KSPLIT, M, N] float32); the last one to arrive adds
    // them up in split order (the same bits whichever block that is) and finishes the tile.
    const int n_total = ((int)gridDim.x - la_blocks) / KSPLIT * FEATURES;
    for (int i = threadIdx.x; i < M * FEATURES; i += WARPS * 32) {
        const int m = i / FEATURES, f = i % FEATURES;
        split_sums[((size_t)split * M + m) * n_total + n0 + f] = block_sum(m, f);
    }
    __threadfence();
    __syncthreads();
    __shared__ int last_of_tile;
    if (threadIdx.x == 0) last_of_tile = atomicAdd(&tile_arrivals[tile], 1) == KSPLIT - 1;
    __syncthreads();
    if (!last_of_tile) {
        STAMP(6);
        return;
    }
    __threadfence();
    if (threadIdx.x == 0) tile_arrivals[tile] = 0;  // as the next launch must find it
#endif
    for (int i = threadIdx.x; i < M * FEATURES; i += WARPS * 32) {
        const int m = i / FEATURES, f = i % FEATURES;
#if KSPLIT > 1
        float base = 0.f;
#pragma unroll
        for (int s = 0; s < KSPLIT; ++s) base += __ldcg(&split_sums[((size_t)s * M + m) * n_total + n0 + f]);
#else
        const float base = block_sum(m, f);
#endif
        float u = 0.f;
#pragma unroll
        for (int r = 0; r < RANK; ++r) u += b_tile[f][r] * t_sum[m][r];
        u *= (float)scaling;
        const float rounded_base = f32(bf16(base));
        const u16 out = round_lora_first ? bf16(rounded_base + f32(bf16(u))) : bf16(rounded_base + u);
        y[(size_t)m * ldy + n0 + f] = out;
    }
    STAMP(6);
}
"""


# bench/mma_timeline.py's stamps per block (int64): (ns, cycles) at each point, the SM last. Weight blocks:
# 0 entry · 1 the kernel before is done · 2 x in operand order ready (unfused: t loaded) · 3 warp 0's
# weight loop done · 4 t ready · 5 every warp's sums in shared memory · 6 the block's outputs stored.
# LoRA A blocks: 0, 1 and 7 their units done.
TIMELINE_POINTS = 8
TIMELINE_SLOTS = 2 * TIMELINE_POINTS + 1

CODE_PAIRS_BYTES = 256 * 16 * 8
STATIC_SHARED_LIMIT = 48 * 1024  # a kernel's static shared memory


def static_shared_bytes(warps: int, rows: int, rank: int, tiles: int, shared_lookups: int) -> int:
    """The kernel's shared memory: the warps' partial sums, t, the LoRA B tile, the K split's
    last-block flag (counted whether or not K is split) and the code pairs."""
    sets = (rows + 7) // 8
    return 4 * (warps * 32 * (4 * sets * tiles + 1) + rows * rank + TILE_N * tiles * (rank + 1) + 1) + (
        CODE_PAIRS_BYTES if shared_lookups else 0)


def source(code: Sequence[float], warps: int, rows: int, rank: int, tiles: int = 1, prefetch_x: bool = False,
           ahead: int = 1, k: int = 4096, fuse_a: bool = False, shared_lookups: int = 0, k_splits: int = 1,
           timeline: bool = False) -> str:
    """The kernel's CUDA source for one NF4 code table, warps per block, row tile (8 or 16), rank,
    16-feature tiles per warp, whether each warp prefetches its next group's x into L1, how many
    groups' weight bytes each warp holds in registers ahead of the one it computes (1 or 2), the
    inputs K (a compile-time constant: 5-7 % fewer ALU instructions per weight, bench/nf4_mma_sass.py),
    whether the launch's first blocks compute the LoRA's A product themselves (`fuse_a`), and how
    many of a lane's 2 x tiles absmax blocks per group decode through the shared-memory code pairs
    instead of register tables (`shared_lookups`), and how many blocks split each feature tile's K
    (`k_splits`: the last of them adds their float32 sums up in a fixed order). `timeline`: the build
    with bench/mma_timeline.py's stamps (one more kernel argument, TIMELINE_POINTS per block)."""
    if len(code) != 16:
        raise ValueError("an NF4 code table has 16 entries")
    if (warps not in WARP_CHOICES or rows not in (1, 8, 16) or (rows == 1 and not fuse_a) or rank <= 0
            or tiles not in TILE_CHOICES or ahead not in (1, 2) or k <= 0 or k % GROUP
            or not 0 <= shared_lookups <= 2 * tiles or k_splits not in K_SPLIT_CHOICES or (k // GROUP) % k_splits
            or static_shared_bytes(warps, rows, rank, tiles, shared_lookups) > STATIC_SHARED_LIMIT):
        raise ValueError(f"no nf4 MMA kernel for {warps} warps, {rows} rows, rank {rank}, {tiles} tiles, "
                         f"{ahead} groups ahead, K {k}, {shared_lookups} shared lookups, {k_splits} K splits")
    # exact: hexadecimal literals of the float32 values
    values = ", ".join(f"{struct.unpack('<f', struct.pack('<f', float(v)))[0].hex()}f" for v in code)
    header = (f"#define KDIM {k}\n#define WARPS {warps}\n#define ROWS {rows}\n#define RANK {rank}\n#define TILES {tiles}\n"
              f"#define PREFETCH_X {int(prefetch_x)}\n#define AHEAD {ahead}\n#define FUSE_A {int(fuse_a)}\n"
              f"#define SHARED_LOOKUPS {shared_lookups}\n#define KSPLIT {k_splits}\n#define A_ROWS {lora_a_unit_rows(rows)}\n"
              f"__device__ __constant__ float CODE_TABLE[16] = {{{values}}};\n#define CODE CODE_TABLE\n"
              + (f"#define NF4_TIMELINE 1\n#define TIMELINE_SLOTS {TIMELINE_SLOTS}\n" if timeline else ""))
    return header + DEVICE_HELPERS + _SOURCE


def fits(m: int, rank: int, warps: int, tiles: int, fuse_a: bool, shared_lookups: int) -> bool:
    """Whether a layout's shared memory fits its kernel for m rows of x and this rank (the code pairs
    take 32 KB of the 48)."""
    return static_shared_bytes(warps, kernel_rows(m, fuse_a), rank, tiles, shared_lookups) <= STATIC_SHARED_LIMIT


class MmaUnavailable(RuntimeError):
    """The kernel cannot be compiled here (no NVRTC, an NVRTC that refuses it): already logged once."""


_DISABLED: str | None = None  # why the kernel cannot be compiled here, once a compile has failed


def available(device: torch.device | str) -> bool:
    """Tensor-core MMA (sm_80 or newer) and NVRTC through PyTorch, and no compile has failed."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or not hasattr(torch.cuda, "_compile_kernel"):
        return False
    return _DISABLED is None and torch.cuda.get_device_capability(device) >= (8, 0)


def disabled_reason() -> str | None:
    return _DISABLED


def _compile(source_text: str) -> Callable:
    """One NVRTC compile. The first failure turns the kernel off for this process, with one WARNING
    line for the operator (the Triton kernels serve instead)."""
    global _DISABLED
    if _DISABLED is not None:
        raise MmaUnavailable(_DISABLED)
    try:
        return torch.cuda._compile_kernel(source_text, "nf4_mma_kernel")
    except Exception as error:  # noqa: BLE001 - NVRTC missing or refusing: any failure means "not here"
        _DISABLED = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        logger.warning("nf4: the tensor-core kernel cannot be compiled here (%s); the Triton kernels serve instead",
                       _DISABLED)
        raise MmaUnavailable(_DISABLED) from error


_KERNELS: dict[tuple, Callable] = {}
_CODE_VALUES: dict[tuple[int | None, int], tuple[float, ...]] = {}


def code_values(code: torch.Tensor) -> tuple[float, ...]:
    """An NF4 code table's values, read back once per tensor, before any graph capture (the tuner
    runs every layer first): reading from the GPU inside a capture is not allowed. Every layer holds
    its own copy of the same table, so the kernels built from it are keyed by these values."""
    address = (code.device.index, code.data_ptr())
    if address not in _CODE_VALUES:
        _CODE_VALUES[address] = tuple(code.tolist())
    return _CODE_VALUES[address]


def _kernel_key(code: torch.Tensor, warps: int, rows: int, rank: int, tiles: int, prefetch_x: bool, ahead: int,
                k: int, fuse_a: bool, shared_lookups: int, k_splits: int, timeline: bool = False) -> tuple:
    """What makes one compiled kernel: the device, then `source`'s arguments."""
    return (code.device.index, code_values(code), warps, rows, rank, tiles, prefetch_x, ahead, k, fuse_a, shared_lookups,
            k_splits, timeline)


def _kernel(code: torch.Tensor, warps: int, rows: int, rank: int, tiles: int, prefetch_x: bool, ahead: int,
            k: int, fuse_a: bool, shared_lookups: int, k_splits: int, timeline: bool = False) -> Callable:
    key = _kernel_key(code, warps, rows, rank, tiles, prefetch_x, ahead, k, fuse_a, shared_lookups, k_splits,
                      timeline)
    if key not in _KERNELS:
        with torch.cuda.device(code.device):
            _KERNELS[key] = _compile(source(*key[1:]))
    return _KERNELS[key]


def occupancy(code: torch.Tensor, m: int, warps: int, rank: int, tiles: int, prefetch_x: bool, ahead: int,
              k: int, fuse_a: bool, shared_lookups: int, k_splits: int) -> tuple[int, int]:
    """(registers per thread, blocks per SM) of the kernel `nf4_mma_linear` launches for m rows with this
    layout (compiled if it was not yet): run 46 found every 16-row launch holding more blocks than the card
    runs at once."""
    kernel = _kernel(code, warps, kernel_rows(m, fuse_a), rank, tiles, prefetch_x, ahead, k, fuse_a, shared_lookups,
                     k_splits)
    return programmatic_launch.occupancy(kernel, warps * 32)


def kernel_rows(m: int, fuse_a: bool) -> int:
    """The row tile (ROWS) of the kernel that serves m rows."""
    return fused_kernel_rows(m) if fuse_a else 8 if m <= 8 else 16


def _nvrtc_steps() -> tuple[Callable, Callable] | None:
    """PyTorch's two halves of `torch.cuda._compile_kernel`: the NVRTC compile (host only, no CUDA
    context needed) and the module load (needs the device's context: the main thread's)."""
    try:
        from torch.cuda._utils import _cuda_load_module, _nvrtc_compile
    except ImportError:
        return None
    return _nvrtc_compile, _cuda_load_module


def precompile(requests: Sequence[tuple], threads: int) -> int:
    """Compile, on `threads` threads, the kernels that `nf4_mma_linear` will need: one per request
    (code tensor, m rows, k, rank, layout), a layout being (warps, tiles, prefetch_x, ahead, fuse_a,
    shared_lookups, k_splits). Returns how many it compiled. NVRTC's compile releases the GIL
    (ctypes), so the start-up's dozens of compiles (0.5-3 s each) overlap instead of queueing (run 25:
    82 s of tuning on a fresh machine); the modules are then loaded here, in the thread that holds
    the device's context. A kernel that fails here is left to its first launch, which compiles it
    again and reports a failure as always; one INFO line says how many."""
    steps = _nvrtc_steps()
    devices: dict[tuple, torch.device] = {}
    for code, m, k, rank, (warps, tiles, prefetch_x, ahead, fuse_a, shared_lookups, k_splits) in requests:
        key = _kernel_key(code, warps, kernel_rows(m, fuse_a), rank, tiles, prefetch_x, ahead, k, fuse_a,
                          shared_lookups, k_splits)
        devices.setdefault(key, code.device)
    missing = [key for key in devices if key not in _KERNELS]
    if steps is None or _DISABLED is not None or not missing:
        return 0
    nvrtc_compile, load_module = steps
    capabilities = {device: "{}{}".format(*torch.cuda.get_device_capability(device)) for device in set(devices.values())}

    def compile_one(key: tuple) -> tuple[bytes, str] | Exception:
        try:
            return nvrtc_compile(source(*key[1:]), "nf4_mma_kernel", compute_capability=capabilities[devices[key]])
        except Exception as error:  # noqa: BLE001 - compiled again (and reported) at its first launch
            return error

    compiled, failures = 0, []
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="nf4-nvrtc") as pool:
        for key, binary in zip(missing, pool.map(compile_one, missing), strict=True):
            try:
                if isinstance(binary, Exception):
                    raise binary
                with torch.cuda.device(devices[key]):
                    _KERNELS[key] = load_module(binary[0], [binary[1]])[binary[1]]
                compiled += 1
            except Exception as error:  # noqa: BLE001 - as above
                failures.append(error)
    if failures:
        first = (str(failures[0]).strip().splitlines() or [type(failures[0]).__name__])[0][:200]
        logger.info("nf4: %d of %d kernels did not compile ahead (%s); each compiles at its first launch instead",
                    len(failures), len(missing), first)
    return compiled


def operand_order(x: torch.Tensor) -> torch.Tensor:
    """x ([rows <= 16, K]) as the kernel reads it, 16 * K values (rows past x's zero): per group of
    256 inputs, set of 8 rows and MMA step, each lane's 4 values in lane order. The LoRA `A` kernel
    writes the same (`llm.serving.nf4_kernels._fragment_offsets`); this is its reference."""
    rows, k = x.shape
    padded = x.new_zeros((16, k))
    padded[:rows] = x
    # input k = 256 group + 64 t + 4 step + j of row 8 set + g  ->  [group, set, step, g, t, j]
    return padded.reshape(2, 8, k // GROUP, 4, 16, 4).permute(2, 0, 4, 1, 3, 5).reshape(-1)


RANK_QUAD = 4  # ranks per LoRA A unit of the fused kernel (one warp: 256 inputs, every row)


def fused_kernel_rows(m: int) -> int:
    """The fused kernel's row tile for m rows: one row reads x as it is (no wait for x in operand
    order, which held back every weight block's first group), more take 8 or 16."""
    return 1 if m == 1 else 8 if m <= 8 else 16


def lora_a_unit_rows(rows: int) -> int:
    """Rows of x per LoRA A unit of the fused kernel with row tile `rows` (its A_ROWS): 8 at most
    (run 25: units of 8 rows beat units of 4 and of all 16 at 16 rows)."""
    return min(rows, 8)


def _a_row_chunks(rows: int) -> int:
    """LoRA A units per (rank quad, 256 inputs) of the fused kernel (its A_ROW_CHUNKS)."""
    return rows // lora_a_unit_rows(rows)


def fused_a_blocks(rt: int, k: int, warps: int, rows: int) -> int:
    """Blocks of a `fuse_a` launch (row tile `rows`) that compute the LoRA's A product: one unit
    (a rank quad, 256 inputs, up to 8 rows) per warp."""
    units = (rt // RANK_QUAD) * _a_row_chunks(rows) * (k // GROUP)
    return -(-units // warps)


def launch_blocks(m: int, n: int, k: int, rt: int, warps: int, tiles: int, fuse_a: bool,
                  k_splits: int) -> tuple[int, int]:
    """The blocks `nf4_mma_linear` launches for m rows of an [n, k] weight (rt LoRA ranks in all): its
    fused LoRA A blocks (first in the grid), and its weight blocks, one per feature tile and K split."""
    la_blocks = fused_a_blocks(rt, k, warps, kernel_rows(m, True)) if fuse_a else 0
    return la_blocks, n // (TILE_N * tiles) * k_splits


def fused_counter_count(rt: int) -> int:
    """The fused kernel's counters for `rt` ranks in all: x ready, t ready, departed, and the
    arrivals of each (rank quad, row chunk), sized for the largest row tile so that one tensor
    serves every row tile of a projection."""
    return 3 + rt // RANK_QUAD * _a_row_chunks(16)


def nf4_mma_linear(
    x: torch.Tensor,
    weight: NF4Matrix,
    lora: LoraParts,
    seg1: int,
    seg2: int,
    round_lora_first: bool,
    warps: int,
    tiles: int = 1,
    prefetch_x: bool = False,
    ahead: int = 1,
    inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
    shared_lookups: int = 0,
    k_splits: int = 1,
    timeline: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ dequant(W).T + scaling * B(A(x)) with PEFT's roundings for x ([m <= 16, K], bf16);
    rows from seg1 and from seg2 on belong to the LoRA's second and third parts.
    `inputs`: what the LoRA A kernel before it wrote (`llm.serving.nf4_kernels.mma_inputs`): x in operand
    order (16 * K values) and t = x @ A.T as split-K partial sums ([splits, rows, sum of ranks],
    float32). Without them, one launch does it all (FUSE_A): its first blocks write x in operand
    order and t (whole, summed in a fixed order), while the others start on their weights and wait
    for x, then for t before their epilogue. The LoRA A kernel and the gap after it were 10 % of a
    one-row decode step and 19 % of a 16-row one (run 17).
    `timeline` (bench/mma_timeline.py's): int64 [blocks, TIMELINE_SLOTS] that the launch stamps (`source`'s
    timeline build)."""
    m, k = x.shape
    n = weight.shape[0]
    rt = lora.a.shape[0]
    y = torch.empty((m, n), dtype=torch.bfloat16, device=x.device)
    if inputs is not None:
        xq, t = inputs
        kernel = _kernel(weight.code, warps, kernel_rows(m, False), lora.rank, tiles, prefetch_x, ahead, k, False,
                         shared_lookups, k_splits, timeline is not None)
        splits, fused_args = t.shape[0], [xq, 0, lora.a, t, t]  # the fused LoRA A's arguments, unused
    else:
        if rt % RANK_QUAD:
            raise ValueError(f"the fused kernel takes ranks in quads; these LoRA parts have {rt} in all")
        if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:
            x = x.clone(memory_format=torch.contiguous_format)  # 16-byte rows for the vector loads
        rows = kernel_rows(m, True)
        kernel = _kernel(weight.code, warps, rows, lora.rank, tiles, prefetch_x, ahead, k, True, shared_lookups,
                         k_splits, timeline is not None)
        counters = lora.counters("fused", fused_counter_count(rt), x.device)
        xq = torch.empty((16 * k,), dtype=torch.bfloat16, device=x.device)
        t = torch.empty((m, rt), dtype=torch.float32, device=x.device)
        partial = torch.empty((k // GROUP, m, rt), dtype=torch.float32, device=x.device)
        splits, fused_args = 1, [x, x.stride(0), lora.a, partial, counters]
    if k_splits > 1:
        split_sums = torch.empty((k_splits, m, n), dtype=torch.float32, device=x.device)
        arrivals = lora.counters("tiles", n // TILE_N, x.device)
    else:
        split_sums, arrivals = t, t  # unused
    la_blocks, weight_blocks = launch_blocks(m, n, k, rt, warps, tiles, inputs is None, k_splits)
    programmatic_launch.launch(
        kernel, (la_blocks + weight_blocks, 1, 1), (warps * 32, 1, 1),
        [weight.packed, weight.absmax, xq, t, lora.b, y, m, k, y.stride(0), float(lora.scaling),
         seg1, seg2, rt, splits, int(round_lora_first), *fused_args, la_blocks, split_sums, arrivals,
         *(() if timeline is None else (timeline,))], x.device)
    return y
