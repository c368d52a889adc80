//! The batched step API that every backend (CPU reference, CUDA) implements.
//!
//! A step takes a batch of (sequence, new tokens, start position) and returns logits for the
//! positions asked for ([`Engine::step`]) or only the token chosen from each of them
//! ([`Engine::step_tokens`]: argmax or a seeded draw, on the device where the backend can).
//! Prefill is a step with many tokens of one sequence; decode is a step with one token for each of
//! many sequences. Sequences own blocks of the engine's paged KV cache from
//! [`Engine::new_sequence`] until [`Engine::free_sequence`].
//!
//! [`open`] builds any backend from a device string (`cpu`, `cuda`, `cuda:N`); every backend fails
//! with the one [`EngineError`].
//!
//! A token-step loop over one sequence (what a server runs, batching many):
//!
//! ```no_run
//! use mixtral::engine::{open, EngineOptions, RowSampler};
//! use mixtral::sampling::{Sampler, SamplingParams};
//! use mixtral::{LoadOptions, LogitsFor, Model, SeqStep};
//!
//! let model = Model::load("models/tiny-mixtral".as_ref(), &LoadOptions::default())?;
//! let tokenizer = model.tokenizer.as_ref().expect("the directory has a tokenizer.json");
//! let options = EngineOptions { max_sequences: Some(8), ..EngineOptions::default() };
//! let mut engine = open("cpu", &model.weights, &options, None)?;
//! let seq = engine.new_sequence()?;
//! let mut tokens = tokenizer.encode("The capital of France is", true)?;
//! let mut sampler = Sampler::new(SamplingParams { temperature: 0.7, seed: 1, ..SamplingParams::greedy() })?;
//! let mut fed = 0;
//! for _ in 0..16 {
//!     let step = [SeqStep { seq, tokens: &tokens[fed..], start_pos: fed, logits: LogitsFor::Last }];
//!     let mut rows = [RowSampler::new(&mut sampler, &tokens)];
//!     let next = match engine.step_tokens(&step, &mut rows) {
//!         Ok(ids) => ids[0],
//!         Err(e) if e.is_dead() => {
//!             // A sticky device fault: this engine refuses all further work; a server opens a new one.
//!             eprintln!("engine lost: {e}");
//!             return Err(e.into());
//!         }
//!         // Refused (bad token, context overflow, KV cache full): nothing changed.
//!         Err(e) => return Err(e.into()),
//!     };
//!     fed = tokens.len();
//!     tokens.push(next);
//! }
//! engine.free_sequence(seq)?;
//! println!("{}", tokenizer.decode(&tokens)?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod error;
mod open;
mod opt_in;
mod tokens;

pub use error::{BackendSource, EngineError};
pub use open::{check_parallel_supported, open, open_device, Device, EngineOptions, OpenError};
pub use opt_in::{KernelsFlagError, OptInKernels, UnknownKernel};
pub use tokens::{check_sampler_count, logits_rows, sample_on_host, RowSampler};

use crate::config::ModelConfig;

/// Identifies one sequence (one KV-cache block table) inside an engine.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct SeqId(pub u64);

/// Which positions of a [`SeqStep`] should produce logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LogitsFor {
    /// No logits (e.g. the first chunks of a long prefill).
    None,
    /// Only the last new token (generation).
    Last,
    /// Every new token (scoring, perplexity).
    All,
}

