//! [`ShardedCudaEngine`]: one model over several GPUs of one process, tensor and expert parallel
//! (feature `nccl`), behind the [`Engine`] trait.
//!
//! Rank `r` of the [`ShardPlan`] runs on GPU `first + r` as a [`CudaEngine`] over its
//! [`RankWeights`] (built by `CudaEngine::build_rank`), owned by one thread. Its collectives are
//! NCCL communicators made at once for the whole world and, with both tensor and expert
//! parallelism, for each TP group ([`NcclComm::init_all`]); the forward pass issues them on the
//! rank's stream, inside its decode graphs.
//!
//! The caller's thread schedules ([`Replicas`]): every [`Engine`] call is run by every rank's
//! engine, in the same order, so each rank's KV bookkeeping (the same limits: the KV block count
//! is agreed before building) stays identical to rank 0's; rank 0's answer is returned, and ranks
//! that answer differently make the engine dead. The logits are gathered on every rank, so every
//! rank draws the same tokens; rank 0's samplers are handed back. A rank that does not answer
//! within the timeout (a GPU stuck in a collective) or whose thread ends makes the engine dead
//! with an error naming it; no call waits longer than the timeout. A rank stuck in a collective
//! is also freed by its own watchdog, which aborts its communicators after the same timeout
//! ([`CudaError::CollectiveTimeout`]).

use std::time::Duration;

use cudarc::driver::CudaContext;

use super::device::driver_present;
use super::engine::rank::{formats as rank_formats, plan_config, rank_bytes};
use super::engine::upload::LayerFormats;
use super::engine::{plan_sizes, RankSetup, WeightSource};
use super::nccl::{NcclComm, NcclError, NcclGroups, TpComm};
use super::{CudaEngine, CudaEngineOptions, CudaError};
use crate::checkpoint::LoadProgress;
use crate::config::ModelConfig;
use crate::engine::{Engine, EngineError, RowSampler, SeqId, SeqStep, StepOutput};
use crate::shard::replicas::{Build, Replicas, SpawnError};
use crate::shard::{
    Layout, PlanError, RankShard, RankWeights, ReadLog, ShardPlan, ShardWeightError,
};
use crate::weights::ModelWeights;

pub use crate::shard::engine::DEFAULT_TIMEOUT;

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

/// The sharded CUDA engine (see the module docs).
pub struct ShardedCudaEngine {
    layout: Layout,
    first: usize,
    ranks: Replicas<CudaEngine>,
    read_bytes: Vec<u64>,
}

