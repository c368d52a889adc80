//! [`EngineBackend`]: a [`Backend`] over the library's generation API. One thread owns the engine
//! and runs one request at a time, in arrival order, through [`generate`] (stop strings, EOS,
//! streaming detokenization); the HTTP side talks to it through channels. A request whose stream
//! was dropped is skipped if it has not started, and cancelled at its next token if it has (its
//! sequence is freed at once).
//!
//! Logit bias, presence and frequency penalties and log-probabilities need the logits on the host:
//! for those requests a `Processed` engine wraps the real one, reads each step's logits row
//! (`[vocab]`), keeps its log-softmax for the reply and changes the row before the host sampler
//! draws from it. Other requests use the engine's own token step (on a GPU, sampling on the device).

use super::backend::{
    Backend, BackendError, Finished, GeneratedToken, GenerationRequest, Stats, StreamEvent,
    TokenLogprob, TokenStream,
};
use crate::engine::{sample_on_host, Engine, EngineError, RowSampler, SeqId, SeqStep, StepOutput};
use crate::generate::{generate, GenerateError, GenerateOptions};
use crate::sampling::log_softmax;
use crate::tokenizer::Tokenizer;
use crate::ModelConfig;
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use tokio::sync::mpsc::UnboundedSender;

/// One queued request and where its events go.
struct Job {
    request: GenerationRequest,
    events: UnboundedSender<StreamEvent>,
}

/// Counts the engine thread publishes for [`Backend::stats`].
#[derive(Debug, Default)]
struct Shared {
    waiting: AtomicUsize,
    running: AtomicUsize,
    kv_free: AtomicUsize,
    kv_total: AtomicUsize,
    /// Why the engine thread stopped, once it has.
    stopped: Mutex<Option<String>>,
}

impl Shared {
    fn record_kv(&self, engine: &dyn Engine) {
        self.kv_free
            .store(engine.free_kv_blocks(), Ordering::Relaxed);
        self.kv_total
            .store(engine.total_kv_blocks(), Ordering::Relaxed);
    }

    fn stop(&self, reason: String) {
        if let Ok(mut stopped) = self.stopped.lock() {
            stopped.get_or_insert(reason);
        }
    }
}

/// A [`Backend`] that runs one request at a time on a thread owning the engine.
pub struct EngineBackend {
    jobs: mpsc::Sender<Job>,
    shared: Arc<Shared>,
}

impl EngineBackend {
    /// Starts the engine thread. `eos` ends every request (the model's and the tokenizer's EOS ids).
    pub fn start(
        engine: Box<dyn Engine>,
        tokenizer: Arc<Tokenizer>,
        eos: Vec<u32>,
    ) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        shared.record_kv(engine.as_ref());
        let worker = Worker {
            engine,
            tokenizer,
            eos,
            shared: Arc::clone(&shared),
        };
        std::thread::Builder::new()
            .name("mixtral-engine".into())
            .spawn(move || worker.run(queue))?;
        Ok(EngineBackend { jobs, shared })
    }
}

impl Backend for EngineBackend {
    fn submit(&self, request: GenerationRequest) -> Result<TokenStream, BackendError> {
        let stopped = |shared: &Shared| {
            let reason = shared.stopped.lock().ok().and_then(|s| s.clone());
            BackendError::Stopped(reason.unwrap_or_else(|| "the engine thread has exited".into()))
        };
        if self.shared.stopped.lock().is_ok_and(|s| s.is_some()) {
            return Err(stopped(&self.shared));
        }
        let (events, stream) = TokenStream::channel();
        self.shared.waiting.fetch_add(1, Ordering::Relaxed);
        if self.jobs.send(Job { request, events }).is_err() {
            self.shared.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(stopped(&self.shared));
        }
        Ok(stream)
    }

    fn stats(&self) -> Stats {
        let free = self.shared.kv_free.load(Ordering::Relaxed);
        let total = self.shared.kv_total.load(Ordering::Relaxed);
        Stats {
            running: self.shared.running.load(Ordering::Relaxed),
            waiting: self.shared.waiting.load(Ordering::Relaxed),
            kv_blocks_used: total.saturating_sub(free),
            kv_blocks_free: free,
            prefix_cache_queries: 0,
            prefix_cache_hits: 0,
        }
    }

