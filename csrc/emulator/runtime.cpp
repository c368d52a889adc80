// runtime.cpp: the kernel emulator's scheduler and its C entry points, mx_emulator_launch and
// mx_emulator_params_bytes (launch.h). A launch runs the grid's blocks one after another; the
// threads of a block are fibers on the calling OS thread (switched by mx_emulator_switch below), run in turn, each until it
// reaches a barrier or a warp collective, or returns; a barrier opens when every live thread of the
// block is at it, a collective when all 32 lanes of the warp are. Anything that would hang or is
// undefined on a GPU (a collective with an exited lane or a lane at another barrier, no thread able
// to go on, __trap, a dynamic shared memory request over the limit) ends the launch with a message.
#if !defined(__x86_64__)
#error "the kernel emulator switches stacks with x86-64 code (mx_emulator_switch)"
#endif

#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#include <new>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "../common.cuh"
#include "launch.h"

// Saves the callee-saved registers on the current stack, stores the stack pointer in *from and
// continues on the stack `to` (saved the same way, or made by new_stack). x86-64 System V. The
// floating-point control words (MXCSR, x87) are callee-saved too, but nothing here changes them, so
// every thread runs with the launching thread's and they are left alone: loading them (ldmxcsr,
// fldcw) took most of the time of a switch.
extern "C" void mx_emulator_switch(void** from, void* to);
asm(R"(
    .text
    .globl mx_emulator_switch
    .type mx_emulator_switch, @function
mx_emulator_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size mx_emulator_switch, .-mx_emulator_switch
)");

