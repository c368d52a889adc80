// cuda_emulator.h: the CUDA device language as plain C++17, so that the kernels of csrc/*.cu compile
// with a host compiler and run on the CPU (the `testing` feature's kernel emulator; see
// csrc/emulator/README.md). Force-included before each kernel file, with MX_EMULATOR defined and
// csrc/emulator/include/ (empty stand-ins for cuda_bf16.h, cuda_fp16.h, cuda_fp8.h) first on the
// include path.
//
// Execution model (runtime.cpp): the blocks of a launch run one after another; the threads of a
// block are fibers on one OS thread, switched only at a barrier (__syncthreads) or a warp collective
// (shuffles, ballots, __syncwarp, mma.sync, ldmatrix), so `__shared__` variables are statics of the
// launching OS thread (`thread_local`) and atomics plain read-modify-writes. A warp collective needs all 32 lanes of its warp, alive and
// at the same collective; anything else, a divergent barrier, or __trap ends the launch with an
// error instead of a hang. Launches from different OS threads run at the same time, each with its
// own shared memory and launch state.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#ifndef MX_EMULATOR
#error "cuda_emulator.h is for the emulator build (MX_EMULATOR) only"
#endif

// ---- qualifiers -------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static thread_local
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

// ---- built-in vector types --------------------------------------------------------------------
struct uint3 {
    unsigned x, y, z;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// ---- bf16 (storage and the conversions the kernels use) ---------------------------------------
struct __nv_bfloat16 {
    uint16_t __x;
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};

namespace mx_emu {
template <class To, class From>
inline To bits_as(From v) {
    static_assert(sizeof(To) == sizeof(From), "same size");
    To out;
    memcpy(&out, &v, sizeof out);
    return out;
}
}  // namespace mx_emu

inline float __uint_as_float(uint32_t v) { return mx_emu::bits_as<float>(v); }
inline float __int_as_float(int32_t v) { return mx_emu::bits_as<float>(v); }
inline uint32_t __float_as_uint(float v) { return mx_emu::bits_as<uint32_t>(v); }
inline int32_t __float_as_int(float v) { return mx_emu::bits_as<int32_t>(v); }
inline long long __double_as_longlong(double v) { return mx_emu::bits_as<long long>(v); }
inline double __longlong_as_double(long long v) { return mx_emu::bits_as<double>(v); }

inline float __bfloat162float(__nv_bfloat16 v) { return __uint_as_float((uint32_t)v.__x << 16); }
// Round to nearest even; NaN stays a (quiet) NaN.
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    const uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40u)};
    return __nv_bfloat16{(uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 v) { return v.__x; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
    return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}

// ---- f16 and FP8: what the sm_89+ pair conversion of quant.cuh uses -------------------------
struct __half_raw {
    unsigned short x;
};
struct __half2_raw {
    unsigned short x, y;
};
struct __half {
    unsigned short __x;
    __half(__half_raw r) : __x(r.x) {}
};
typedef unsigned short __nv_fp8x2_storage_t;
enum __nv_fp8_interpretation_t { __NV_E4M3, __NV_E5M2 };

// f16 to f32, exactly.
inline float __half2float(__half h) {
    const uint32_t sign = (uint32_t)(h.__x & 0x8000u) << 16;
    const uint32_t e = (h.__x >> 10) & 0x1fu, m = h.__x & 0x3ffu;
    if (e == 31) return __uint_as_float(sign | 0x7f800000u | (m << 13));  // infinity or NaN
    const float magnitude = e == 0 ? ldexpf((float)m, -24) : ldexpf((float)(1024 + m), (int)e - 25);
    return sign != 0 ? -magnitude : magnitude;
}

namespace mx_emu {
[[noreturn]] void trap(const char* why);
// One E4M3 code as f16 bits, exactly (every E4M3 value is a normal f16 or zero); the NaN codes
// (S.1111.111) give the canonical f16 NaN 0x7fff.
inline unsigned short e4m3_as_f16(unsigned code) {
    const unsigned sign = (code & 0x80u) << 8;
    const unsigned e = (code >> 3) & 0xfu, m = code & 7u;
    if (e == 15 && m == 7) return 0x7fff;
    if (e == 0 && m == 0) return (unsigned short)sign;
    const float v = e == 0 ? ldexpf((float)m, -9) : ldexpf((float)(8 + m), (int)e - 10);
    const uint32_t u = __float_as_uint(v);
    return (unsigned short)(sign | ((((u >> 23) & 0xffu) - 112u) << 10) | ((u >> 13) & 0x3ffu));
}
}  // namespace mx_emu

// cvt.rn.f16x2.e4m3x2: the low byte of `pair` to .x, the high byte to .y. E5M2 is not emulated.
inline __half2_raw __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t pair, __nv_fp8_interpretation_t kind) {
    if (kind != __NV_E4M3) mx_emu::trap("__nv_cvt_fp8x2_to_halfraw2 of E5M2 (not emulated)");
    return __half2_raw{mx_emu::e4m3_as_f16(pair & 0xffu), mx_emu::e4m3_as_f16(pair >> 8)};
}

