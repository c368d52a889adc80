//! [`Tracked`]: a request's [`TokenStream`] that records what it sees in the server [`Metrics`]:
//! time to first token from the request's arrival, the latency between tokens, and how the request
//! ended (finished, failed, or dropped by a client that went away).

use super::backend::{StreamEvent, TokenStream};
use super::metrics::{Metrics, Outcome};
use std::sync::Arc;
use std::time::Instant;

/// A token stream that measures itself.
#[derive(Debug)]
pub struct Tracked {
    stream: TokenStream,
    metrics: Arc<Metrics>,
    arrived: Instant,
    last: Option<Instant>,
    prompt_tokens: usize,
    ended: bool,
}

impl Tracked {
    /// Tracks `stream` of a request that arrived at `arrived` with `prompt_tokens` prompt tokens.
    pub fn new(
        stream: TokenStream,
        metrics: Arc<Metrics>,
        arrived: Instant,
        prompt_tokens: usize,
    ) -> Self {
        Tracked {
            stream,
            metrics,
            arrived,
            last: None,
            prompt_tokens,
            ended: false,
        }
    }

    /// The next event. A stream that ends without `Finished` or `Failed` (the backend dropped
    /// the request) reads as `Failed`.
    pub async fn next(&mut self) -> Option<StreamEvent> {
        if self.ended {
            return None;
        }
        let event = self.stream.next().await;
        let now = Instant::now();
        match &event {
            Some(StreamEvent::Token(_)) => {
                let since = self.last.unwrap_or(self.arrived);
                self.metrics
                    .token(now, self.last.is_none(), now.duration_since(since));
                self.last = Some(now);
            }
            Some(StreamEvent::Finished(_)) => self.end(Outcome::Finished),
            Some(StreamEvent::Failed(_)) => self.end(Outcome::Failed),
            None => {
                self.end(Outcome::Failed);
                return Some(StreamEvent::Failed("the engine dropped the request".into()));
            }
        }
        event
    }

    fn end(&mut self, outcome: Outcome) {
        self.ended = true;
        self.metrics.request(outcome, self.prompt_tokens);
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if !self.ended {
            self.metrics.request(Outcome::Aborted, self.prompt_tokens);
        }
    }
}
