//! [`ShardedCudaEngine`]: one model over several GPUs of one process, tensor and expert parallel
//! (feature `nccl`), behind the [`Engine`] trait.
//!
//! Rank `r` of the [`ShardPlan`] runs on GPU `first + r` as a [`CudaEngine`] over its
//! [`RankWeights`] (built by [`CudaEngine::build_rank`]), owned by one thread. Its collectives are
//! NCCL communicators made at once for the whole world and, with both tensor and expert
//! parallelism, for each TP group ([`NcclComm::init_all`]); the forward pass issues them on the
//! rank's stream, inside its decode graphs.
//!
//! The caller's thread schedules: every [`Engine`] call is run by every rank's engine, in the same
//! order, so each rank's KV bookkeeping (the same limits: the KV block count is agreed before
//! building) stays identical to rank 0's; rank 0's answer is returned, and ranks that answer
//! differently make the engine dead. The logits are gathered on every rank, so every rank draws
//! the same tokens; rank 0's samplers are handed back. A rank that does not answer within the
//! timeout (a GPU stuck in a collective) or whose thread ends makes the engine dead with an error
//! naming it; no call waits longer than the timeout.

use std::ops::Range;
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cudarc::driver::CudaContext;

use super::device::driver_present;
use super::engine::rank::{plan_config, rank_bytes};
use super::engine::{plan_sizes, RankSetup, WeightSource};
use super::nccl::{NcclComm, NcclError, NcclGroups, TpComm};
use super::{CudaEngine, CudaEngineOptions, CudaError};
use crate::config::ModelConfig;
use crate::engine::{Engine, EngineError, LogitsFor, RowSampler, SeqId, SeqStep, StepOutput};
use crate::sampling::Sampler;
use crate::shard::{Layout, PlanError, RankWeights, ReadLog, ShardPlan, ShardWeightError};
use crate::weights::ModelWeights;

/// How long the scheduler waits for every rank to answer one call, unless set.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Options of a [`ShardedCudaEngine`].
#[derive(Debug, Clone)]
pub struct ShardedCudaOptions {
    /// The split.
    pub layout: Layout,
    /// Every rank's engine options; `device` is the first rank's GPU (rank `r` runs on
    /// `device + r`).
    pub cuda: CudaEngineOptions,
    /// How long one call (or the build) may wait for every rank.
    pub timeout: Duration,
}