// ---- math and bit intrinsics (the GPU's approximate ones computed exactly here) --------------
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
// sin(pi x) and cos(pi x), x reduced modulo 2 first (exactly) as the GPU's sincospi does.
inline void sincospi(double x, double* s, double* c) {
    const double r = fmod(x, 2.0);
    *s = sin(M_PI * r);
    *c = cos(M_PI * r);
}
inline int __popc(uint32_t v) { return __builtin_popcount(v); }
inline int __clz(uint32_t v) { return v == 0 ? 32 : __builtin_clz(v); }
inline int __clz(int32_t v) { return __clz((uint32_t)v); }
// Byte n of the result is byte (s >> 4n) & 7 of the 8 bytes {y:x} (x the low word). The selector's
// sign-replicating bit 3 is not emulated: a selector using it traps.
uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s);

template <class A, class B>
inline typename std::common_type<A, B>::type min(A a, B b) {
    typedef typename std::common_type<A, B>::type T;
    return (T)b < (T)a ? (T)b : (T)a;
}
template <class A, class B>
inline typename std::common_type<A, B>::type max(A a, B b) {
    typedef typename std::common_type<A, B>::type T;
    return (T)a < (T)b ? (T)b : (T)a;
}

template <class T>
inline T __ldg(const T* p) {
    return *p;
}
template <class T>
inline T __ldcg(const T* p) {
    return *p;
}
// One block's threads never run at the same time as another's and switch only at collectives:
// every read-modify-write is atomic and every fence trivially satisfied.
template <class T>
inline T atomicAdd(T* p, T v) {
    const T old = *p;
    *p = old + v;
    return old;
}
inline void __threadfence() {}

