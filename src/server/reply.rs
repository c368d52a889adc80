//! The pieces of replies built from generated tokens: choice objects of both endpoints (whole or
//! as streamed chunks), their log-probabilities, finish reasons and usage.

use super::backend::{Finished, GeneratedToken};
use super::openai::{
    ChatChoice, ChatLogprobs, ChatMessageOutput, ChatTokenLogprob, CompletionChoice,
    CompletionLogprobs, PromptTokensDetails, TopLogprob, Usage,
};
use crate::generate::FinishReason;
use crate::tokenizer::Tokenizer;
use std::collections::BTreeMap;

/// OpenAI's name of a finish reason: `length`, or `stop` (EOS, a stop string, or cancelled).
pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Eos | FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

/// The text of one token as log-probability entries show it: its vocabulary piece with
/// SentencePiece's word marker as a space (`<0x0A>` byte pieces stay as written; an unknown id is
/// shown as `<id>`).
pub fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer
        .id_to_token(id)
        .map(|piece| piece.replace('\u{2581}', " "))
        .unwrap_or_else(|_| format!("<{id}>"))
}

/// What one choice has produced so far (the whole reply of a non-streamed request).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChoiceState {
    /// The text.
    pub text: String,
    /// Every token.
    pub tokens: Vec<GeneratedToken>,
    /// How it ended, once it has.
    pub finished: Option<Finished>,
}

/// Usage of a request: `prompt_tokens` counted once per prompt, completion and cached tokens over
/// `finished` (every choice).
pub fn usage<'a>(
    prompt_tokens: usize,
    finished: impl Iterator<Item = &'a Finished>,
    n: usize,
) -> Usage {
    let mut completion = 0;
    let mut cached = 0;
    for (i, f) in finished.enumerate() {
        completion += f.completion_tokens;
        // Each prompt's cached tokens once, like its prompt tokens.
        if i % n.max(1) == 0 {
            cached += f.cached_tokens;
        }
    }
    Usage {
        prompt_tokens,
        completion_tokens: completion,
        total_tokens: prompt_tokens + completion,
        prompt_tokens_details: PromptTokensDetails {
            cached_tokens: cached,
        },
    }
}

/// Completion-format log-probabilities of `tokens`, whose texts start at byte `offset` of the
/// choice's text; `None` when they were not asked for.
pub fn completion_logprobs(
    tokenizer: &Tokenizer,
    tokens: &[GeneratedToken],
    mut offset: usize,
) -> Option<CompletionLogprobs> {
    let mut out = CompletionLogprobs::default();
    for token in tokens {
        let lp = token.logprob.as_ref()?;
        out.tokens.push(token_text(tokenizer, token.id));
        out.token_logprobs.push(lp.logprob);
        out.top_logprobs.push(
            lp.top
                .iter()
                .map(|&(id, l)| (token_text(tokenizer, id), l))
                .collect::<BTreeMap<_, _>>(),
        );
        out.text_offset.push(offset);
        offset += token.text.len();
    }
    Some(out)
}

/// Chat-format log-probabilities of `tokens`; `None` when they were not asked for.
pub fn chat_logprobs(tokenizer: &Tokenizer, tokens: &[GeneratedToken]) -> Option<ChatLogprobs> {
    let entry = |id: u32, logprob: f64| {
        let token = token_text(tokenizer, id);
        TopLogprob {
            bytes: token.as_bytes().to_vec(),
            token,
            logprob,
        }
    };
    let mut out = ChatLogprobs::default();
    for token in tokens {
        let lp = token.logprob.as_ref()?;
        let main = entry(token.id, lp.logprob);
        out.content.push(ChatTokenLogprob {
            token: main.token,
            logprob: main.logprob,
            bytes: main.bytes,
            top_logprobs: lp.top.iter().map(|&(id, l)| entry(id, l)).collect(),
        });
    }
    Some(out)
}

/// A completion choice: `text` and the `tokens` that made it (starting at byte `offset` of the
/// choice's whole text), finished or not.
pub fn completion_choice(
    tokenizer: &Tokenizer,
    index: usize,
    text: String,
    tokens: &[GeneratedToken],
    offset: usize,
    finished: Option<&Finished>,
) -> CompletionChoice {
    CompletionChoice {
        index,
        text,
        logprobs: completion_logprobs(tokenizer, tokens, offset).filter(|_| !tokens.is_empty()),
        finish_reason: finished.map(|f| finish_reason(f.reason)),
    }
}

/// A chat choice: the whole `message` (reply) or a `delta` (chunk).
pub fn chat_choice(
    tokenizer: &Tokenizer,
    index: usize,
    content: ChatMessageOutput,
    whole: bool,
    tokens: &[GeneratedToken],
    finished: Option<&Finished>,
) -> ChatChoice {
    let (message, delta) = if whole {
        (Some(content), None)
    } else {
        (None, Some(content))
    };
    ChatChoice {
        index,
        message,
        delta,
        logprobs: chat_logprobs(tokenizer, tokens).filter(|_| !tokens.is_empty()),
        finish_reason: finished.map(|f| finish_reason(f.reason)),
    }
}
