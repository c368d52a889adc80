//! Streamed replies as server-sent events: one `data: {json}` event per chunk (a chat reply opens
//! each choice with the assistant role, then content deltas; every choice ends with a chunk
//! holding its finish reason), an optional last chunk with `usage`, then `data: [DONE]`. A task
//! forwards the choices' tokens to the response body; when the client goes away the body is
//! dropped, the task stops at once and dropping the token streams aborts the requests.

use super::backend::{Finished, GeneratedToken, StreamEvent};
use super::errors::ApiError;
use super::openai::{ChatMessageOutput, ChatResponse, CompletionResponse, Usage};
use super::reply::{chat_choice, completion_choice, usage};
use super::routes::{request_id, unix_now, Endpoint, ServerState};
use super::tracked::Tracked;
use super::validate::Plan;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, SelectAll, StreamExt};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Events buffered between the forwarding task and the response body.
const BUFFER: usize = 64;

/// Builds chunks of one streamed reply.
struct Chunks {
    state: Arc<ServerState>,
    endpoint: Endpoint,
    id: String,
    created: u64,
    /// Bytes of text sent so far per choice (completion log-probabilities' `text_offset`).
    offsets: Vec<usize>,
}

impl Chunks {
    /// A chunk with choice `index`'s new `text` and `tokens`, and its end when `finished`.
    fn choice(
        &self,
        index: usize,
        text: String,
        tokens: &[GeneratedToken],
        finished: Option<&Finished>,
        role: bool,
    ) -> Event {
        let tokenizer = &self.state.model.tokenizer;
        let offset = self.offsets.get(index).copied().unwrap_or(0);
        match self.endpoint {
            Endpoint::Completion => self.completion(
                vec![completion_choice(
                    tokenizer, index, text, tokens, offset, finished,
                )],
                None,
            ),
            Endpoint::Chat => {
                let delta = ChatMessageOutput {
                    role: role.then_some("assistant"),
                    content: (!text.is_empty() || role).then_some(text),
                };
                self.chat(
                    vec![chat_choice(
                        tokenizer, index, delta, false, tokens, finished,
                    )],
                    None,
                )
            }
        }
    }

    /// The last chunk: no choices, the usage.
    fn usage(&self, usage: Usage) -> Event {
        match self.endpoint {
            Endpoint::Completion => self.completion(Vec::new(), Some(usage)),
            Endpoint::Chat => self.chat(Vec::new(), Some(usage)),
        }
    }

    fn completion(
        &self,
        choices: Vec<super::openai::CompletionChoice>,
        usage: Option<Usage>,
    ) -> Event {
        json_event(&CompletionResponse {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.state.model.id.clone(),
            choices,
            usage,
        })
    }

    fn chat(&self, choices: Vec<super::openai::ChatChoice>, usage: Option<Usage>) -> Event {
        json_event(&ChatResponse {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.state.model.id.clone(),
            choices,
            usage,
        })
    }
}

/// `data: <json>`.
fn json_event<T: serde::Serialize>(value: &T) -> Event {
    match serde_json::to_string(value) {
        Ok(json) => Event::default().data(json),
        Err(e) => error_event(&ApiError::server(format!("cannot encode a chunk: {e}"))),
    }
}

/// `data: {"error": ...}`.
fn error_event(error: &ApiError) -> Event {
    let json = serde_json::to_string(&error.body()).unwrap_or_else(|_| "{}".into());
    Event::default().data(json)
}

/// The streamed reply to `plan`, whose choices are `streams` (in choice order).
pub fn respond(
    state: Arc<ServerState>,
    endpoint: Endpoint,
    plan: Plan,
    streams: Vec<Tracked>,
) -> Response {
    let (sender, receiver) = mpsc::channel::<Event>(BUFFER);
    let chunks = Chunks {
        offsets: vec![0; streams.len()],
        state,
        endpoint,
        id: request_id(if endpoint == Endpoint::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        created: unix_now(),
    };
    tokio::spawn(async move {
        // Stop as soon as the client is gone (the body, and with it `receiver`, dropped); the
        // streams are dropped with this future, which aborts their requests.
        let closed = sender.clone();
        tokio::select! {
            () = closed.closed() => {}
            () = forward(chunks, plan, streams, sender) => {}
        }
    });
    let body = stream::unfold(receiver, |mut receiver| async move {
        receiver
            .recv()
            .await
            .map(|event| (Ok::<Event, Infallible>(event), receiver))
    });
    Sse::new(body).into_response()
}

/// One choice's events, tagged with its index.
fn indexed(
    index: usize,
    stream: Tracked,
) -> impl futures_util::Stream<Item = (usize, StreamEvent)> + Send {
    stream::unfold(stream, move |mut s| async move {
        s.next().await.map(|event| ((index, event), s))
    })
}

/// Sends every chunk, the usage chunk when asked for, and `[DONE]`.
async fn forward(
    mut chunks: Chunks,
    plan: Plan,
    streams: Vec<Tracked>,
    sender: mpsc::Sender<Event>,
) {
    let send = |event: Event| {
        let sender = sender.clone();
        async move { sender.send(event).await.is_ok() }
    };
    if chunks.endpoint == Endpoint::Chat {
        for index in 0..streams.len() {
            if !send(chunks.choice(index, String::new(), &[], None, true)).await {
                return;
            }
        }
    }
    let mut merged: SelectAll<_> = stream::select_all(
        streams
            .into_iter()
            .enumerate()
            .map(|(i, s)| Box::pin(indexed(i, s))),
    );
    let mut finished: Vec<Option<Finished>> = vec![None; plan.requests.len()];
    while let Some((index, event)) = merged.next().await {
        let chunk = match event {
            StreamEvent::Token(token) => {
                if token.text.is_empty() && token.logprob.is_none() {
                    continue;
                }
                let text = token.text.clone();
                let len = text.len();
                let chunk = chunks.choice(index, text, std::slice::from_ref(&token), None, false);
                if let Some(offset) = chunks.offsets.get_mut(index) {
                    *offset += len;
                }
                chunk
            }
            StreamEvent::Finished(end) => {
                if let Some(slot) = finished.get_mut(index) {
                    *slot = Some(end);
                }
                chunks.choice(index, String::new(), &[], Some(&end), false)
            }
            StreamEvent::Failed(message) => {
                let _ = send(error_event(&ApiError::server(message))).await;
                let _ = send(Event::default().data("[DONE]")).await;
                return;
            }
        };
        if !send(chunk).await {
            return;
        }
    }
    if plan.include_usage {
        let usage = usage(plan.prompt_tokens(), finished.iter().flatten(), plan.n);
        if !send(chunks.usage(usage)).await {
            return;
        }
    }
    let _ = send(Event::default().data("[DONE]")).await;
}
