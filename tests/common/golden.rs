//! The golden fixtures: what transformers computed on each checkpoint of `tests/fixtures/` and on
//! `models/tiny-mixtral` (`golden.json`: prompt, greedy continuation, per-token log-probs, last
//! logits, perplexity).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::repo::root;

/// One fixture's `golden.json`.
pub struct Golden {
    /// The prompt's token ids.
    pub prompt_ids: Vec<u32>,
    /// transformers' greedy continuation.
    pub greedy_ids: Vec<u32>,
    /// The log-prob of each token of prompt + continuation after the first.
    pub token_logprobs: Vec<f64>,
    /// The logits of the last position of prompt + continuation.
    pub last_logits: Vec<f64>,
    /// The perplexity of prompt + continuation.
    pub perplexity: f64,
}

impl Golden {
    /// The prompt followed by the greedy continuation: what the log-probs were computed over.
    pub fn sequence(&self) -> Vec<u32> {
        self.prompt_ids
            .iter()
            .chain(&self.greedy_ids)
            .copied()
            .collect()
    }
}

/// The ids under `key` of a JSON object.
pub fn ids(v: &Value, key: &str) -> Vec<u32> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key}"))
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The numbers under `key` of a JSON object.
pub fn floats(v: &Value, key: &str) -> Vec<f64> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// `dir/golden.json`.
pub fn read_golden(dir: &Path) -> Golden {
    let text = std::fs::read_to_string(dir.join("golden.json")).expect("golden.json");
    let v: Value = serde_json::from_str(&text).expect("golden json");
    Golden {
        prompt_ids: ids(&v, "prompt_ids"),
        greedy_ids: ids(&v, "greedy_ids"),
        token_logprobs: floats(&v, "token_logprobs"),
        last_logits: floats(&v, "last_logits"),
        perplexity: v["perplexity"].as_f64().expect("perplexity"),
    }
}

/// Every golden fixture of `tests/fixtures/` (sorted), then `models/tiny-mixtral`.
pub fn fixture_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root().join("tests/fixtures"))
        .expect("tests/fixtures")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("golden.json").exists() && p.join("config.json").exists())
        .collect();
    dirs.sort();
    dirs.push(root().join("models/tiny-mixtral"));
    assert!(
        dirs.len() >= 5,
        "expected the four golden fixtures and the shipped model, found {dirs:?}"
    );
    dirs
}
