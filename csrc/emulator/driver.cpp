// driver.cpp: an emulated CUDA device behind the CUDA driver API, built as `libcuda.so` over the kernel
// emulator (runtime.cpp), so that the CUDA engine itself (src/cuda/engine: uploads, the static plan, the
// decode graphs, device sampling) runs on a machine without a GPU: `scripts/emulated-gpu` puts this
// library first on the loader's path for `tests/gpu_engine.rs`.
//
// It implements the calls cudarc and this crate make, and only those (a call it lacks is cudarc's
// "Missing symbol" panic, naming it):
//   - MIXTRAL_EMULATED_GPUS devices (1 when unset; at most MAX_DEVICES), each of compute capability 8.0
//     (the kernels' sm_80 code paths), 108 multiprocessors and DEVICE_BYTES of memory, with one
//     context each; the allocations a context makes count against its device;
//   - device memory is host memory: a device pointer is the address of a 256-byte aligned host
//     allocation, so the emulated kernels read and write it directly; allocation past DEVICE_BYTES is
//     CUDA_ERROR_OUT_OF_MEMORY. Each allocation has a mapping of its own, its end against an
//     inaccessible page (and one before it): a kernel (or copy) that reads or writes more than the
//     256-byte rounding past the end of a buffer, before the page its buffer starts in, or at an
//     address nothing is mapped at, fails with CUDA_ERROR_ILLEGAL_ADDRESS, sticky as on a GPU, with
//     a message naming it and the address on stderr;
//   - every stream runs its work at once, in the order it is issued (stream order is all the crate
//     relies on); events complete at once;
//   - a kernel launch runs the emulated kernel of that symbol (the module's image is not read: every
//     emulated kernel is in this library), its blocks and threads alternately in forward and reverse
//     order from one launch to the next, and the kernels' sm_80 and sm_90 code paths (FP8 decoding)
//     every two launches, as the kernel tests run them;
//   - stream capture records launches (with a copy of their parameter struct), copies and memsets;
//     a graph launch runs them again in order;
//   - a kernel the emulator rejects (a trap, a barrier not every thread reaches, a symbol it does not
//     emulate) makes the launch fail with CUDA_ERROR_LAUNCH_FAILED and the context sticky, as a fault on
//     a GPU does; the emulator's message goes to stderr.
// An access inside another allocation, or within an allocation's rounding, is not caught. A sticky error
// stops every device, not only the one that faulted. The emulated NCCL (nccl.cpp) issues its
// collectives through this file (device.h).
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include "device.h"
#include "launch.h"

#define MX_EXPORT extern "C" __attribute__((visibility("default")))

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;

struct MxContext {
    int device;
};
struct MxModule {};
struct MxFunction {
    std::string symbol;
};
struct MxEvent {};
struct MxGraph {
    std::vector<std::function<CUresult()>> work;
};
struct MxStream {
    MxGraph* capturing = nullptr;
};

typedef MxContext* CUcontext;
typedef MxModule* CUmodule;
typedef MxFunction* CUfunction;
typedef MxEvent* CUevent;
typedef MxStream* CUstream;
typedef MxGraph* CUgraph;
typedef MxGraph* CUgraphExec;

// The result codes used here (the values of cuda.h).
enum : CUresult {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    INVALID_DEVICE = 101,
    ILLEGAL_ADDRESS = 700,
    LAUNCH_FAILED = 719,
    NOT_SUPPORTED = 801,
};

// The device attributes answered with something other than 0 (cuda.h's values).
enum : int {
    ATTR_MAX_THREADS_PER_BLOCK = 1,
    ATTR_MAX_BLOCK_DIM_X = 2,
    ATTR_MAX_GRID_DIM_X = 5,
    ATTR_MAX_SHARED_MEMORY_PER_BLOCK = 8,
    ATTR_WARP_SIZE = 10,
    ATTR_MULTIPROCESSOR_COUNT = 16,
    ATTR_COMPUTE_CAPABILITY_MAJOR = 75,
    ATTR_COMPUTE_CAPABILITY_MINOR = 76,
    ATTR_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97,
};