// ---- the emulator's runtime (runtime.cpp) -----------------------------------------------------
namespace mx_emu {
// Each emulated thread's stack: STACK_BYTES, aligned to its size, so that the stack a thread runs
// on says which thread it is (this_fiber) without a thread-local variable: in the dlopened emulated
// libcuda.so each thread-local access is a call into the dynamic loader, which took about a tenth
// of the emulated engine tests' time.
constexpr uintptr_t STACK_BYTES = 256 * 1024;
// The bytes at the bottom of each stack kept for its Fiber (the rest is the thread's stack).
constexpr uintptr_t FIBER_AREA_BYTES = 64 * 1024;
// The bytes of a lane's exchange slot: the largest value it contributes to a warp collective.
constexpr size_t SLOT_BYTES = 32;
struct Launch;  // runtime.cpp
// The most cp.async copies one emulated thread may have in flight.
constexpr unsigned MAX_COPIES_IN_FLIGHT = 64;
// A cp.async copy in flight: 16 bytes from `src` (zeros when not `valid`) to shared address `dst`,
// issued after `group` commits of its thread.
struct Copy {
    const void* src;
    uint32_t dst;
    uint32_t group;
    bool valid;
};
// A thread's cp.async copies in flight, in issue order, and the groups it has committed. Made empty
// without writing the slots.
struct CopyQueue {
    CopyQueue() : count(0), groups(0) {}
    unsigned count;
    uint32_t groups;
    Copy copies[MAX_COPIES_IN_FLIGHT];
};
// An emulated thread: its launch, its index in its block, its block's coordinates, the launch's
// geometry, the compute capability it emulates (major * 100 + minor * 10: 800, 900; for the code
// that differs by architecture, quant.cuh's FP8 pair conversion, sm_89+), its warp's exchange
// slots (32 lanes' in each of two banks) with the bank of its next warp collective, and its
// cp.async copies in flight. Written by the scheduler before the thread starts.
struct Fiber {
    Launch* launch;
    unsigned thread;
    unsigned arch;
    uint3 block, grid, block_dim;
    unsigned char* warp_slots[2];
    unsigned bank;
    CopyQueue copies;
};
// The Fiber of the stack starting at `base`: within its bottom FIBER_AREA_BYTES, at one of
// FIBER_PLACES places 64 bytes apart, the next place for the next stack, so that the Fibers of the
// stacks (STACK_BYTES apart) do not all fall in the same cache sets.
constexpr uintptr_t FIBER_PLACES = 512;
static_assert((FIBER_PLACES - 1) * 64 + sizeof(Fiber) <= FIBER_AREA_BYTES, "a Fiber stays in its area");
inline Fiber* fiber_at(uintptr_t base) {
    return reinterpret_cast<Fiber*>(base + (base / STACK_BYTES) % FIBER_PLACES * 64);
}
// The Fiber of the running emulated thread (only ever called on an emulated thread's stack).
inline Fiber& this_fiber() {
    uintptr_t sp;
    asm("movq %%rsp, %0" : "=r"(sp));
    return *fiber_at(sp & ~(STACK_BYTES - 1));
}
inline unsigned arch() { return this_fiber().arch; }
inline uint3 thread_idx() { return uint3{this_fiber().thread, 0, 0}; }
inline uint3 block_idx() { return this_fiber().block; }
inline uint3 block_dim() { return this_fiber().block_dim; }
inline uint3 grid_dim() { return this_fiber().grid; }
// Waits for every live thread of the block; returns whether any of them passed `predicate`.
bool block_barrier(bool predicate);
// Warp all-gather: every lane of the warp passes `bytes` (at most 32) and receives all 32 lanes'
// values, lane-major, in `all`. `mask` must name the whole warp.
void warp_gather(uint32_t mask, const void* mine, size_t bytes, void* all);
// Ends the launch with an error naming the thread.
[[noreturn]] void trap(const char* why);
// The 32-bit "shared state space" address of a static in this image, and back.
uint32_t shared_address(const void* p);
void* shared_pointer(uint32_t address);
// The launch's dynamic shared memory (at least 16-byte aligned, as large as the launch asked for).
void* dynamic_shared();
// cp.async of 16 bytes from `src` (zeros when not `valid`) to shared address `dst`, both 16-byte
// aligned: queued in the current thread, copied only when a cp_async_wait leaves its group behind,
// as late as a GPU may land it, so a read that does not wait for it reads what was there before.
void cp_async(uint32_t dst, const void* src, bool valid);
// cp.async.commit_group: the current thread's queued copies form a group.
void cp_async_commit();
// cp.async.wait_group n: the current thread's copies of every committed group but the n newest land.
void cp_async_wait(unsigned n);

// The exchange slot (SLOT_BYTES) of `lane` in the current thread's warp, for the warp collective
// the thread is at (two banks, used by a warp's collectives in turn).
inline void* warp_slot(unsigned lane) {
    Fiber& f = this_fiber();
    return f.warp_slots[f.bank] + lane * SLOT_BYTES;
}
// Waits until all 32 lanes of the warp are at a warp collective (`mask` must name them all), then
// (once the thread has read the slots it wants) warp_done moves the thread to the other bank for its
// next collective. A lane cannot write a bank again before every lane has read it: that takes the
// collective in between, which opens only when all 32 lanes have reached it.
void warp_wait(uint32_t mask);
inline void warp_done() { this_fiber().bank ^= 1u; }

template <class T>
inline T shuffle_from(uint32_t mask, T v, int (*source)(int lane, int arg), int arg) {
    static_assert(sizeof(T) <= SLOT_BYTES, "a shuffled value fits an exchange slot");
    const int lane = (int)(this_fiber().thread % 32);
    memcpy(warp_slot(lane), &v, sizeof(T));
    warp_wait(mask);
    T out;
    memcpy(&out, warp_slot(source(lane, arg)), sizeof(T));
    warp_done();
    return out;
}
inline int lane_xor(int lane, int m) { return (lane ^ m) & 31; }
inline int lane_up(int lane, int d) { return lane >= d ? lane - d : lane; }
inline int lane_down(int lane, int d) { return lane + d < 32 ? lane + d : lane; }
inline int lane_at(int, int src) { return src & 31; }
}  // namespace mx_emu

