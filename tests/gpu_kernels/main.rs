//! Every CUDA kernel against its CPU reference in `src/cpu` (built with `--features cuda`).
//!
//! Each module tests one op on proptest-random shapes, with guard bands around every output
//! ([`common::Guarded`]): outputs are poisoned before the launch, every element must be written and
//! nothing outside may be touched. bf16 paths must reach a relative L2 error <= 1e-2 against the f32
//! CPU reference; integer outputs must match exactly. Without a CUDA device every test prints why it
//! skipped and passes.
#![cfg(feature = "cuda")]

mod common;

mod attention_decode;
mod attention_prefill;
mod embedding;
mod linear;
mod moe_gemv;
mod moe_grouped;
mod moe_wgmma;
mod quant;
mod rmsnorm;
mod rope_kv;
mod router;
mod sample;
