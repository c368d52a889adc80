//! [`Scheduler`]: the synchronous serving core over any [`Engine`]. Each [`Scheduler::step`] builds
//! one engine step and runs it:
//! - every running sequence gets its next tokens first, oldest first: one token for a decode, a
//!   chunk of its remaining prompt for a prefill (chunked prefill), within the per-step token
//!   budget (`max_num_batched_tokens`);
//! - then waiting sequences are admitted first come first served while the budget, the sequence
//!   limit and the engine's free KV blocks allow (the blocks of the sequence's whole remaining
//!   history, estimated with [`Engine::kv_block_size`]); an admitted sequence first takes what the
//!   engine's prefix cache holds of its history ([`Engine::reuse_prefix`]), and choice `i > 0` of a
//!   request forks choice 0 once its prompt is computed ([`Engine::fork_sequence`]);
//! - when the engine refuses the step because its KV pool is full, the newest running sequence is
//!   preempted (its blocks freed, its tokens kept to be computed again when it is re-admitted) and
//!   the step is built again without admissions; a sequence that does not fit even alone fails.
//!
//! A sequence whose step produced logits gets its next token (drawn by the engine, or on the host
//! when the request needs the logits: log-probabilities, bias, penalties). Preemption never
//! changes an output: the recomputed prefill gives the same logits (on a batch-invariant engine
//! such as the CPU one) and the sampler keeps its random stream.
//!
//! [`Scheduler::abort`] ends a request at once; its engine sequences are freed at the start of the
//! next step.

use super::event::Event;
use super::request::{Request, RequestId, RequestLimits, ServeError};
use super::sequence::SequenceState;
use super::stats::ServeStats;
use crate::engine::{Engine, EngineError, LogitsFor, RowSampler, SeqId, SeqStep};
use crate::generate::FinishReason;
use crate::tokenizer::Tokenizer;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// Limits of a [`Scheduler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerOptions {
    /// Most sequences (choices) running at once.
    pub max_num_seqs: usize,
    /// Most tokens in one engine step (decodes and prefill chunks together); at least 1.
    pub max_num_batched_tokens: usize,
    /// Start admitted sequences on the engine's cached prefix blocks.
    pub prefix_caching: bool,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        SchedulerOptions {
            max_num_seqs: 64,
            max_num_batched_tokens: 512,
            prefix_caching: true,
        }
    }
}

/// Orders sequences: first come first served, then by choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    arrival: u64,
    choice: usize,
}

/// A request's bookkeeping.
#[derive(Debug)]
struct Active {
    arrival: u64,
    /// Choices not yet finished.
    live: usize,
}

/// One sequence's part of a step being built.
#[derive(Debug, Clone, Copy)]
struct Planned {
    key: Key,
    start: usize,
    len: usize,
    /// The chunk ends at the history's end: the step produces its next token.
    logits: bool,
}

/// The serving core: requests in, engine steps run, events out. See the module docs.
pub struct Scheduler {
    tokenizer: Arc<Tokenizer>,
    options: SchedulerOptions,
    limits: RequestLimits,
    requests: HashMap<RequestId, Active>,
    seqs: BTreeMap<Key, SequenceState>,
    waiting: BTreeSet<Key>,
    running: BTreeSet<Key>,
    /// Engine sequences of aborted requests, freed at the next step.
    to_free: Vec<SeqId>,
    /// Events produced outside a step (aborts), returned by the next one.
    pending: Vec<(RequestId, Event)>,
    next_arrival: u64,
    stats: ServeStats,
    dead: Option<EngineError>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("options", &self.options)
            .field("running", &self.running.len())
            .field("waiting", &self.waiting.len())
            .finish_non_exhaustive()
    }
}

impl Scheduler {
    /// A scheduler for `engine`'s context and vocabulary, detokenizing with `tokenizer`.
    pub fn new(engine: &dyn Engine, tokenizer: Arc<Tokenizer>, options: SchedulerOptions) -> Self {
        Scheduler {
            tokenizer,
            options: SchedulerOptions {
                max_num_batched_tokens: options.max_num_batched_tokens.max(1),
                max_num_seqs: options.max_num_seqs.max(1),
                ..options
            },
            limits: RequestLimits {
                max_context: engine.max_context(),
                vocab_size: engine.config().vocab_size,
            },
            requests: HashMap::new(),
            seqs: BTreeMap::new(),
            waiting: BTreeSet::new(),
            running: BTreeSet::new(),
            to_free: Vec::new(),
            pending: Vec::new(),
            next_arrival: 0,
            stats: ServeStats::default(),
            dead: None,
        }
    }