namespace {

constexpr size_t DEVICE_BYTES = size_t(8) << 30;
constexpr int MAX_DEVICES = 8;
constexpr size_t ALIGNMENT = 256;
constexpr int MULTIPROCESSORS = 108;

// `value` rounded up to a multiple of `to`.
size_t round_up(size_t value, size_t to) { return (value + to - 1) / to * to; }

// One device allocation: its mapping (mapping_bytes(bytes) long: a guard page, the pages holding the
// buffer, a guard page) and its size rounded to ALIGNMENT, which ends where the second guard page
// starts.
struct Allocation {
    char* mapping;
    size_t bytes;
    int device;
};

size_t page_bytes() { return (size_t)sysconf(_SC_PAGESIZE); }

size_t mapping_bytes(size_t bytes) { return round_up(bytes, page_bytes()) + 2 * page_bytes(); }

std::mutex lock;
std::map<uintptr_t, Allocation> allocations;  // by the buffer's address
size_t allocated[MAX_DEVICES] = {};          // bytes, by device
// What runs on the device on this thread (a kernel, a copy or a memset), and where a fault in it
// returns to (see guarded).
thread_local const char* running = nullptr;
thread_local sigjmp_buf* escape = nullptr;
struct sigaction previous_segv;

// A fault while device work runs: says what faulted where and leaves that work (guarded); any other
// fault goes to the handler that was there before (Rust's stack-overflow report, or the default).
void on_segv(int signal, siginfo_t* info, void* context) {
    if (running != nullptr && escape != nullptr) {
        char text[512];
        const int n = snprintf(text, sizeof text,
                               "emulated CUDA device: %s accessed %p, outside its memory (a GPU "
                               "would fault: illegal address)\n",
                               running, info->si_addr);
        if (n > 0) (void)!write(2, text, (size_t)n < sizeof text ? (size_t)n : sizeof text - 1);
        siglongjmp(*escape, 1);
    }
    if (previous_segv.sa_flags & SA_SIGINFO) {
        previous_segv.sa_sigaction(signal, info, context);
    } else if (previous_segv.sa_handler != SIG_IGN && previous_segv.sa_handler != SIG_DFL) {
        previous_segv.sa_handler(signal);
    } else {
        ::signal(SIGSEGV, SIG_DFL);  // the access faults again, now fatally
    }
}

void install_fault_report() {
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction action {};
        action.sa_sigaction = on_segv;
        action.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&action.sa_mask);
        sigaction(SIGSEGV, &action, &previous_segv);
    });
}

thread_local uint64_t launches = 0;  // this thread's, so that its order of launches is its own
std::atomic<CUresult> sticky{SUCCESS};
MxContext contexts[MAX_DEVICES] = {{0}, {1}, {2}, {3}, {4}, {5}, {6}, {7}};
thread_local CUcontext current = nullptr;

// The number of devices: MIXTRAL_EMULATED_GPUS, 1 when unset or not a number from 1 to MAX_DEVICES.
int device_count() {
    static const int count = [] {
        const char* text = getenv("MIXTRAL_EMULATED_GPUS");
        const int n = text != nullptr ? atoi(text) : 1;
        return n >= 1 && n <= MAX_DEVICES ? n : 1;
    }();
    return count;
}

// The device of the current context (device 0 without one).
int current_device() { return current != nullptr ? current->device : 0; }

// Runs `work` now, or records it when `stream` is capturing.
CUresult issue(CUstream stream, std::function<CUresult()> work) {
    if (sticky != SUCCESS) return sticky;
    if (stream != nullptr && stream->capturing != nullptr) {
        stream->capturing->work.push_back(std::move(work));
        return SUCCESS;
    }
    return work();
}

// Runs `work` (`what`, for the message of a fault). An access it makes outside the memory it may
// touch faults (see on_segv) and comes back here: the work is abandoned where it was (an emulated
// launch's thread stacks are not freed) and the device fails from then on, as a GPU's context does.
template <class Work>
CUresult guarded(const char* what, Work work) {
    sigjmp_buf jump;
    if (sigsetjmp(jump, 1) != 0) {
        running = nullptr;
        escape = nullptr;
        sticky = ILLEGAL_ADDRESS;
        return ILLEGAL_ADDRESS;
    }
    running = what;
    escape = &jump;
    const CUresult result = work();
    running = nullptr;
    escape = nullptr;
    return result;
}

CUresult run_kernel(const std::string& symbol, const MxEmulatorGrid& geometry, const void* params) {
    char message[1024] = {0};
    const std::string what = "kernel " + symbol;
    const CUresult result = guarded(what.c_str(), [&] {
        return mx_emulator_launch(symbol.c_str(), params, &geometry, message, sizeof message) == 0
                   ? SUCCESS
                   : LAUNCH_FAILED;
    });
    if (result == LAUNCH_FAILED) {
        fprintf(stderr, "emulated CUDA device: launch of %s failed: %s\n", symbol.c_str(), message);
        sticky = LAUNCH_FAILED;
    }
    return result;
}

