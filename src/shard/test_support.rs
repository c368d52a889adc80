//! What the unit tests of the sharding modules share: the tiny model, a CPU engine over it, a
//! one-sequence step, and the check that several engines in step answer as one does.

use std::sync::Arc;

use crate::cpu::{CpuEngine, CpuEngineOptions};
use crate::engine::{Engine, LogitsFor, RowSampler, SeqId, SeqStep};
use crate::sampling::{Sampler, SamplingParams};
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

/// Drives `one` (a single engine) and `many` (engines in step behind one) through the same calls
/// and asserts equal answers: limits, a prefill's logits, the cache's state, a sampled step (the
/// ids and the samplers' streams), a refusal every engine makes (which leaves `many` usable), a
/// fork, a freed and a new sequence.
pub fn answers_like_one_engine(one: &mut dyn Engine, many: &mut dyn Engine) {
    assert_eq!(many.max_context(), one.max_context());
    assert_eq!(many.total_kv_blocks(), one.total_kv_blocks());
    let (a, b) = (one.new_sequence().unwrap(), many.new_sequence().unwrap());
    assert_eq!(a, b);
    let prompt = [1, 5, 9, 13];
    let want = one.step(&steps(a, &prompt, 0)).unwrap();
    assert_eq!(many.step(&steps(b, &prompt, 0)).unwrap(), want);
    assert_eq!(many.sequence_len(b).unwrap(), 4);
    assert_eq!(many.free_kv_blocks(), one.free_kv_blocks());
    let params = SamplingParams {
        temperature: 0.8,
        seed: 7,
        ..SamplingParams::greedy()
    };
    let (mut s1, mut s2) = (Sampler::new(params).unwrap(), Sampler::new(params).unwrap());
    let history = [1, 5, 9, 13, 3];
    let step = |e: &mut dyn Engine, seq, sampler: &mut Sampler| {
        let mut rows = [RowSampler::new(sampler, &history)];
        e.step_tokens(&steps(seq, &[3], 4), &mut rows).unwrap()
    };
    assert_eq!(step(many, b, &mut s2), step(one, a, &mut s1));
    assert_eq!(s2.rng().state(), s1.rng().state());
    let bad = SeqId(999);
    let e = many.step(&steps(bad, &[1], 0)).unwrap_err();
    assert_eq!(e, one.step(&steps(bad, &[1], 0)).unwrap_err());
    assert!(!e.is_dead(), "{e}");
    assert_eq!(
        many.fork_sequence(b).unwrap(),
        one.fork_sequence(a).unwrap()
    );
    many.free_sequence(b).unwrap();
    one.free_sequence(a).unwrap();
    assert_eq!(many.new_sequence().unwrap(), one.new_sequence().unwrap());
}