namespace mx_emu {
namespace {

// The largest dynamic shared memory a launch may ask for: what every GPU gives a kernel that has not
// opted in to more with cuFuncSetAttribute (MAX_DYNAMIC_SHARED_SIZE_BYTES), which the crate never
// calls; a GPU refuses a larger launch.
constexpr size_t DYNAMIC_SHARED_BYTES = 48 * 1024;

// The origin of the 32-bit shared addresses: every thread-local static of this image (the kernels'
// __shared__ variables and the dynamic shared memory below) lies within 2 GiB of the calling
// thread's copy (one thread's block of thread-local storage). 256-byte aligned, so an
// address's low byte is its object's (quant.cuh's table lookups build addresses bytewise).
alignas(4096) thread_local char shared_origin[256];
alignas(256) thread_local char dynamic_shared_memory[DYNAMIC_SHARED_BYTES];

enum class State { Ready, AtBarrier, AtCollective, Done };

struct Thread {
    void* stack_pointer;  // where mx_emulator_switch saved it
    State state;
    bool predicate;  // what it passed to the barrier it waits at
};

}  // namespace

// The launch in progress on an OS thread.
struct Launch {
    void (*body)(const void*) = nullptr;
    const void* params = nullptr;
    uint3 grid{}, block{};
    uint3 block_index{};
    std::vector<Thread> threads;
    unsigned current = 0;
    unsigned position = 0;  // the current thread's place in the scheduler's pass
    bool reverse = false;   // passes run the threads last to first
    void* scheduler = nullptr;  // the scheduler's saved stack pointer
    bool barrier_result = false;
    unsigned char slots[2][1024][SLOT_BYTES];
    // mma_bf16_16816: each thread's accumulators, and how many lanes of each warp are at it.
    float mma_d[1024][4];
    unsigned mma_arrivals[32];
    std::string error;
    unsigned arch = 800;
};

namespace {

// The launch of the running emulated thread.
Launch& launch() { return *this_fiber().launch; }

// Leaves the current thread, now in `state`: for the next ready thread of the scheduler's pass (in
// the pass's order), or for the scheduler when none is left or the launch failed. One switch where
// going back through the scheduler took two; the threads run in the same order.
void leave(State state) {
    Launch& l = launch();
    Thread& t = l.threads[l.current];
    t.state = state;
    void* to = l.scheduler;
    const unsigned n = (unsigned)l.threads.size();
    for (unsigned i = l.position + 1; l.error.empty() && i < n; ++i) {
        const unsigned next = l.reverse ? n - 1 - i : i;
        if (l.threads[next].state != State::Ready) continue;
        l.position = i;
        l.current = next;
        to = l.threads[next].stack_pointer;
        break;
    }
    mx_emulator_switch(&t.stack_pointer, to);
}

// Suspends the current thread in `state` until the scheduler opens what it waits at.
void wait(State state) { leave(state); }

// Ends the current thread, never resumed.
[[noreturn]] void finish() {
    leave(State::Done);
    abort();  // a finished thread is never resumed
}

std::string where(const Launch& l, unsigned thread) {
    char text[160];
    snprintf(text, sizeof text, "block (%u, %u, %u), thread %u", l.block_index.x, l.block_index.y,
             l.block_index.z, thread);
    return text;
}

void fail(Launch& l, const std::string& what) {
    if (l.error.empty()) l.error = what;
}

// The first frame of every thread: the kernel's body, then back to the scheduler for good.
[[noreturn]] void thread_main() {
    Launch& l = launch();
    l.body(l.params);
    finish();
}

// A fresh stack for a thread below `stack_top` (16-byte aligned): what mx_emulator_switch pops
// (zeroed callee-saved registers) and thread_main as the address it returns to, placed so that
// thread_main starts as if called (the stack 16-byte aligned before the call).
void* new_stack(char* stack_top) {
    uint64_t* top = reinterpret_cast<uint64_t*>(stack_top);
    *--top = 0;  // thread_main's own return address slot (it never returns): keeps the alignment
    *--top = reinterpret_cast<uint64_t>(&thread_main);
    for (int i = 0; i < 6; ++i) *--top = 0;  // rbp, rbx, r12..r15
    return top;
}

// Opens what can be opened: a warp whose 32 lanes are all at a collective, else the block barrier
// once every live thread is at it. Returns false (with an error) when nothing can go on.
bool release(Launch& l) {
    const unsigned n = (unsigned)l.threads.size();
    bool opened = false;
    for (unsigned w = 0; w * 32 < n; ++w) {
        unsigned at = 0, other = 0;
        for (unsigned t = w * 32; t < n && t < w * 32 + 32; ++t) {
            if (l.threads[t].state == State::AtCollective) ++at;
            else other++;
        }
        if (at == 0) continue;
        if (other != 0 || w * 32 + 32 > n) {
            // Some lane has exited, waits at the block barrier, or does not exist: on a GPU the
            // collective would hang or be undefined.
            bool anyone_ready = false;
            for (unsigned t = w * 32; t < n && t < w * 32 + 32; ++t)
                anyone_ready |= l.threads[t].state == State::Ready;
            if (anyone_ready) continue;
            fail(l, where(l, w * 32) + ": warp " + std::to_string(w) +
                        " reached a warp collective without all 32 lanes (one exited, waits at "
                        "__syncthreads, or the block is not whole warps)");
            return false;
        }
        for (unsigned t = w * 32; t < w * 32 + 32; ++t) l.threads[t].state = State::Ready;
        opened = true;
    }
    if (opened) return true;
    unsigned live = 0, at_barrier = 0;
    bool any = false;
    for (const Thread& t : l.threads) {
        if (t.state == State::Done) continue;
        ++live;
        if (t.state == State::AtBarrier) {
            ++at_barrier;
            any |= t.predicate;
        }
    }
    if (live != 0 && at_barrier == live) {
        l.barrier_result = any;
        for (Thread& t : l.threads)
            if (t.state == State::AtBarrier) t.state = State::Ready;
        return true;
    }
    if (live != 0) {
        fail(l, where(l, 0) + ": no thread can go on (a __syncthreads some live threads never reach, "
                              "or threads of one warp at different barriers)");
        return false;
    }
    return true;
}

// The emulated threads' stacks of this OS thread's launches, STACK_BYTES each and aligned to it
// (see this_fiber), kept from one launch to the next and grown when a launch has more threads (a
// fresh mapping for each launch spent about a tenth of the emulated engine tests' time faulting in
// and clearing pages). A stack left by a launch abandoned at a fault (driver.cpp) is simply reused.
// Each stack's lowest usable byte sits above a guard page, so an overflow is a crash, never a
// corrupted Fiber.
struct Stacks {
    static constexpr uintptr_t GUARD_BYTES = 4096;
    static_assert((FIBER_PLACES - 1) * 64 + sizeof(Fiber) <= FIBER_AREA_BYTES - GUARD_BYTES,
                  "a Fiber stays below its stack's guard page");
    char* mapping = nullptr;
    size_t mapping_bytes = 0;
    char* memory = nullptr;  // the first stack, STACK_BYTES-aligned
    size_t threads = 0;
    Stacks() = default;
    Stacks(const Stacks&) = delete;
    Stacks& operator=(const Stacks&) = delete;
    ~Stacks() { release(); }
    void release() {
        if (mapping != nullptr) munmap(mapping, mapping_bytes);
        mapping = memory = nullptr;
        mapping_bytes = threads = 0;
    }
    // Room for `wanted` threads' stacks; false when no memory could be mapped.
    bool reserve(size_t wanted) {
        if (wanted <= threads) return true;
        release();
        const size_t bytes = (wanted + 1) * STACK_BYTES;  // one more, for the alignment
        void* mapped = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                            -1, 0);
        if (mapped == MAP_FAILED) return false;
        mapping = static_cast<char*>(mapped);
        mapping_bytes = bytes;
        const uintptr_t aligned = (reinterpret_cast<uintptr_t>(mapping) + STACK_BYTES - 1) & ~(STACK_BYTES - 1);
        memory = reinterpret_cast<char*>(aligned);
        threads = wanted;
        // A guard page at the top of each Fiber area, under the stack: a thread whose frames
        // outgrow its stack faults there instead of overwriting its Fiber unnoticed.
        for (size_t t = 0; t < wanted; ++t) {
            if (mprotect(memory + t * STACK_BYTES + FIBER_AREA_BYTES - GUARD_BYTES, GUARD_BYTES, PROT_NONE) != 0) {
                release();
                return false;
            }
        }
        return true;
    }
    Fiber& fiber(size_t t) const { return *fiber_at(reinterpret_cast<uintptr_t>(memory) + t * STACK_BYTES); }
    // The top of thread t's stack. The tops are staggered by 256 bytes a thread (over 64 KiB): at
    // one stride of STACK_BYTES every thread's top would fall in the same cache sets, and switching
    // threads missed the cache each time. Between a stack's top and its Fiber area there are at
    // least STACK_BYTES - 2 * FIBER_AREA_BYTES (128 KiB).
    char* top(size_t t) const { return memory + (t + 1) * STACK_BYTES - (t % 256) * 256; }
};
thread_local Stacks thread_stacks;

// Runs one block to its end (or an error).
void run_block(Launch& l, const Stacks& stacks, bool reverse) {
    const unsigned n = (unsigned)l.threads.size();
    for (unsigned t = 0; t < n; ++t) {
        // In place: its queue of cp.async copies starts empty without writing its slots.
        new (&stacks.fiber(t)) Fiber{&l, t, l.arch, l.block_index, l.grid, l.block,
                                     {l.slots[0][t / 32 * 32], l.slots[1][t / 32 * 32]}, 0, CopyQueue{}};
        Thread& th = l.threads[t];
        th.state = State::Ready;
        th.predicate = false;
        th.stack_pointer = new_stack(stacks.top(t));
    }
    l.reverse = reverse;
    memset(l.mma_arrivals, 0, sizeof l.mma_arrivals);
    for (;;) {
        bool ran = false;
        for (unsigned i = 0; i < n; ++i) {
            const unsigned t = reverse ? n - 1 - i : i;
            if (l.threads[t].state != State::Ready) continue;
            l.current = t;
            l.position = i;
            ran = true;
            // Runs thread t and those after it in this pass that are ready (see leave).
            mx_emulator_switch(&l.scheduler, l.threads[t].stack_pointer);
            if (!l.error.empty()) return;
            i = l.position;
        }
        bool all_done = true;
        for (const Thread& t : l.threads) all_done &= t.state == State::Done;
        if (all_done) return;
        if (!release(l) && !ran) return;
        if (!l.error.empty()) return;
    }
}

}  // namespace


