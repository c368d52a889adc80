// nccl.cpp: an emulated NCCL over the emulated CUDA device (driver.cpp), linked into the same library,
// which build.rs also names `libnccl.so`: with `scripts/emulated-gpu`, cudarc's NCCL (feature `nccl`)
// loads it, so that the sharded CUDA engine (src/cuda/sharded.rs, src/cuda/nccl.rs) runs on the CPU,
// its ranks on the emulated devices.
//
// It implements the calls src/cuda/nccl.rs makes, and only those (a call it lacks is cudarc's
// "Missing symbol" panic, naming it):
//   - communicators of ranks in this process: ncclCommInitAll (one world of every device given),
//     ncclGetUniqueId + ncclCommInitRank (each rank in a thread of its own; blocks until all joined),
//     ncclCommSplit (by color, ordered by key then parent rank; NCCL_SPLIT_NOCOLOR gets none),
//     ncclCommCount, ncclCommUserRank, ncclCommAbort / ncclCommDestroy;
//   - ncclAllReduce (ncclSum) and ncclAllGather over f32 and bf16 device buffers, issued on a stream
//     like a kernel: run at once, or recorded when the stream is capturing and run by each graph
//     launch. A collective is a round: each rank's call waits until every rank of its communicator
//     has made its own, then the last to arrive computes the result for all of them:
//       all-reduce: recv = ((send_0 + send_1) + send_2) + ..., in rank order; f32 sums in f32, bf16
//       sums rounded to bf16 after each addition (as a ring reduction of bf16 data does);
//       all-gather: recv = send_0 | send_1 | ... (sendcount elements each), on every rank;
//     buffers outside a live device allocation fail the round (ncclInvalidArgument, said on stderr);
//   - ncclGroupStart / ncclGroupEnd: nothing to do (every rank issues its calls in the same order, so
//     rounds that wait in turn cannot deadlock).
// A rank whose communicator is aborted or destroyed leaves its world: a round that waits for it, or
// starts after, fails with ncclRemoteError instead of waiting forever.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <unistd.h>

#include "device.h"

#define MX_EXPORT extern "C" __attribute__((visibility("default")))

typedef int ncclResult_t;

// The result codes, data types and constants used here (the values of nccl.h).
enum : ncclResult_t {
    ncclSuccess = 0,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
};
enum : int {
    ncclFloat32 = 7,
    ncclBfloat16 = 9,
    ncclSum = 0,
    NCCL_SPLIT_NOCOLOR = -1,
};

struct ncclUniqueId {
    char internal[128];
};

