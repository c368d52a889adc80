//! [`ShardedCpuEngine`]: the sharded plan run on N simulated ranks in one process, one thread per
//! rank, behind the [`Engine`] trait: how the plan is tested without several GPUs.
//!
//! The coordinator (the caller's thread, rank 0's role of scheduler) owns the paged-KV bookkeeping
//! ([`PagedKv`]): it applies each step, then hands every rank the same [`StepJob`] (tokens,
//! positions, cache slots, block tables). Each rank thread runs [`Rank::step`] on its shard with
//! its [`CpuRank`] handles and returns the gathered logits (rank 0's are kept). A rank failure
//! (a collective timeout, a departed rank, a panic) makes the engine dead: every later call is
//! refused with the first failure.
//!
//! [`ShardedCpuEngine::one_rank`] runs a single rank of the plan, its collectives given (ranks in
//! separate processes: [`super::tcp_ranks`]); the other processes run the other ranks, in
//! lockstep with this one ([`super::lockstep`]).

use super::collective::Collective;
use super::cpu_ranks::{cpu_group, CpuRank};
use super::plan::{Layout, ShardPlan};
use super::rank::{JobEntry, Rank, RankComms, StepJob};
use super::weights::{RankWeights, ReadLog};
use super::ShardError;
use crate::config::ModelConfig;
use crate::cpu::CpuEngineOptions;
use crate::engine::{Engine, EngineError, SeqId, SeqStep, StepOutput};
use crate::kv::{PagedKv, StepPlan};
use crate::weights::ModelWeights;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a rank waits in one collective for the others, unless set.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Options of a [`ShardedCpuEngine`].
#[derive(Debug, Clone)]
pub struct ShardedOptions {
    /// The split.
    pub layout: Layout,
    /// The cache and batch limits, as for [`crate::cpu::CpuEngine`].
    pub cpu: CpuEngineOptions,
    /// How long a rank waits in one collective before it fails the step.
    pub timeout: Duration,
}

/// What a rank thread sends back for one step: the logits (rank 0) or nothing (the others).
type Reply = Result<Option<Vec<f32>>, ShardError>;

/// One rank thread.
#[derive(Debug)]
struct Worker {
    jobs: Option<Sender<Arc<StepJob>>>,
    replies: Receiver<Reply>,
    thread: Option<JoinHandle<()>>,
}

/// The sharded CPU engine (see the module docs).
pub struct ShardedCpuEngine {
    config: Arc<ModelConfig>,
    layout: Layout,
    kv: PagedKv,
    workers: Vec<Worker>,
    /// Bytes each rank read while taking its weights.
    read_bytes: Vec<u64>,
    /// The ranks this engine runs (every rank, or one of a world of processes).
    ranks: Vec<usize>,
    /// The failure that killed the engine.
    dead: Option<EngineError>,
}

impl std::fmt::Debug for ShardedCpuEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedCpuEngine")
            .field("layout", &self.layout)
            .field("kv", &self.kv.limits())
            .finish_non_exhaustive()
    }
}

impl ShardedCpuEngine {
    /// Splits `weights` by `options.layout` and starts one thread per rank. Refuses a layout the
    /// model cannot be split by, a weight format that cannot be cut as planned, and bad cache
    /// options.
    pub fn new(weights: &ModelWeights, options: &ShardedOptions) -> Result<Self, ShardError> {
        let config = Arc::new(weights.config.clone());
        let plan = ShardPlan::new(&config, options.layout)?;
        let (limits, block_rows) = crate::cpu::kv_limits(&config, &options.cpu)?;
        let kv = PagedKv::new(limits)?;
        let layout = options.layout;
        let mut world = cpu_group(layout.world(), options.timeout).into_iter();
        let mut tp_groups: Vec<std::vec::IntoIter<CpuRank>> = (0..layout.ep)
            .map(|_| cpu_group(layout.tp, options.timeout).into_iter())
            .collect();
        let mut workers = Vec::new();
        let mut read_bytes = Vec::new();
        for shard in &plan.ranks {
            let mut log = ReadLog::default();
            let rank_weights = RankWeights::new(weights, shard, &mut log)?;
            read_bytes.push(log.total_bytes());
            let comms = RankComms {
                world: world.next().expect("one world handle per rank"),
                tp: tp_groups[shard.ep_rank]
                    .next()
                    .expect("one TP handle per rank of the group"),
            };
            let rank = Rank::new(Arc::clone(&config), rank_weights, comms, block_rows);
            workers.push(spawn(shard.rank, rank, shard.rank == 0)?);
        }
        Ok(ShardedCpuEngine {
            config,
            layout,
            kv,
            workers,
            read_bytes,
            ranks: (0..layout.world()).collect(),
            dead: None,
        })
    }

