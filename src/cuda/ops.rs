//! One planner per kernel family in `csrc/`, each in its own file beside its `.cu` file. A planner
//! holds only what a person decides: the shape rules beyond buffer extents, the compiled
//! instantiation, the grid. It fills the kernel's parameter struct through the generated
//! [`args`](super::args) (which checks every device view against what the kernel touches) and
//! issues the launches through [`launch`](super::launch). Nothing is allocated on the device and
//! nothing synchronises, so the calls can be captured into a CUDA graph; zero tokens / rows launch
//! nothing. Which family runs an op is decided by [`select`](super::select). A file declares its
//! launchers (`planned_launcher!`, the op's public entry points and their docs) after its imports,
//! then its planner, then the planner's GPU-free tests.
//!
//! Layouts (row-major): activations `[tokens, hidden]` bf16, residual stream `[tokens, hidden]` f32,
//! weights `[out, in]` bf16, paged KV cache `[num_blocks, block_size, n_kv_heads, head_dim]` bf16 per
//! layer, block tables `[num_seqs, max_blocks_per_seq]` i32. The exact semantics of each kernel are in
//! the header comment of its `csrc/*.cu` file and on its parameter struct in [`params`](super::params).

// Some re-exports serve only the crate's tests and benches (feature `testing`).
#![cfg_attr(not(feature = "testing"), allow(unused_imports))]

mod argmax;
pub use argmax::*;

mod embedding;
pub use embedding::*;

mod rmsnorm;
pub use rmsnorm::*;

#[cfg(test)]
pub(crate) mod fake;

mod linear;
pub use linear::*;

mod router;
pub use router::*;

mod moe_gemv;
pub use moe_gemv::*;

mod moe_grouped;
pub use crate::cuda::select::MOE_GROUPED_MIN_TOKENS;
pub use moe_grouped::*;

mod paged_cache;
pub use paged_cache::{attention_splits, PagedCacheShape};

mod rope_kv;
pub use rope_kv::*;

mod attention_decode;
pub use attention_decode::*;

mod attention_prefill;
pub use attention_prefill::*;

mod sample;
pub use sample::*;

mod fill;
pub use fill::*;

mod quant_layout;
pub use quant_layout::{mma_reads, PackedKernel, PackedView};

mod qlinear;
pub use qlinear::*;

mod qmoe;
pub use qmoe::*;

mod dequant;
pub use dequant::*;

mod hopper_check;
pub use hopper_check::*;

mod moe_cutlass;
pub use moe_cutlass::*;

mod linear_cutlass;
pub use linear_cutlass::*;