void warp_wait(uint32_t mask) {
    if (mask != 0xffffffffu) trap("a warp collective with a partial lane mask (not emulated)");
    wait(State::AtCollective);
}

bool block_barrier(bool predicate) {
    Launch& l = launch();
    l.threads[l.current].predicate = predicate;
    wait(State::AtBarrier);
    return l.barrier_result;
}

void warp_gather(uint32_t mask, const void* mine, size_t bytes, void* all) {
    if (bytes > SLOT_BYTES) trap("a warp collective value over 32 bytes");
    memcpy(warp_slot(this_fiber().thread % 32), mine, bytes);
    warp_wait(mask);
    for (unsigned i = 0; i < 32; ++i) memcpy(static_cast<char*>(all) + i * bytes, warp_slot(i), bytes);
    warp_done();
}

void trap(const char* why) {
    Launch& l = launch();
    fail(l, where(l, l.current) + ": " + why);
    finish();
}

uint32_t shared_address(const void* p) {
    const intptr_t offset = (const char*)p - shared_origin;
    if (offset < INT32_MIN || offset > INT32_MAX) trap("a shared address of memory that is not shared");
    return (uint32_t)(int32_t)offset;
}

void* shared_pointer(uint32_t address) { return shared_origin + (int32_t)address; }

void* dynamic_shared() { return dynamic_shared_memory; }

