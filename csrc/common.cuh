// common.cuh: helpers shared by every kernel file: bf16 <-> f32 conversion of packed registers,
// 16-byte loads (streaming for weights, cached for activations), asynchronous copies into shared memory
// and ldmatrix, the bf16 tensor-core MMA, warp and block reductions.
// Storage is bf16, arithmetic and accumulation f32. Every kernel takes one parameter struct from
// generated/params.h by value; the instantiations come from generated/instantiations.cuh.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

#include "generated/instantiations.cuh"
#include "generated/params.h"

// Defines the `extern "C"` kernel entry point `symbol` (the symbols the Rust side loads from the
// fatbin) with __launch_bounds__ `bounds` (parenthesised), taking its parameter struct `Params p` by
// value: its first statement is mx::after_prior_kernels() (below), then the statement `...` (the
// body's call, commas allowed). Every entry in csrc/*.cu is defined through it (src/cuda/module.rs
// checks that no file there declares a __global__ function itself).
#ifndef MX_EMULATOR
#define MX_ENTRY(symbol, bounds, Params, ...)                        \
    extern "C" __global__ void __launch_bounds__ bounds symbol(Params p) { \
        mx::after_prior_kernels();                                   \
        __VA_ARGS__;                                                 \
    }
#else
// The emulator's entry (csrc/emulator/runtime.cpp runs it on every emulated thread of the launch),
// the size of its parameter struct (what the emulated driver copies when it records a launch) and
// the most threads a block may have (__launch_bounds__: a GPU refuses a larger block).
#define MX_ENTRY(symbol, bounds, Params, ...)                               \
    extern const size_t mx_emulated_params_bytes_##symbol = sizeof(Params);     \
    extern const unsigned mx_emulated_max_threads_##symbol = mx_emu::max_threads bounds; \
    void mx_emulated_##symbol(const void* params) {                    \
        const Params& p = *static_cast<const Params*>(params);          \
        mx::after_prior_kernels();                                      \
        __VA_ARGS__;                                                    \
    }
#endif

namespace mx {

// The first statement of every kernel entry (MX_ENTRY). Waits until the kernels issued before this one on the
// stream have finished and their writes are visible (griddepcontrol.wait), then lets the next kernel
// start (griddepcontrol.launch_dependents): that one's blocks can then be placed on the SMs while this
// one runs, and wait there in turn. Both are no-ops unless the kernel was issued as a programmatic
// dependent launch (src/cuda/launch.rs, on compute capability 9.0+ when asked for); before sm_90 they
// compile to nothing. No kernel may read another kernel's output before this call.
__device__ __forceinline__ void after_prior_kernels() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

constexpr unsigned FULL_MASK = 0xffffffffu;
constexpr float LOG2E = 1.4426950408889634f;

// The two bf16 halves of a packed 32-bit word as f32 (low half is the lower address).
__device__ __forceinline__ float bf16_lo(uint32_t packed) { return __uint_as_float(packed << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t packed) { return __uint_as_float(packed & 0xffff0000u); }

__device__ __forceinline__ float to_f32(mx_bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(float v) { return v; }

// f32 -> bf16, round to nearest even.
__device__ __forceinline__ mx_bf16 to_bf16(float v) { return __float2bfloat16_rn(v); }

// Two bf16 values (raw bits) as one register, `lo` in the low half (an mma fragment's pair).
__device__ __forceinline__ uint32_t pack_bits(mx_bf16 lo, mx_bf16 hi) {
    return (uint32_t)__bfloat16_as_ushort(lo) | ((uint32_t)__bfloat16_as_ushort(hi) << 16);
}

// A 16-byte load of data read once per kernel (weights): read-only path, no L1 allocation.
__device__ __forceinline__ uint4 load_stream_16(const void* ptr) {
#ifdef MX_EMULATOR
    return *static_cast<const uint4*>(ptr);
#else
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(ptr));
    return r;
#endif
}

// A 16-byte load of data many warps share (activations): read-only path, cached in L1.
__device__ __forceinline__ uint4 load_shared_16(const void* ptr) {
    return __ldg(reinterpret_cast<const uint4*>(ptr));
}

// acc + dot(a, b) over 8 bf16 pairs packed in two 16-byte registers.
__device__ __forceinline__ float dot8(uint4 a, uint4 b, float acc) {
    acc = fmaf(bf16_lo(a.x), bf16_lo(b.x), acc);
    acc = fmaf(bf16_hi(a.x), bf16_hi(b.x), acc);
    acc = fmaf(bf16_lo(a.y), bf16_lo(b.y), acc);
    acc = fmaf(bf16_hi(a.y), bf16_hi(b.y), acc);
    acc = fmaf(bf16_lo(a.z), bf16_lo(b.z), acc);
    acc = fmaf(bf16_hi(a.z), bf16_hi(b.z), acc);
    acc = fmaf(bf16_lo(a.w), bf16_lo(b.w), acc);
    acc = fmaf(bf16_hi(a.w), bf16_hi(b.w), acc);
    return acc;
}

// acc + dot(a, b) for 8 bf16 values of `a` against 8 f32 values of `b`.
__device__ __forceinline__ float dot8(uint4 a, const float* b, float acc) {
    acc = fmaf(bf16_lo(a.x), b[0], acc);
    acc = fmaf(bf16_hi(a.x), b[1], acc);
    acc = fmaf(bf16_lo(a.y), b[2], acc);
    acc = fmaf(bf16_hi(a.y), b[3], acc);
    acc = fmaf(bf16_lo(a.z), b[4], acc);
    acc = fmaf(bf16_hi(a.z), b[5], acc);
    acc = fmaf(bf16_lo(a.w), b[6], acc);
    acc = fmaf(bf16_hi(a.w), b[7], acc);
    return acc;
}

// Unpacks 8 bf16 values into f32.
__device__ __forceinline__ void unpack8(uint4 a, float* out) {
    out[0] = bf16_lo(a.x);
    out[1] = bf16_hi(a.x);
    out[2] = bf16_lo(a.y);
    out[3] = bf16_hi(a.y);
    out[4] = bf16_lo(a.z);
    out[5] = bf16_hi(a.z);
    out[6] = bf16_lo(a.w);
    out[7] = bf16_hi(a.w);
}

// d += a (16x16, row-major) * b (16x8, column-major) on the tensor cores: mma.sync.m16n8k16, bf16 inputs,
// f32 accumulators. Fragments (lane = 4 * g + q): a[0] (row g, k 2q..2q+1), a[1] (row g + 8, same k),
// a[2] (row g, k 2q + 8..2q + 9), a[3] (row g + 8, same k); b0 (k 2q..2q+1, column g), b1 (k 2q + 8..2q + 9,
// column g); d[0..1] (row g, columns 2q, 2q + 1), d[2..3] (row g + 8, same columns). The lower k or column
// of a pair is the low half of its register.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef MX_EMULATOR
    mx_emu::mma_bf16_16816(d, a, b0, b1);
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// The launch's dynamic shared memory (its size set at launch) as an array of T.
template <class T>
__device__ __forceinline__ T* dynamic_shared() {
#ifdef MX_EMULATOR
    return static_cast<T*>(mx_emu::dynamic_shared());
#else
    extern __shared__ __align__(16) unsigned char mx_dynamic_shared[];
    return reinterpret_cast<T*>(mx_dynamic_shared);
#endif
}

// The shared-memory (state space) address of a generic pointer into shared memory.
__device__ __forceinline__ uint32_t shared_address(const void* p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

// 16 bytes global -> shared at shared address `dst`, asynchronous (cp.async, sm_80+). With
// valid = false nothing is read and the 16 bytes become zero (a zero source size).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
#ifdef MX_EMULATOR
    mx_emu::cp_async(dst, src, valid);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16u : 0u)
                 : "memory");
#endif
}

