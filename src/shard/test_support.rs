//! What the unit tests of the sharding modules share: the tiny model, a CPU engine over it, a
//! one-sequence step.

use std::sync::Arc;

use crate::cpu::{CpuEngine, CpuEngineOptions};
use crate::engine::{LogitsFor, SeqId, SeqStep};
use crate::{LoadOptions, Model};

/// `models/tiny-mixtral`.
pub fn tiny_model() -> Model {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-mixtral");
    Model::load(&dir, &LoadOptions::default()).unwrap()
}

/// A CPU engine over `model` with a 64-token context and room for `max_sequences` sequences.
pub fn cpu(model: &Model, max_sequences: usize) -> CpuEngine {
    let options = CpuEngineOptions {
        max_context: Some(64),
        max_sequences,
        ..CpuEngineOptions::default()
    };
    CpuEngine::new(Arc::clone(&model.weights), options).unwrap()
}

/// A step of one sequence asking for its last token's logits.
pub fn steps(seq: SeqId, tokens: &[u32], start_pos: usize) -> [SeqStep<'_>; 1] {
    [SeqStep {
        seq,
        tokens,
        start_pos,
        logits: LogitsFor::Last,
    }]
}
