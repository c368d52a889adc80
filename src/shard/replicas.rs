//! [`Replicas`]: N engines driven in lockstep behind one [`Engine`]: the scheduling half of a
//! sharded engine whose ranks are whole engines (the sharded CUDA engine: one CUDA engine per GPU,
//! their collectives inside their forward passes).
//!
//! Each engine is built and owned by its own thread (it never moves: a CUDA engine stays with its
//! context's thread). Every [`Engine`] call runs on every engine, in the same order, so engines
//! whose bookkeeping is deterministic (the paged KV cache) stay identical; rank 0's answer is
//! returned. A refusal every rank makes (a bad request) leaves the replicas usable; a rank that
//! answers differently (one refusing what another did, a different sequence id), a dead rank, or
//! a rank that does not answer within the timeout (stuck, or its thread ended) makes them dead:
//! every later call fails with the first failure, and no call waits longer than the timeout.
//! Sampled ids are rank 0's; every rank draws with its own copy of the samplers, and rank 0's
//! advanced samplers are handed back.

use std::ops::Range;
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::checkpoint::LoadProgress;
use crate::config::ModelConfig;
use crate::engine::{Engine, EngineError, LogitsFor, RowSampler, SeqId, SeqStep, StepOutput};
use crate::sampling::Sampler;

/// Work for one rank's engine.
type Job<E> = Box<dyn FnOnce(&mut E) + Send>;

/// Builds one rank's engine, on that rank's thread, reporting its load progress to the closure it
/// is given.
pub type Build<E, B> = Box<dyn FnOnce(&dyn Fn(LoadProgress)) -> Result<E, B> + Send>;

/// What a rank's thread reports while it builds.
enum Building<B> {
    /// Its load progress.
    Progress(LoadProgress),
    /// Its engine's limits (`max_context`, KV block size), or why it did not build.
    Built(Result<(usize, Option<usize>), B>),
}

/// Why the replicas could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError<B> {
    /// A rank's engine refused to build.
    #[error("rank {rank}: {error}")]
    Build {
        /// The rank.
        rank: usize,
        /// Its error.
        error: B,
    },
    /// A rank's thread could not start, ended without answering, or did not build in time.
    #[error("rank {rank}: {reason}")]
    Worker {
        /// The rank.
        rank: usize,
        /// What happened.
        reason: String,
    },
}

/// One rank's thread.
struct Worker<E> {
    jobs: Option<Sender<Job<E>>>,
    thread: Option<JoinHandle<()>>,
}

/// N engines in lockstep (see the module docs).
pub struct Replicas<E: Engine + 'static> {
    config: ModelConfig,
    timeout: Duration,
    workers: Vec<Worker<E>>,
    max_context: usize,
    block_size: Option<usize>,
    /// The first failure; then every call fails with it.
    dead: Option<EngineError>,
}

impl<E: Engine + 'static> std::fmt::Debug for Replicas<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicas")
            .field("ranks", &self.workers.len())
            .field("dead", &self.dead)
            .finish_non_exhaustive()
    }
}

