//! The pure-Rust reference backend: f32 compute over the memory-mapped weights.
//!
//! Each op lives in its own module as a pure function over slices, the single CPU definition a
//! GPU kernel is compared against: [`embedding`], [`norm`] (RMSNorm), [`rope`], [`attention`]
//! (causal GQA over the paged cache, sliding window) and [`exp`] (its softmax's exponential),
//! [`router`] (softmax, top-k, grouping by expert), [`moe`] (SwiGLU experts and the MoE block),
//! [`matmul`] (every projection of stored elements) and [`packed_matmul`] (of quantized
//! matrices, read as their packed codes).
//! [`CpuEngine`] runs a whole model with them behind the [`Engine`](crate::engine::Engine) trait.

pub mod attention;
pub mod embedding;
mod engine;
pub mod exp;
pub mod matmul;
pub mod moe;
pub mod norm;
pub mod packed_matmul;
pub mod rope;
pub mod router;

pub(crate) use engine::kv_limits;
pub use engine::{CpuEngine, CpuEngineOptions};
