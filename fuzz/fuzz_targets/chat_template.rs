//! `tokenizer_config.json` (special tokens and `chat_template`) or a `chat_template.jinja`, with the
//! real tokenizer of `models/tiny-mixtral`: an input starting with `{` but not with a Jinja
//! delimiter (`{{`, `{%`, `{#`) is the config file, any other input is the template file (loaded
//! beside the model's own config). Loading must either
//! fail with a `TokenizerError` or give a tokenizer whose chat rendering and encoding of a few
//! conversations each succeed or fail with a `TokenizerError`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mixtral::tokenizer::{ChatMessage, Tokenizer};
use std::path::PathBuf;
use std::sync::OnceLock;

/// The model directory holding the real tokenizer files.
const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tiny-mixtral");

static DIR: OnceLock<PathBuf> = OnceLock::new();

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

fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| mixtral_fuzz::scratch_dir("chat-template"));
    let model = std::path::Path::new(MODEL);
    let is_config = matches!(data, [b'{', second, ..] if !b"{%#".contains(second));
    let loaded = if is_config {
        let config = dir.join("tokenizer_config.json");
        mixtral_fuzz::write(&config, data);
        Tokenizer::from_files(&model.join("tokenizer.json"), Some(&config), None)
    } else {
        let template = dir.join("chat_template.jinja");
        mixtral_fuzz::write(&template, data);
        Tokenizer::from_files(
            &model.join("tokenizer.json"),
            Some(&model.join("tokenizer_config.json")),
            Some(&template),
        )
    };
    let Ok(tokenizer) = loaded else { return };
    assert!((tokenizer.bos_id() as usize) < tokenizer.vocab_size());
    for messages in conversations() {
        if let Ok(text) = tokenizer.render_chat(&messages) {
            if let Ok(ids) = tokenizer.encode_rendered(&text) {
                assert!(ids.iter().all(|&id| (id as usize) < tokenizer.vocab_size()));
                let _ = tokenizer.decode(&ids);
            }
        }
    }
});