    /// Rank `rank` of `options.layout` alone, over `comms` (its handles on the world and its TP
    /// group, whose other ranks run elsewhere, each as the same call with its own rank). Its
    /// steps answer with the gathered logits, which every rank holds. Refuses what
    /// [`ShardedCpuEngine::new`] refuses, and a rank outside the layout.
    pub fn one_rank<C>(
        weights: &ModelWeights,
        options: &ShardedOptions,
        rank: usize,
        comms: RankComms<C>,
    ) -> Result<Self, ShardError>
    where
        C: Collective<Mem<f32> = [f32]> + 'static,
    {
        let config = Arc::new(weights.config.clone());
        let layout = options.layout;
        let plan = ShardPlan::new(&config, layout)?;
        let shard = plan
            .ranks
            .get(rank)
            .ok_or(ShardError::NoSuchRank { rank, layout })?;
        let (limits, block_rows) = crate::cpu::kv_limits(&config, &options.cpu)?;
        let kv = PagedKv::new(limits)?;
        let mut log = ReadLog::default();
        let rank_weights = RankWeights::new(weights, shard, &mut log)?;
        let worker = spawn(
            rank,
            Rank::new(Arc::clone(&config), rank_weights, comms, block_rows),
            true,
        )?;
        Ok(ShardedCpuEngine {
            config,
            layout,
            kv,
            workers: vec![worker],
            read_bytes: vec![log.total_bytes()],
            ranks: vec![rank],
            dead: None,
        })
    }

    /// The split.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Bytes of weights each rank read when it took its shard, by rank (of [`ShardedCpuEngine::one_rank`]: its
    /// rank's only).
    pub fn read_bytes(&self) -> &[u64] {
        &self.read_bytes
    }

    /// The paged-KV bookkeeping.
    pub fn kv(&self) -> &PagedKv {
        &self.kv
    }

