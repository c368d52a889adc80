// cuda_bf16.h for the kernel emulator: empty; csrc/emulator/cuda_emulator.h (force-included) defines
// what the kernels use of it.
#pragma once
