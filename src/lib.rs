//! # mixtral
//!
//! Runs Mixtral-family mixture-of-experts language models (Mixtral-8x7B, Mixtral-8x22B, Mistral-7B as
//! the one-expert case) from a Hugging Face model directory.
//!
//! The pieces, in the order data flows through them:
//! - [`config`]: `config.json` -> validated [`ModelConfig`];
//! - [`checkpoint`]: memory-mapped safetensors shards -> validated zero-copy tensor views;
//! - [`weights`]: the typed per-layer weights of the model, checked against the config;
//! - [`packed`]: the FP8 / INT8 / INT4 encodings and the packed layout of a quantized matrix (used
//!   by the checkpoint, the loaders and both backends; it uses no other module);
//! - [`quant`]: FP8 / INT8 / INT4 (GPTQ) weights, quantized on load or published pre-quantized,
//!   dequantized to f32 for the CPU reference; the memory preflight;
//! - [`tokenizer`]: `tokenizer.json`, the chat template, streaming detokenization;
//! - [`engine`]: the batched step API every backend implements (logits or chosen tokens), over a
//!   paged KV cache ([`kv`]), and [`engine::open`], which builds any backend from a device string;
//! - [`cpu`]: the pure-Rust reference backend ([`cpu::CpuEngine`]);
//! - `cuda` (feature `cuda`): the GPU backend, `cuda::CudaEngine`, behind the same step API;
//! - [`shard`]: tensor- and expert-parallel sharding, run on CPU-simulated ranks
//!   ([`shard::ShardedCpuEngine`]);
//! - [`generate`]: sampling, stop conditions, streaming generation and perplexity;
//! - [`serve`]: continuous batching with prefix caching, and a thread-owned engine handle for
//!   servers;
//! - [`model`]: loads everything from a model directory in one call;
//! - `server` (feature `server`, on by default): the OpenAI-compatible HTTP server of `mixtral-serve`;
//! - [`capi`]: the C ABI (`include/mixtral.h`, built as `libmixtral.so`).
//!
//! ```no_run
//! use mixtral::engine::{open, EngineOptions};
//! use mixtral::generate::{generate, GenerateOptions};
//! use mixtral::{LoadOptions, Model};
//!
//! let model = Model::load("models/tiny-mixtral".as_ref(), &LoadOptions::default())?;
//! let tokenizer = model.tokenizer.as_ref().expect("the directory has a tokenizer.json");
//! // "cpu", "cuda" or "cuda:N"; the last two need the `cuda` feature.
//! let mut engine = open("cpu", &model.weights, &EngineOptions::default(), None)?;
//! let prompt = tokenizer.encode("The capital of France is", true)?;
//! let options = GenerateOptions::greedy(16).with_eos(&model.config.eos_token_ids);
//! let out = generate(engine.as_mut(), tokenizer, &prompt, &options, |event| {
//!     print!("{}", event.text);
//!     std::ops::ControlFlow::Continue(())
//! })?;
//! println!("\nfinished: {:?}", out.finish_reason);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

// build.rs sets `mixtral_no_kernels` when it could not compile the CUDA kernels; only rustdoc
// (`cfg(doc)`) may go on without them.
#[cfg(all(feature = "cuda", mixtral_no_kernels, not(doc)))]
compile_error!(
    "feature `cuda`: the CUDA kernels were not built (build.rs's warning above says why). Run \
     scripts/install-cuda-toolchain (no GPU needed), or point NVCC or CUDA_HOME at a CUDA 13.0 \
     nvcc, then build again. Without them only `cargo doc --features cuda` works."
);

pub mod capi;
pub mod checkpoint;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dtype;
pub mod engine;
pub mod generate;
pub mod kv;
pub mod load_display;
pub mod model;
pub mod packed;
pub mod quant;
pub mod random_model;
pub mod sampling;
pub mod serve;
#[cfg(feature = "server")]
pub mod server;
pub mod shard;
pub mod tokenizer;
pub mod weights;

pub use config::ModelConfig;
pub use engine::{Engine, EngineError, LogitsFor, RowSampler, SeqId, SeqStep, StepOutput};
pub use model::{LoadOptions, Model, ModelError};
