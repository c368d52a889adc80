//! The pure-Rust reference backend: f32 compute over the memory-mapped weights, parallel over the
//! machine's cores. Each op lives in its own file as a plain function over slices; these functions
//! are the single reference the GPU kernels are tested against.

pub mod attention;
pub mod embedding;
mod engine;
pub mod matmul;
pub mod moe;
pub mod norm;
pub mod rope;
pub mod router;

pub use engine::{CpuEngine, CpuEngineOptions};