/// Why a sharded CUDA engine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MultiGpuError {
    /// Fewer GPUs than ranks.
    #[error(
        "{layout} needs {needed} GPUs from cuda:{first} on, but the driver reports {count} \
         GPU(s)"
    )]
    TooFewGpus {
        /// The split.
        layout: Layout,
        /// GPUs needed (`tp * ep`).
        needed: usize,
        /// The first rank's device.
        first: usize,
        /// Devices the driver reports.
        count: usize,
    },
    /// The model cannot be split by the layout.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// A weight cannot be cut as planned.
    #[error(transparent)]
    Weights(#[from] ShardWeightError),
    /// NCCL is missing or refused to make the communicators.
    #[error(transparent)]
    Nccl(#[from] NcclError),
    /// The device or a rank's engine failed (no driver, out of memory, ...).
    #[error("rank {rank} (cuda:{ordinal}): {source}")]
    Rank {
        /// The rank.
        rank: usize,
        /// Its device.
        ordinal: usize,
        /// Why.
        #[source]
        source: CudaError,
    },
    /// A rank's thread could not be started, ended without answering, or did not answer in time.
    #[error("rank {rank}: {reason}")]
    Worker {
        /// The rank.
        rank: usize,
        /// What happened.
        reason: String,
    },
}

impl MultiGpuError {
    /// The CUDA error underneath, if any (a test skips on "no driver" or "no device" only).
    pub fn cuda(&self) -> Option<&CudaError> {
        match self {
            MultiGpuError::Rank { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Work for one rank's engine.
type Job = Box<dyn FnOnce(&mut CudaEngine) + Send>;

/// One rank's thread.
struct Worker {
    jobs: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

/// The sharded CUDA engine (see the module docs).
pub struct ShardedCudaEngine {
    config: ModelConfig,
    layout: Layout,
    first: usize,
    timeout: Duration,
    workers: Vec<Worker>,
    max_context: usize,
    block_size: usize,
    read_bytes: Vec<u64>,
    /// The first failure; then every call fails with it.
    dead: Option<EngineError>,
}

impl std::fmt::Debug for ShardedCudaEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedCudaEngine")
            .field("layout", &self.layout)
            .field("first", &self.first)
            .field("dead", &self.dead)
            .finish_non_exhaustive()
    }
}

/// Where a rank's weights come from.
#[derive(Clone, Copy)]
enum Source<'a> {
    Checkpoint(&'a ModelWeights),
    Random { config: &'a ModelConfig, seed: u32 },
}

impl ShardedCudaEngine {
    /// Splits `weights` by `options.layout` over the GPUs `options.cuda.device ..` and builds one
    /// engine per rank. Refuses a layout the model cannot be split by, fewer GPUs than ranks, a
    /// missing NCCL, and whatever a rank's engine refuses.
    pub fn new(
        weights: &ModelWeights,
        options: &ShardedCudaOptions,
    ) -> Result<Self, MultiGpuError> {
        Self::build(Source::Checkpoint(weights), options)
    }

    testing_pub! {
        /// A sharded engine over seeded random bf16 weights of `config`'s shape, each rank making
        /// its own part on its device (for benchmarks: nothing is read from disk).
        fn with_random_weights(
            config: &ModelConfig,
            seed: u32,
            options: &ShardedCudaOptions,
        ) -> Result<Self, MultiGpuError> {
            Self::build(Source::Random { config, seed }, options)
        }
    }

    fn build(source: Source<'_>, options: &ShardedCudaOptions) -> Result<Self, MultiGpuError> {
        let config = match source {
            Source::Checkpoint(w) => w.config.clone(),
            Source::Random { config, .. } => config.clone(),
        };
        let layout = options.layout;
        let plan = ShardPlan::new(&config, layout)?;
        let world = layout.world();
        let first = options.cuda.device;
        let ordinals: Vec<usize> = (first..first + world).collect();
        let device_error = |source: CudaError| MultiGpuError::Rank {
            rank: 0,
            ordinal: first,
            source,
        };
        if !driver_present() {
            return Err(device_error(CudaError::NoDriver));
        }
        let count = CudaContext::device_count()
            .map_err(|e| device_error(CudaError::driver("counting devices")(e)))?;
        let count = usize::try_from(count).unwrap_or(0);
        if count == 0 {
            return Err(device_error(CudaError::NoDevice {
                ordinal: first,
                count,
            }));
        }
        if first + world > count {
            return Err(MultiGpuError::TooFewGpus {
                layout,
                needed: world,
                first,
                count,
            });
        }
        let mut read_bytes = Vec::with_capacity(world);
        let mut rank_weights = Vec::with_capacity(world);
        if let Source::Checkpoint(w) = source {
            for shard in &plan.ranks {
                let mut log = ReadLog::default();
                rank_weights.push(Some(RankWeights::new(w, shard, &mut log)?));
                read_bytes.push(log.total_bytes());
            }
        } else {
            rank_weights.resize_with(world, || None);
        }
        let mut world_comms = NcclComm::init_all(&ordinals)?.into_iter();
        let mut tp_comms: Vec<TpComm> = if layout.tp == world {
            (0..world).map(|_| TpComm::World).collect()
        } else if layout.tp == 1 {
            (0..world).map(|_| TpComm::Alone).collect()
        } else {
            let mut all = Vec::with_capacity(world);
            for p in 0..layout.ep {
                let group = &ordinals[plan.tp_group(p)];
                all.extend(NcclComm::init_all(group)?.into_iter().map(TpComm::Own));
            }
            all
        };
        let mut rank_options = options.cuda.clone();
        if rank_options.engine.kv_blocks.is_none() {
            let blocks = agreed_kv_blocks(&config, &plan, &ordinals, &rank_options)?;
            rank_options.engine.kv_blocks = Some(blocks);
        }
        // Every rank builds at once: the warm-up passes run the collectives.
        let (built_tx, built_rx) = channel::<(usize, Result<(usize, usize), CudaError>)>();
        let mut workers = Vec::with_capacity(world);
        for (shard, weights) in plan.ranks.iter().zip(rank_weights.drain(..)) {
            let (rank, ordinal) = (shard.rank, ordinals[shard.rank]);
            let setup = RankSetup {
                shard: shard.clone(),
                comms: Box::new(NcclGroups {
                    world: world_comms.next().expect("one world communicator per rank"),
                    tp: tp_comms.remove(0),
                }),
            };
            let mut opts = rank_options.clone();
            opts.device = ordinal;
            let full = config.clone();
            let seed = match source {
                Source::Random { seed, .. } => Some(seed),
                Source::Checkpoint(_) => None,
            };
            let built = built_tx.clone();
            let (jobs, job_rx) = channel::<Job>();
            let thread = std::thread::Builder::new()
                .name(format!("cuda-rank-{rank}"))
                .spawn(move || {
                    let source = match (&weights, seed) {
                        (Some(w), _) => WeightSource::Shard {
                            weights: w,
                            config: &full,
                        },
                        (None, seed) => WeightSource::Random {
                            config: &full,
                            seed: seed.unwrap_or(0).wrapping_add(rank as u32),
                            format: crate::quant::QuantFormat::Bf16,
                        },
                    };
                    let engine = CudaEngine::build_rank(source, Some(setup), opts, None);
                    drop(weights);
                    let mut engine = match engine {
                        Ok(e) => e,
                        Err(e) => {
                            let _ = built.send((rank, Err(e)));
                            return;
                        }
                    };
                    let limits = (engine.max_context(), engine.kv_block_size().unwrap_or(0));
                    if built.send((rank, Ok(limits))).is_err() {
                        return;
                    }
                    for job in job_rx {
                        job(&mut engine);
                    }
                })
                .map_err(|e| MultiGpuError::Worker {
                    rank,
                    reason: format!("cannot start its thread: {e}"),
                })?;
            workers.push(Worker {
                jobs: Some(jobs),
                thread: Some(thread),
            });
        }
        drop(built_tx);
        let mut engine = ShardedCudaEngine {
            config,
            layout,
            first,
            timeout: options.timeout,
            workers,
            max_context: 0,
            block_size: 0,
            read_bytes,
            dead: None,
        };
        let deadline = Instant::now() + options.timeout;
        let mut limits = vec![None; world];
        for _ in 0..world {
            let left = deadline.saturating_duration_since(Instant::now());
            let (rank, result) = match built_rx.recv_timeout(left) {
                Ok(answer) => answer,
                Err(_) => {
                    let missing = limits.iter().position(Option::is_none).unwrap_or(0);
                    engine.abandon();
                    return Err(MultiGpuError::Worker {
                        rank: missing,
                        reason: format!("not built within {:?}", options.timeout),
                    });
                }
            };
            match result {
                Ok(l) => limits[rank] = Some(l),
                Err(source) => {
                    // The other ranks may wait in a collective for this one: leave them.
                    engine.abandon();
                    return Err(MultiGpuError::Rank {
                        rank,
                        ordinal: ordinals[rank],
                        source,
                    });
                }
            }
        }
        (engine.max_context, engine.block_size) = limits[0].unwrap_or_default();
        Ok(engine)
    }

    /// The split.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Bytes of checkpoint weights each rank read when it took its shard, by rank (empty for
    /// random weights).
    pub fn read_bytes(&self) -> &[u64] {
        &self.read_bytes
    }

    testing_pub! {
        /// Rank 0's captured decode batch sizes (the graphs that hold its collectives).
        fn rank_graph_buckets(&self) -> Result<Vec<usize>, EngineError> {
            self.ask(|e| e.graph_buckets())
        }
    }

    /// Gives up on the rank threads without waiting for them (they may be stuck on the device).
    fn abandon(&mut self) {
        for w in &mut self.workers {
            w.jobs = None;
            w.thread = None;
        }
    }

    /// Runs `f` on the engines of `ranks`, each on its own thread, and returns their answers in
    /// rank order; a rank that does not answer in time, or whose thread is gone, is an error.
    fn on_ranks<R: Send + 'static>(
        &self,
        ranks: Range<usize>,
        f: impl Fn(&mut CudaEngine) -> R + Send + Sync + 'static,
    ) -> Result<Vec<R>, EngineError> {
        if let Some(e) = &self.dead {
            return Err(e.clone());
        }
        let f = Arc::new(f);
        let (tx, rx) = channel::<(usize, R)>();
        for rank in ranks.clone() {
            let (f, tx) = (Arc::clone(&f), tx.clone());
            let job: Job = Box::new(move |engine| {
                let _ = tx.send((rank, f(engine)));
            });
            let sent = self.workers[rank].jobs.as_ref().map(|jobs| jobs.send(job));
            if !matches!(sent, Some(Ok(()))) {
                return Err(rank_gone(rank, "its thread has ended"));
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
                    return Err(rank_gone(
                        ranks.start + missing,
                        &format!(
                            "no answer within {:?} (stuck on its device, or its thread ended)",
                            self.timeout
                        ),
                    ));
                }
            }
        }
        Ok(answers.into_iter().flatten().collect())
    }

    /// [`ShardedCudaEngine::on_ranks`] over every rank, with rank 0's answer kept. A refusal every
    /// rank makes (a bad request: no rank changed anything) leaves the engine usable; a failure
    /// to answer, a dead rank, or ranks answering differently (one refusing what another did)
    /// makes it dead.
    fn on_all<T: PartialEq + Send + 'static>(
        &mut self,
        f: impl Fn(&mut CudaEngine) -> Result<T, EngineError> + Send + Sync + 'static,
    ) -> Result<T, EngineError> {
        let answers = match self.on_ranks(0..self.workers.len(), f) {
            Ok(a) => a,
            Err(e) => return Err(self.kill(e)),
        };
        let mut answers = answers.into_iter().enumerate();
        let Some((_, first)) = answers.next() else {
            return Err(EngineError::Unsupported("no ranks"));
        };
        let disagree = |rank: usize, what: &str| {
            EngineError::dead(CudaError::Dead(format!(
                "rank {rank} {what} where rank 0 answered {:?}",
                first.as_ref().err()
            )))
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

    /// Marks the engine dead after `error` (kept as the first failure) and returns it dead.
    fn kill(&mut self, error: EngineError) -> EngineError {
        let error = if error.is_dead() {
            error
        } else {
            EngineError::dead(CudaError::Dead(error.to_string()))
        };
        if self.dead.is_none() {
            self.dead = Some(error.clone());
        }
        if let Some(e) = &self.dead {
            e.clone()
        } else {
            error
        }
    }

    /// Rank 0's answer to a question that changes nothing (or the dead error).
    fn ask<T: Send + 'static>(
        &self,
        f: impl Fn(&mut CudaEngine) -> T + Send + Sync + 'static,
    ) -> Result<T, EngineError> {
        self.on_ranks(0..1, f)?
            .pop()
            .ok_or(EngineError::Unsupported("no ranks"))
    }
}

/// The dead error of a rank that did not answer.
fn rank_gone(rank: usize, why: &str) -> EngineError {
    EngineError::dead(CudaError::Dead(format!("rank {rank}: {why}")))
}

/// The KV block count every rank can hold: the least of what each rank's free memory allows.
fn agreed_kv_blocks(
    config: &ModelConfig,
    plan: &ShardPlan,
    ordinals: &[usize],
    options: &CudaEngineOptions,
) -> Result<usize, MultiGpuError> {
    let mut least = usize::MAX;
    for (shard, &ordinal) in plan.ranks.iter().zip(ordinals) {
        let failed = |source: CudaError| MultiGpuError::Rank {
            rank: shard.rank,
            ordinal,
            source,
        };
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| failed(CudaError::driver(format!("opening device {ordinal}"))(e)))?;
        ctx.bind_to_thread()
            .map_err(|e| failed(CudaError::driver("making the CUDA context current")(e)))?;
        let (free, _) = ctx
            .mem_get_info()
            .map_err(|e| failed(CudaError::driver("reading free device memory")(e)))?;
        let weights = rank_bytes(config, shard, options.max_step_tokens().max(1));
        let sizes = plan_sizes(
            &plan_config(config, shard),
            options,
            free.saturating_sub(weights),
        )
        .map_err(failed)?;
        least = least.min(sizes.num_blocks);
    }
    Ok(least.max(1))
}

/// A step's entries, owned (to send to the rank threads).
#[derive(Debug, Clone)]
struct OwnedStep {
    seq: SeqId,
    tokens: Vec<u32>,
    start_pos: usize,
    logits: LogitsFor,
}

fn owned(batch: &[SeqStep<'_>]) -> Arc<Vec<OwnedStep>> {
    Arc::new(
        batch
            .iter()
            .map(|s| OwnedStep {
                seq: s.seq,
                tokens: s.tokens.to_vec(),
                start_pos: s.start_pos,
                logits: s.logits,
            })
            .collect(),
    )
}

fn borrowed(steps: &[OwnedStep]) -> Vec<SeqStep<'_>> {
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

impl Drop for ShardedCudaEngine {
    fn drop(&mut self) {
        for w in &mut self.workers {
            w.jobs = None;
        }
        // A rank stuck on its device (the engine died of a timeout) is left, not waited for.
        if self.dead.is_none() {
            for w in &mut self.workers {
                if let Some(t) = w.thread.take() {
                    let _ = t.join();
                }
            }
        }
    }
}

impl Engine for ShardedCudaEngine {
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

    /// Every rank draws with its own copy of the samplers (the same logits, so the same tokens);
    /// rank 0's advanced samplers are handed back.
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
            let states: Vec<Sampler> = mine.into_iter().map(|(s, _)| s).collect();
            Ok(SamplerRows(ids, states))
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
        Some(self.block_size)
    }

    fn describe(&self) -> Option<String> {
        Some(format!(
            "cuda: {} GPUs from cuda:{} ({}), NCCL collectives in the decode graphs",
            self.layout.world(),
            self.first,
            self.layout
        ))
    }
}

/// A step's logits, compared across ranks by their rows and length only (the values are the
/// same gathered bits on every rank; a NaN would not compare equal).
#[derive(Debug, Clone)]
struct Logits(StepOutput);

impl PartialEq for Logits {
    fn eq(&self, other: &Self) -> bool {
        self.0.rows == other.0.rows && self.0.logits.len() == other.0.logits.len()
    }
}

/// Drawn ids and the advanced samplers of one rank, compared across ranks by their count only:
/// every rank gathers the same logits, but rank 0's draw is the answer whatever the others drew.
#[derive(Debug, Clone)]
struct SamplerRows(Vec<u32>, Vec<Sampler>);

impl PartialEq for SamplerRows {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
    }
}
