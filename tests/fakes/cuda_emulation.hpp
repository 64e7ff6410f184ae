// Just enough CUDA to run llm/serving/nf4_mma.py's kernel text on a CPU (tests/test_nf4_mma_emulated.py).
//
// One std::thread per CUDA thread, one block at a time (so `__shared__` can be `static`), a barrier
// per warp for `mma.sync` (each lane publishes its fragments, then computes its own accumulators
// from everyone's, as the PTX ISA lays the m16n8k16 operands out) and one per block for
// `__syncthreads`. Prefetches only check their address. The PTX helpers are replaced by C++ ones with
// the same arithmetic (prmt's byte selection and sign mode, round-to-nearest-even to bf16).
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

typedef unsigned int u32;
typedef unsigned short u16;

struct uint2 {
    u32 x, y;
};
struct alignas(16) uint4 {
    u32 x, y, z, w;
};
inline uint2 make_uint2(u32 x, u32 y) { return {x, y}; }
inline uint4 make_uint4(u32 x, u32 y, u32 z, u32 w) { return {x, y, z, w}; }

struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

struct Index3 {
    unsigned x = 0, y = 0, z = 0;
};
inline thread_local Index3 threadIdx, blockIdx, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __constant__
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

// Every global read is checked against the buffers the launcher registered. An out-of-bounds read
// (an illegal address on the GPU) is counted and reads zeros instead; the test asserts none.
struct Buffer {
    const char* begin;
    const char* end;
};
inline std::vector<Buffer> global_buffers;
inline std::atomic<long> out_of_bounds_reads{0};
inline bool check_read(const void* p, std::size_t bytes) {
    const char* at = static_cast<const char*>(p);
    for (const Buffer& b : global_buffers)
        if (at >= b.begin && at + bytes <= b.end) return true;
    ++out_of_bounds_reads;
    return false;
}

