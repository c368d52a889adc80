//! The typed weights of a Mixtral-family model, taken from a [`Checkpoint`] in one pass and checked
//! against the [`ModelConfig`]: every expected tensor present, with the expected shape.
//!
//! STUB: interface only; implementation pending.

use crate::checkpoint::{Checkpoint, TensorView};
use crate::config::ModelConfig;
use crate::dtype::WeightSlice;

/// A weight tensor whose whole shape was checked: `[rows, cols]` (vectors have `rows == 1`).
#[derive(Debug, Clone)]
pub struct Weight {
    /// Rows (output features for a projection).
    pub rows: usize,
    /// Columns (input features for a projection).
    pub cols: usize,
    /// Where the data lives.
    pub tensor: TensorView,
}

impl Weight {
    /// The elements, row-major `[rows, cols]`.
    pub fn data(&self) -> WeightSlice<'_> {
        self.tensor.data()
    }
}

/// One SwiGLU expert: `w2( silu(w1 x) * (w3 x) )`.
#[derive(Debug, Clone)]
pub struct ExpertWeights {
    /// Gate projection `[intermediate, hidden]`.
    pub w1: Weight,
    /// Down projection `[hidden, intermediate]`.
    pub w2: Weight,
    /// Up projection `[intermediate, hidden]`.
    pub w3: Weight,
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// RMSNorm before attention `[hidden]`.
    pub attn_norm: Weight,
    /// `[heads * head_dim, hidden]`.
    pub q_proj: Weight,
    /// `[kv_heads * head_dim, hidden]`.
    pub k_proj: Weight,
    /// `[kv_heads * head_dim, hidden]`.
    pub v_proj: Weight,
    /// `[hidden, heads * head_dim]`.
    pub o_proj: Weight,
    /// RMSNorm before the MoE block `[hidden]`.
    pub ffn_norm: Weight,
    /// Router `[experts, hidden]`; `None` for the dense (one-expert) case.
    pub router: Option<Weight>,
    /// The experts (one for the dense case).
    pub experts: Vec<ExpertWeights>,
}

/// All weights of a model.
#[derive(Debug)]
pub struct ModelWeights {
    /// The configuration the weights were checked against.
    pub config: ModelConfig,
    /// Token embedding `[vocab, hidden]`.
    pub embed: Weight,
    /// Decoder layers.
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm `[hidden]`.
    pub final_norm: Weight,
    /// LM head `[vocab, hidden]` (the embedding when tied).
    pub lm_head: Weight,
}

/// A tensor missing or of the wrong shape or type.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// Placeholder.
    #[error("{0}")]
    Invalid(String),
}

impl ModelWeights {
    /// Takes every weight of `config`'s model from `checkpoint`, checking names and shapes.
    pub fn from_checkpoint(
        checkpoint: &Checkpoint,
        config: &ModelConfig,
    ) -> Result<Self, WeightsError> {
        let _ = (checkpoint, config);
        todo!()
    }
}

impl ModelWeights {
    /// Reads every weight page once (so the first token does not pay the page faults), reporting
    /// progress as it goes.
    pub fn prefetch(&self, progress: &dyn Fn(crate::checkpoint::LoadProgress)) {
        let _ = progress;
        todo!()
    }
}