void cp_async(uint32_t dst, const void* src, bool valid) {
    // Both addresses 16-byte aligned, as on a GPU (the source even when nothing is read).
    if (dst % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0)
        trap("cp.async of 16 bytes from or to an address not 16-byte aligned");
    CopyQueue& q = this_fiber().copies;
    if (q.count == MAX_COPIES_IN_FLIGHT) trap("more cp.async copies in flight than the emulator holds");
    q.copies[q.count++] = Copy{src, dst, q.groups, valid};
}

void cp_async_commit() { this_fiber().copies.groups += 1; }

void cp_async_wait(unsigned n) {
    CopyQueue& q = this_fiber().copies;
    unsigned kept = 0;
    for (unsigned i = 0; i < q.count; ++i) {
        const Copy& c = q.copies[i];
        // Committed, and older than the n newest committed groups: it lands now.
        if (c.group < q.groups && q.groups - c.group > n) {
            if (c.valid) memcpy(shared_pointer(c.dst), c.src, 16);
            else memset(shared_pointer(c.dst), 0, 16);
        } else {
            q.copies[kept++] = c;
        }
    }
    q.count = kept;
}

namespace {
// The 16 x 8 tile of mma.sync m16n8k16 for the whole of `warp`, from the A and B registers its
// lanes left in their exchange slots and the accumulators they left in `l.mma_d`, which it updates.
// The fragments of the PTX ISA: lane 4g + q holds A rows g and g + 8 at k 2q, 2q + 1 (registers 0,
// 1) and at k 2q + 8, 2q + 9 (registers 2, 3), B column g at k 2q, 2q + 1 (register 0) and 2q + 8,
// 2q + 9 (register 1), the lower index in the low half, and the accumulators of rows g (0, 1) and
// g + 8 (2, 3) by columns 2q and 2q + 1. Each product and sum in f32, in k order.
void multiply_warp_tile(Launch& l, unsigned warp) {
    auto lo = [](uint32_t v) { return __uint_as_float(v << 16); };
    auto hi = [](uint32_t v) { return __uint_as_float(v & 0xffff0000u); };
    float A[16][16], B[8][16];  // A[row][k], B[column][k]
    for (unsigned lane = 0; lane < 32; ++lane) {
        uint32_t r[6];
        memcpy(r, warp_slot(lane), sizeof r);
        const unsigned g = lane / 4, q = lane % 4;
        for (unsigned i = 0; i < 4; ++i) {
            const unsigned row = g + 8 * (i % 2), k = 2 * q + 8 * (i / 2);
            A[row][k] = lo(r[i]);
            A[row][k + 1] = hi(r[i]);
        }
        for (unsigned i = 0; i < 2; ++i) {
            const unsigned k = 2 * q + 8 * i;
            B[g][k] = lo(r[4 + i]);
            B[g][k + 1] = hi(r[4 + i]);
        }
    }
    for (unsigned lane = 0; lane < 32; ++lane) {
        const unsigned g = lane / 4, q = lane % 4;
        float* acc = l.mma_d[warp * 32 + lane];
        for (unsigned i = 0; i < 4; ++i) {
            const unsigned row = g + 8 * (i / 2), column = 2 * q + i % 2;
            float sum = acc[i];
            for (unsigned k = 0; k < 16; ++k) sum = fmaf(A[row][k], B[column][k], sum);
            acc[i] = sum;
        }
    }
}
}  // namespace