CUresult copy(void* to, const void* from, size_t bytes) {
    return guarded("a copy", [&] {
        if (bytes != 0) memmove(to, from, bytes);
        return SUCCESS;
    });
}

}  // namespace

int mx_device_issue(MxStream* stream, std::function<int()> work) { return issue(stream, std::move(work)); }

bool mx_device_owns(const void* address, size_t bytes) {
    const uintptr_t start = reinterpret_cast<uintptr_t>(address);
    std::lock_guard<std::mutex> guard(lock);
    auto found = allocations.upper_bound(start);
    if (found == allocations.begin()) return false;
    --found;  // the allocation starting at or before `start`
    return start - found->first <= found->second.bytes && bytes <= found->second.bytes - (start - found->first);
}

MX_EXPORT CUresult cuInit(unsigned) {
    install_fault_report();
    return SUCCESS;
}

MX_EXPORT CUresult cuDriverGetVersion(int* version) {
    *version = 13000;
    return SUCCESS;
}

MX_EXPORT CUresult cuDeviceGetCount(int* count) {
    *count = device_count();
    return SUCCESS;
}

MX_EXPORT CUresult cuDeviceGet(CUdevice* device, int ordinal) {
    if (ordinal < 0 || ordinal >= device_count()) return INVALID_DEVICE;
    *device = ordinal;
    return SUCCESS;
}

MX_EXPORT CUresult cuDeviceGetName(char* name, int length, CUdevice) {
    snprintf(name, length, "emulated CUDA device (mixtral kernel emulator, sm_80)");
    return SUCCESS;
}

MX_EXPORT CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    *bytes = DEVICE_BYTES;
    return SUCCESS;
}

MX_EXPORT CUresult cuDeviceGetAttribute(int* value, int attribute, CUdevice) {
    switch (attribute) {
        case ATTR_MAX_THREADS_PER_BLOCK:
        case ATTR_MAX_BLOCK_DIM_X: *value = 1024; break;
        case ATTR_MAX_GRID_DIM_X: *value = 0x7fffffff; break;
        case ATTR_MAX_SHARED_MEMORY_PER_BLOCK: *value = 48 * 1024; break;
        case ATTR_WARP_SIZE: *value = 32; break;
        case ATTR_MULTIPROCESSOR_COUNT: *value = MULTIPROCESSORS; break;
        case ATTR_COMPUTE_CAPABILITY_MAJOR: *value = 8; break;
        case ATTR_COMPUTE_CAPABILITY_MINOR: *value = 0; break;
        case ATTR_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *value = 163 * 1024; break;
        default: *value = 0;  // memory pools (so cudarc allocates synchronously) and the rest
    }
    return SUCCESS;
}

MX_EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext* context, CUdevice device) {
    if (device < 0 || device >= device_count()) return INVALID_DEVICE;
    *context = &contexts[device];
    return SUCCESS;
}

MX_EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return SUCCESS; }

MX_EXPORT CUresult cuCtxSetCurrent(CUcontext context) {
    current = context;
    return SUCCESS;
}

MX_EXPORT CUresult cuCtxGetCurrent(CUcontext* context) {
    *context = current;
    return SUCCESS;
}

MX_EXPORT CUresult cuCtxSynchronize() { return sticky; }

MX_EXPORT CUresult cuGetErrorName(CUresult error, const char** name) {
    switch (error) {
        case SUCCESS: *name = "CUDA_SUCCESS"; break;
        case INVALID_VALUE: *name = "CUDA_ERROR_INVALID_VALUE"; break;
        case OUT_OF_MEMORY: *name = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case INVALID_DEVICE: *name = "CUDA_ERROR_INVALID_DEVICE"; break;
        case ILLEGAL_ADDRESS: *name = "CUDA_ERROR_ILLEGAL_ADDRESS"; break;
        case LAUNCH_FAILED: *name = "CUDA_ERROR_LAUNCH_FAILED"; break;
        case NOT_SUPPORTED: *name = "CUDA_ERROR_NOT_SUPPORTED"; break;
        default: *name = "CUDA_ERROR_UNKNOWN";
    }
    return SUCCESS;
}

MX_EXPORT CUresult cuGetErrorString(CUresult error, const char** text) {
    if (error == LAUNCH_FAILED) {
        *text = "an emulated kernel failed (see stderr)";
        return SUCCESS;
    }
    return cuGetErrorName(error, text);
}

// --- memory -----------------------------------------------------------------------------------------