    /// What requests are checked against.
    pub fn limits(&self) -> RequestLimits {
        self.limits
    }

    /// Queues `request` under `id` (chosen by the caller, unique among active requests) behind
    /// every request queued before. Refuses an invalid request, a duplicate id, and any request
    /// after the engine died ([`ServeError::Stopped`]).
    pub fn add(&mut self, id: RequestId, request: &Request) -> Result<(), ServeError> {
        if self.dead.is_some() {
            return Err(ServeError::Stopped);
        }
        if self.requests.contains_key(&id) {
            return Err(ServeError::DuplicateId(id));
        }
        request.validate(&self.limits)?;
        let states = (0..request.n)
            .map(|choice| SequenceState::new(Arc::clone(&self.tokenizer), id, request, choice))
            .collect::<Result<Vec<_>, _>>()?;
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        for state in states {
            let key = Key {
                arrival,
                choice: state.choice(),
            };
            self.seqs.insert(key, state);
            self.waiting.insert(key);
        }
        self.requests.insert(
            id,
            Active {
                arrival,
                live: request.n,
            },
        );
        Ok(())
    }

    /// Ends request `id` now: each unfinished choice yields `Finished` with reason `Cancelled`
    /// (returned by the next step) and its engine sequence is freed at the start of the next step.
    /// False when no such request is active.
    pub fn abort(&mut self, id: RequestId) -> bool {
        let Some(active) = self.requests.remove(&id) else {
            return false;
        };
        for key in self.keys_of(active.arrival) {
            self.waiting.remove(&key);
            self.running.remove(&key);
            if let Some(state) = self.seqs.remove(&key) {
                self.to_free.extend(state.engine_seq);
                self.pending.push((
                    id,
                    Event::Finished {
                        choice: state.choice(),
                        reason: FinishReason::Cancelled,
                        usage: state.usage(),
                    },
                ));
            }
        }
        self.stats.requests_aborted += 1;
        true
    }

    /// True while request `id` is active (not finished, aborted or failed).
    pub fn is_active(&self, id: RequestId) -> bool {
        self.requests.contains_key(&id)
    }

    /// True when a step has nothing to do: no request active, nothing to free, no event pending.
    pub fn is_idle(&self) -> bool {
        self.requests.is_empty() && self.to_free.is_empty() && self.pending.is_empty()
    }

    /// The engine failure that stopped this scheduler, if any.
    pub fn dead(&self) -> Option<&EngineError> {
        self.dead.as_ref()
    }

    /// Counts and gauges now.
    pub fn stats(&self, engine: &dyn Engine) -> ServeStats {
        ServeStats {
            requests: self.requests.len(),
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_blocks_total: engine.total_kv_blocks(),
            kv_blocks_free: engine.free_kv_blocks(),
            ..self.stats
        }
    }

    fn keys_of(&self, arrival: u64) -> Vec<Key> {
        let from = Key { arrival, choice: 0 };
        let to = Key {
            arrival,
            choice: usize::MAX,
        };
        self.seqs.range(from..=to).map(|(k, _)| *k).collect()
    }