impl<E: Engine + 'static> Replicas<E> {
    /// Starts one thread per builder (rank `r` runs `builds[r]`), all at once (their builds may
    /// wait for each other, e.g. in collectives), and waits up to `timeout` for every engine,
    /// reporting the sum of the ranks' load progress to `progress` on the caller's thread.
    /// `config` is what [`Engine::config`] answers (the whole model's). A rank that fails to
    /// build is [`SpawnError::Build`]; the others are then left to end on their own.
    pub fn spawn<B: Send + 'static>(
        config: ModelConfig,
        timeout: Duration,
        builds: Vec<Build<E, B>>,
        progress: Option<&dyn Fn(LoadProgress)>,
    ) -> Result<Self, SpawnError<B>> {
        let ranks = builds.len();
        let (built_tx, built_rx) = channel::<(usize, Building<B>)>();
        let mut workers = Vec::with_capacity(ranks);
        for (rank, build) in builds.into_iter().enumerate() {
            let built = built_tx.clone();
            let (jobs, job_rx) = channel::<Job<E>>();
            let thread = std::thread::Builder::new()
                .name(format!("rank-{rank}"))
                .spawn(move || {
                    let report = |p: LoadProgress| {
                        let _ = built.send((rank, Building::Progress(p)));
                    };
                    let mut engine = match build(&report) {
                        Ok(e) => e,
                        Err(e) => {
                            let _ = built.send((rank, Building::Built(Err(e))));
                            return;
                        }
                    };
                    let limits = (engine.max_context(), engine.kv_block_size());
                    if built.send((rank, Building::Built(Ok(limits)))).is_err() {
                        return;
                    }
                    drop(built);
                    for job in job_rx {
                        job(&mut engine);
                    }
                })
                .map_err(|e| SpawnError::Worker {
                    rank,
                    reason: format!("cannot start its thread: {e}"),
                })?;
            workers.push(Worker {
                jobs: Some(jobs),
                thread: Some(thread),
            });
        }
        drop(built_tx);
        let mut replicas = Replicas {
            config,
            timeout,
            workers,
            max_context: 0,
            block_size: None,
            dead: None,
        };
        let deadline = Instant::now() + timeout;
        let mut limits = vec![None; ranks];
        let mut loaded = vec![LoadProgress::default(); ranks];
        while limits.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            let (rank, result) = match built_rx.recv_timeout(left) {
                Ok(answer) => answer,
                Err(_) => {
                    let missing = limits.iter().position(Option::is_none).unwrap_or(0);
                    replicas.abandon();
                    return Err(SpawnError::Worker {
                        rank: missing,
                        reason: format!(
                            "not built within {timeout:?} (stuck, or its thread ended)"
                        ),
                    });
                }
            };
            match result {
                Building::Progress(p) => {
                    loaded[rank] = p;
                    if let Some(report) = progress {
                        report(LoadProgress {
                            done_bytes: loaded.iter().map(|l| l.done_bytes).sum(),
                            total_bytes: loaded.iter().map(|l| l.total_bytes).sum(),
                        });
                    }
                }
                Building::Built(Ok(l)) => limits[rank] = Some(l),
                Building::Built(Err(error)) => {
                    // The other ranks may wait for this one (in a collective): leave them.
                    replicas.abandon();
                    return Err(SpawnError::Build { rank, error });
                }
            }
        }
        if let Some(Some((max_context, block_size))) = limits.first() {
            (replicas.max_context, replicas.block_size) = (*max_context, *block_size);
        }
        Ok(replicas)
    }

    /// Ranks.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// True with no rank.
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Gives up on the rank threads without waiting for them (they may be stuck on a device).
    fn abandon(&mut self) {
        for w in &mut self.workers {
            w.jobs = None;
            w.thread = None;
        }
    }

    /// Runs `f` on the engines of `ranks`, each on its own thread, and returns their answers in
    /// rank order; a rank that does not answer in time, or whose thread is gone, is a dead error.
    pub fn on_ranks<R: Send + 'static>(
        &self,
        ranks: Range<usize>,
        f: impl Fn(&mut E) -> R + Send + Sync + 'static,
    ) -> Result<Vec<R>, EngineError> {
        if let Some(e) = &self.dead {
            return Err(e.clone());
        }
        let f = Arc::new(f);
        let (tx, rx) = channel::<(usize, R)>();
        for rank in ranks.clone() {
            let (f, tx) = (Arc::clone(&f), tx.clone());
            let job: Job<E> = Box::new(move |engine| {
                let _ = tx.send((rank, f(engine)));
            });
            let sent = self
                .workers
                .get(rank)
                .and_then(|w| w.jobs.as_ref())
                .map(|jobs| jobs.send(job));
            if !matches!(sent, Some(Ok(()))) {
                return Err(rank_failed(rank, "its thread has ended"));
            }
        }
        drop(tx);
        let deadline = Instant::now() + self.timeout;
        let mut answers: Vec<Option<R>> = ranks.clone().map(|_| None).collect();
        for _ in ranks.clone() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((rank, r)) => answers[rank - ranks.start] = Some(r),
                Err(_) => {
                    let missing = answers.iter().position(Option::is_none).unwrap_or(0);
                    let why = format!(
                        "no answer within {:?} (stuck, or its thread ended)",
                        self.timeout
                    );
                    return Err(rank_failed(ranks.start + missing, &why));
                }
            }
        }
        Ok(answers.into_iter().flatten().collect())
    }

    /// [`Replicas::on_ranks`] over every rank, with rank 0's answer kept (see the module docs
    /// for what makes the replicas dead).
    fn on_all<T: PartialEq + Send + 'static>(
        &mut self,
        f: impl Fn(&mut E) -> Result<T, EngineError> + Send + Sync + 'static,
    ) -> Result<T, EngineError> {
        let answers = match self.on_ranks(0..self.workers.len(), f) {
            Ok(a) => a,
            Err(e) => return Err(self.kill(e)),
        };
        let mut answers = answers.into_iter().enumerate();
        let Some((_, first)) = answers.next() else {
            return Err(EngineError::Unsupported("an engine of no ranks"));
        };
        let disagree = |rank: usize, what: &str| {
            let first = match &first {
                Ok(_) => "succeeded".to_string(),
                Err(e) => format!("failed with {e}"),
            };
            rank_failed(rank, &format!("{what}, where rank 0 {first}"))
        };
        for (rank, other) in answers {
            let error = match (&first, &other) {
                (Err(e), _) if e.is_dead() => e.clone(),
                (_, Err(e)) if e.is_dead() => e.clone(),
                (Ok(a), Ok(b)) if a == b => continue,
                (Err(_), Err(_)) => continue,
                (Ok(_), Ok(_)) => disagree(rank, "answered differently"),
                (_, Err(e)) => disagree(rank, &format!("failed with {e}")),
                (Err(_), Ok(_)) => disagree(rank, "succeeded"),
            };
            return Err(self.kill(error));
        }
        if let Err(e) = &first {
            if e.is_dead() {
                return Err(self.kill(e.clone()));
            }
        }
        first
    }

    /// Marks the replicas dead after `error` (the first failure is kept) and returns it.
    fn kill(&mut self, error: EngineError) -> EngineError {
        self.dead.get_or_insert(error).clone()
    }

    /// Rank 0's answer to a question that changes nothing (or the dead error).
    pub fn ask<T: Send + 'static>(
        &self,
        f: impl Fn(&mut E) -> T + Send + Sync + 'static,
    ) -> Result<T, EngineError> {
        self.on_ranks(0..1, f)?
            .pop()
            .ok_or(EngineError::Unsupported("an engine of no ranks"))
    }
}