    fn health(&self) -> Result<(), String> {
        match self.shared.stopped.lock() {
            Ok(stopped) => stopped.clone().map_or(Ok(()), Err),
            Err(_) => Err("the engine thread panicked".into()),
        }
    }
}

/// The engine thread's state.
struct Worker {
    engine: Box<dyn Engine>,
    tokenizer: Arc<Tokenizer>,
    eos: Vec<u32>,
    shared: Arc<Shared>,
}

impl Worker {
    /// Serves jobs until every sender is gone or the engine dies.
    fn run(mut self, queue: mpsc::Receiver<Job>) {
        while let Ok(job) = queue.recv() {
            self.shared.waiting.fetch_sub(1, Ordering::Relaxed);
            if job.events.is_closed() {
                continue;
            }
            self.shared.running.store(1, Ordering::Relaxed);
            let served = catch_unwind(AssertUnwindSafe(|| self.serve(&job)));
            self.shared.running.store(0, Ordering::Relaxed);
            self.shared.record_kv(self.engine.as_ref());
            let event = match served {
                Ok(Ok(finished)) => StreamEvent::Finished(finished),
                Ok(Err(error)) => {
                    let message = error.to_string();
                    if matches!(&error, GenerateError::Engine(e) if e.is_dead()) {
                        self.shared.stop(message.clone());
                        let _ = job.events.send(StreamEvent::Failed(message));
                        return;
                    }
                    StreamEvent::Failed(message)
                }
                Err(_) => StreamEvent::Failed("internal error: generation panicked".into()),
            };
            // The client may be gone; nothing to do then.
            let _ = job.events.send(event);
        }
        self.shared.stop("the server is shutting down".into());
    }

    /// Generates one request, sending each token as it comes.
    fn serve(&mut self, job: &Job) -> Result<Finished, GenerateError> {
        let request = &job.request;
        let options = GenerateOptions {
            max_new_tokens: request.max_tokens,
            sampling: request.sampling,
            eos_token_ids: self.eos.clone(),
            stop_strings: request.stop.clone(),
        };
        let last_row = Arc::new(Mutex::new(None));
        let mut engine = Processed {
            inner: self.engine.as_mut(),
            request,
            counts: HashMap::new(),
            last_row: Arc::clone(&last_row),
            shared: &self.shared,
        };
        let output = generate(
            &mut engine,
            &self.tokenizer,
            &request.prompt,
            &options,
            |event| {
                let logprob = request.logprobs.and_then(|k| {
                    let row = last_row.lock().ok()?.take()?;
                    Some(token_logprob(&row, event.id, k))
                });
                let token = GeneratedToken {
                    id: event.id,
                    text: event.text.clone(),
                    logprob,
                };
                match job.events.send(StreamEvent::Token(token)) {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(_) => ControlFlow::Break(()),
                }
            },
        )?;
        Ok(Finished {
            reason: output.finish_reason,
            prompt_tokens: output.prompt_ids.len(),
            completion_tokens: output.generated_ids.len(),
            cached_tokens: 0,
        })
    }
}

/// The log-probability of `id` in `row` (a log-softmax) and the `k` largest entries, largest
/// first, ties to the lower id.
fn token_logprob(row: &[f64], id: u32, k: usize) -> TokenLogprob {
    let logprob = usize::try_from(id)
        .ok()
        .and_then(|i| row.get(i))
        .copied()
        .unwrap_or(f64::NEG_INFINITY);
    let mut ranked: Vec<(u32, f64)> = (0u32..).zip(row.iter().copied()).collect();
    let by_rank = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let k = k.min(ranked.len());
    if k > 0 && k < ranked.len() {
        ranked.select_nth_unstable_by(k - 1, by_rank);
    }
    ranked.truncate(k);
    ranked.sort_by(by_rank);
    TokenLogprob {
        logprob,
        top: ranked,
    }
}