    /// Runs one step: frees aborted sequences, builds the batch (preempting when the pool is
    /// full) and runs it, and returns every event produced since the last step, in order.
    pub fn step(&mut self, engine: &mut dyn Engine) -> Vec<(RequestId, Event)> {
        for seq in std::mem::take(&mut self.to_free) {
            // An engine that refuses to free a sequence it gave out is dead or broken; the error
            // shows again at its next step.
            let _ = engine.free_sequence(seq);
        }
        let mut events = std::mem::take(&mut self.pending);
        if self.dead.is_some() {
            return events;
        }
        let mut admit = true;
        loop {
            let planned = self.schedule(engine, admit, &mut events);
            if planned.is_empty() {
                break;
            }
            match self.run(engine, &planned) {
                Ok(ids) => {
                    self.finish_step(engine, &planned, ids, &mut events);
                    break;
                }
                Err(EngineError::KvCacheFull { free, .. }) => {
                    admit = false;
                    let Some(&victim) = self.running.last() else {
                        break;
                    };
                    if self.running.len() == 1 {
                        let id = self.seqs.get(&victim).map(|s| s.request());
                        if let Some(id) = id {
                            self.fail(engine, id, ServeError::DoesNotFit { free }, &mut events);
                        }
                    } else {
                        self.preempt(engine, victim);
                    }
                }
                Err(e) if e.is_dead() => {
                    let ids: Vec<RequestId> = self.requests.keys().copied().collect();
                    for id in ids {
                        self.fail(engine, id, ServeError::Engine(e.clone()), &mut events);
                    }
                    self.dead = Some(e);
                    break;
                }
                Err(e) => {
                    let mut ids: Vec<RequestId> = planned
                        .iter()
                        .filter_map(|p| self.seqs.get(&p.key).map(|s| s.request()))
                        .collect();
                    ids.dedup();
                    for id in ids {
                        self.fail(engine, id, ServeError::Engine(e.clone()), &mut events);
                    }
                    break;
                }
            }
        }
        events
    }

    /// Frees `key`'s engine sequence and puts it back in the waiting queue.
    fn preempt(&mut self, engine: &mut dyn Engine, key: Key) {
        self.running.remove(&key);
        if let Some(state) = self.seqs.get_mut(&key) {
            if let Some(seq) = state.engine_seq.take() {
                let _ = engine.free_sequence(seq);
            }
            state.computed = 0;
            if state.generated() == 0 {
                state.cached_tokens = None;
            }
        }
        self.waiting.insert(key);
        self.stats.preemptions += 1;
    }

    /// Ends request `id` with `error`: its engine sequences freed, one `Error` event.
    fn fail(
        &mut self,
        engine: &mut dyn Engine,
        id: RequestId,
        error: ServeError,
        events: &mut Vec<(RequestId, Event)>,
    ) {
        let Some(active) = self.requests.remove(&id) else {
            return;
        };
        for key in self.keys_of(active.arrival) {
            self.waiting.remove(&key);
            self.running.remove(&key);
            if let Some(seq) = self.seqs.remove(&key).and_then(|s| s.engine_seq) {
                let _ = engine.free_sequence(seq);
            }
        }
        self.stats.requests_failed += 1;
        events.push((id, Event::Error(error)));
    }

    /// Blocks needed to grow a sequence from `from` to `to` tokens, when the block size is known.
    fn blocks(block_size: Option<usize>, from: usize, to: usize) -> usize {
        block_size.map_or(0, |bs| to.div_ceil(bs) - from.div_ceil(bs))
    }

    /// The step's entries: the running sequences' next tokens, then admissions (see the module
    /// docs). Admitting creates the engine sequences.
    fn schedule(
        &mut self,
        engine: &mut dyn Engine,
        admit: bool,
        events: &mut Vec<(RequestId, Event)>,
    ) -> Vec<Planned> {
        let bs = engine.kv_block_size();
        let mut budget = self.options.max_num_batched_tokens;
        let mut planned = Vec::new();
        let mut reserved = 0;
        for &key in &self.running {
            let Some(s) = self.seqs.get(&key) else {
                continue;
            };
            if budget == 0 {
                break;
            }
            let remaining = s.history().len() - s.computed;
            let len = remaining.min(budget);
            budget -= len;
            reserved += Self::blocks(bs, s.computed, s.computed + len);
            planned.push(Planned {
                key,
                start: s.computed,
                len,
                logits: len == remaining,
            });
        }
        while admit && budget > 0 && self.running.len() < self.options.max_num_seqs {
            let Some(&key) = self.waiting.first() else {
                break;
            };
            match self.start_sequence(engine, key) {
                Ok(false) => break,
                Ok(true) => {}
                Err(error) => {
                    let id = self.seqs.get(&key).map(|s| s.request());
                    if let Some(id) = id {
                        self.fail(engine, id, error, events);
                    }
                    continue;
                }
            }
            let Some(s) = self.seqs.get(&key) else {
                break;
            };
            let total = s.history().len();
            // The whole remaining history (and one block of slack for copy-on-write or the next
            // decode) must fit beside what the step already needs, unless nothing else runs.
            let needed = Self::blocks(bs, s.computed, total) + usize::from(bs.is_some());
            let alone = self.running.is_empty() && planned.is_empty();
            if !alone && reserved + needed > engine.free_kv_blocks() {
                self.unstart(engine, key);
                break;
            }
            let remaining = total - s.computed;
            let len = remaining.min(budget);
            budget -= len;
            reserved += Self::blocks(bs, s.computed, s.computed + len);
            planned.push(Planned {
                key,
                start: s.computed,
                len,
                logits: len == remaining,
            });
            self.waiting.remove(&key);
            self.running.insert(key);
        }
        // A request failed while admitting may have had choices planned already.
        planned.retain(|p| self.seqs.contains_key(&p.key));
        planned.sort_by_key(|p| p.key);
        planned
    }

