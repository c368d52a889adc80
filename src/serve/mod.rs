//! Serving: continuous batching over any [`Engine`](crate::Engine), with prefix caching, for
//! servers that link this crate.
//!
//! Two layers:
//! - [`Scheduler`], synchronous and engine-agnostic: [`Scheduler::add`] queues a [`Request`],
//!   [`Scheduler::abort`] ends one, and each [`Scheduler::step`] runs one engine step (decodes and
//!   chunked prefills mixed under a token budget, admission by free KV blocks, preemption by
//!   recompute when the pool runs out, first come first served) and returns the [`Event`]s it
//!   produced, tagged with their [`RequestId`];
//! - [`EngineHandle`], a thread owning the engine and a scheduler:
//!
//! ```no_run
//! use mixtral::engine::{open, EngineOptions};
//! use mixtral::generate::GenerateOptions;
//! use mixtral::serve::{EngineHandle, Event, Request, SchedulerOptions};
//! use mixtral::{LoadOptions, Model};
//! use std::sync::Arc;
//!
//! let mut model = Model::load("models/tiny-mixtral".as_ref(), &LoadOptions::default())?;
//! let tokenizer = Arc::new(model.tokenizer.take().expect("a tokenizer.json"));
//! // A pool of a given size: the CPU engine then caches prefixes (see `CpuEngineOptions`).
//! let options = EngineOptions { kv_blocks: Some(4096), ..EngineOptions::default() };
//! let engine = open("cpu", &model.weights, &options, None)?;
//! let handle = EngineHandle::spawn(engine, Arc::clone(&tokenizer), SchedulerOptions::default())?;
//! let prompt = tokenizer.encode("The capital of France is", true)?;
//! let options = GenerateOptions::greedy(16).with_eos(&model.config.eos_token_ids);
//! // From any thread; in async code `stream.recv().await` instead of `blocking_recv()`.
//! let mut stream = handle.submit(Request::new(prompt, options))?;
//! while let Some(event) = stream.blocking_recv() {
//!     match event {
//!         Event::Token { token, .. } => print!("{}", token.text),
//!         Event::Finished { reason, usage, .. } => println!("\n{reason}: {usage:?}"),
//!         Event::Error(e) => return Err(e.into()),
//!     }
//! }
//! println!("{:?}", handle.stats());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The handle's API: [`EngineHandle::spawn`]`(engine, tokenizer, options)`;
//! [`EngineHandle::submit`]`(Request) -> Result<RequestStream, ServeError>` (validated at once,
//! never blocks); [`RequestStream`] yields [`Event::Token`] (`choice`, [`GeneratedToken`]: id,
//! final text, index, optional [`TokenLogprob`] with top-k alternatives), then
//! [`Event::Finished`] (`choice`, [`FinishReason`](crate::generate::FinishReason), [`Usage`]:
//! prompt, completion and cached tokens) per choice, or one [`Event::Error`]; dropping the stream
//! aborts the request; [`EngineHandle::stats`] gives [`ServeStats`] (running and waiting, KV blocks
//! used and free, prefix-cache queries and hits, counters). Per-request state is public:
//! [`SequenceState`] (sampler, shared-tokenizer detokenizer, stop strings and ids, limits, bias,
//! penalties, log-probabilities).

mod event;
mod handle;
mod logits;
mod request;
mod scheduler;
mod sequence;
mod stats;

pub use event::{Event, GeneratedToken, TokenLogprob, Usage};
pub use handle::{EngineHandle, RequestStream};
pub use logits::{adjust, logprobs};
pub use request::{Request, RequestId, RequestLimits, ServeError};
pub use scheduler::{Scheduler, SchedulerOptions};
pub use sequence::SequenceState;
pub use stats::ServeStats;
