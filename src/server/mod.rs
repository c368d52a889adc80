//! The OpenAI-compatible HTTP server behind `mixtral-serve` (feature `server`, on by default):
//! axum routes over a [`Backend`] that runs generation requests and streams their tokens.
//!
//! - [`args`]: `mixtral-serve`'s command line;
//! - [`openai`]: the request and reply JSON shapes;
//! - [`validate`]: a request body to a [`Plan`] of [`GenerationRequest`]s, every field checked;
//! - [`backend`]: the [`Backend`] trait, requests and token streams;
//! - [`engine_backend`]: [`EngineBackend`], a backend over an [`Engine`](crate::Engine), one
//!   request at a time on its own thread;
//! - [`routes`]: the router ([`router`]) and whole replies; [`sse`]: streamed replies;
//! - [`reply`]: choices, log-probabilities and usage; [`tracked`], [`metrics`]: `/metrics`;
//! - [`errors`]: [`ApiError`], the OpenAI-style error body.
//!
//! ```no_run
//! use mixtral::engine::{open, EngineOptions};
//! use mixtral::server::{router, EngineBackend, ServedModel, ServerState};
//! use mixtral::{LoadOptions, Model};
//! use std::sync::Arc;
//!
//! # async fn serve() -> Result<(), Box<dyn std::error::Error>> {
//! let mut model = Model::load("models/mini-mixtral".as_ref(), &LoadOptions::default())?;
//! let tokenizer = Arc::new(model.tokenizer.take().expect("a tokenizer.json"));
//! let engine = open("cpu", &model.weights, &EngineOptions::default(), None)?;
//! let served = ServedModel {
//!     id: "mini-mixtral".into(),
//!     tokenizer: Arc::clone(&tokenizer),
//!     max_context: engine.max_context(),
//!     vocab: model.config.vocab_size,
//! };
//! let backend = EngineBackend::start(engine, tokenizer, model.config.eos_token_ids.clone())?;
//! let app = router(Arc::new(ServerState::new(Arc::new(backend), served)));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(())
//! # }
//! ```

pub mod args;
pub mod backend;
pub mod engine_backend;
pub mod errors;
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
pub use engine_backend::EngineBackend;
pub use errors::ApiError;
pub use routes::{router, ServedModel, ServerState};
pub use validate::Plan;