MX_EXPORT CUresult cuMemGetInfo_v2(size_t* free, size_t* total) {
    std::lock_guard<std::mutex> guard(lock);
    *free = DEVICE_BYTES - allocated[current_device()];
    *total = DEVICE_BYTES;
    return SUCCESS;
}

MX_EXPORT CUresult cuMemAlloc_v2(CUdeviceptr* pointer, size_t bytes) {
    const size_t rounded = round_up(bytes == 0 ? 1 : bytes, ALIGNMENT);
    const size_t size = mapping_bytes(rounded), page = page_bytes();
    const int device = current_device();
    std::lock_guard<std::mutex> guard(lock);
    if (rounded > DEVICE_BYTES - allocated[device]) return OUT_OF_MEMORY;
    void* mapping = mmap(nullptr, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mapping == MAP_FAILED) return OUT_OF_MEMORY;
    char* first = static_cast<char*>(mapping) + page;
    char* end = static_cast<char*>(mapping) + size - page;  // the second guard page
    if (mprotect(first, end - first, PROT_READ | PROT_WRITE) != 0) {
        munmap(mapping, size);
        return OUT_OF_MEMORY;
    }
    char* buffer = end - rounded;
    allocations[reinterpret_cast<uintptr_t>(buffer)] = Allocation{static_cast<char*>(mapping), rounded, device};
    allocated[device] += rounded;
    *pointer = reinterpret_cast<CUdeviceptr>(buffer);
    return SUCCESS;
}

MX_EXPORT CUresult cuMemFree_v2(CUdeviceptr pointer) {
    std::lock_guard<std::mutex> guard(lock);
    auto found = allocations.find(static_cast<uintptr_t>(pointer));
    if (found == allocations.end()) return INVALID_VALUE;
    allocated[found->second.device] -= found->second.bytes;
    munmap(found->second.mapping, mapping_bytes(found->second.bytes));
    allocations.erase(found);
    return SUCCESS;
}

MX_EXPORT CUresult cuMemHostAlloc(void** pointer, size_t bytes, unsigned) {
    *pointer = aligned_alloc(ALIGNMENT, round_up(bytes == 0 ? 1 : bytes, ALIGNMENT));
    return *pointer == nullptr ? OUT_OF_MEMORY : SUCCESS;
}

MX_EXPORT CUresult cuMemFreeHost(void* pointer) {
    free(pointer);
    return SUCCESS;
}

MX_EXPORT CUresult cuMemsetD8Async(CUdeviceptr to, unsigned char value, size_t bytes, CUstream stream) {
    return issue(stream, [=] {
        return guarded("a memset", [&] {
            memset(reinterpret_cast<void*>(to), value, bytes);
            return SUCCESS;
        });
    });
}

MX_EXPORT CUresult cuMemsetD8_v2(CUdeviceptr to, unsigned char value, size_t bytes) {
    return cuMemsetD8Async(to, value, bytes, nullptr);
}

MX_EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr to, const void* from, size_t bytes, CUstream stream) {
    return issue(stream, [=] { return copy(reinterpret_cast<void*>(to), from, bytes); });
}

MX_EXPORT CUresult cuMemcpyDtoHAsync_v2(void* to, CUdeviceptr from, size_t bytes, CUstream stream) {
    return issue(stream, [=] { return copy(to, reinterpret_cast<const void*>(from), bytes); });
}

MX_EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr to, CUdeviceptr from, size_t bytes, CUstream stream) {
    return issue(stream,
                 [=] { return copy(reinterpret_cast<void*>(to), reinterpret_cast<const void*>(from), bytes); });
}

MX_EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr to, const void* from, size_t bytes) {
    return cuMemcpyHtoDAsync_v2(to, from, bytes, nullptr);
}

MX_EXPORT CUresult cuMemcpyDtoH_v2(void* to, CUdeviceptr from, size_t bytes) {
    return cuMemcpyDtoHAsync_v2(to, from, bytes, nullptr);
}

MX_EXPORT CUresult cuMemcpyDtoD_v2(CUdeviceptr to, CUdeviceptr from, size_t bytes) {
    return cuMemcpyDtoDAsync_v2(to, from, bytes, nullptr);
}

// --- streams and events ------------------------------------------------------------------------------

MX_EXPORT CUresult cuStreamCreate(CUstream* stream, unsigned) {
    *stream = new MxStream();
    return SUCCESS;
}

MX_EXPORT CUresult cuStreamCreateWithPriority(CUstream* stream, unsigned flags, int) {
    return cuStreamCreate(stream, flags);
}

MX_EXPORT CUresult cuStreamDestroy_v2(CUstream stream) {
    delete stream;
    return SUCCESS;
}