// Closes this thread's current group of cp.async copies.
__device__ __forceinline__ void cp_async_commit() {
#ifdef MX_EMULATOR
    mx_emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef MX_EMULATOR
    mx_emu::cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Four 8x8 b16 matrices from shared memory: lane l gives the (16-byte aligned) address of row l % 8
// of matrix l / 8 and receives in r[i] the elements (row l / 4, columns 2 (l % 4), +1) of matrix i,
// the lower column in the low half.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
#ifdef MX_EMULATOR
    mx_emu::ldmatrix_x4(r, address, false);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address)
                 : "memory");
#endif
}

// ldmatrix_x4 of the transposed matrices: lane l receives in r[i] the elements (rows 2 (l % 4), +1;
// column l / 4) of matrix i as stored, the lower row in the low half.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t address) {
#ifdef MX_EMULATOR
    mx_emu::ldmatrix_x4(r, address, true);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address)
                 : "memory");
#endif
}

// Sum over the `WIDTH` consecutive lanes of each aligned lane group; every lane gets its group's sum.
template <int WIDTH = 32>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
    for (int offset = WIDTH / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

// Maximum over the `WIDTH` consecutive lanes of each aligned lane group; every lane gets it.
template <int WIDTH = 32>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
    for (int offset = WIDTH / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    return v;
}

// `combine` over a block of THREADS threads (`group(v)` combines a warp first); every thread gets the
// result. Contains __syncthreads, so every thread of the block must call it.
template <int THREADS, class Group, class Combine>
__device__ __forceinline__ float block_reduce(float v, float identity, Group group, Combine combine) {
    static_assert(THREADS % 32 == 0 && THREADS <= 1024, "block of whole warps");
    __shared__ float partial[THREADS / 32];
    v = group(v);
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) partial[warp] = v;
    __syncthreads();
    float total = identity;
#pragma unroll
    for (int w = 0; w < THREADS / 32; ++w) total = combine(total, partial[w]);
    __syncthreads();  // `partial` may be reused by a following call
    return total;
}

// Sum over a block of THREADS threads; every thread gets the total (see block_reduce).
template <int THREADS>
__device__ __forceinline__ float block_sum(float v) {
    return block_reduce<THREADS>(
        v, 0.0f, [](float x) { return group_sum(x); }, [](float a, float b) { return a + b; });
}

// Maximum over a block of THREADS threads; every thread gets it (see block_reduce).
template <int THREADS>
__device__ __forceinline__ float block_max(float v) {
    return block_reduce<THREADS>(
        v, __int_as_float(0xff800000), [](float x) { return group_max(x); }, [](float a, float b) { return fmaxf(a, b); });
}

// Cache slot of (sequence row `seq`, position `pos`) in a paged cache, or -1 when the block table or
// the position is out of range: returns the token index `block * block_size + pos % block_size`.
__device__ __forceinline__ long long paged_slot(const int32_t* block_tables, int32_t seq, int32_t pos,
                                                uint32_t num_seqs, uint32_t max_blocks_per_seq,
                                                uint32_t block_size, uint32_t num_blocks) {
    if (seq < 0 || (uint32_t)seq >= num_seqs || pos < 0) return -1;
    const uint32_t logical = (uint32_t)pos / block_size;
    if (logical >= max_blocks_per_seq) return -1;
    const int32_t block = block_tables[(size_t)seq * max_blocks_per_seq + logical];
    if (block < 0 || (uint32_t)block >= num_blocks) return -1;
    return (long long)block * block_size + (uint32_t)pos % block_size;
}

}  // namespace mx
