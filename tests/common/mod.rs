//! Helpers shared by several integration tests, in one place: where the repository is
//! ([`repo`]), seeded random values, bf16 rounding and the relative L2 error ([`numeric`]), the CPU
//! reference of the expert slots the MoE kernels write ([`moe`]), and, with `--features cuda`, the
//! one rule deciding when a GPU test may skip ([`gpu`]), running `mixtral-run` and reading what a
//! command printed ([`run`]), greedy decoding through any engine ([`greedy`]), the golden
//! fixtures ([`golden`]), and safetensors files written as a test wants them ([`safetensors`]).
//!
//! A test file at `tests/x.rs` includes it with `mod common;`; the test folders
//! (`tests/integration/`, `tests/gpu_kernels/`) with `#[path = "../common/mod.rs"]`. Each test
//! binary uses part of it.
#![allow(dead_code)]

pub mod golden;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod greedy;
pub mod moe;
pub mod numeric;
pub mod repo;
pub mod run;
pub mod safetensors;
