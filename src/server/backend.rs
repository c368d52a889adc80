//! What the HTTP layer needs from whatever runs the model: [`Backend`] takes one validated
//! [`GenerationRequest`] (one sequence: prompt ids, limits, sampling, stops, log-probabilities) and
//! returns a [`TokenStream`] of [`StreamEvent`]s; dropping the stream aborts the request. [`Stats`]
//! feeds `/metrics`.

use crate::generate::FinishReason;
use crate::sampling::SamplingParams;
use std::task::{self, Context};
use tokio::sync::mpsc;

/// One sequence to generate, already validated against the model (ids in the vocabulary, prompt
/// plus `max_tokens` within the context).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    /// The prompt's token ids (BOS included where the caller wants it).
    pub prompt: Vec<u32>,
    /// Most tokens to generate (>= 1).
    pub max_tokens: usize,
    /// Temperature, top-k, top-p and seed (the repetition penalty stays off).
    pub sampling: SamplingParams,
    /// Texts that end the output (excluded from it).
    pub stop: Vec<String>,
    /// `Some(k)`: report each chosen token's log-probability and the `k` most likely alternatives.
    pub logprobs: Option<usize>,
    /// Added to the logit of each id before sampling.
    pub logit_bias: Vec<(u32, f32)>,
    /// Subtracted from the logit of every id generated at least once.
    pub presence_penalty: f32,
    /// Subtracted, times the count, from the logit of every id generated so far.
    pub frequency_penalty: f32,
}

impl GenerationRequest {
    /// True when the logits must be read and changed on the host (bias, penalties) or reported
    /// (log-probabilities); otherwise the engine may choose tokens on its device.
    pub fn needs_logits(&self) -> bool {
        self.logprobs.is_some()
            || !self.logit_bias.is_empty()
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }
}

/// Log-probabilities of one generated token, from the model's own distribution (before bias,
/// penalties, temperature and the top-k/top-p filters).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// `ln p(token)`.
    pub logprob: f64,
    /// The most likely ids and their log-probabilities, most likely first (ties to the lower id).
    pub top: Vec<(u32, f64)>,
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedToken {
    /// The id.
    pub id: u32,
    /// Text that became final with it (may be empty: held back, a special id, or a stop string).
    pub text: String,
    /// Present when the request asked for log-probabilities.
    pub logprob: Option<TokenLogprob>,
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    /// Why.
    pub reason: FinishReason,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
}

/// What a request's stream carries: tokens, then exactly one `Finished` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// The next token.
    Token(GeneratedToken),
    /// The request ended normally.
    Finished(Finished),
    /// The engine failed; the message says how.
    Failed(String),
}

/// Polls for a stream's next event (`Ready(None)` at its end).
type Poll = Box<dyn FnMut(&mut Context<'_>) -> task::Poll<Option<StreamEvent>> + Send + Sync>;

/// The events of one request. Dropping it aborts the request (its KV blocks are freed by the
/// backend's next step).
pub struct TokenStream {
    poll: Poll,
}

impl std::fmt::Debug for TokenStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenStream").finish_non_exhaustive()
    }
}

impl TokenStream {
    /// A stream and the sender a backend writes it with.
    pub fn channel() -> (mpsc::UnboundedSender<StreamEvent>, TokenStream) {
        let (sender, mut receiver) = mpsc::unbounded_channel();
        (
            sender,
            TokenStream::from_poll(move |cx| receiver.poll_recv(cx)),
        )
    }

    /// A stream whose events come from `poll` (`Ready(None)` once there are no more); dropping
    /// the stream drops `poll` and what it owns.
    pub fn from_poll(
        poll: impl FnMut(&mut Context<'_>) -> task::Poll<Option<StreamEvent>> + Send + Sync + 'static,
    ) -> Self {
        TokenStream {
            poll: Box::new(poll),
        }
    }

    /// The next event; `None` after the last one (or when the backend dropped the request).
    pub async fn next(&mut self) -> Option<StreamEvent> {
        std::future::poll_fn(|cx| (self.poll)(cx)).await
    }
}

/// Why a backend did not take a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The engine thread has stopped (an engine that died, or shutdown).
    #[error("the engine is not running: {0}")]
    Stopped(String),
    /// The backend refused the request itself (a limit the HTTP layer did not check).
    #[error("{0}")]
    Refused(String),
}

/// A point-in-time view of the backend, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    /// Sequences (one per choice) running in the engine now.
    pub running: usize,
    /// Sequences accepted and waiting for admission (new, or preempted).
    pub waiting: usize,
    /// KV-cache blocks held by sequences.
    pub kv_blocks_used: usize,
    /// KV-cache blocks free.
    pub kv_blocks_free: usize,
    /// Prompt tokens looked up in the prefix cache so far.
    pub prefix_cache_queries: u64,
    /// Of those, tokens found.
    pub prefix_cache_hits: u64,
    /// Engine steps run.
    pub steps: u64,
    /// Prompt tokens the engine computed (cache hits excluded, recomputation after preemption
    /// included).
    pub prefill_tokens: u64,
    /// Sequences preempted (their KV freed, to be computed again).
    pub preemptions: u64,
}

/// Runs generation requests. Implementations own the engine; `submit` never blocks on it.
pub trait Backend: Send + Sync {
    /// Queues `request`; its tokens arrive on the returned stream.
    fn submit(&self, request: GenerationRequest) -> Result<TokenStream, BackendError>;

    /// The current counts.
    fn stats(&self) -> Stats;

    /// `Err(why)` once the backend takes no more requests (for `/health`).
    fn health(&self) -> Result<(), String> {
        Ok(())
    }
}
