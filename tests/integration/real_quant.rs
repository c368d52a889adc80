//! Checkpoints written by the real quantization libraries (`tests/fixtures/real-quant/<name>/`,
//! made by `scripts/make-real-quant-fixtures.py`: llm-compressor / compressed-tensors, GPTQModel,
//! bitsandbytes on a tiny Mixtral) load through the crate and score like the library's own
//! dequantization run in transformers (f32): perplexity of a fixed token sequence within
//! [`PERPLEXITY_REL`] of `expected.json`'s, and the same greedy tokens from a fixed prompt.
//!
//! Every directory is checked; a checkpoint that does not load is a failure (named with the
//! loader's error), never a skip.

use crate::common;
use crate::common::numeric::argmax;

use common::repo::root;
use mixtral::cpu::{CpuEngine, CpuEngineOptions};
use mixtral::generate::perplexity;
use mixtral::{Engine, LoadOptions, LogitsFor, Model, SeqStep};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Largest relative perplexity difference from the library's own dequantization (the acceptance
/// bound of the quantized-format work). Both sides run f32 arithmetic on the same dequantized
/// weights, so only summation order differs: about 1e-6 relative in the logits, well under this.
/// A misread format (a wrong nibble order, zero point, scale layout or group index) moves
/// perplexity by far more: the 4-bit fixtures' perplexity differs from the bf16 model's by
/// several percent.
const PERPLEXITY_REL: f64 = 1e-3;

fn fixtures() -> Vec<PathBuf> {
    let dir = root().join("tests/fixtures/real-quant");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_dir())
        .collect();
    dirs.sort();
    dirs
}

fn json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids(v: &Value, key: &str) -> Vec<u32> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} missing"))
        .iter()
        .map(|x| u32::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

fn engine(model: &Model, max_context: usize) -> CpuEngine {
    let options = CpuEngineOptions {
        max_context: Some(max_context),
        max_sequences: 1,
        ..CpuEngineOptions::default()
    };
    CpuEngine::new(model.weights.clone(), options).unwrap()
}

/// `new_tokens` greedy tokens after `prompt`: one prefill step, then one decode step a token.
fn greedy(model: &Model, prompt: &[u32], new_tokens: usize) -> Vec<u32> {
    let mut engine = engine(model, prompt.len() + new_tokens);
    let seq = engine.new_sequence().unwrap();
    let mut out = Vec::with_capacity(new_tokens);
    let mut fed: Vec<u32> = prompt.to_vec();
    let mut start = 0;
    while out.len() < new_tokens {
        let step = engine
            .step(&[SeqStep {
                seq,
                tokens: &fed[start..],
                start_pos: start,
                logits: LogitsFor::Last,
            }])
            .unwrap();
        let next = argmax(step.row(0));
        out.push(next);
        start = fed.len();
        fed.push(next);
    }
    out
}

/// Loads and scores one fixture; `Err` says what went wrong.
fn check(dir: &Path) -> Result<String, String> {
    let expected = json(&dir.join("expected.json"));
    let model = Model::load(dir, &LoadOptions::default()).map_err(|e| format!("load: {e}"))?;
    let score_ids = ids(&expected, "score_ids");
    let mut scorer = engine(&model, score_ids.len());
    let scored = perplexity(&mut scorer, &score_ids).map_err(|e| format!("perplexity: {e}"))?;
    let want: Vec<f64> = expected["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(scored.token_logprobs.len(), want.len(), "{}", dir.display());
    let worst = scored
        .token_logprobs
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f64::max);
    let ppl = expected["perplexity"].as_f64().unwrap();
    let rel = (scored.perplexity - ppl).abs() / ppl;
    let prompt = ids(&expected, "prompt_ids");
    let want_greedy = ids(&expected, "greedy_ids");
    let got_greedy = greedy(&model, &prompt, want_greedy.len());
    let summary = format!(
        "perplexity {:.6} vs {ppl:.6} (relative {rel:.1e}), worst log-prob difference {worst:.1e}",
        scored.perplexity
    );
    if rel > PERPLEXITY_REL {
        return Err(format!("{summary}: over {PERPLEXITY_REL}"));
    }
    if got_greedy != want_greedy {
        return Err(format!(
            "{summary}; greedy {got_greedy:?} != expected {want_greedy:?}"
        ));
    }
    Ok(summary)
}

#[test]
fn real_library_checkpoints_score_like_their_libraries() {
    let dirs = fixtures();
    assert!(
        !dirs.is_empty(),
        "no fixtures under tests/fixtures/real-quant"
    );
    let mut failures = Vec::new();
    for dir in &dirs {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let library = json(&dir.join("expected.json"))["library"]
            .as_str()
            .unwrap_or("?")
            .to_owned();
        match check(dir) {
            Ok(summary) => eprintln!("ok   {name} ({library}): {summary}"),
            Err(why) => {
                eprintln!("FAIL {name} ({library}): {why}");
                failures.push(format!("{name}: {why}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} real-library checkpoints fail:\n{}",
        failures.len(),
        dirs.len(),
        failures.join("\n")
    );
}