    /// The job of an applied step.
    fn job(&self, batch: &[SeqStep<'_>], plan: &StepPlan) -> Result<StepJob, EngineError> {
        let mut job = StepJob {
            tokens: batch.iter().flat_map(|s| s.tokens).copied().collect(),
            positions: Vec::with_capacity(plan.total_tokens),
            slots: Vec::with_capacity(plan.total_tokens),
            entries: Vec::with_capacity(plan.entries.len()),
            selected: Vec::new(),
            block_size: self.kv.limits().block_size,
        };
        for e in &plan.entries {
            for pos in e.start_pos..e.start_pos + e.len {
                let slot = self.kv.slot(e.seq, pos).ok_or_else(|| {
                    EngineError::backend(format!("no cache slot for {:?} position {pos}", e.seq))
                })?;
                job.positions.push(pos);
                job.slots.push(slot);
            }
            job.selected
                .extend(e.logit_rows().map(|i| e.token_offset + i));
            job.entries.push(JobEntry {
                start_pos: e.start_pos,
                rows: e.tokens(),
                table: self.kv.block_table(e.seq)?.to_vec(),
            });
        }
        Ok(job)
    }

    /// Runs `job` on every rank; rank 0's logits.
    fn run(&mut self, job: StepJob) -> Result<Vec<f32>, ShardError> {
        let job = Arc::new(job);
        for (rank, w) in self.workers.iter().enumerate() {
            let sent = w.jobs.as_ref().map(|jobs| jobs.send(Arc::clone(&job)));
            if !matches!(sent, Some(Ok(()))) {
                return Err(ShardError::RankDied { rank });
            }
        }
        // Every rank answers (its collectives time out if another is stuck) or its thread ends.
        let mut logits = None;
        let mut first_error = None;
        for (rank, w) in self.workers.iter().enumerate() {
            match w.replies.recv() {
                Ok(Ok(Some(l))) => logits = logits.or(Some(l)),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => first_error = first_error.or(Some(e)),
                Err(_) => first_error = first_error.or(Some(ShardError::RankDied { rank })),
            }
        }
        match (first_error, logits) {
            (Some(e), _) => Err(e),
            (None, Some(l)) => Ok(l),
            (None, None) => Err(ShardError::RankDied { rank: 0 }),
        }
    }
}

/// Starts rank `index`'s thread: it runs each job it receives and answers (with the logits when
/// `answers`); it stops after a failure (its group is broken) or when the engine drops its job
/// channel.
fn spawn<C>(index: usize, mut rank: Rank<C>, answers: bool) -> Result<Worker, ShardError>
where
    C: Collective<Mem<f32> = [f32]> + 'static,
{
    let (jobs, job_rx) = channel::<Arc<StepJob>>();
    let (reply_tx, replies) = channel::<Reply>();
    let thread = std::thread::Builder::new()
        .name(format!("cpu-rank-{index}"))
        .spawn(move || {
            for job in job_rx {
                let reply = rank
                    .step(&job)
                    .map(|logits| answers.then_some(logits))
                    .map_err(ShardError::from);
                let failed = reply.is_err();
                if reply_tx.send(reply).is_err() || failed {
                    break;
                }
            }
        })
        .map_err(|e| ShardError::Spawn {
            rank: index,
            reason: e.to_string(),
        })?;
    Ok(Worker {
        jobs: Some(jobs),
        replies,
        thread: Some(thread),
    })
}

impl Drop for ShardedCpuEngine {
    fn drop(&mut self) {
        for w in &mut self.workers {
            w.jobs = None;
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Engine for ShardedCpuEngine {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn max_context(&self) -> usize {
        self.kv.limits().max_context
    }

    fn new_sequence(&mut self) -> Result<SeqId, EngineError> {
        self.kv.new_sequence()
    }

    fn free_sequence(&mut self, seq: SeqId) -> Result<(), EngineError> {
        self.kv.free_sequence(seq)
    }

    fn sequence_len(&self, seq: SeqId) -> Result<usize, EngineError> {
        self.kv.sequence_len(seq)
    }

    fn free_kv_blocks(&self) -> usize {
        self.kv.free_blocks()
    }

    fn total_kv_blocks(&self) -> usize {
        self.kv.total_blocks()
    }

    fn step(&mut self, batch: &[SeqStep<'_>]) -> Result<StepOutput, EngineError> {
        if let Some(e) = &self.dead {
            return Err(e.clone());
        }
        let plan = self.kv.apply_step(batch)?;
        let job = self.job(batch, &plan)?;
        let mut rows = Vec::with_capacity(job.selected.len());
        for (b, e) in plan.entries.iter().enumerate() {
            rows.extend(e.logit_rows().map(|i| (b, e.start_pos + i)));
        }
        match self.run(job) {
            Ok(logits) => Ok(StepOutput {
                vocab: self.config.vocab_size,
                logits,
                rows,
            }),
            Err(e) => {
                let error = EngineError::dead(e);
                self.dead = Some(error.clone());
                Err(error)
            }
        }
    }

    fn describe(&self) -> Option<String> {
        Some(match self.ranks.as_slice() {
            [rank] if self.layout.is_sharded() => format!(
                "cpu: rank {rank} of {} ({}), the others in their own processes",
                self.layout.world(),
                self.layout
            ),
            _ => format!(
                "cpu: {} simulated ranks ({}), one thread each",
                self.layout.world(),
                self.layout
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::LogitsFor;
    use crate::shard::CollectiveError;
    use crate::{LoadOptions, Model};

    fn engine(layout: Layout, timeout: Duration) -> ShardedCpuEngine {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-mixtral");
        let model = Model::load(&dir, &LoadOptions::default()).unwrap();
        let options = ShardedOptions {
            layout,
            cpu: CpuEngineOptions {
                max_context: Some(64),
                ..CpuEngineOptions::default()
            },
            timeout,
        };
        ShardedCpuEngine::new(&model.weights, &options).unwrap()
    }

    #[test]
    fn a_rank_that_dies_kills_the_engine_with_a_clear_error_and_no_hang() {
        let mut e = engine(Layout { tp: 2, ep: 1 }, Duration::from_secs(60));
        let seq = e.new_sequence().unwrap();
        let step = [SeqStep {
            seq,
            tokens: &[1, 2, 3],
            start_pos: 0,
            logits: LogitsFor::Last,
        }];
        e.step(&step).unwrap();
        // Rank 1's thread ends (its job channel closes), dropping its collective handles.
        e.workers[1].jobs = None;
        e.workers[1].thread.take().unwrap().join().unwrap();
        let next = [SeqStep {
            seq,
            tokens: &[4],
            start_pos: 3,
            logits: LogitsFor::Last,
        }];
        let error = e.step(&next).unwrap_err();
        assert!(error.is_dead(), "{error}");
        assert!(error.to_string().contains("rank 1 died"), "{error}");
        // Rank 0 got the job and fails at once in its first collective (not after the 60 s).
        let reply = e.workers[0].replies.recv_timeout(Duration::from_secs(10));
        match reply {
            Ok(Err(ShardError::Collective(CollectiveError::PeerGone { gone: 1, .. }))) => {}
            other => panic!("{other:?}"),
        }
        // Every later call is refused with the same error.
        assert_eq!(e.step(&next).unwrap_err(), error);
    }

    #[test]
    fn describe_names_the_ranks() {
        let e = engine(Layout { tp: 1, ep: 2 }, DEFAULT_TIMEOUT);
        let line = e.describe().unwrap();
        assert!(line.contains("2 simulated ranks (tp=1 ep=2)"), "{line}");
    }
}
