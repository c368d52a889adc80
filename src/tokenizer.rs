//! Text <-> token ids: `tokenizer.json` through the `tokenizers` crate, the chat template of
//! `tokenizer_config.json` rendered with minijinja, and streaming detokenization.
//!
//! STUB: interface only; implementation pending.

use std::path::{Path, PathBuf};

/// What went wrong loading a tokenizer or converting text.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// Placeholder.
    #[error("{path}: {message}")]
    Load {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
}

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `user`, `assistant` or `system`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A loaded tokenizer with its special tokens and chat template.
pub struct Tokenizer {}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and, if present, `dir/tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let _ = dir;
        todo!()
    }
    /// Encodes text; `add_bos` prepends the BOS token (exactly one).
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, TokenizerError> {
        let _ = (text, add_bos);
        todo!()
    }
    /// Decodes ids to text, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        let _ = ids;
        todo!()
    }
    /// Renders `messages` with the chat template (or the Mixtral `[INST]` fallback).
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, TokenizerError> {
        let _ = messages;
        todo!()
    }
    /// Renders and encodes a chat without adding special tokens again (one BOS).
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, TokenizerError> {
        let _ = messages;
        todo!()
    }
    /// A streaming decoder that turns ids into text pieces as they arrive.
    pub fn detokenizer(&self) -> Detokenizer<'_> {
        todo!()
    }
}

/// Incremental detokenizer: never drops a space, never splits a multi-byte character.
pub struct Detokenizer<'t> {
    _tokenizer: &'t Tokenizer,
}

impl Detokenizer<'_> {
    /// Adds one id; returns the text that became final (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        let _ = id;
        todo!()
    }
    /// Returns whatever text is still held back.
    pub fn finish(&mut self) -> Result<String, TokenizerError> {
        todo!()
    }
}