// The last lane of the warp to arrive computes the warp's tile (the others wait at the
// collective); each lane then reads its own accumulators back. Once a warp, where each lane
// gathering the twelve fragments it needs cost about twice as much.
void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    Launch& l = launch();
    const unsigned thread = l.current, warp = thread / 32;
    const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
    static_assert(sizeof mine <= SLOT_BYTES, "a lane's A and B registers fit an exchange slot");
    memcpy(warp_slot(thread % 32), mine, sizeof mine);
    memcpy(l.mma_d[thread], d, sizeof d);
    if (++l.mma_arrivals[warp] == 32) {
        l.mma_arrivals[warp] = 0;
        multiply_warp_tile(l, warp);
    }
    warp_wait(0xffffffffu);
    memcpy(d, l.mma_d[thread], sizeof d);
    warp_done();
}

void ldmatrix_x4(uint32_t (&r)[4], uint32_t address, bool transposed) {
    uint32_t rows[32];
    warp_gather(0xffffffffu, &address, sizeof address, rows);
    const int lane = (int)(launch().current % 32);
    for (int i = 0; i < 4; ++i) {
        uint16_t half[2];
        for (int h = 0; h < 2; ++h) {
            // Matrix i's rows are at the addresses of lanes 8i..8i+7, 8 b16 elements each.
            const int row = transposed ? 2 * (lane % 4) + h : lane / 4;
            const int col = transposed ? lane / 4 : 2 * (lane % 4) + h;
            const uint32_t at = rows[8 * i + row];
            if (at % 16 != 0) trap("ldmatrix row address not 16-byte aligned");
            memcpy(&half[h], static_cast<const char*>(shared_pointer(at)) + 2 * col, 2);
        }
        r[i] = (uint32_t)half[0] | ((uint32_t)half[1] << 16);
    }
}

uint32_t fma_bf16x2(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t out = 0;
    for (int h = 0; h < 2; ++h) {
        const double x = __uint_as_float(((a >> (16 * h)) & 0xffffu) << 16);
        const double y = __uint_as_float(((b >> (16 * h)) & 0xffffu) << 16);
        const double z = __uint_as_float(((c >> (16 * h)) & 0xffffu) << 16);
        out |= (uint32_t)__float2bfloat16_rn((float)(x * y + z)).__x << (16 * h);
    }
    return out;
}

}  // namespace mx_emu

uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s) {
    const uint64_t bytes = (uint64_t)x | ((uint64_t)y << 32);
    uint32_t out = 0;
    for (int n = 0; n < 4; ++n) {
        const uint32_t selector = (s >> (4 * n)) & 0xfu;
        if (selector & 8u) mx_emu::trap("__byte_perm with a sign-replicating selector (not emulated)");
        out |= (uint32_t)((bytes >> (8 * selector)) & 0xffu) << (8 * n);
    }
    return out;
}

uint32_t __ballot_sync(uint32_t mask, int predicate) {
    const unsigned char mine = predicate != 0;
    unsigned char all[32];
    mx_emu::warp_gather(mask, &mine, 1, all);
    uint32_t bits = 0;
    for (int l = 0; l < 32; ++l) bits |= (uint32_t)all[l] << l;
    return bits;
}

