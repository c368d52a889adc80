//! Streaming detokenization: token ids arrive one at a time, text leaves in pieces whose
//! concatenation is exactly `decode(all ids)`.
//!
//! Technique (prefix / read offset): the window holds the ids of the last emitted piece (the prefix,
//! `ids[..read]`) and the ids not yet emitted (`ids[read..]`). On each id the window is decoded and
//! the text beyond the prefix's own decoding is emitted. The prefix gives the new ids their context:
//! the decoder strips the leading space of the first token of a text only, so a token after the
//! first keeps its space.
//!
//! Text is held back while it cannot be final:
//! - after a byte-fallback id (`<0xE6>`): the decoder turns a run of consecutive byte tokens into
//!   text as a whole (invalid UTF-8 anywhere in the run makes every byte of it U+FFFD), so nothing
//!   of a run is final until a non-byte token ends it;
//! - while the decoded window ends in U+FFFD.
//!
//! Special ids are skipped (decode skips them) and never enter the window. A window is one emitted
//! piece plus the held ids, so the work per id is O(window), independent of the sequence length;
//! byte ids are only appended (no decoding) until their run ends.
//!
//! The detokenizer borrows its tokenizer (`Detokenizer<&Tokenizer>`) or shares it
//! (`Detokenizer<Arc<Tokenizer>>`, for state that outlives a borrow, e.g. a server's request).

use super::{TokenKind, Tokenizer, TokenizerError};
use std::ops::Deref;

/// Most ids of a caller's context kept as the first prefix.
const CONTEXT_IDS: usize = 8;

/// Incremental detokenizer: never drops a space, never splits a multi-byte character. `T` holds the
/// tokenizer: `&Tokenizer` or `Arc<Tokenizer>`.
pub struct Detokenizer<T: Deref<Target = Tokenizer>> {
    tokenizer: T,
    /// The prefix (already emitted, `ids[..read]`) followed by held ids.
    ids: Vec<u32>,
    /// Length of the prefix.
    read: usize,
    /// `decode(ids[..read])`.
    prefix_text: String,
}

impl<T: Deref<Target = Tokenizer>> std::fmt::Debug for Detokenizer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detokenizer")
            .field("ids", &self.ids)
            .field("read", &self.read)
            .finish()
    }
}

impl<T: Deref<Target = Tokenizer>> Detokenizer<T> {
    /// Starts at the beginning of a text.
    pub fn new(tokenizer: T) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            read: 0,
            prefix_text: String::new(),
        }
    }

    /// Starts after `context` (the prompt's ids, or its last few), whose last few non-special ids
    /// become the first prefix: the pieces are the text that `decode(context ++ generated)` has
    /// after `decode(context)`. An id the tokenizer does not know is an error.
    pub fn after(tokenizer: T, context: &[u32]) -> Result<Self, TokenizerError> {
        let mut kept = Vec::with_capacity(CONTEXT_IDS);
        for &id in context.iter().rev() {
            if kept.len() == CONTEXT_IDS {
                break;
            }
            if tokenizer.kind(id)? != TokenKind::Special {
                kept.push(id);
            }
        }
        kept.reverse();
        let prefix_text = tokenizer.decode_checked(&kept)?;
        Ok(Self {
            tokenizer,
            read: kept.len(),
            ids: kept,
            prefix_text,
        })
    }

    /// Adds one id; returns the text that became final (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        match self.tokenizer.kind(id)? {
            TokenKind::Special => Ok(String::new()),
            TokenKind::Byte => {
                self.ids.push(id);
                Ok(String::new())
            }
            _ => {
                self.ids.push(id);
                let text = self.tokenizer.decode_checked(&self.ids)?;
                if text.ends_with('\u{FFFD}') {
                    return Ok(String::new());
                }
                self.emit(text)
            }
        }
    }

    /// Returns whatever text is still held back (an unfinished character comes out as U+FFFD, as
    /// `decode` writes it). Later ids continue the same text.
    pub fn finish(&mut self) -> Result<String, TokenizerError> {
        if self.ids.len() == self.read {
            return Ok(String::new());
        }
        let text = self.tokenizer.decode_checked(&self.ids)?;
        self.emit(text)
    }

    /// Number of ids kept: the last emitted piece's ids plus the held ones (not the sequence length).
    pub fn window_len(&self) -> usize {
        self.ids.len()
    }

    /// Emits what `text` (the decoded window) has beyond the prefix, then makes the held ids the
    /// new prefix.
    fn emit(&mut self, text: String) -> Result<String, TokenizerError> {
        let piece = match text.strip_prefix(self.prefix_text.as_str()) {
            Some(piece) => piece.to_string(),
            // Only when a caller's context ended inside a multi-byte character that the new ids
            // complete: emit from the first difference.
            None => text
                .char_indices()
                .zip(self.prefix_text.chars())
                .find(|((_, a), b)| a != b)
                .and_then(|((at, _), _)| text.get(at..))
                .unwrap_or_default()
                .to_string(),
        };
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        self.prefix_text = self.tokenizer.decode_checked(&self.ids)?;
        Ok(piece)
    }
}
