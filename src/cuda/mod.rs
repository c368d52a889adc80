//! CUDA backend foundation: the device and its stream ([`device`]), the kernels embedded as fatbins
//! and looked up once ([`module`]), the kernel parameter structs generated from `codegen/`
//! ([`params`]), and one safe launcher per kernel ([`ops`]) that checks every device buffer against
//! the shapes before it launches. Errors are [`CudaError`].
//!
//! Every activation, weight and cache buffer is bf16 (`half::bf16`), the residual stream and logits f32,
//! indices i32 / u32, all laid out as documented on each op. The ops allocate nothing on the device
//! and never synchronise, so a static execution plan can call them with preallocated buffers and
//! capture a whole decode step in a CUDA graph.
//!
//! The kernels in `csrc/` compile for sm_80 and sm_90a (plus compute_90 PTX). None of them has run on a
//! GPU yet: see `csrc/README.md`.

#[rustfmt::skip]
pub mod args;
pub mod checks;
pub mod device;
pub mod engine;
pub mod error;
pub mod launch;
pub mod memory;
pub mod module;
pub mod ops;
pub mod region;
#[rustfmt::skip]
pub mod params;
#[rustfmt::skip]
mod params_ffi;

pub use device::CudaDevice;
pub use engine::{CudaEngine, CudaEngineOptions, WeightSource};
pub use error::CudaError;
pub use module::Kernels;
