//! The pure-Rust reference backend: f32 compute over the memory-mapped weights.
//!
//! STUB: interface only; implementation pending.

use crate::engine::EngineError;
use crate::weights::ModelWeights;
use std::sync::Arc;

/// Options of a [`CpuEngine`].
#[derive(Debug, Clone)]
pub struct CpuEngineOptions {
    /// Longest sequence, in tokens; `None` = the model's `max_position_embeddings`.
    pub max_context: Option<usize>,
    /// Tokens per KV-cache block.
    pub block_size: usize,
    /// Blocks in the KV pool; `None` = enough for `max_sequences` full contexts.
    pub kv_blocks: Option<usize>,
    /// Most sequences alive at once.
    pub max_sequences: usize,
}

impl Default for CpuEngineOptions {
    fn default() -> Self {
        CpuEngineOptions {
            max_context: None,
            block_size: 16,
            kv_blocks: None,
            max_sequences: 256,
        }
    }
}

/// The CPU reference engine.
pub struct CpuEngine {
    _weights: Arc<ModelWeights>,
}

impl CpuEngine {
    /// Builds an engine over `weights`.
    pub fn new(weights: Arc<ModelWeights>, options: CpuEngineOptions) -> Result<Self, EngineError> {
        let _ = options;
        Ok(CpuEngine { _weights: weights })
    }
}