#define threadIdx (::mx_emu::thread_idx())
#define blockIdx (::mx_emu::block_idx())
#define blockDim (::mx_emu::block_dim())
#define gridDim (::mx_emu::grid_dim())

inline void __syncthreads() { mx_emu::block_barrier(false); }
inline int __syncthreads_or(int predicate) { return mx_emu::block_barrier(predicate != 0) ? 1 : 0; }
inline void __syncwarp(uint32_t mask = 0xffffffffu) {
    const char none = 0;
    char all[32];
    mx_emu::warp_gather(mask, &none, 1, all);
}
template <class T>
inline T __shfl_xor_sync(uint32_t mask, T v, int lane_mask) {
    return mx_emu::shuffle_from(mask, v, mx_emu::lane_xor, lane_mask);
}
template <class T>
inline T __shfl_up_sync(uint32_t mask, T v, unsigned delta) {
    return mx_emu::shuffle_from(mask, v, mx_emu::lane_up, (int)delta);
}
template <class T>
inline T __shfl_down_sync(uint32_t mask, T v, unsigned delta) {
    return mx_emu::shuffle_from(mask, v, mx_emu::lane_down, (int)delta);
}
template <class T>
inline T __shfl_sync(uint32_t mask, T v, int source) {
    return mx_emu::shuffle_from(mask, v, mx_emu::lane_at, source);
}
uint32_t __ballot_sync(uint32_t mask, int predicate);
template <class T>
inline uint32_t __match_any_sync(uint32_t mask, T v) {
    T all[32];
    mx_emu::warp_gather(mask, &v, sizeof(T), all);
    uint32_t peers = 0;
    for (int l = 0; l < 32; ++l) peers |= (memcmp(&all[l], &v, sizeof(T)) == 0 ? 1u : 0u) << l;
    return peers;
}
[[noreturn]] inline void __trap() { mx_emu::trap("__trap()"); }
inline size_t __cvta_generic_to_shared(const void* p) { return mx_emu::shared_address(p); }

// ---- the PTX instructions csrc/common.cuh, quant.cuh and quant_mma.cuh issue -------------------
namespace mx_emu {
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (d += a b), by the fragment layout of the
// PTX ISA, each product and sum in f32 in k order.
void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 from the 32-bit shared address `address`.
void ldmatrix_x4(uint32_t (&r)[4], uint32_t address, bool transposed);
// fma.rn.bf16x2: per 16-bit half, a * b + c rounded once to bf16.
uint32_t fma_bf16x2(uint32_t a, uint32_t b, uint32_t c);
}  // namespace mx_emu

// The emulator's own test kernels (self_test.cpp; run by src/cuda/emulator.rs's unit tests), each
// taking MxEmulatorSelfTestParams: X(symbol).
#define MX_EMULATOR_SELF_TESTS(X)      \
    X(emulator_shuffles)               \
    X(emulator_unsynchronised_read)    \
    X(emulator_split_warp)             \
    X(emulator_exited_lane)            \
    X(emulator_shared_per_launch)      \
    X(emulator_trap)                   \
    X(emulator_misaligned_load)        \
    X(emulator_misaligned_cp_async)    \
    X(emulator_shared_index_past_end)  \
    X(emulator_wide_shift)             \
    X(emulator_float_to_int_overflow)  \
    X(emulator_cp_async_lands_at_the_wait) \
    X(emulator_deep_stack)

namespace mx_emu {
// The block size bound of `__launch_bounds__(max_threads[, min_blocks])`.
constexpr unsigned max_threads(unsigned max_threads, unsigned = 0) { return max_threads; }
}  // namespace mx_emu

// The parameters of every self-test kernel: one output of an int per thread of the launch.
struct MxEmulatorSelfTestParams {
    int32_t* out;
};