MX_EXPORT CUresult cuStreamSynchronize(CUstream) { return sticky; }

MX_EXPORT CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned) { return sticky; }

MX_EXPORT CUresult cuEventCreate(CUevent* event, unsigned) {
    *event = new MxEvent();
    return SUCCESS;
}

MX_EXPORT CUresult cuEventDestroy_v2(CUevent event) {
    delete event;
    return SUCCESS;
}

MX_EXPORT CUresult cuEventRecord(CUevent, CUstream) { return sticky; }
MX_EXPORT CUresult cuEventSynchronize(CUevent) { return sticky; }
MX_EXPORT CUresult cuEventQuery(CUevent) { return sticky; }

// --- modules and launches ----------------------------------------------------------------------------

MX_EXPORT CUresult cuModuleLoadData(CUmodule* module, const void*) {
    *module = new MxModule();
    return SUCCESS;
}

MX_EXPORT CUresult cuModuleUnload(CUmodule module) {
    delete module;
    return SUCCESS;
}

// Every symbol resolves; one the emulator does not run fails at launch.
MX_EXPORT CUresult cuModuleGetFunction(CUfunction* function, CUmodule, const char* symbol) {
    *function = new MxFunction{symbol};
    return SUCCESS;
}

MX_EXPORT CUresult cuFuncSetAttribute(CUfunction, int, int) { return SUCCESS; }

MX_EXPORT CUresult cuFuncGetAttribute(int* value, int, CUfunction) {
    *value = 0;
    return SUCCESS;
}

// One parameter (the kernel's parameter struct), copied so that a recorded launch outlives it.
MX_EXPORT CUresult cuLaunchKernel(CUfunction function, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                  unsigned by, unsigned bz, unsigned shared_bytes, CUstream stream,
                                  void** params, void** extra) {
    if (by != 1 || bz != 1 || extra != nullptr || params == nullptr) return NOT_SUPPORTED;
    const size_t bytes = mx_emulator_params_bytes(function->symbol.c_str());
    std::vector<unsigned char> copied(static_cast<const unsigned char*>(params[0]),
                                      static_cast<const unsigned char*>(params[0]) + bytes);
    const std::string symbol = function->symbol;
    return issue(stream, [=] {
        // Forward and reverse order on alternate launches, the sm_80 and sm_90 code paths of the
        // kernels (FP8 decoding) every two, as the kernel tests run them.
        const uint64_t launch = launches++;
        const uint32_t reverse = launch % 2, arch = launch / 2 % 2 ? 900 : 800;
        const MxEmulatorGrid geometry{{gx, gy, gz}, bx, shared_bytes, reverse, arch};
        return run_kernel(symbol, geometry, copied.data());
    });
}

// --- graphs ------------------------------------------------------------------------------------------

MX_EXPORT CUresult cuStreamBeginCapture_v2(CUstream stream, int) {
    if (stream == nullptr || stream->capturing != nullptr) return INVALID_VALUE;
    stream->capturing = new MxGraph();
    return SUCCESS;
}

MX_EXPORT CUresult cuStreamEndCapture(CUstream stream, CUgraph* graph) {
    if (stream == nullptr || stream->capturing == nullptr) return INVALID_VALUE;
    *graph = stream->capturing;
    stream->capturing = nullptr;
    return SUCCESS;
}

MX_EXPORT CUresult cuStreamIsCapturing(CUstream stream, int* status) {
    *status = stream != nullptr && stream->capturing != nullptr ? 1 : 0;
    return SUCCESS;
}

MX_EXPORT CUresult cuGraphInstantiateWithFlags(CUgraphExec* exec, CUgraph graph, unsigned long long) {
    *exec = new MxGraph(*graph);
    return SUCCESS;
}

MX_EXPORT CUresult cuGraphLaunch(CUgraphExec exec, CUstream stream) {
    if (sticky != SUCCESS) return sticky;
    if (stream != nullptr && stream->capturing != nullptr) return NOT_SUPPORTED;
    for (auto& work : exec->work) {
        const CUresult result = work();
        if (result != SUCCESS) return result;
    }
    return SUCCESS;
}

MX_EXPORT CUresult cuGraphUpload(CUgraphExec, CUstream) { return sticky; }

MX_EXPORT CUresult cuGraphExecDestroy(CUgraphExec exec) {
    delete exec;
    return SUCCESS;
}

MX_EXPORT CUresult cuGraphDestroy(CUgraph graph) {
    delete graph;
    return SUCCESS;
}
