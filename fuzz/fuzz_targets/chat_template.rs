//! `tokenizer_config.json` (special tokens and `chat_template`) or a `chat_template.jinja`, with the
//! tokenizer of `models/tiny-mixtral`: an input starting with `{` but not with a Jinja delimiter
//! (`{{`, `{%`, `{#`) is the config file, any other input is the template file (loaded beside the
//! model's own config). Loading must either fail with a `TokenizerError` or give a tokenizer whose
//! chat rendering and encoding of a few conversations each succeed or fail with a `TokenizerError`.
//!
//! A template input is swapped into a tokenizer loaded once (`Tokenizer::set_chat_template`); a
//! config input loads a tokenizer with it. The full 32000-token file takes seconds per load in an
//! instrumented build, so by default the target uses that file cut down to its
//! first 1024 ids (the byte-fallback tokens included) and the merges among them: the same
//! normalizer, pre-tokenizer, decoder and special tokens. `MIXTRAL_FUZZ_FULL_TOKENIZER=1` uses the
//! file as it is (for replaying a corpus with `-runs=0`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mixtral::tokenizer::{ChatMessage, Tokenizer};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

/// The model directory holding the real tokenizer files.
const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tiny-mixtral");

/// Ids kept by the cut-down tokenizer.
const KEEP_IDS: u64 = 1024;

/// The scratch directory and the `tokenizer.json` to load.
static SETUP: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();

fn setup() -> (PathBuf, PathBuf) {
    let dir = mixtral_fuzz::scratch_dir("chat-template");
    let real = std::path::Path::new(MODEL).join("tokenizer.json");
    if std::env::var_os("MIXTRAL_FUZZ_FULL_TOKENIZER").is_some() {
        return (dir, real);
    }
    let text = std::fs::read(&real).expect("read the model's tokenizer.json");
    let mut json: serde_json::Value = serde_json::from_slice(&text).expect("valid tokenizer.json");
    let model = &mut json["model"];
    let vocab = model["vocab"].as_object_mut().expect("a BPE vocab");
    vocab.retain(|_, id| id.as_u64().is_some_and(|id| id < KEEP_IDS));
    let kept: std::collections::HashSet<String> = vocab.keys().cloned().collect();
    let merges = model["merges"].as_array_mut().expect("BPE merges");
    merges.retain(|merge| {
        let pair: Vec<&str> = match merge {
            serde_json::Value::String(s) => s.splitn(2, ' ').collect(),
            serde_json::Value::Array(parts) => parts.iter().filter_map(|p| p.as_str()).collect(),
            _ => Vec::new(),
        };
        matches!(pair.as_slice(), [a, b]
            if kept.contains(*a) && kept.contains(*b) && kept.contains(&format!("{a}{b}")))
    });
    let cut = dir.join("tokenizer.json");
    mixtral_fuzz::write(&cut, &serde_json::to_vec(&json).expect("serialize"));
    (dir, cut)
}

/// Conversations every loaded template renders: the usual alternation, a system prompt, wrong
/// orders, an unknown role, empty and markup-bearing contents, no messages at all.
fn conversations() -> Vec<Vec<ChatMessage>> {
    vec![
        vec![ChatMessage::user("Hello")],
        vec![
            ChatMessage::system("Be brief."),
            ChatMessage::user("What is 2+2?"),
            ChatMessage::assistant("4"),
            ChatMessage::user("And 3+3?"),
        ],
        vec![
            ChatMessage::assistant("first"),
            ChatMessage::assistant("second"),
        ],
        vec![ChatMessage::new("tool", "{\"x\": 1}")],
        vec![
            ChatMessage::user(""),
            ChatMessage::assistant("[INST] <s></s> {{ x }} {% raw %}"),
        ],
        vec![ChatMessage::user("ünïcödé \u{0} \u{10FFFF} é")],
        vec![],
    ]
}

/// The model's tokenizer, loaded once, whose template each template input replaces.
static LOADED: OnceLock<Mutex<Tokenizer>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let (dir, tokenizer_json) = SETUP.get_or_init(setup);
    let model = std::path::Path::new(MODEL);
    let is_config = matches!(data, [b'{', second, ..] if !b"{%#".contains(second));
    if is_config {
        let config = dir.join("tokenizer_config.json");
        mixtral_fuzz::write(&config, data);
        if let Ok(tokenizer) = Tokenizer::from_files(tokenizer_json, Some(&config), None) {
            check(&tokenizer);
        }
        return;
    }
    // A template: swapped into the already loaded tokenizer (loading takes far longer than a
    // render), through the same compile as `chat_template.jinja`.
    let Ok(source) = String::from_utf8(data.to_vec()) else {
        return;
    };
    let loaded = LOADED.get_or_init(|| {
        Mutex::new(
            Tokenizer::from_files(
                tokenizer_json,
                Some(&model.join("tokenizer_config.json")),
                None,
            )
            .expect("the model's tokenizer loads"),
        )
    });
    let mut tokenizer = loaded.lock().unwrap_or_else(|p| p.into_inner());
    if tokenizer
        .set_chat_template(source, std::path::Path::new("chat_template.jinja"))
        .is_ok()
    {
        check(&tokenizer);
    }
});

/// Renders and encodes every conversation: each succeeds or fails with a `TokenizerError`.
fn check(tokenizer: &Tokenizer) {
    assert!((tokenizer.bos_id() as usize) < tokenizer.vocab_size());
    for messages in conversations() {
        if let Ok(text) = tokenizer.render_chat(&messages) {
            if let Ok(ids) = tokenizer.encode_rendered(&text) {
                assert!(ids.iter().all(|&id| (id as usize) < tokenizer.vocab_size()));
                let _ = tokenizer.decode(&ids);
            }
        }
    }
}
