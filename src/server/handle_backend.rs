//! [`HandleBackend`]: the server's [`Backend`] over the serving core's [`EngineHandle`]: requests
//! run together under continuous batching with prefix caching (see [`crate::serve`]).
//!
//! Each [`GenerationRequest`] (one choice: its seed is already `seed + j` for sample `j`) becomes
//! one [`Request`] with `n = 1`, the model's EOS ids added; its [`RequestStream`]'s events become
//! [`StreamEvent`]s (log-probabilities widened to f64, usage with the cached prompt tokens).
//! Dropping the [`TokenStream`] drops the request stream, which aborts the request: its KV blocks
//! are freed within one engine step. [`Backend::stats`] reads [`EngineHandle::stats`].

use super::backend::{
    Backend, BackendError, Finished, GeneratedToken, GenerationRequest, Stats, StreamEvent,
    TokenLogprob, TokenStream,
};
use crate::engine::Engine;
use crate::generate::GenerateOptions;
use crate::serve::{
    self, EngineHandle, Event, Request, RequestStream, SchedulerOptions, ServeError,
};
use crate::tokenizer::Tokenizer;
use std::sync::{Arc, Mutex};
use std::task::Poll;

/// A [`Backend`] running requests on an [`EngineHandle`].
pub struct HandleBackend {
    handle: EngineHandle,
    eos: Vec<u32>,
    /// Why the engine stopped, once a request has seen it stop.
    stopped: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for HandleBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandleBackend")
            .field("handle", &self.handle)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

impl HandleBackend {
    /// Starts the engine thread over `engine` with `options`; `eos` ends every request (the
    /// model's and the tokenizer's EOS ids).
    pub fn start(
        engine: Box<dyn Engine>,
        tokenizer: Arc<Tokenizer>,
        eos: Vec<u32>,
        options: SchedulerOptions,
    ) -> Result<Self, ServeError> {
        let handle = EngineHandle::spawn(engine, tokenizer, options)?;
        Ok(HandleBackend::new(handle, eos))
    }

    /// A backend over a running `handle`; `eos` ends every request.
    pub fn new(handle: EngineHandle, eos: Vec<u32>) -> Self {
        HandleBackend {
            handle,
            eos,
            stopped: Arc::new(Mutex::new(None)),
        }
    }

    /// The engine handle (its limits and stats).
    pub fn handle(&self) -> &EngineHandle {
        &self.handle
    }

    /// The serving core's request for `request`.
    fn core_request(&self, request: GenerationRequest) -> Request {
        Request {
            prompt: request.prompt,
            generate: GenerateOptions {
                max_new_tokens: request.max_tokens,
                sampling: request.sampling,
                eos_token_ids: self.eos.clone(),
                stop_strings: request.stop,
            },
            n: 1,
            logprobs: request.logprobs,
            logit_bias: request.logit_bias,
            presence_penalty: request.presence_penalty,
            frequency_penalty: request.frequency_penalty,
        }
    }

    /// Why the engine no longer runs, if it does not.
    fn stop_reason(&self) -> Option<String> {
        let seen = self.stopped.lock().ok().and_then(|s| s.clone());
        seen.or_else(|| {
            (!self.handle.is_running()).then(|| "the engine thread has exited".to_string())
        })
    }
}

impl Backend for HandleBackend {
    fn submit(&self, request: GenerationRequest) -> Result<TokenStream, BackendError> {
        if let Some(reason) = self.stop_reason() {
            return Err(BackendError::Stopped(reason));
        }
        let stream = self
            .handle
            .submit(self.core_request(request))
            .map_err(|e| match e {
                ServeError::Stopped => BackendError::Stopped(e.to_string()),
                other => BackendError::Refused(other.to_string()),
            })?;
        Ok(token_stream(stream, Arc::clone(&self.stopped)))
    }

    fn stats(&self) -> Stats {
        let s = self.handle.stats();
        Stats {
            running: s.running,
            waiting: s.waiting,
            kv_blocks_used: s.kv_blocks_used(),
            kv_blocks_free: s.kv_blocks_free,
            prefix_cache_queries: s.prefix_cache_queries,
            prefix_cache_hits: s.prefix_cache_hits,
            steps: s.steps,
            prefill_tokens: s.prefill_tokens,
            preemptions: s.preemptions,
        }
    }

    fn health(&self) -> Result<(), String> {
        self.stop_reason().map_or(Ok(()), Err)
    }
}

/// `stream`'s events as the HTTP layer's; an error saying the engine stopped is kept in
/// `stopped` (for `/health`).
fn token_stream(mut stream: RequestStream, stopped: Arc<Mutex<Option<String>>>) -> TokenStream {
    TokenStream::from_poll(move |cx| match stream.poll_recv(cx) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(None) => Poll::Ready(None),
        Poll::Ready(Some(event)) => {
            if let Event::Error(e) = &event {
                if stops_the_engine(e) {
                    if let Ok(mut s) = stopped.lock() {
                        s.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            Poll::Ready(Some(convert(event)))
        }
    })
}

/// True for an error after which the engine takes no more requests.
fn stops_the_engine(e: &ServeError) -> bool {
    match e {
        ServeError::Stopped => true,
        ServeError::Engine(e) => e.is_dead(),
        _ => false,
    }
}

/// One core event as the HTTP layer's.
fn convert(event: Event) -> StreamEvent {
    match event {
        Event::Token { token, .. } => StreamEvent::Token(GeneratedToken {
            id: token.id,
            text: token.text,
            logprob: token.logprob.map(|lp| TokenLogprob {
                logprob: widen(lp.logprob),
                top: lp.top.into_iter().map(|(id, l)| (id, widen(l))).collect(),
            }),
        }),
        Event::Finished { reason, usage, .. } => StreamEvent::Finished(finished(reason, usage)),
        Event::Error(e) => StreamEvent::Failed(e.to_string()),
    }
}

/// How a choice ended, with its token counts.
fn finished(reason: crate::generate::FinishReason, usage: serve::Usage) -> Finished {
    Finished {
        reason,
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        cached_tokens: usage.cached_tokens,
    }
}

/// `x` as the f64 nearest to its shortest decimal form, so that JSON shows `-1.25` rather than
/// the f32's binary expansion; differs from `x` by less than half an f32 ulp.
fn widen(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widening_keeps_the_f32_and_prints_short() {
        for x in [-1.25f32, -0.1, -13.734_567, 0.0, f32::MIN_POSITIVE] {
            let w = widen(x);
            assert_eq!(w as f32, x, "{x}");
            assert_eq!(w.to_string(), x.to_string());
        }
        assert_eq!(widen(f32::NEG_INFINITY), f64::NEG_INFINITY);
    }
}
