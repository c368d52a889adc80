//! A whole `model.safetensors` for a fixed small Mixtral config (`mixtral_fuzz::weights_spec`; the
//! seed corpus holds its valid checkpoint): opening and taking the model's weights must either fail
//! with a typed error or give weights that the CPU engine runs, where one prefill step and a greedy
//! pick either succeed or fail with a typed error (non-finite weights give non-finite logits, which
//! sampling refuses).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mixtral::checkpoint::{Checkpoint, SINGLE_FILE};
use mixtral::config::ModelConfig;
use mixtral::cpu::{CpuEngine, CpuEngineOptions};
use mixtral::engine::{Engine, LogitsFor, SeqStep};
use mixtral::sampling::{Sampler, SamplingParams};
use mixtral::weights::ModelWeights;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

static SETUP: OnceLock<(PathBuf, ModelConfig)> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let (dir, config) = SETUP.get_or_init(|| {
        let config = mixtral_fuzz::weights_spec()
            .model_config()
            .expect("the spec's config is valid");
        (mixtral_fuzz::scratch_dir("weights"), config)
    });
    mixtral_fuzz::write(&dir.join(SINGLE_FILE), data);
    let Ok(checkpoint) = Checkpoint::open(dir) else {
        return;
    };
    let Ok(weights) = ModelWeights::from_checkpoint(&checkpoint, config) else {
        return;
    };
    for w in weights.all() {
        assert_eq!(w.data().len(), w.rows * w.cols);
    }
    let options = CpuEngineOptions {
        max_context: Some(8),
        block_size: 4,
        kv_blocks: Some(4),
        max_sequences: 2,
    };
    let mut engine = CpuEngine::new(Arc::new(weights), options).expect("valid engine options");
    let seq = engine.new_sequence().expect("a free sequence slot");
    let tokens = [1u32, 5, 9];
    let out = engine
        .step(&[SeqStep {
            seq,
            tokens: &tokens,
            start_pos: 0,
            logits: LogitsFor::Last,
        }])
        .expect("a valid step on valid weights");
    assert_eq!(out.logits.len(), config.vocab_size);
    let _ = std::hint::black_box(pick(&out.logits));
    engine.free_sequence(seq).expect("the sequence exists");
});

/// A greedy pick: refuses non-finite logits with a typed error.
fn pick(logits: &[f32]) -> Option<u32> {
    Sampler::new(SamplingParams::greedy())
        .ok()?
        .sample(logits, &[])
        .ok()
}