/// The dead error of a rank that failed the replicas.
fn rank_failed(rank: usize, why: &str) -> EngineError {
    EngineError::dead(ReplicaFailure(format!("rank {rank}: {why}")))
}

/// A rank that failed the replicas (no answer, a dead thread, a different answer).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ReplicaFailure(String);

/// A step's entries, owned (to send to the rank threads).
/// One sequence's part of a step, owned (to send to rank threads, or to other processes:
/// [`super::lockstep`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct OwnedStep {
    seq: SeqId,
    tokens: Vec<u32>,
    start_pos: usize,
    logits: LogitsFor,
}

/// The owned copy of a step's entries.
pub(super) fn owned_steps(batch: &[SeqStep<'_>]) -> Vec<OwnedStep> {
    batch
        .iter()
        .map(|s| OwnedStep {
            seq: s.seq,
            tokens: s.tokens.to_vec(),
            start_pos: s.start_pos,
            logits: s.logits,
        })
        .collect()
}

fn owned(batch: &[SeqStep<'_>]) -> Arc<Vec<OwnedStep>> {
    Arc::new(owned_steps(batch))
}

/// The step entries of owned ones.
pub(super) fn borrowed(steps: &[OwnedStep]) -> Vec<SeqStep<'_>> {
    steps
        .iter()
        .map(|s| SeqStep {
            seq: s.seq,
            tokens: &s.tokens,
            start_pos: s.start_pos,
            logits: s.logits,
        })
        .collect()
}

/// A step's logits, compared across ranks by their rows and length only (every rank holds the
/// same gathered values, and a NaN would not compare equal to itself).
#[derive(Debug, Clone)]
struct Logits(StepOutput);

impl PartialEq for Logits {
    fn eq(&self, other: &Self) -> bool {
        self.0.rows == other.0.rows && self.0.logits.len() == other.0.logits.len()
    }
}

/// Drawn ids and the advanced samplers of one rank, compared across ranks by their count only:
/// rank 0's draw is the answer whatever the others drew.
#[derive(Debug, Clone)]
struct Drawn(Vec<u32>, Vec<Sampler>);

impl PartialEq for Drawn {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
    }
}