namespace {

// The emulated kernels: every entry point of the families compiled into this library.
struct Entry {
    const char* symbol;
    void (*body)(const void*);
    const size_t* params_bytes;
    const unsigned* max_threads;  // its __launch_bounds__
};

#define MX_DECLARE(symbol, ...)                   \
    void mx_emulated_##symbol(const void*);       \
    extern const size_t mx_emulated_params_bytes_##symbol; \
    extern const unsigned mx_emulated_max_threads_##symbol;
#define MX_ROW(symbol, ...) \
    {#symbol, &mx_emulated_##symbol, &mx_emulated_params_bytes_##symbol, &mx_emulated_max_threads_##symbol},

}  // namespace

MIXTRAL_ALL_VARIANTS(MX_DECLARE)
MX_EMULATOR_SELF_TESTS(MX_DECLARE)

namespace {
const Entry ENTRIES[] = {MIXTRAL_ALL_VARIANTS(MX_ROW) MX_EMULATOR_SELF_TESTS(MX_ROW)};
}  // namespace

// The emulated kernel `symbol`, or null (a hash look-up: comparing the name with every entry's
// in turn took a few percent of the emulated engine tests' time).
static const Entry* find_entry(const char* symbol) {
    static const std::unordered_map<std::string_view, const Entry*> by_symbol = [] {
        std::unordered_map<std::string_view, const Entry*> map;
        for (const Entry& e : ENTRIES) map.emplace(e.symbol, &e);
        return map;
    }();
    const auto found = by_symbol.find(symbol);
    return found == by_symbol.end() ? nullptr : found->second;
}


// The undefined-behaviour checks the emulator is compiled with (build.rs: -fsanitize=alignment,
// bounds, shift, signed-integer-overflow, integer-divide-by-zero, float-cast-overflow), for what a
// GPU would do differently from this CPU or fault on: a typed load or store at an address not
// aligned for its type (CUDA_ERROR_MISALIGNED_ADDRESS; x86 would just read it), an index past a
// fixed-size array (a shared or local array: another variable's bytes on a GPU, no guard to stop
// it), a shift by the type's width or more (x86 shifts by the count modulo the width, PTX by the
// count clamped: different bits), a signed overflow (the optimizers of both assume there is none),
// a division by zero, and a float converted to an integer that cannot hold it (PTX's cvt
// saturates and turns NaN into 0, x86 gives the lowest value). Each calls its handler below,
// which ends the launch naming the check (with the address or index where it has one) and the
// kernel source line. The layouts and names are the undefined-behaviour sanitizer's, which GCC and
// Clang share; no sanitizer runtime is linked.
namespace {
struct UbsanSourceLocation {
    const char* file;
    uint32_t line;
    uint32_t column;
};
struct UbsanTypeMismatch {
    UbsanSourceLocation location;
    const void* type;
    unsigned char log_alignment;
    unsigned char check_kind;
};

// Ends the launch: `what` at `location` (trap never returns, so nothing here may need freeing).
[[noreturn]] void undefined(const UbsanSourceLocation& location, const char* what) {
    char message[512];
    snprintf(message, sizeof message, "%s (%s:%u)", what, location.file, location.line);
    mx_emu::trap(message);
}
}  // namespace

extern "C" void __ubsan_handle_type_mismatch_v1(const UbsanTypeMismatch* data, uintptr_t address) {
    static const char* const kinds[] = {"load from", "store to", "reference to", "member access in"};
    char what[128];
    snprintf(what, sizeof what, "%s 0x%llx, not %u-byte aligned as its type needs",
             data->check_kind < 4 ? kinds[data->check_kind] : "access to", (unsigned long long)address,
             1u << data->log_alignment);
    undefined(data->location, what);
}

extern "C" void __ubsan_handle_out_of_bounds(const UbsanSourceLocation* data, uintptr_t index) {
    char what[128];
    snprintf(what, sizeof what, "index %lld past the end of a fixed-size array", (long long)index);
    undefined(*data, what);
}

extern "C" void __ubsan_handle_shift_out_of_bounds(const UbsanSourceLocation* data, uintptr_t, uintptr_t) {
    undefined(*data, "a shift by a negative count, by the type's width or more, or of a negative value");
}

extern "C" void __ubsan_handle_add_overflow(const UbsanSourceLocation* data, uintptr_t, uintptr_t) {
    undefined(*data, "a signed addition overflows");
}

extern "C" void __ubsan_handle_sub_overflow(const UbsanSourceLocation* data, uintptr_t, uintptr_t) {
    undefined(*data, "a signed subtraction overflows");
}

extern "C" void __ubsan_handle_mul_overflow(const UbsanSourceLocation* data, uintptr_t, uintptr_t) {
    undefined(*data, "a signed multiplication overflows");
}

extern "C" void __ubsan_handle_negate_overflow(const UbsanSourceLocation* data, uintptr_t) {
    undefined(*data, "a signed negation overflows");
}

extern "C" void __ubsan_handle_float_cast_overflow(const UbsanSourceLocation* data, uintptr_t) {
    undefined(*data, "a float converted to an integer type that cannot hold it (or a NaN)");
}

extern "C" void __ubsan_handle_divrem_overflow(const UbsanSourceLocation* data, uintptr_t, uintptr_t) {
    undefined(*data, "an integer division by zero (or of the lowest signed value by -1)");
}

extern "C" size_t mx_emulator_params_bytes(const char* symbol) {
    const Entry* entry = find_entry(symbol);
    return entry == nullptr ? 0 : *entry->params_bytes;
}

extern "C" int mx_emulator_launch(const char* symbol, const void* params, const MxEmulatorGrid* geometry,
                                  char* error, size_t error_bytes) {
    auto report = [&](const std::string& what) {
        snprintf(error, error_bytes, "%s", what.c_str());
        return 1;
    };
    const Entry* entry = find_entry(symbol);
    if (entry == nullptr) return report(std::string("kernel ") + symbol + " is not emulated");
    const uint32_t block = geometry->block;
    if (block == 0 || block > 1024) return report("block of " + std::to_string(block) + " threads");
    if (block > *entry->max_threads)
        return report(std::string(symbol) + ": block of " + std::to_string(block) +
                      " threads, over the kernel's __launch_bounds__ of " +
                      std::to_string(*entry->max_threads) + " (a GPU refuses the launch)");
    if (geometry->shared_bytes > mx_emu::DYNAMIC_SHARED_BYTES)
        return report(std::to_string(geometry->shared_bytes) +
                      " bytes of dynamic shared memory, over the 48 KiB a kernel gets without opting in "
                      "(a GPU refuses the launch)");

    static thread_local mx_emu::Launch state;
    mx_emu::Launch& l = state;
    l.body = entry->body;
    l.params = params;
    l.grid = uint3{geometry->grid[0], geometry->grid[1], geometry->grid[2]};
    l.block = uint3{block, 1, 1};
    l.threads.assign(block, mx_emu::Thread{});
    l.error.clear();
    if (!mx_emu::thread_stacks.reserve(block)) return report("no memory for the emulated threads' stacks");
    if (geometry->arch != 800 && geometry->arch != 900) return report("emulated arch must be 800 or 900");
    l.arch = geometry->arch;
    const uint64_t blocks = (uint64_t)l.grid.x * l.grid.y * l.grid.z;
    for (uint64_t i = 0; i < blocks && l.error.empty(); ++i) {
        const uint64_t b = geometry->reverse ? blocks - 1 - i : i;
        l.block_index = uint3{(unsigned)(b % l.grid.x), (unsigned)(b / l.grid.x % l.grid.y),
                              (unsigned)(b / l.grid.x / l.grid.y)};
        memset(mx_emu::dynamic_shared_memory, 0xA5, geometry->shared_bytes);
        mx_emu::run_block(l, mx_emu::thread_stacks, geometry->reverse != 0);
    }
    if (!l.error.empty()) return report(std::string(symbol) + ": " + l.error);
    return 0;
}