/// One sequence's part of a step.
#[derive(Debug, Clone, Copy)]
pub struct SeqStep<'a> {
    /// The sequence.
    pub seq: SeqId,
    /// New token ids, at positions `start_pos ..`; never empty.
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`. Must not exceed the sequence's cached length; a smaller value
    /// first truncates the cache to `start_pos` tokens (rewinding the sequence).
    pub start_pos: usize,
    /// Which positions produce logits.
    pub logits: LogitsFor,
}

/// Logits of a step: one row of `vocab` f32 values for each requested position, in batch order and
/// then position order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOutput {
    /// Vocabulary size (row length).
    pub vocab: usize,
    /// Row-major `[rows.len(), vocab]`.
    pub logits: Vec<f32>,
    /// For each row: (index into the step's batch, absolute position of the token).
    pub rows: Vec<(usize, usize)>,
}

impl StepOutput {
    /// Logits row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.logits[i * self.vocab..(i + 1) * self.vocab]
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when no logits were requested.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// A model executor with a paged KV cache, driven one batched step at a time.
pub trait Engine: Send {
    /// The model's hyper-parameters.
    fn config(&self) -> &ModelConfig;

    /// The largest number of tokens a sequence may hold.
    fn max_context(&self) -> usize;

    /// Starts an empty sequence.
    fn new_sequence(&mut self) -> Result<SeqId, EngineError>;

    /// Frees a sequence and returns its KV blocks to the pool.
    fn free_sequence(&mut self, seq: SeqId) -> Result<(), EngineError>;

    /// Tokens currently cached for `seq`.
    fn sequence_len(&self, seq: SeqId) -> Result<usize, EngineError>;

    /// KV blocks currently free in the pool.
    fn free_kv_blocks(&self) -> usize;

    /// Total KV blocks in the pool.
    fn total_kv_blocks(&self) -> usize;

    /// Runs one batched forward step; see [`SeqStep`]. Either every entry is applied or none is.
    fn step(&mut self, batch: &[SeqStep<'_>]) -> Result<StepOutput, EngineError>;

    /// Runs one batched forward step like [`Engine::step`] but returns only the token chosen
    /// from each logits row, in the same order: row `i` by `samplers[i]` (argmax for a greedy
    /// sampler, else its seeded draw, exactly as [`Sampler::sample`](crate::sampling::Sampler::sample)
    /// defines them). A sampler count other than the step's rows is
    /// [`EngineError::SamplerCount`] and changes nothing. A row whose logits are not finite is
    /// [`EngineError::NonFiniteLogits`] (device) or [`EngineError::Sampling`] (host); the step
    /// itself was applied.
    ///
    /// The default runs [`Engine::step`] and samples on the host ([`sample_on_host`]); a backend
    /// with device sampling overrides it to skip reading the logits back.
    fn step_tokens(
        &mut self,
        batch: &[SeqStep<'_>],
        samplers: &mut [RowSampler<'_>],
    ) -> Result<Vec<u32>, EngineError> {
        sample_on_host(self, batch, samplers)
    }

    /// Starts the empty sequence `seq` on the engine's cached KV blocks of the longest prefix of
    /// `tokens` it holds (whole KV blocks, always leaving the last token of `tokens` to compute) and
    /// returns how many tokens that is: the caller's next step starts at that position. The
    /// default (an engine without a prefix cache) caches nothing and returns 0. A sequence that
    /// is not empty is [`EngineError::SequenceNotEmpty`].
    fn reuse_prefix(&mut self, seq: SeqId, tokens: &[u32]) -> Result<usize, EngineError> {
        let len = self.sequence_len(seq)?;
        if len != 0 {
            return Err(EngineError::SequenceNotEmpty { seq, len });
        }
        let _ = tokens;
        Ok(0)
    }

    /// A new sequence holding the same tokens as `seq` and sharing its KV blocks (written blocks
    /// are copied on write), for several continuations of one prompt. The default is
    /// [`EngineError::Unsupported`]: the caller computes the prompt again in a new sequence.
    fn fork_sequence(&mut self, seq: SeqId) -> Result<SeqId, EngineError> {
        let _ = seq;
        Err(EngineError::Unsupported("fork_sequence"))
    }

    /// Tokens per KV block, when the engine says (for admission estimates; `None`, the default,
    /// leaves the caller to learn from [`EngineError::KvCacheFull`]).
    fn kv_block_size(&self) -> Option<usize> {
        None
    }

    /// One line on where the engine runs and what it holds (device, memory), for logs; `None`
    /// when there is nothing to say beyond the model (the default).
    fn describe(&self) -> Option<String> {
        None
    }
}
