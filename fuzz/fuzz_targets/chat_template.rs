//! `tokenizer_config.json` (special tokens and `chat_template`) or a `chat_template.jinja`, with the
//! tokenizer of `models/tiny-mixtral`: an input starting with `{` but not with a Jinja delimiter
//! (`{{`, `{%`, `{#`) is the config file, any other input is the template file. Loading must either
//! fail with a `TokenizerError` or give a tokenizer whose chat rendering and encoding of a few
//! conversations each succeed or fail with a `TokenizerError`, every id in the vocabulary.
//!
//! What an execution costs in the instrumented build (address sanitizer, coverage), and so how the
//! target keeps it small:
//! - A template input is swapped into the model's own tokenizer, loaded once
//!   (`Tokenizer::set_chat_template`), through the same compile as `chat_template.jinja`.
//! - A config input has to load a tokenizer with it: `Tokenizer::from_files` parses
//!   `tokenizer.json` twice, about 8 ms for even a small file here (30 ms for 1024 ids, seconds for
//!   the full 32,000). So it loads that file cut down to the special tokens and the 256
//!   byte-fallback tokens (ids below [`KEEP_IDS`]), with the same normalizer, decoder and added
//!   tokens; its templates' texts encode to byte tokens. `MIXTRAL_FUZZ_FULL_TOKENIZER=1` loads the
//!   full file instead (for replaying a corpus with `-runs=0`).
//! - Encoding and decoding cost about 15 us a byte here, and most templates render the same text
//!   for several conversations, so each distinct text is encoded once, and at most its first
//!   [`MAX_ENCODED`] bytes (only a template that loops renders more).
//! - A render that runs out of the library's budget (minijinja's fuel, or the bound on the
//!   rendered length) takes up to seconds here, so the conversations after it are not rendered:
//!   they would run out the same way.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mixtral::tokenizer::{ChatMessage, Tokenizer, TokenizerError};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// The model directory holding the real tokenizer files.
const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tiny-mixtral");

/// Ids kept by the cut-down tokenizer of config inputs: `<unk>`, `<s>`, `</s>` and `<0x00>` to
/// `<0xFF>` (no merges among them).
const KEEP_IDS: u64 = 259;

/// Bytes of each distinct rendered text that are encoded and decoded (cut at a character boundary).
const MAX_ENCODED: usize = 16 << 10;

/// The scratch directory and the `tokenizer.json` that config inputs load.
static SETUP: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();

fn setup() -> (PathBuf, PathBuf) {
    let dir = mixtral_fuzz::scratch_dir("chat-template");
    let real = Path::new(MODEL).join("tokenizer.json");
    if std::env::var_os("MIXTRAL_FUZZ_FULL_TOKENIZER").is_some() {
        return (dir, real);
    }
    let text = std::fs::read(&real).expect("read the model's tokenizer.json");
    let mut json: serde_json::Value = serde_json::from_slice(&text).expect("valid tokenizer.json");
    let model = &mut json["model"];
    let vocab = model["vocab"].as_object_mut().expect("a BPE vocab");
    vocab.retain(|_, id| id.as_u64().is_some_and(|id| id < KEEP_IDS));
    let kept: HashSet<String> = vocab.keys().cloned().collect();
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

/// The model's tokenizer (its own `tokenizer.json` and `tokenizer_config.json`), loaded once,
/// whose template each template input replaces.
static LOADED: OnceLock<Mutex<Tokenizer>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let (dir, config_tokenizer_json) = SETUP.get_or_init(setup);
    let model = Path::new(MODEL);
    let is_config = matches!(data, [b'{', second, ..] if !b"{%#".contains(second));
    if is_config {
        let config = dir.join("tokenizer_config.json");
        mixtral_fuzz::write(&config, data);
        if let Ok(tokenizer) = Tokenizer::from_files(config_tokenizer_json, Some(&config), None) {
            check(&tokenizer);
        }
        return;
    }
    let Ok(source) = String::from_utf8(data.to_vec()) else {
        return;
    };
    let loaded = LOADED.get_or_init(|| {
        Mutex::new(Tokenizer::from_dir(model).expect("the model's tokenizer loads"))
    });
    let mut tokenizer = loaded.lock().unwrap_or_else(|p| p.into_inner());
    if tokenizer
        .set_chat_template(source, Path::new("chat_template.jinja"))
        .is_ok()
    {
        check(&tokenizer);
    }
});

/// Renders every conversation, each succeeding or failing with a `TokenizerError`, and encodes and
/// decodes every distinct rendered text (up to [`MAX_ENCODED`] bytes): every id in the vocabulary,
/// decoding succeeding or failing with a `TokenizerError`.
fn check(tokenizer: &Tokenizer) {
    assert!((tokenizer.bos_id() as usize) < tokenizer.vocab_size());
    let mut encoded = HashSet::new();
    for messages in conversations() {
        let text = match tokenizer.render_chat(&messages) {
            Ok(text) => text,
            Err(TokenizerError::Render { message }) if ran_out_of_budget(&message) => return,
            Err(_) => continue,
        };
        let mut end = text.len().min(MAX_ENCODED);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let text = &text[..end];
        if encoded.contains(text) {
            continue;
        }
        if let Ok(ids) = tokenizer.encode_rendered(text) {
            assert!(ids.iter().all(|&id| (id as usize) < tokenizer.vocab_size()));
            let _ = tokenizer.decode(&ids);
        }
        encoded.insert(text.to_string());
    }
}

/// Whether a render error is the library's budget running out: minijinja's "ran out of fuel", or
/// the bound on the rendered length.
fn ran_out_of_budget(message: &str) -> bool {
    message.contains("ran out of fuel") || message.contains("the rendered chat is longer than")
}