template <class T>
inline T __ldg(const T* p) {
    if (!check_read(p, sizeof(T))) return T{};
    return *p;
}
template <class T>
inline T load_plain(const T* p) {
    return __ldg(p);
}
template <class T>
inline T __ldcg(const T* p) {
    return __ldg(p);
}
inline float __fmul_rn(float a, float b) {
    volatile float product = a * b;  // one float32 rounding, never fused
    return product;
}
inline float __uint_as_float(u32 u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline u32 float_bits(float f) {
    u32 u;
    std::memcpy(&u, &f, 4);
    return u;
}

// ---- the PTX helpers -------------------------------------------------------------------------
inline u32 prmt(u32 a, u32 b, u32 s) {
    unsigned char bytes[8];
    std::memcpy(bytes, &a, 4);
    std::memcpy(bytes + 4, &b, 4);
    u32 d = 0;
    for (int i = 0; i < 4; ++i) {
        const u32 nibble = (s >> (4 * i)) & 0xF;
        u32 byte = bytes[nibble & 7];
        if (nibble & 8) byte = (byte & 0x80) ? 0xFF : 0x00;  // sign mode
        d |= byte << (8 * i);
    }
    return d;
}
inline u16 bf16(float v) {  // round to nearest even (no NaNs here)
    const u32 u = float_bits(v);
    return (u16)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}
inline u32 bf16x2(float lo, float hi) { return (u32)bf16(lo) | ((u32)bf16(hi) << 16); }
inline u32 and_or(u32 a, u32 b, u32 c) { return (a & b) | c; }
inline u32 shift_right_on_fma(u32 a, int k) { return (u32)(((unsigned long long)a * (1ull << (32 - k))) >> 32); }
inline u32 shift_left_on_fma(u32 a, int k) { return a << k; }
inline uint4 load_streaming(const uint4* p) { return __ldg(p); }
inline void prefetch_l1(const void* p) { check_read(p, 128); }  // a hint; its line must exist

// ---- warps and blocks ---------------------------------------------------------------------------
struct WarpExchange {
    u32 a[32][4];
    u32 b[32][2];
    u32 shuffled[32];
    std::barrier<>* arrived;
};
inline thread_local WarpExchange* this_warp = nullptr;
inline thread_local std::barrier<>* this_block = nullptr;

inline void __syncthreads() { this_block->arrive_and_wait(); }
inline void __syncwarp() { this_warp->arrived->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) { std::this_thread::yield(); }
[[noreturn]] inline void __trap() { std::abort(); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline int load_acquire(const int* p) { return std::atomic_ref<int>(*const_cast<int*>(p)).load(std::memory_order_acquire); }
// One block at a time: the kernels before this one are done, the next one starts after it.
inline void previous_kernels_done() {}
inline void next_kernel_may_start() {}

// Every lane of the warp takes part, as with the full mask the kernel passes.
inline u32 shuffle(u32 value, int source_lane) {
    WarpExchange& w = *this_warp;
    const int lane = threadIdx.x & 31;
    w.shuffled[lane] = value;
    w.arrived->arrive_and_wait();
    const u32 out = w.shuffled[source_lane & 31];
    w.arrived->arrive_and_wait();
    return out;
}
inline float __shfl_xor_sync(unsigned, float v, int mask) {
    return __uint_as_float(shuffle(float_bits(v), (threadIdx.x & 31) ^ mask));
}
inline int __shfl_sync(unsigned, int v, int source_lane) { return (int)shuffle((u32)v, source_lane); }
inline u32 __shfl_xor_sync(unsigned, u32 v, int mask) { return shuffle(v, (threadIdx.x & 31) ^ mask); }

inline float bf16_value(u32 reg, int half) { return __uint_as_float(((reg >> (16 * half)) & 0xFFFF) << 16); }

// D = A (16 x 16, row) * B (16 x 8, col) + C; lane (g, t) holds a0 = A[g][2t..2t+1], a1 = A[g+8][2t..],
// a2 = A[g][2t+8..], a3 = A[g+8][2t+8..], b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g], and
// c0, c1 = D[g][2t, 2t+1], c2, c3 = D[g+8][2t, 2t+1] (lower index in the low half).
inline void mma(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    const int lane = threadIdx.x & 31;
    WarpExchange& w = *this_warp;
    w.a[lane][0] = a0, w.a[lane][1] = a1, w.a[lane][2] = a2, w.a[lane][3] = a3;
    w.b[lane][0] = b0, w.b[lane][1] = b1;
    w.arrived->arrive_and_wait();
    auto A = [&](int row, int k) {
        const int holder = (row & 7) * 4 + (k & 7) / 2;
        return bf16_value(w.a[holder][(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k & 1);
    };
    auto B = [&](int k, int col) { return bf16_value(w.b[col * 4 + (k & 7) / 2][k >= 8 ? 1 : 0], k & 1); };
    const int g = lane >> 2, t = lane & 3;
    const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    float out[4];
    for (int i = 0; i < 4; ++i) {
        float sum = 0.f;
        for (int k = 0; k < 16; ++k) sum += A(rows[i], k) * B(k, cols[i]);
        out[i] = d[i] + sum;
    }
    w.arrived->arrive_and_wait();  // everyone has read the fragments before the next MMA writes them
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// Runs kernel(args...) for blocks 0..grid-1, `threads` CUDA threads each, one block after another.
template <class Kernel>
void launch_blocks(int grid, int threads, Kernel kernel) {
    for (int block = 0; block < grid; ++block) {
        std::barrier<> block_barrier(threads);
        std::vector<WarpExchange> warps(threads / 32);
        std::vector<std::barrier<>*> warp_barriers;
        for (auto& w : warps) {
            w.arrived = new std::barrier<>(32);
            warp_barriers.push_back(w.arrived);
        }
        std::vector<std::thread> pool;
        for (int thread = 0; thread < threads; ++thread) {
            pool.emplace_back([&, thread] {
                threadIdx.x = thread;
                blockIdx.x = block;
                gridDim.x = grid;
                this_warp = &warps[thread / 32];
                this_block = &block_barrier;
                kernel();
            });
        }
        for (auto& th : pool) th.join();
        for (auto* b : warp_barriers) delete b;
    }
}
