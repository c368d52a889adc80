//! The OpenAI-compatible HTTP server behind `mixtral-serve` (feature `server`, on by default):
//! axum routes over a [`Backend`] that runs generation requests and streams their tokens.
//!
//! - [`args`]: `mixtral-serve`'s command line;
//! - [`openai`]: the request and reply JSON shapes;
//! - [`validate`]: a request body to a [`Plan`] of [`GenerationRequest`]s, every field checked;
//! - [`backend`]: the [`Backend`] trait, requests and token streams;
//! - [`handle_backend`]: [`HandleBackend`], the backend over the serving core's
//!   [`EngineHandle`](crate::serve::EngineHandle): continuous batching with prefix caching;
//! - [`routes`]: the router ([`router`]) and whole replies; [`sse`]: streamed replies;
//! - [`reply`]: choices, log-probabilities and usage; [`tracked`], [`metrics`]: `/metrics`;
//! - [`errors`]: [`ApiError`], the OpenAI-style error body.
//!
//! ```no_run
//! use mixtral::engine::{open, EngineOptions};
//! use mixtral::serve::SchedulerOptions;
//! use mixtral::server::{router, HandleBackend, ServedModel, ServerState};
//! use mixtral::{LoadOptions, Model};
//! use std::sync::Arc;
//!
//! # async fn serve() -> Result<(), Box<dyn std::error::Error>> {
//! let mut model = Model::load("models/mini-mixtral".as_ref(), &LoadOptions::default())?;
//! let tokenizer = Arc::new(model.tokenizer.take().expect("a tokenizer.json"));
//! // A pool of a given size: the CPU engine then caches prefixes.
//! let options = EngineOptions { kv_blocks: Some(1024), ..EngineOptions::default() };
//! let engine = open("cpu", &model.weights, &options, None)?;
//! let served = ServedModel {
//!     id: "mini-mixtral".into(),
//!     tokenizer: Arc::clone(&tokenizer),
//!     max_context: engine.max_context(),
//!     vocab: model.config.vocab_size,
//! };
//! let eos = model.config.eos_token_ids.clone();
//! let backend = HandleBackend::start(engine, tokenizer, eos, SchedulerOptions::default())?;
//! let app = router(Arc::new(ServerState::new(Arc::new(backend), served)));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(())
//! # }
//! ```

pub mod args;
pub mod backend;
pub mod errors;
pub mod handle_backend;
pub mod metrics;
pub mod openai;
pub mod reply;
pub mod routes;
pub mod sse;
pub mod tracked;
pub mod validate;

pub use backend::{
    Backend, BackendError, Finished, GeneratedToken, GenerationRequest, Stats, StreamEvent,
    TokenLogprob, TokenStream,
};
pub use errors::ApiError;
pub use handle_backend::HandleBackend;
pub use routes::{router, ServedModel, ServerState};
pub use validate::Plan;
