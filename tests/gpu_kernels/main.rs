//! Every CUDA kernel against its CPU reference in `src/cpu` (built with `--features cuda`).
//!
//! Each module tests one op on proptest-random shapes, with guard bands around every output
//! ([`common::Guarded`]): outputs are poisoned before the launch, every element must be written and
//! nothing outside may be touched. Integer outputs must match exactly, copies bit for bit.
//!
//! Float outputs are compared by relative L2 error against the CPU reference run on the same
//! (bf16-rounded) inputs, within a bound derived from the kernel's arithmetic and written beside
//! each comparison, never one tolerance for all (`common.rs` holds the derivations, and tests that
//! check their constants on the CPU):
//! - an f32 output summing k exact products: [`common::f32_bound`], 1e-5 up to k = 2684 (summation
//!   order and tensor-core truncation; a bf16 accumulation bug is 100 times above it);
//! - a bf16 output, and each bf16 intermediate before it that reaches it element-wise or through a
//!   softmax-weighted average: [`common::bf16_bound`], 2^-8 (3.9e-3) per rounding plus the f32 part;
//! - a bf16 intermediate feeding a projection (the SwiGLU activation before the down projection):
//!   [`common::propagated_bound`], from the data;
//! - packed FP8 / INT8 / 4-bit weights: the same rules against the CPU on the dequantized matrices.
//!
//! NaN never passes. A bound is not widened after a failed run without the measurement that
//! justifies it, committed with it.
//!
//! On a machine without a CUDA driver or device the tests run on the kernel emulator instead
//! (`mixtral::cuda::emulator`, `csrc/emulator/README.md`: the same kernel sources compiled for the
//! CPU, the same planners and argument checks, launches alternately in forward and reverse thread
//! order), with fewer random cases where a kernel is slow there ([`common::Target::cases`]); each
//! prints `<test>: no GPU (...): on the kernel emulator`. The Hopper-only kernels (CUTLASS),
//! which the emulator does not run, skip there with `skipped <test>: no GPU: ...`. With a device
//! present, a device or kernel load failure fails every test (`tests/common/gpu.rs`), and
//! `scripts/gpu-check` counts a skip there as a failure.
#![cfg(feature = "cuda")]

#[path = "../common/mod.rs"]
mod shared;

mod common;

mod attention_decode;
mod attention_prefill;
mod embedding;
mod linear;
mod linear_cutlass;
mod moe_cutlass;
mod moe_gemv;
mod moe_grouped;
mod quant;
mod rmsnorm;
mod rope_kv;
mod router;
mod sample;
