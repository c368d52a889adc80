//! What a request's stream yields: generated tokens (with text and optional log-probabilities),
//! the end of each choice with its token counts, or an error.

use super::request::ServeError;
use crate::generate::FinishReason;

/// The log-probability of a generated token and the most likely tokens at its position
/// (natural log of the softmax of the model's logits, before bias, penalties and temperature).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// Log-probability of the generated token.
    pub logprob: f32,
    /// The `k` most likely (token id, log-probability), most likely first (ties to the lower id).
    pub top: Vec<(u32, f32)>,
}

/// One generated token of one choice.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedToken {
    /// The token id.
    pub id: u32,
    /// Text that became final with this token (possibly empty; text that could still become a stop
    /// string is held back; an EOS id and a stop string add none).
    pub text: String,
    /// Index of the token among the choice's generated ones (0-based).
    pub index: usize,
    /// Its log-probabilities, when the request asked for them.
    pub logprob: Option<TokenLogprob>,
}

/// Token counts of one finished choice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Tokens of the prompt (the same for every choice of a request).
    pub prompt_tokens: usize,
    /// Tokens this choice generated (an EOS id counts).
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache when the choice was first prefilled.
    pub cached_tokens: usize,
}

/// What a request's stream yields. Each choice yields its tokens in order, then one `Finished`;
/// the stream ends after the last choice's `Finished`, or after an `Error` (which ends every
/// choice of the request).
#[derive(Debug)]
pub enum Event {
    /// A generated token of choice `choice`.
    Token {
        /// The choice (0 .. n).
        choice: usize,
        /// The token.
        token: GeneratedToken,
    },
    /// Choice `choice` ended.
    Finished {
        /// The choice.
        choice: usize,
        /// Why: length, EOS, stop string, or cancelled (aborted).
        reason: FinishReason,
        /// Its token counts.
        usage: Usage,
    },
    /// The request failed; no more events follow.
    Error(ServeError),
}

impl Event {
    /// The token, when this is a `Token` event.
    pub fn token(&self) -> Option<&GeneratedToken> {
        match self {
            Event::Token { token, .. } => Some(token),
            _ => None,
        }
    }
}
