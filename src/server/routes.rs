//! The HTTP routes: `POST /v1/completions`, `POST /v1/chat/completions` (whole replies here,
//! streamed ones in [`super::sse`]), `GET /v1/models`, `GET /health`, `GET /metrics`; any other
//! path or method is a JSON 404 / 405.

use super::backend::{Backend, BackendError, StreamEvent};
use super::errors::ApiError;
use super::metrics::Metrics;
use super::openai::{ChatMessageOutput, ChatResponse, CompletionResponse, ModelCard, ModelList};
use super::reply::{chat_choice, completion_choice, usage, ChoiceState};
use super::tracked::Tracked;
use super::validate::{self, ModelLimits, Plan};
use crate::tokenizer::Tokenizer;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The model a server serves, as requests are checked against it.
pub struct ServedModel {
    /// The name clients give as `model` (the directory's name unless set).
    pub id: String,
    /// Its tokenizer and chat template.
    pub tokenizer: Arc<Tokenizer>,
    /// Longest sequence, in tokens (the engine's context).
    pub max_context: usize,
    /// Token ids (the model's vocabulary size).
    pub vocab: usize,
}

/// Everything a request handler reads.
pub struct ServerState {
    /// Runs the requests.
    pub backend: Arc<dyn Backend>,
    /// The served model.
    pub model: ServedModel,
    /// What the HTTP layer measured.
    pub metrics: Arc<Metrics>,
    /// Unix seconds at start (the model card's `created`).
    pub created: u64,
}

impl ServerState {
    /// State for `model` served by `backend`, created now.
    pub fn new(backend: Arc<dyn Backend>, model: ServedModel) -> Self {
        ServerState {
            backend,
            model,
            metrics: Arc::new(Metrics::new()),
            created: unix_now(),
        }
    }

    /// What requests are validated against.
    pub fn limits(&self) -> ModelLimits<'_> {
        ModelLimits {
            id: &self.model.id,
            tokenizer: &self.model.tokenizer,
            max_context: self.model.max_context,
            vocab: self.model.vocab,
        }
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A new request id with `prefix` (`cmpl` or `chatcmpl`).
pub fn request_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        unix_now(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The server's routes over `state`.
pub fn router(state: Arc<ServerState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|uri: Uri| async move { ApiError::no_route(uri.path()) })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .with_state(state)
}

/// Which generation endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/completions`.
    Completion,
    /// `/v1/chat/completions`.
    Chat,
}

async fn completions(
    State(state): State<Arc<ServerState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generation(state, Endpoint::Completion, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions(
    State(state): State<Arc<ServerState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generation(state, Endpoint::Chat, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// Validates, submits every choice, then replies whole or streamed.
async fn generation(
    state: Arc<ServerState>,
    endpoint: Endpoint,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let body = body.map_err(|e| ApiError {
        status: e.status(),
        ..ApiError::invalid(
            None,
            format!("cannot read the request body: {}", e.body_text()),
        )
    })?;
    let limits = state.limits();
    let plan = match endpoint {
        Endpoint::Completion => validate::completion(&body, &limits)?,
        Endpoint::Chat => validate::chat(&body, &limits)?,
    };
    let mut streams = Vec::with_capacity(plan.requests.len());
    for request in &plan.requests {
        let prompt_tokens = request.prompt.len();
        let stream = state.backend.submit(request.clone()).map_err(|e| match e {
            BackendError::Stopped(_) => ApiError::unavailable(e.to_string()),
            BackendError::Refused(message) => ApiError::invalid(None, message),
        })?;
        streams.push(Tracked::new(
            stream,
            Arc::clone(&state.metrics),
            arrived,
            prompt_tokens,
        ));
    }
    if plan.stream {
        return Ok(super::sse::respond(state, endpoint, plan, streams));
    }
    let choices = futures_util::future::join_all(streams.into_iter().map(collect)).await;
    let choices = choices.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(whole_reply(&state, endpoint, &plan, choices))
}

/// Reads a stream to its end.
async fn collect(mut stream: Tracked) -> Result<ChoiceState, ApiError> {
    let mut choice = ChoiceState::default();
    while let Some(event) = stream.next().await {
        match event {
            StreamEvent::Token(token) => {
                choice.text.push_str(&token.text);
                choice.tokens.push(token);
            }
            StreamEvent::Finished(finished) => {
                choice.finished = Some(finished);
                return Ok(choice);
            }
            StreamEvent::Failed(message) => return Err(ApiError::server(message)),
        }
    }
    Err(ApiError::server("the engine dropped the request"))
}

/// The JSON reply of a non-streamed request.
fn whole_reply(
    state: &ServerState,
    endpoint: Endpoint,
    plan: &Plan,
    choices: Vec<ChoiceState>,
) -> Response {
    let tokenizer = &state.model.tokenizer;
    let usage = usage(
        plan.prompt_tokens(),
        choices.iter().filter_map(|c| c.finished.as_ref()),
        plan.n,
    );
    match endpoint {
        Endpoint::Completion => Json(CompletionResponse {
            id: request_id("cmpl"),
            object: "text_completion",
            created: unix_now(),
            model: state.model.id.clone(),
            choices: choices
                .into_iter()
                .enumerate()
                .map(|(i, c)| {
                    completion_choice(tokenizer, i, c.text, &c.tokens, 0, c.finished.as_ref())
                })
                .collect(),
            usage: Some(usage),
        })
        .into_response(),
        Endpoint::Chat => Json(ChatResponse {
            id: request_id("chatcmpl"),
            object: "chat.completion",
            created: unix_now(),
            model: state.model.id.clone(),
            choices: choices
                .into_iter()
                .enumerate()
                .map(|(i, c)| {
                    let message = ChatMessageOutput {
                        role: Some("assistant"),
                        content: Some(c.text),
                    };
                    chat_choice(tokenizer, i, message, true, &c.tokens, c.finished.as_ref())
                })
                .collect(),
            usage: Some(usage),
        })
        .into_response(),
    }
}

async fn models(State(state): State<Arc<ServerState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: state.model.id.clone(),
            object: "model",
            created: state.created,
            owned_by: "mixtral",
            max_model_len: state.model.max_context,
        }],
    })
}

async fn health(State(state): State<Arc<ServerState>>) -> Response {
    match state.backend.health() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(message) => ApiError::unavailable(message).into_response(),
    }
}

async fn metrics(State(state): State<Arc<ServerState>>) -> Response {
    let text = state.metrics.render(&state.backend.stats(), Instant::now());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
