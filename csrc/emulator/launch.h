// launch.h: the kernel emulator's C entry points (runtime.cpp), for the emulated driver (driver.cpp);
// src/cuda/emulator.rs declares the same for Rust.
#pragma once

#include <stddef.h>
#include <stdint.h>

// The geometry of one launch.
struct MxEmulatorGrid {
    uint32_t grid[3];
    uint32_t block;
    uint32_t shared_bytes;
    uint32_t reverse;  // run threads and blocks in reverse order (uncovers missing barriers)
    uint32_t arch;     // the compute capability emulated: 800 or 900 (mx_emu::arch)
};

// Runs the kernel `symbol` with the parameter struct at `params` over `geometry`. Returns 0, or 1
// with a message in `error` (at most `error_bytes`, NUL-terminated): unknown symbol, a request the
// emulator cannot meet, or what the kernel did wrong.
extern "C" int mx_emulator_launch(const char* symbol, const void* params, const MxEmulatorGrid* geometry,
                                  char* error, size_t error_bytes);

// The size of kernel `symbol`'s parameter struct; 0 when `symbol` is not emulated.
extern "C" size_t mx_emulator_params_bytes(const char* symbol);