impl std::fmt::Debug for ShardedCudaEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedCudaEngine")
            .field("layout", &self.layout)
            .field("first", &self.first)
            .field("ranks", &self.ranks)
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
    /// engine per rank, reporting the ranks' uploads together to `progress`. Refuses a layout the
    /// model cannot be split by, fewer GPUs than ranks, a missing NCCL, and whatever a rank's
    /// engine refuses.
    pub fn new(
        weights: &ModelWeights,
        options: &ShardedCudaOptions,
        progress: Option<&dyn Fn(LoadProgress)>,
    ) -> Result<Self, MultiGpuError> {
        Self::build(Source::Checkpoint(weights), options, progress)
    }

    testing_pub! {
        /// A sharded engine over seeded random bf16 weights of `config`'s shape, each rank making
        /// its own part on its device (for benchmarks: nothing is read from disk).
        fn with_random_weights(
            config: &ModelConfig,
            seed: u32,
            options: &ShardedCudaOptions,
        ) -> Result<Self, MultiGpuError> {
            Self::build(Source::Random { config, seed }, options, None)
        }
    }

    fn build(
        source: Source<'_>,
        options: &ShardedCudaOptions,
        progress: Option<&dyn Fn(LoadProgress)>,
    ) -> Result<Self, MultiGpuError> {
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
        for shard in &plan.ranks {
            match source {
                Source::Checkpoint(w) => {
                    let mut log = ReadLog::default();
                    rank_weights.push(Some(RankWeights::new(w, shard, &mut log)?));
                    read_bytes.push(log.total_bytes());
                }
                Source::Random { .. } => rank_weights.push(None),
            }
        }
        let mut world_comms = NcclComm::init_all(&ordinals)?.into_iter();
        let tp_comms: Vec<TpComm> = if layout.tp == world {
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
        let mut tp_comms = tp_comms.into_iter();
        let mut rank_options = options.cuda.clone();
        if rank_options.engine.kv_blocks.is_none() {
            let formats: Vec<_> = rank_weights
                .iter()
                .map(|w| rank_formats(&config, w.as_ref()))
                .collect();
            let blocks = agreed_kv_blocks(&config, &plan, &formats, &ordinals, &rank_options)?;
            rank_options.engine.kv_blocks = Some(blocks);
        }
        let seed = match source {
            Source::Random { seed, .. } => seed,
            Source::Checkpoint(_) => 0,
        };
        let mut builds: Vec<Build<CudaEngine, CudaError>> = Vec::with_capacity(world);
        for (shard, weights) in plan.ranks.iter().zip(rank_weights) {
            let setup = RankSetup {
                shard: shard.clone(),
                comms: Box::new(NcclGroups {
                    world: world_comms.next().expect("one world communicator per rank"),
                    tp: tp_comms.next().expect("one TP communicator per rank"),
                }),
                timeout: options.timeout,
            };
            let mut opts = rank_options.clone();
            opts.device = ordinals[shard.rank];
            let full = config.clone();
            let seed = seed.wrapping_add(shard.rank as u32);
            builds.push(Box::new(move |report| {
                let source = match &weights {
                    Some(w) => WeightSource::Shard {
                        weights: w,
                        config: &full,
                    },
                    None => WeightSource::Random {
                        config: &full,
                        seed,
                        format: crate::cuda::engine::matrix::StackFormat::Bf16,
                    },
                };
                CudaEngine::build_rank(source, Some(setup), opts, Some(report))
            }));
        }
        // Every rank builds at once: the warm-up passes run the collectives.
        let spawned = Replicas::spawn(config, options.timeout, builds, progress);
        let ranks = spawned.map_err(|e| match e {
            SpawnError::Build { rank, error } => MultiGpuError::Rank {
                rank,
                ordinal: ordinals[rank],
                source: error,
            },
            SpawnError::Worker { rank, reason } => MultiGpuError::Worker { rank, reason },
        })?;
        Ok(ShardedCudaEngine {
            layout,
            first,
            ranks,
            read_bytes,
        })
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
            self.ranks.ask(|e| e.graph_buckets())
        }
    }
}

/// The KV block count every rank can hold: the least of what each rank's free memory allows, with
/// its weights stored in its `formats`.
fn agreed_kv_blocks(
    config: &ModelConfig,
    plan: &ShardPlan,
    formats: &[Vec<LayerFormats>],
    ordinals: &[usize],
    options: &CudaEngineOptions,
) -> Result<usize, MultiGpuError> {
    let mut least = usize::MAX;
    for ((shard, &ordinal), formats) in plan.ranks.iter().zip(ordinals).zip(formats) {
        least = least.min(rank_kv_blocks(config, shard, formats, ordinal, options)?);
    }
    Ok(least.max(1))
}

/// The KV blocks rank `shard` can hold on device `ordinal` after its weights (in `formats`).
fn rank_kv_blocks(
    config: &ModelConfig,
    shard: &RankShard,
    formats: &[LayerFormats],
    ordinal: usize,
    options: &CudaEngineOptions,
) -> Result<usize, MultiGpuError> {
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
    let weights = rank_bytes(config, shard, formats, options.max_step_tokens().max(1));
    let sizes = plan_sizes(
        &plan_config(config, shard),
        options,
        free.saturating_sub(weights),
    )
    .map_err(failed)?;
    Ok(sizes.num_blocks)
}