/// The engine as one request sees it: every call goes to `inner`; with bias, penalties or
/// log-probabilities the logits rows are read (log-softmax kept in `last_row`) and changed before
/// the host samples them. After each step the KV counts are published.
struct Processed<'a> {
    inner: &'a mut dyn Engine,
    request: &'a GenerationRequest,
    /// How often each id was generated so far (the penalties' counts).
    counts: HashMap<u32, u32>,
    /// The log-softmax of the last row, taken by the token callback.
    last_row: Arc<Mutex<Option<Vec<f64>>>>,
    shared: &'a Shared,
}

impl Processed<'_> {
    /// Adds the bias and subtracts the penalties, in place, from one `[vocab]` row.
    fn adjust(&self, row: &mut [f32]) {
        for &(id, bias) in &self.request.logit_bias {
            if let Some(x) = usize::try_from(id).ok().and_then(|i| row.get_mut(i)) {
                *x += bias;
            }
        }
        let (presence, frequency) = (
            self.request.presence_penalty,
            self.request.frequency_penalty,
        );
        for (&id, &count) in &self.counts {
            if let Some(x) = usize::try_from(id).ok().and_then(|i| row.get_mut(i)) {
                *x -= presence + frequency * count as f32;
            }
        }
    }
}

impl Engine for Processed<'_> {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }

    fn max_context(&self) -> usize {
        self.inner.max_context()
    }

    fn new_sequence(&mut self) -> Result<SeqId, EngineError> {
        self.inner.new_sequence()
    }

    fn free_sequence(&mut self, seq: SeqId) -> Result<(), EngineError> {
        let freed = self.inner.free_sequence(seq);
        self.shared.record_kv(&*self.inner);
        freed
    }

    fn sequence_len(&self, seq: SeqId) -> Result<usize, EngineError> {
        self.inner.sequence_len(seq)
    }

    fn free_kv_blocks(&self) -> usize {
        self.inner.free_kv_blocks()
    }

    fn total_kv_blocks(&self) -> usize {
        self.inner.total_kv_blocks()
    }

    fn step(&mut self, batch: &[SeqStep<'_>]) -> Result<StepOutput, EngineError> {
        let mut out = self.inner.step(batch);
        self.shared.record_kv(&*self.inner);
        if let Ok(out) = &mut out {
            let prompt_len = self.request.prompt.len();
            for entry in batch {
                for (position, &id) in (entry.start_pos..).zip(entry.tokens) {
                    if position >= prompt_len {
                        *self.counts.entry(id).or_default() += 1;
                    }
                }
            }
            let vocab = out.vocab.max(1);
            for i in 0..out.logits.len() / vocab {
                let Some(row) = out.logits.get_mut(i * vocab..(i + 1) * vocab) else {
                    break;
                };
                if self.request.logprobs.is_some() {
                    if let Ok(mut last) = self.last_row.lock() {
                        *last = Some(log_softmax(row));
                    }
                }
                self.adjust(row);
            }
        }
        out
    }

    fn step_tokens(
        &mut self,
        batch: &[SeqStep<'_>],
        samplers: &mut [RowSampler<'_>],
    ) -> Result<Vec<u32>, EngineError> {
        if self.request.needs_logits() {
            sample_on_host(self, batch, samplers)
        } else {
            let ids = self.inner.step_tokens(batch, samplers);
            self.shared.record_kv(&*self.inner);
            ids
        }
    }

    fn describe(&self) -> Option<String> {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_logprobs_are_ranked_with_ties_to_the_lower_id() {
        let row = [-3.0, -1.0, -2.0, -1.0, -5.0];
        let t = token_logprob(&row, 2, 3);
        assert_eq!(t.logprob, -2.0);
        assert_eq!(t.top, vec![(1, -1.0), (3, -1.0), (2, -2.0)]);
        assert_eq!(token_logprob(&row, 9, 0).logprob, f64::NEG_INFINITY);
        assert_eq!(token_logprob(&row, 0, 10).top.len(), 5);
    }
}