    /// Gives waiting sequence `key` an engine sequence: a fork of its request's choice 0 when that
    /// one's prompt is computed, else a new one started on the cached prefix. `Ok(false)` when it
    /// must wait (choice 0 still prefilling, or no engine sequence free).
    fn start_sequence(&mut self, engine: &mut dyn Engine, key: Key) -> Result<bool, ServeError> {
        let leader = Key {
            arrival: key.arrival,
            choice: 0,
        };
        let (fresh, prompt) = match self.seqs.get(&key) {
            Some(s) => (s.generated() == 0, s.history().len() - s.generated()),
            None => return Ok(false),
        };
        if key.choice > 0 && fresh && self.running.contains(&leader) {
            let (leader_seq, leader_computed, leader_cached) = match self.seqs.get(&leader) {
                Some(l) => (l.engine_seq, l.computed, l.cached_tokens),
                None => (None, 0, None),
            };
            if leader_computed < prompt {
                return Ok(false);
            }
            // Only right after choice 0's prompt step: the child then rewinds one token, which no
            // sliding window has released yet. Later it computes its prompt itself (the prefix
            // cache still serves it).
            if let Some(parent) = leader_seq.filter(|_| leader_computed == prompt) {
                match engine.fork_sequence(parent) {
                    Ok(seq) => {
                        self.stats.forks += 1;
                        if let Some(s) = self.seqs.get_mut(&key) {
                            s.engine_seq = Some(seq);
                            s.computed = prompt - 1;
                            s.cached_tokens = leader_cached;
                        }
                        return Ok(true);
                    }
                    Err(EngineError::Unsupported(_)) => {}
                    Err(EngineError::TooManySequences { .. }) => return Ok(false),
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let seq = match engine.new_sequence() {
            Ok(seq) => seq,
            Err(EngineError::TooManySequences { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let Some(s) = self.seqs.get_mut(&key) else {
            let _ = engine.free_sequence(seq);
            return Ok(false);
        };
        s.engine_seq = Some(seq);
        s.computed = 0;
        if self.options.prefix_caching {
            let history = s.history();
            let looked_up = history.len() as u64;
            match engine.reuse_prefix(seq, history) {
                Ok(cached) => {
                    s.computed = cached;
                    self.stats.prefix_cache_queries += looked_up;
                    self.stats.prefix_cache_hits += cached as u64;
                }
                Err(e) => {
                    let _ = engine.free_sequence(seq);
                    s.engine_seq = None;
                    return Err(e.into());
                }
            }
        }
        if s.cached_tokens.is_none() {
            s.cached_tokens = Some(s.computed.min(prompt));
        }
        Ok(true)
    }

    /// Undoes [`Scheduler::start_sequence`] of a sequence that is not admitted after all.
    fn unstart(&mut self, engine: &mut dyn Engine, key: Key) {
        if let Some(s) = self.seqs.get_mut(&key) {
            if let Some(seq) = s.engine_seq.take() {
                let _ = engine.free_sequence(seq);
            }
            s.computed = 0;
            if s.generated() == 0 {
                s.cached_tokens = None;
            }
        }
    }

    /// Runs the planned step: the next token of each entry with logits, in `planned` order, with
    /// its log-probabilities when asked for.
    #[allow(clippy::type_complexity)]
    fn run(
        &mut self,
        engine: &mut dyn Engine,
        planned: &[Planned],
    ) -> Result<Vec<Option<(u32, Option<super::event::TokenLogprob>)>>, EngineError> {
        let host = planned.iter().any(|p| {
            p.logits
                && self
                    .seqs
                    .get(&p.key)
                    .is_some_and(SequenceState::needs_logits)
        });
        let mut batch = Vec::with_capacity(planned.len());
        let mut samplers: Vec<RowSampler<'_>> = Vec::new();
        let mut wanted = planned.iter().peekable();
        for (key, s) in self.seqs.iter_mut() {
            let Some(p) = wanted.next_if(|p| p.key == *key) else {
                continue;
            };
            let Some(seq) = s.engine_seq else {
                return Err(EngineError::backend(format!(
                    "scheduled sequence {key:?} has no engine sequence"
                )));
            };
            let range = p.start..p.start + p.len;
            let (tokens, logits) = if p.logits && !host {
                let (history, sampler) = s.step_parts();
                samplers.push(sampler);
                (&history[range], LogitsFor::Last)
            } else {
                let s: &SequenceState = s;
                let logits = if p.logits {
                    LogitsFor::Last
                } else {
                    LogitsFor::None
                };
                (&s.history()[range], logits)
            };
            batch.push(SeqStep {
                seq,
                tokens,
                start_pos: p.start,
                logits,
            });
        }
        if batch.len() != planned.len() {
            return Err(EngineError::backend(format!(
                "{} of {} scheduled sequences found",
                batch.len(),
                planned.len()
            )));
        }
        self.stats.steps += 1;
        if !host {
            let ids = engine.step_tokens(&batch, &mut samplers)?;
            let mut ids = ids.into_iter();
            return Ok(planned
                .iter()
                .map(|p| {
                    if p.logits {
                        ids.next().map(|id| (id, None))
                    } else {
                        None
                    }
                })
                .collect());
        }
        let out = engine.step(&batch)?;
        drop(batch);
        let mut row = 0;
        let mut chosen = Vec::with_capacity(planned.len());
        for p in planned {
            if !p.logits {
                chosen.push(None);
                continue;
            }
            let Some(s) = self.seqs.get_mut(&p.key) else {
                chosen.push(None);
                continue;
            };
            if row >= out.len() {
                return Err(EngineError::backend("a step returned too few logits rows"));
            }
            let pick = s.choose(out.row(row)).map_err(|e| match e {
                ServeError::Sampling(source) => EngineError::Sampling { row, source },
                other => EngineError::backend(other.to_string()),
            })?;
            chosen.push(Some(pick));
            row += 1;
        }
        Ok(chosen)
    }

    /// Takes the step's tokens: advances every entry, streams the new tokens, ends the choices
    /// that finished.
    fn finish_step(
        &mut self,
        engine: &mut dyn Engine,
        planned: &[Planned],
        chosen: Vec<Option<(u32, Option<super::event::TokenLogprob>)>>,
        events: &mut Vec<(RequestId, Event)>,
    ) {
        for (p, pick) in planned.iter().zip(chosen) {
            let Some(s) = self.seqs.get_mut(&p.key) else {
                continue;
            };
            s.computed = p.start + p.len;
            if !p.logits {
                self.stats.prefill_tokens += p.len as u64;
                continue;
            }
            self.stats.prefill_tokens += p.len.saturating_sub(1) as u64;
            let Some((id, logprob)) = pick else {
                continue;
            };
            let request = s.request();
            let choice = s.choice();
            let (token, finished) = match s.accept(id, logprob) {
                Ok(accepted) => accepted,
                Err(error) => {
                    self.fail(engine, request, error, events);
                    continue;
                }
            };
            self.stats.generated_tokens += 1;
            events.push((request, Event::Token { choice, token }));
            let Some(reason) = finished else {
                continue;
            };
            let usage = s.usage();
            if let Some(seq) = s.engine_seq.take() {
                let _ = engine.free_sequence(seq);
            }
            self.seqs.remove(&p.key);
            self.running.remove(&p.key);
            events.push((
                request,
                Event::Finished {
                    choice,
                    reason,
                    usage,
                },
            ));
            if let Some(active) = self.requests.get_mut(&request) {
                active.live -= 1;
                if active.live == 0 {
                    self.requests.remove(&request);
                    self.stats.requests_finished += 1;
                }
            }
        }
    }
}
