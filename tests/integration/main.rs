//! The integration tests that need no GPU, in one test binary (one link and one start instead of
//! thirty): each module is one area, run alone with its name as the filter, e.g.
//! `cargo test --test integration real_quant::`. The GPU tests are their own binaries
//! (`gpu_kernels`, `gpu_engine`, `gpu_fault`, `gpu_multi`), as is `cuda_codegen`.

mod c_header;
mod capi;
mod checkpoint_errors;
mod checkpoint_forms;
mod cli;
mod cli_shard;
#[path = "../common/mod.rs"]
mod common;
mod cpu_engine;
mod cpu_ops;
mod determinism;
mod engine_api;
mod fuzz_regressions;
mod generate;
mod golden;
mod load;
#[cfg(feature = "server")]
mod openai_client;
mod packed_matmul;
mod prefix_cache;
mod quant;
mod quant_formats;
mod quant_quality;
mod random_model;
mod real_quant;
mod sampling;
mod serve;
#[cfg(feature = "server")]
mod serve_cli;
mod serve_dist;
mod server_fuzz_corpus;
#[cfg(feature = "server")]
mod server_http;
mod shard;
mod tokenizer;