/// One rank of a world of processes (`mixtral-run --device cuda:N --dist-init ...`): rank `rank`
/// of `layout` on device `options.device`, its shard of `weights` uploaded, its NCCL
/// communicators joined through `nccl_id` (rank 0's [`NcclComm::unique_id`], handed out by the
/// rendezvous) and, with both tensor and expert parallelism, split into TP groups. Every rank
/// calls this at about the same time (joining waits for all). Unless set, the KV block count is
/// the least every rank can hold: `agree_min` takes this rank's and returns the world's (the
/// rendezvous's [`crate::shard::rendezvous::Session::agree_min`], which waits at most its own
/// timeout). It is called either way, so it is also the barrier before NCCL's join, which would
/// wait forever for a rank that failed to load its shard.
///
/// Each step (and the warm-up) may wait `timeout` on the other ranks: past it, the rank aborts
/// its communicators and the engine is dead with [`CudaError::CollectiveTimeout`], so a dead or
/// hung peer is an error, never a hang.
#[allow(clippy::too_many_arguments)]
pub fn open_process_rank(
    weights: &ModelWeights,
    layout: Layout,
    rank: usize,
    nccl_id: &[u8],
    options: &CudaEngineOptions,
    timeout: Duration,
    agree_min: impl FnOnce(usize) -> Result<usize, String>,
    progress: Option<&dyn Fn(LoadProgress)>,
) -> Result<CudaEngine, MultiGpuError> {
    let config = &weights.config;
    let plan = ShardPlan::new(config, layout)?;
    let ordinal = options.device;
    let shard = plan.ranks.get(rank).ok_or_else(|| MultiGpuError::Worker {
        rank,
        reason: format!("not a rank of {layout}"),
    })?;
    let failed = |source: CudaError| MultiGpuError::Rank {
        rank,
        ordinal,
        source,
    };
    if !driver_present() {
        return Err(failed(CudaError::NoDriver));
    }
    let mut log = ReadLog::default();
    let rank_weights = RankWeights::new(weights, shard, &mut log)?;
    let mut options = options.clone();
    let mine = match options.engine.kv_blocks {
        Some(blocks) => blocks,
        None => {
            let formats = rank_formats(config, Some(&rank_weights));
            rank_kv_blocks(config, shard, &formats, ordinal, &options)?
        }
    };
    let agreed = agree_min(mine).map_err(|reason| MultiGpuError::Worker { rank, reason })?;
    options.engine.kv_blocks = Some(agreed.max(1));
    let ctx = CudaContext::new(ordinal)
        .map_err(|e| failed(CudaError::driver(format!("opening device {ordinal}"))(e)))?;
    let world = NcclComm::join(nccl_id, rank, layout.world(), &ctx)?;
    let tp = if layout.tp == layout.world() {
        TpComm::World
    } else if layout.tp == 1 {
        TpComm::Alone
    } else {
        TpComm::Own(world.split(shard.ep_rank, shard.tp_rank)?)
    };
    let setup = RankSetup {
        shard: shard.clone(),
        comms: Box::new(NcclGroups { world, tp }),
        timeout,
    };
    let source = WeightSource::Shard {
        weights: &rank_weights,
        config,
    };
    CudaEngine::build_rank(source, Some(setup), options, progress).map_err(failed)
}

impl Engine for ShardedCudaEngine {
    fn config(&self) -> &ModelConfig {
        self.ranks.config()
    }

    fn max_context(&self) -> usize {
        self.ranks.max_context()
    }

    fn new_sequence(&mut self) -> Result<SeqId, EngineError> {
        self.ranks.new_sequence()
    }

    fn free_sequence(&mut self, seq: SeqId) -> Result<(), EngineError> {
        self.ranks.free_sequence(seq)
    }

    fn sequence_len(&self, seq: SeqId) -> Result<usize, EngineError> {
        self.ranks.sequence_len(seq)
    }

    fn free_kv_blocks(&self) -> usize {
        self.ranks.free_kv_blocks()
    }

    fn total_kv_blocks(&self) -> usize {
        self.ranks.total_kv_blocks()
    }

    fn step(&mut self, batch: &[SeqStep<'_>]) -> Result<StepOutput, EngineError> {
        self.ranks.step(batch)
    }

    fn step_tokens(
        &mut self,
        batch: &[SeqStep<'_>],
        samplers: &mut [RowSampler<'_>],
    ) -> Result<Vec<u32>, EngineError> {
        self.ranks.step_tokens(batch, samplers)
    }

    fn reuse_prefix(&mut self, seq: SeqId, tokens: &[u32]) -> Result<usize, EngineError> {
        self.ranks.reuse_prefix(seq, tokens)
    }

    fn fork_sequence(&mut self, seq: SeqId) -> Result<SeqId, EngineError> {
        self.ranks.fork_sequence(seq)
    }

    fn kv_block_size(&self) -> Option<usize> {
        self.ranks.kv_block_size()
    }

    fn describe(&self) -> Option<String> {
        let rank0 = self.ranks.describe().unwrap_or_default();
        Some(format!(
            "cuda: {} GPUs from cuda:{} ({}), NCCL collectives in the decode graphs; rank 0: {rank0}",
            self.layout.world(),
            self.first,
            self.layout
        ))
    }
}
