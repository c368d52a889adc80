// device.h: what the emulated device (driver.cpp) lends the emulated NCCL (nccl.cpp) inside the one
// library both are linked into (`OUT_DIR/emulated-cuda/libcuda.so`, also reached as libnccl.so).
#pragma once

#include <cstddef>
#include <functional>

struct MxStream;

// Runs `work` now, or records it into the graph `stream` is capturing (a graph launch runs it then).
// Returns a CUresult: the device's sticky error without running anything once it has one.
int mx_device_issue(MxStream* stream, std::function<int()> work);

// True when [address, address + bytes) lies inside one live device allocation.
bool mx_device_owns(const void* address, size_t bytes);