impl<E: Engine + 'static> Drop for Replicas<E> {
    fn drop(&mut self) {
        for w in &mut self.workers {
            w.jobs = None;
        }
        // A rank that stopped answering (the replicas died of it) may be stuck: it is not waited
        // for.
        if self.dead.is_none() {
            for w in &mut self.workers {
                if let Some(t) = w.thread.take() {
                    let _ = t.join();
                }
            }
        }
    }
}

impl<E: Engine + 'static> Engine for Replicas<E> {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn max_context(&self) -> usize {
        self.max_context
    }

    fn new_sequence(&mut self) -> Result<SeqId, EngineError> {
        self.on_all(|e| e.new_sequence())
    }

    fn free_sequence(&mut self, seq: SeqId) -> Result<(), EngineError> {
        self.on_all(move |e| e.free_sequence(seq))
    }

    fn sequence_len(&self, seq: SeqId) -> Result<usize, EngineError> {
        self.ask(move |e| e.sequence_len(seq))?
    }

    fn free_kv_blocks(&self) -> usize {
        self.ask(|e| e.free_kv_blocks()).unwrap_or(0)
    }

    fn total_kv_blocks(&self) -> usize {
        self.ask(|e| e.total_kv_blocks()).unwrap_or(0)
    }

    fn step(&mut self, batch: &[SeqStep<'_>]) -> Result<StepOutput, EngineError> {
        let steps = owned(batch);
        let out = self.on_all(move |e| e.step(&borrowed(&steps)).map(Logits))?;
        Ok(out.0)
    }

    fn step_tokens(
        &mut self,
        batch: &[SeqStep<'_>],
        samplers: &mut [RowSampler<'_>],
    ) -> Result<Vec<u32>, EngineError> {
        let steps = owned(batch);
        let rows: Arc<Vec<(Sampler, Vec<u32>)>> = Arc::new(
            samplers
                .iter()
                .map(|s| (s.sampler.clone(), s.history.to_vec()))
                .collect(),
        );
        let drawn = self.on_all(move |e| {
            let mut mine: Vec<(Sampler, Vec<u32>)> = rows.as_ref().clone();
            let mut row_samplers: Vec<RowSampler<'_>> = mine
                .iter_mut()
                .map(|(s, h)| RowSampler::new(s, h))
                .collect();
            let ids = e.step_tokens(&borrowed(&steps), &mut row_samplers)?;
            Ok(Drawn(ids, mine.into_iter().map(|(s, _)| s).collect()))
        })?;
        for (row, moved) in samplers.iter_mut().zip(drawn.1) {
            *row.sampler = moved;
        }
        Ok(drawn.0)
    }

    fn reuse_prefix(&mut self, seq: SeqId, tokens: &[u32]) -> Result<usize, EngineError> {
        let tokens = tokens.to_vec();
        self.on_all(move |e| e.reuse_prefix(seq, &tokens))
    }

    fn fork_sequence(&mut self, seq: SeqId) -> Result<SeqId, EngineError> {
        self.on_all(move |e| e.fork_sequence(seq))
    }

    fn kv_block_size(&self) -> Option<usize> {
        self.block_size
    }

    fn describe(&self) -> Option<String> {
        self.ask(|e| e.describe()).ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{CpuEngine, CpuEngineOptions};
    use crate::shard::test_support::{answers_like_one_engine, cpu, steps, tiny_model as model};
    use crate::Model;

    /// `n` CPU engines, rank `r` allowing `sequences[r]` sequences.
    fn replicas(model: &Model, sequences: &[usize]) -> Replicas<CpuEngine> {
        let builds: Vec<Build<CpuEngine, EngineError>> = sequences
            .iter()
            .map(|&n| {
                let weights = Arc::clone(&model.weights);
                let build: Build<CpuEngine, EngineError> = Box::new(move |_| {
                    let options = CpuEngineOptions {
                        max_context: Some(64),
                        max_sequences: n,
                        ..CpuEngineOptions::default()
                    };
                    CpuEngine::new(weights, options)
                });
                build
            })
            .collect();
        Replicas::spawn(model.config.clone(), Duration::from_secs(60), builds, None).unwrap()
    }

    #[test]
    fn replicas_answer_what_one_engine_answers() {
        let model = model();
        let mut three = replicas(&model, &[4, 4, 4]);
        assert_eq!(three.len(), 3);
        answers_like_one_engine(&mut cpu(&model, 4), &mut three);
    }

    #[test]
    fn ranks_that_disagree_kill_the_replicas_naming_the_rank() {
        let model = model();
        // Rank 1 holds one sequence, rank 0 two: the second sequence is refused by rank 1 only.
        let mut r = replicas(&model, &[2, 1]);
        r.new_sequence().unwrap();
        let e = r.new_sequence().unwrap_err();
        assert!(e.is_dead(), "{e}");
        assert!(
            e.to_string()
                .contains("rank 1: failed with too many sequences"),
            "{e}"
        );
        assert_eq!(
            r.new_sequence().unwrap_err(),
            e,
            "every later call fails alike"
        );
        assert_eq!(r.free_kv_blocks(), 0);
    }

    #[test]
    fn a_rank_whose_thread_ended_is_a_dead_error_not_a_hang() {
        let model = model();
        let mut r = replicas(&model, &[2, 2]);
        let seq = r.new_sequence().unwrap();
        // Rank 1's thread ends: its job channel closes.
        r.workers[1].jobs = None;
        r.workers[1].thread.take().unwrap().join().unwrap();
        let e = r.step(&steps(seq, &[1, 2], 0)).unwrap_err();
        assert!(e.is_dead(), "{e}");
        assert!(
            e.to_string().contains("rank 1: its thread has ended"),
            "{e}"
        );
    }

    #[test]
    fn the_ranks_load_progress_reaches_the_caller_summed() {
        let model = model();
        let builds: Vec<Build<CpuEngine, String>> = (1..=3u64)
            .map(|r| {
                let weights = Arc::clone(&model.weights);
                let build: Build<CpuEngine, String> = Box::new(move |report| {
                    // Rank r loads 100 * r bytes in two halves.
                    for done in [50 * r, 100 * r] {
                        report(LoadProgress {
                            done_bytes: done,
                            total_bytes: 100 * r,
                        });
                    }
                    CpuEngine::new(weights, CpuEngineOptions::default()).map_err(|e| e.to_string())
                });
                build
            })
            .collect();
        let seen = std::sync::Mutex::new(Vec::new());
        let report = |p: LoadProgress| seen.lock().unwrap().push(p);
        let config = model.config.clone();
        Replicas::spawn(config, Duration::from_secs(60), builds, Some(&report)).unwrap();
        let seen = seen.into_inner().unwrap();
        assert_eq!(seen.len(), 6);
        assert!(seen.windows(2).all(|w| w[0].done_bytes <= w[1].done_bytes));
        let last = seen.last().unwrap();
        assert_eq!((last.done_bytes, last.total_bytes), (600, 600));
    }

    #[test]
    fn a_rank_that_fails_to_build_is_named() {
        let model = model();
        let weights = Arc::clone(&model.weights);
        let builds: Vec<Build<CpuEngine, String>> = vec![
            Box::new(move |_| {
                CpuEngine::new(weights, CpuEngineOptions::default()).map_err(|e| e.to_string())
            }),
            Box::new(|_| Err("no device".to_string())),
        ];
        match Replicas::spawn(model.config.clone(), Duration::from_secs(60), builds, None) {
            Err(SpawnError::Build { rank: 1, error }) => assert_eq!(error, "no device"),
            other => panic!("{:?}", other.map(|r| r.len())),
        }
    }
}
