//! The CPU engine against Hugging Face transformers: for every golden fixture (tiny random
//! checkpoints written by transformers, see tests/fixtures/README.md) the engine must reproduce the
//! greedy continuation exactly (decoding incrementally through the KV cache), the teacher-forced
//! per-token log-probs to 1e-4, and the last position's logits; with every CPU kernel this
//! machine can run (scalar, AVX2, AVX-512), one after the other.

use crate::common;

use common::golden::{fixture_dirs, ids, read_golden};
use common::greedy::greedy_steps;
use common::numeric::max_abs_diff;
use mixtral::cpu::matmul::{set_active_kernel, Kernel};
use mixtral::cpu::{CpuEngine, CpuEngineOptions};
use mixtral::generate::perplexity;
use mixtral::{Engine, LoadOptions, LogitsFor, Model, SeqStep};
use serde_json::Value;
use std::path::Path;
use std::sync::Mutex;

const LOGPROB_TOLERANCE: f64 = 1e-4;
const LOGITS_REL_L2: f64 = 1e-5;

fn engine(dir: &Path) -> CpuEngine {
    let model = Model::load(dir, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let options = CpuEngineOptions {
        max_context: Some(256),
        block_size: 4,
        ..Default::default()
    };
    CpuEngine::new(model.weights.clone(), options).expect("engine")
}

/// Held while a test runs with a chosen kernel: the choice is process-wide.
static KERNEL_CHOICE: Mutex<()> = Mutex::new(());

/// Runs `check` with each kernel this CPU has, naming the kernel in a failure.
fn with_each_kernel(check: impl Fn(&str)) {
    let _only_me = KERNEL_CHOICE.lock().unwrap_or_else(|e| e.into_inner());
    for kernel in Kernel::available() {
        set_active_kernel(kernel).expect("available kernel");
        check(kernel.name());
    }
}

fn rel_l2(out: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len());
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&o, &r) in out.iter().zip(reference) {
        assert!(o.is_finite(), "non-finite logit");
        diff += (o as f64 - r).powi(2);
        norm += r * r;
    }
    (diff / norm).sqrt()
}

#[test]
fn greedy_tokens_match_transformers() {
    with_each_kernel(|kernel| {
        for dir in fixture_dirs() {
            let golden = read_golden(&dir);
            let mut engine = engine(&dir);
            let got = greedy_steps(&mut engine, &golden.prompt_ids, golden.greedy_ids.len());
            assert_eq!(got, golden.greedy_ids, "{} ({kernel})", dir.display());
            assert_eq!(
                engine.free_kv_blocks(),
                engine.total_kv_blocks(),
                "{}: blocks leaked",
                dir.display()
            );
        }
    });
}

#[test]
fn logprobs_and_perplexity_match_transformers() {
    with_each_kernel(|kernel| {
        for dir in fixture_dirs() {
            let golden = read_golden(&dir);
            let mut engine = engine(&dir);
            let sequence = golden.sequence();
            let scored = perplexity(&mut engine, &sequence).unwrap();
            assert_eq!(
                scored.token_logprobs.len(),
                golden.token_logprobs.len(),
                "{}",
                dir.display()
            );
            let worst = max_abs_diff(&scored.token_logprobs, &golden.token_logprobs);
            eprintln!(
                "{} ({kernel}): max |logprob diff| {worst:.2e}",
                dir.display()
            );
            assert!(
                worst <= LOGPROB_TOLERANCE,
                "{} ({kernel}): max |logprob diff| {worst:e}",
                dir.display()
            );
            let rel = (scored.perplexity - golden.perplexity).abs() / golden.perplexity;
            assert!(
                rel <= 1e-4,
                "{} ({kernel}): perplexity {} vs {}",
                dir.display(),
                scored.perplexity,
                golden.perplexity
            );
        }
    });
}

#[test]
fn last_logits_match_transformers() {
    with_each_kernel(|kernel| {
        for dir in fixture_dirs() {
            let golden = read_golden(&dir);
            let mut engine = engine(&dir);
            let sequence = golden.sequence();
            let seq = engine.new_sequence().unwrap();
            let out = engine
                .step(&[SeqStep {
                    seq,
                    tokens: &sequence,
                    start_pos: 0,
                    logits: LogitsFor::Last,
                }])
                .unwrap();
            let rel = rel_l2(out.row(0), &golden.last_logits);
            eprintln!(
                "{} ({kernel}): last-logits relative L2 error {rel:.2e}",
                dir.display()
            );
            assert!(
                rel <= LOGITS_REL_L2,
                "{} ({kernel}): relative L2 error of last logits {rel:e}",
                dir.display()
            );
        }
    });
}

#[test]
fn shipped_model_text_round_trips_like_transformers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-mixtral");
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let model = common::repo::tiny_mixtral();
    let tokenizer = model.tokenizer.as_ref().unwrap();
    let prompt_text = v["prompt_text"].as_str().unwrap();
    assert_eq!(
        tokenizer.encode(prompt_text, true).unwrap(),
        ids(&v, "prompt_ids")
    );
    let greedy_text = v["greedy_text"].as_str().unwrap();
    assert_eq!(
        tokenizer.decode(&ids(&v, "greedy_ids")).unwrap(),
        greedy_text
    );
    assert_eq!(model.config.eos_token_ids, vec![2]);
}