namespace {

// The version reported: 2.18.0, the oldest src/cuda/nccl.rs accepts (ncclCommSplit).
constexpr int VERSION = 21800;
// What the CUDA calls return when a collective issued on a stream fails (CUDA_ERROR_LAUNCH_FAILED).
constexpr int CUDA_LAUNCH_FAILED = 719;

struct World;

// What one rank brings to a round, and what a split hands back to it.
struct Part {
    const void* send = nullptr;
    void* recv = nullptr;
    int color = 0;
    int key = 0;
    std::shared_ptr<World> split_world;
    int split_rank = -1;
};

// The ranks of one communicator and the state of their rounds.
struct World {
    explicit World(int size) : size(size), parts(size) {}
    const int size;
    std::mutex mutex;
    std::condition_variable finished;
    uint64_t generation = 0;  // rounds completed
    int arrived = 0;          // ranks in the current round
    bool left = false;        // a rank aborted or destroyed its communicator
    ncclResult_t result = ncclSuccess;  // of the last completed round
    std::vector<Part> parts;
};

thread_local std::string last_error;

ncclResult_t fail(ncclResult_t code, const std::string& message) {
    last_error = message;
    fprintf(stderr, "emulated NCCL: %s\n", message.c_str());
    return code;
}

// Rank `rank`'s part of one round of `world`: waits until every rank has brought its part; the last to
// arrive runs `complete` over all the parts (under the world's lock), and every rank returns its
// result, with its own part as `complete` left it in `out`.
template <class Complete>
ncclResult_t round(World& world, int rank, Part part, Complete complete, Part* out = nullptr) {
    std::unique_lock<std::mutex> guard(world.mutex);
    if (world.left) return fail(ncclRemoteError, "a rank of this communicator has left it");
    const uint64_t generation = world.generation;
    world.parts[rank] = std::move(part);
    if (++world.arrived == world.size) {
        world.result = complete(world.parts);
        world.arrived = 0;
        ++world.generation;
        world.finished.notify_all();
    } else {
        world.finished.wait(guard, [&] { return world.generation != generation || world.left; });
        if (world.generation == generation) {
            return fail(ncclRemoteError, "a rank of this communicator left it during a collective");
        }
    }
    if (out != nullptr) *out = world.parts[rank];
    return world.result;
}

size_t element_bytes(int type) {
    switch (type) {
        case ncclFloat32: return 4;
        case ncclBfloat16: return 2;
        default: return 0;
    }
}

float bf16_value(uint16_t bits) {
    const uint32_t word = uint32_t(bits) << 16;
    float value;
    memcpy(&value, &word, sizeof value);
    return value;
}

// `value` rounded to the nearest bf16, ties to even (NaN stays a NaN).
uint16_t bf16_bits(float value) {
    uint32_t word;
    memcpy(&word, &value, sizeof word);
    if ((word & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    word += 0x7fffu + ((word >> 16) & 1u);
    return uint16_t(word >> 16);
}

// Fails unless every rank's send buffer holds `send_bytes` and its recv buffer `recv_bytes`.
ncclResult_t check_buffers(const char* call, const std::vector<Part>& parts, size_t send_bytes,
                           size_t recv_bytes) {
    for (size_t rank = 0; rank < parts.size(); ++rank) {
        const bool send = mx_device_owns(parts[rank].send, send_bytes);
        if (!send || !mx_device_owns(parts[rank].recv, recv_bytes)) {
            return fail(ncclInvalidArgument, std::string(call) + ": rank " + std::to_string(rank) + "'s " +
                                                 (send ? "recv" : "send") +
                                                 " buffer is not inside one device allocation of its size");
        }
    }
    return ncclSuccess;
}

// The all-reduce (sum) of `count` elements of `type` over every rank's part.
ncclResult_t all_reduce(std::vector<Part>& parts, size_t count, int type) {
    const size_t bytes = count * element_bytes(type);
    const ncclResult_t checked = check_buffers("ncclAllReduce", parts, bytes, bytes);
    if (checked != ncclSuccess) return checked;
    std::vector<unsigned char> sum(bytes);
    if (bytes != 0) memcpy(sum.data(), parts[0].send, bytes);
    for (size_t rank = 1; rank < parts.size(); ++rank) {
        for (size_t i = 0; i < count; ++i) {
            if (type == ncclFloat32) {
                float a, b;
                memcpy(&a, sum.data() + 4 * i, 4);
                memcpy(&b, static_cast<const unsigned char*>(parts[rank].send) + 4 * i, 4);
                a += b;
                memcpy(sum.data() + 4 * i, &a, 4);
            } else {
                uint16_t a, b;
                memcpy(&a, sum.data() + 2 * i, 2);
                memcpy(&b, static_cast<const unsigned char*>(parts[rank].send) + 2 * i, 2);
                a = bf16_bits(bf16_value(a) + bf16_value(b));
                memcpy(sum.data() + 2 * i, &a, 2);
            }
        }
    }
    for (Part& part : parts) {
        if (bytes != 0) memcpy(part.recv, sum.data(), bytes);
    }
    return ncclSuccess;
}

// The all-gather of `count` elements of `type` from every rank's part.
ncclResult_t all_gather(std::vector<Part>& parts, size_t count, int type) {
    const size_t bytes = count * element_bytes(type);
    const ncclResult_t checked = check_buffers("ncclAllGather", parts, bytes, bytes * parts.size());
    if (checked != ncclSuccess) return checked;
    std::vector<unsigned char> gathered(bytes * parts.size());
    for (size_t rank = 0; rank < parts.size(); ++rank) {
        if (bytes != 0) memcpy(gathered.data() + rank * bytes, parts[rank].send, bytes);
    }
    for (Part& part : parts) {
        if (!gathered.empty()) memcpy(part.recv, gathered.data(), gathered.size());
    }
    return ncclSuccess;
}

// Issues the round `run` (returning an ncclResult_t) of this rank on `stream`, like a kernel.
template <class Run>
ncclResult_t issue(const char* call, MxStream* stream, Run run) {
    const int result = mx_device_issue(stream, [run] { return run() == ncclSuccess ? 0 : CUDA_LAUNCH_FAILED; });
    if (result == 0) return ncclSuccess;
    return fail(result == CUDA_LAUNCH_FAILED ? ncclRemoteError : ncclInternalError,
                std::string(call) + " failed on the emulated device (CUDA error " + std::to_string(result) + ")");
}

std::mutex registry_lock;
std::map<std::string, std::shared_ptr<World>> joining;  // worlds being joined, by unique id
std::atomic<uint64_t> next_id{1};

}  // namespace

struct ncclComm {
    std::shared_ptr<World> world;
    int rank;
};

MX_EXPORT ncclResult_t ncclGetVersion(int* version) {
    *version = VERSION;
    return ncclSuccess;
}

MX_EXPORT const char* ncclGetErrorString(ncclResult_t result) {
    switch (result) {
        case ncclSuccess: return "no error";
        case ncclInternalError: return "internal error";
        case ncclInvalidArgument: return "invalid argument";
        case ncclInvalidUsage: return "invalid usage";
        case ncclRemoteError: return "remote process exited or there was a network error";
        default: return "unknown result code";
    }
}

MX_EXPORT const char* ncclGetLastError(ncclComm*) { return last_error.c_str(); }

MX_EXPORT ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    memset(id, 0, sizeof *id);
    snprintf(id->internal, sizeof id->internal, "emulated NCCL %d.%llu", (int)getpid(),
             (unsigned long long)next_id++);
    return ncclSuccess;
}

MX_EXPORT ncclResult_t ncclCommInitRank(ncclComm** comm, int ranks, ncclUniqueId id, int rank) {
    if (ranks < 1 || rank < 0 || rank >= ranks) {
        return fail(ncclInvalidArgument, "ncclCommInitRank: rank " + std::to_string(rank) + " of " +
                                              std::to_string(ranks));
    }
    const std::string key(id.internal, strnlen(id.internal, sizeof id.internal));
    std::shared_ptr<World> world;
    {
        std::lock_guard<std::mutex> guard(registry_lock);
        auto& entry = joining[key];
        if (!entry) entry = std::make_shared<World>(ranks);
        world = entry;
    }
    if (world->size != ranks) {
        return fail(ncclInvalidUsage, "ncclCommInitRank: ranks disagree on the world size");
    }
    const ncclResult_t joined = round(*world, rank, Part{}, [&](std::vector<Part>&) {
        std::lock_guard<std::mutex> guard(registry_lock);
        joining.erase(key);
        return ncclSuccess;
    });
    if (joined != ncclSuccess) return joined;
    *comm = new ncclComm{world, rank};
    return ncclSuccess;
}

MX_EXPORT ncclResult_t ncclCommInitAll(ncclComm** comms, int count, const int*) {
    if (count < 1) return fail(ncclInvalidArgument, "ncclCommInitAll: no device");
    auto world = std::make_shared<World>(count);
    for (int rank = 0; rank < count; ++rank) comms[rank] = new ncclComm{world, rank};
    return ncclSuccess;
}

MX_EXPORT ncclResult_t ncclCommSplit(ncclComm* comm, int color, int key, ncclComm** split, void*) {
    if (comm == nullptr) return fail(ncclInvalidArgument, "ncclCommSplit: no communicator");
    Part part;
    part.color = color;
    part.key = key;
    Part mine;
    const ncclResult_t result = round(
        *comm->world, comm->rank, part,
        [](std::vector<Part>& parts) {
            std::map<int, std::vector<int>> members;  // by color, the parent ranks in order
            for (int rank = 0; rank < (int)parts.size(); ++rank) {
                if (parts[rank].color != NCCL_SPLIT_NOCOLOR) members[parts[rank].color].push_back(rank);
            }
            for (auto& group : members) {
                std::vector<int>& ranks = group.second;
                std::stable_sort(ranks.begin(), ranks.end(),
                                 [&](int a, int b) { return parts[a].key < parts[b].key; });
                auto world = std::make_shared<World>((int)ranks.size());
                for (int i = 0; i < (int)ranks.size(); ++i) {
                    parts[ranks[i]].split_world = world;
                    parts[ranks[i]].split_rank = i;
                }
            }
            return ncclSuccess;
        },
        &mine);
    if (result != ncclSuccess) return result;
    *split = mine.split_world ? new ncclComm{mine.split_world, mine.split_rank} : nullptr;
    return ncclSuccess;
}

MX_EXPORT ncclResult_t ncclCommCount(const ncclComm* comm, int* count) {
    *count = comm->world->size;
    return ncclSuccess;
}

MX_EXPORT ncclResult_t ncclCommUserRank(const ncclComm* comm, int* rank) {
    *rank = comm->rank;
    return ncclSuccess;
}

// The rank leaves its world (see the file comment) and the communicator is freed.
MX_EXPORT ncclResult_t ncclCommAbort(ncclComm* comm) {
    if (comm == nullptr) return ncclSuccess;
    {
        std::lock_guard<std::mutex> guard(comm->world->mutex);
        comm->world->left = true;
        comm->world->finished.notify_all();
    }
    delete comm;
    return ncclSuccess;
}

MX_EXPORT ncclResult_t ncclCommDestroy(ncclComm* comm) { return ncclCommAbort(comm); }

namespace {

// Issues this rank's part (`send`, `recv`) of a round of `comm`'s world on `stream`, like a kernel;
// `compute` makes the round's result from every rank's part.
template <class Compute>
ncclResult_t issue_round(const char* call, const ncclComm* comm, MxStream* stream, const void* send, void* recv,
                         Compute compute) {
    std::shared_ptr<World> world = comm->world;
    const int rank = comm->rank;
    return issue(call, stream, [=] {
        Part part;
        part.send = send;
        part.recv = recv;
        return round(*world, rank, part, compute);
    });
}

}  // namespace

MX_EXPORT ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, int type, int op, ncclComm* comm,
                                     MxStream* stream) {
    if (comm == nullptr || element_bytes(type) == 0 || op != ncclSum) {
        return fail(ncclInvalidArgument, "ncclAllReduce: the emulation sums f32 or bf16 over a communicator");
    }
    return issue_round("ncclAllReduce", comm, stream, send, recv,
                       [=](std::vector<Part>& parts) { return all_reduce(parts, count, type); });
}

MX_EXPORT ncclResult_t ncclAllGather(const void* send, void* recv, size_t count, int type, ncclComm* comm,
                                     MxStream* stream) {
    if (comm == nullptr || element_bytes(type) == 0) {
        return fail(ncclInvalidArgument, "ncclAllGather: the emulation gathers f32 or bf16 over a communicator");
    }
    return issue_round("ncclAllGather", comm, stream, send, recv,
                       [=](std::vector<Part>& parts) { return all_gather(parts, count, type); });
}

MX_EXPORT ncclResult_t ncclGroupStart() { return ncclSuccess; }
MX_EXPORT ncclResult_t ncclGroupEnd() { return ncclSuccess; }
