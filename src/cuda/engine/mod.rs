//! [`CudaEngine`]: the Mixtral forward pass on one NVIDIA GPU behind the same batched step API as the
//! CPU reference ([`Engine`]).
//!
//! Built once: the weights are uploaded from the memory-mapped checkpoint through pinned staging
//! ([`upload`]), the static [`plan`] allocates every activation buffer and the paged KV cache, and one
//! CUDA graph per decode batch-size bucket is captured ([`graph`]). Before anything is allocated the
//! whole footprint is compared with the free device memory, so a model that cannot fit is a typed
//! [`CudaError::OutOfMemory`] and nothing stays allocated.
//!
//! A step is validated and applied to the KV bookkeeping ([`PagedKv`], shared with the CPU engine),
//! the changed block-table rows are uploaded, and the step runs as a graph replay (decode) or as
//! eager chunks (prefill, see [`inputs`]). After a device failure the engine refuses all further work
//! with a dead [`EngineError::Backend`] ([`EngineError::is_dead`]) holding the [`CudaError`]: the
//! failure itself, then [`CudaError::Dead`] naming it (a sticky CUDA error poisons the context).

pub mod forward;
pub mod graph;
pub mod host;
pub mod inputs;
pub mod matrix;
pub mod plan;
pub mod rank;
pub mod staging;
pub mod upload;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use self::forward::{Attention, Pass};
use self::graph::DecodeGraph;
use self::inputs::{decode_buckets, schedule_step, Chunk, ChunkKind, NO_SEQUENCE};
pub use self::matrix::GroupedKernel;
use self::matrix::{GroupedExperts, StackFormat};
use self::plan::{plan_bytes, Dims, Plan, PlanSizes};
use self::rank::DeviceCollectives;
use self::staging::StepStaging;
use self::upload::{
    allocate_weights, device_weight_bytes, is_tied, randomize_weights, upload_weights,
    weight_formats, GpuWeights, LayerFormats,
};
use super::args::{SampleArgs, SampleScalars};
use super::device::CudaDevice;
use super::error::CudaError;
use super::memory::{copy_to_host, DeviceArena, DeviceBuffer};
use super::module::Kernels;
use super::ops::{self, HopperCheck, RNG_STATE_WORDS, SAMPLE_ID_BAD_PARAMS, SAMPLE_ID_NON_FINITE};
use crate::checkpoint::LoadProgress;
use crate::config::ModelConfig;
use crate::engine::{
    check_sampler_count, sample_on_host, Engine, EngineError, EngineOptions, LogitsFor, RowSampler,
    SeqId, SeqStep, StepOutput,
};
use crate::kv::{BlockCopy, KvLimits, PagedKv, RELEASED};
use crate::quant::Q8;
use crate::sampling::{Rng, Sampler};
use crate::shard::watchdog::Watchdog;
use crate::shard::{RankShard, RankWeights};
use crate::weights::ModelWeights;

/// Options of a [`CudaEngine`]. The defaults fit a model on the first GPU with as much KV cache as
/// the remaining memory holds (up to `max_sequences` full contexts).
#[derive(Debug, Clone)]
pub struct CudaEngineOptions {
    /// The limits every backend takes. Left `None`: the model's context, 16-token blocks, 16
    /// sequences (also the largest decode batch), 512 tokens per forward pass (longer steps run in
    /// chunks), and as many KV blocks as fit (at most `max_sequences` full contexts).
    pub engine: EngineOptions,
    /// CUDA device ordinal.
    pub device: usize,
    /// Capture and replay CUDA graphs for decode steps (off: eager launches, for comparison).
    pub cuda_graphs: bool,
    /// Device memory left free for the driver and other users, in bytes.
    pub reserve_bytes: usize,
    /// On a compute capability 9.0 GPU (H100, H200), run the expert GEMMs of prefill chunks on CUTLASS's Hopper
    /// grouped GEMM (`csrc/cutlass/`), and their dense projections (past the GEMV's range; where
    /// every projection's feature counts are multiples of 8) on its dense GEMM, after their
    /// self-checks once at build (against the mma.sync kernels; for a model
    /// whose experts are all FP8 or all INT8, the 8-bit kernels against their CPU reference); both
    /// must pass (`CudaEngine::prefill_experts` says which kernels run). Off by default until they
    /// have run on hardware.
    pub cutlass_experts: bool,
    /// Run the decode products of packed weights the tensor-core decode kernels read (FP8, INT8,
    /// and INT4 in groups of multiples of 128 columns; no act-order permutation) on those kernels
    /// (`qlinear_mma`, `qmoe_mma_*`) instead of the GEMVs: the same values, the multiply-adds of
    /// up to 32 tokens a pass on the tensor cores. Decode attention then also computes its
    /// scores on the tensor cores where it is compiled for the shape (head_dim 64 or 128, 4, 6 or 8
    /// query heads per KV head, as Mixtral's 128 and 4). Off by default until they have run on
    /// hardware.
    pub mma_decode: bool,
    /// On a compute capability 9.0+ GPU, issue every kernel as a programmatic dependent launch
    /// (also inside the decode graphs): the next kernel's blocks are placed on the SMs while the
    /// one before still runs and wait there for it, hiding the gap between kernels. The kernels
    /// compute the same values either way (`tests/gpu_engine.rs` compares the logits bit for
    /// bit; not yet run on a GPU). Ignored before compute capability 9.0
    /// (`CudaEngine::dependent_launches` says whether they are on). Off by default until timed on
    /// hardware.
    pub dependent_launches: bool,
    /// Device sampling (`step_sample`, `Engine::step_tokens` with sampled rows) through the `sample`
    /// kernel's fast paths: for top-k up to 1024 (with or without top-p), top-p alone when its cut
    /// falls within the 1024 highest logits, and no filter, a few passes over the row instead of the
    /// search path's 16 or more; the same ids as the search path (and the host sampler) up to
    /// rounding.
    /// Off by default until run on hardware.
    pub fast_sampling: bool,
}

impl Default for CudaEngineOptions {
    fn default() -> Self {
        CudaEngineOptions {
            engine: EngineOptions::default(),
            device: 0,
            cuda_graphs: true,
            reserve_bytes: 1 << 30,
            cutlass_experts: false,
            mma_decode: false,
            dependent_launches: false,
            fast_sampling: false,
        }
    }
}

impl CudaEngineOptions {
    fn block_size(&self) -> usize {
        self.engine.block_size.unwrap_or(16)
    }

    fn max_sequences(&self) -> usize {
        self.engine.max_sequences.unwrap_or(16)
    }

    /// The longest sequence (the model's `max_position_embeddings` when not given), at least 1.
    fn max_context(&self, config: &ModelConfig) -> usize {
        self.engine
            .max_context
            .unwrap_or(config.max_position_embeddings)
            .max(1)
    }

    /// Most tokens in one forward pass (the default when not given).
    pub(crate) fn max_step_tokens(&self) -> usize {
        self.engine.max_step_tokens.unwrap_or(512)
    }
}

/// Device memory a [`CudaEngine`] holds, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryUse {
    /// The weights (bf16 and packed stacks) and the scratch packed stacks are expanded into for
    /// large chunks.
    pub weights: usize,
    /// Projection stacks held packed (quantized) on the device, of `5 * layers` (q/k/v, o, w1, w3,
    /// w2 of each layer); the others are bf16.
    pub packed_stacks: usize,
    /// Activations, inputs and the KV cache.
    pub plan: usize,
    /// KV blocks in the pool.
    pub kv_blocks: usize,
    /// Free device memory before the engine allocated anything.
    pub free_before: usize,
}

/// The CUDA engine. Fields drop in order: a rank's watchdog first, graphs before the memory they
/// point into, the device last.
pub struct CudaEngine {
    /// A sharded engine rank's deadline on each step (see [`CudaEngine::watched`]).
    watchdog: Option<Watchdog>,
    graphs: Vec<DecodeGraph>,
    plan: Plan,
    weights: GpuWeights,
    arena: DeviceArena,
    kernels: Kernels,
    device: CudaDevice,
    config: ModelConfig,
    kv: PagedKv,
    /// Block-table row of each live sequence.
    seq_rows: HashMap<SeqId, usize>,
    free_rows: Vec<usize>,
    /// Page-locked host memory of every per-step upload and read-back (with the host copy of the
    /// block tables).
    staging: StepStaging,
    memory: MemoryUse,
    /// The Hopper expert kernels' self-check, when asked for.
    hopper_check: Option<HopperCheck>,
    /// The first device failure; set once, then every call fails fast.
    dead: Option<String>,
}

impl std::fmt::Debug for CudaEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaEngine")
            .field("device", &self.device.name())
            .field("kv", &self.kv.limits())
            .field("graphs", &self.graphs)
            .field("memory", &self.memory)
            .field("dead", &self.dead)
            .finish_non_exhaustive()
    }
}

/// The `(in, out)` features of the projections, as CUTLASS's dense GEMM takes them, when it can run
/// every one of them (all multiples of 8 below 2^32: whole 16-byte TMA rows); `None` leaves the
/// projections on the mma.sync kernels.
fn projection_features(dims: &Dims, vocab_rows: usize) -> Option<Vec<(u32, u32)>> {
    dims.projections(vocab_rows)
        .iter()
        .map(|&(i, o)| {
            let whole = i % 8 == 0 && o % 8 == 0;
            Some((u32::try_from(i).ok()?, u32::try_from(o).ok()?)).filter(|_| whole)
        })
        .collect()
}

/// The 8-bit format of every layer's expert stacks when they are all FP8 or all INT8 without
/// column permutation (what the CUTLASS 8-bit expert kernels read); `None` otherwise.
fn q8_experts(formats: &[LayerFormats]) -> Option<Q8> {
    let first = formats.first()?;
    let format = match first.w13 {
        StackFormat::Packed { kind, perm: false } => Q8::of(kind)?,
        _ => return None,
    };
    let stack = StackFormat::Packed {
        kind: format.kind(),
        perm: false,
    };
    formats
        .iter()
        .all(|f| f.w13 == stack && f.w2 == stack)
        .then_some(format)
}

/// The plan sizes for `options` given `free` device bytes after the weights; `None` KV blocks
/// means "as many as fit". Pure arithmetic, tested without a device.
pub fn plan_sizes(
    config: &ModelConfig,
    options: &CudaEngineOptions,
    free_after_weights: usize,
) -> Result<PlanSizes, CudaError> {
    let invalid =
        |what: &str| CudaError::UnsupportedModel(format!("invalid engine options: {what}"));
    if options.block_size() == 0 || options.max_sequences() == 0 || options.max_step_tokens() == 0 {
        return Err(invalid(
            "block_size, max_sequences and max_step_tokens must be at least 1",
        ));
    }
    let max_context = options.max_context(config);
    if max_context > i32::MAX as usize / 2 {
        return Err(invalid("max_context must be below 2^30"));
    }
    let max_blocks_per_seq = max_context.div_ceil(options.block_size());
    let max_decode_tokens = options.max_sequences().min(options.max_step_tokens());
    let mut sizes = PlanSizes {
        max_tokens: options.max_step_tokens(),
        max_decode_tokens,
        max_sequences: options.max_sequences(),
        num_blocks: 0,
        block_size: options.block_size(),
        max_blocks_per_seq,
    };
    // The cache buffers grow by whole blocks, so two sizes give the bytes of one more block (exact
    // when a block's bytes are a multiple of the allocation alignment, as for 16-token blocks of
    // 8 or more key values a token; otherwise within the alignment per buffer).
    sizes.num_blocks = 1;
    let one_block = plan_bytes(config, &sizes);
    sizes.num_blocks = 2;
    let per_block = plan_bytes(config, &sizes).saturating_sub(one_block);
    let without_cache = one_block.saturating_sub(per_block);
    let wanted = max_blocks_per_seq
        .checked_mul(options.max_sequences())
        .ok_or_else(|| invalid("max_sequences * blocks per context overflows"))?;
    sizes.num_blocks = match options.engine.kv_blocks {
        Some(0) => return Err(invalid("kv_blocks must be at least 1")),
        Some(n) => n,
        None => {
            let room = free_after_weights
                .saturating_sub(without_cache)
                .saturating_sub(options.reserve_bytes);
            wanted.min(room / per_block.max(1)).max(1)
        }
    };
    Ok(sizes)
}

/// What makes an engine one rank of a sharded engine: its part of the model and its groups.
#[derive(Debug)]
pub struct RankSetup {
    /// What the rank holds.
    pub shard: RankShard,
    /// Its collectives (world and tensor-parallel group).
    pub comms: Box<dyn DeviceCollectives>,
    /// How long one step (or the warm-up) may wait on the other ranks before the rank aborts its
    /// communicators and fails with [`CudaError::CollectiveTimeout`].
    pub timeout: Duration,
}

/// Where a [`CudaEngine`]'s weights come from.
#[derive(Clone, Copy)]
pub enum WeightSource<'a> {
    /// One rank's shard of a checkpoint (with a [`RankSetup`]).
    Shard {
        /// The shard.
        weights: &'a RankWeights,
        /// The whole model's config.
        config: &'a ModelConfig,
    },
    /// A loaded checkpoint (uploaded through pinned staging).
    Checkpoint(&'a ModelWeights),
    /// Seeded random values made on the device, for benchmarks of real shapes without a checkpoint.
    Random {
        /// The model shape.
        config: &'a ModelConfig,
        /// Seed of the values.
        seed: u32,
        /// Storage of every projection stack (bf16, or packed in a quantized format: then the codes
        /// are made on the host and uploaded; [`StackFormat::of_quant_format`] gives the formats
        /// quantizing on load makes).
        format: StackFormat,
    },
}

impl CudaEngine {
    /// Opens the device, checks that the model and its KV cache fit, uploads the weights (reporting
    /// progress), allocates the plan and captures the decode graphs.
    pub fn new(
        weights: &ModelWeights,
        options: CudaEngineOptions,
        progress: Option<&dyn Fn(LoadProgress)>,
    ) -> Result<CudaEngine, CudaError> {
        Self::build(WeightSource::Checkpoint(weights), options, progress)
    }

    testing_pub! {
        /// Builds an engine over `source`.
        fn build(
            source: WeightSource<'_>,
            options: CudaEngineOptions,
            progress: Option<&dyn Fn(LoadProgress)>,
        ) -> Result<CudaEngine, CudaError> {
            Self::build_rank(source, None, options, progress)
        }
    }

    testing_pub! {
        /// Builds an engine over `source`; with `rank`, one rank of a sharded engine: `source` is
        /// that rank's shard ([`WeightSource::Shard`]) or random bf16 weights of its shapes.
        fn build_rank(
            source: WeightSource<'_>,
            rank: Option<RankSetup>,
            options: CudaEngineOptions,
            progress: Option<&dyn Fn(LoadProgress)>,
        ) -> Result<CudaEngine, CudaError> {
            let full = match source {
                WeightSource::Checkpoint(w) => &w.config,
                WeightSource::Random { config, .. } | WeightSource::Shard { config, .. } => config,
            };
            let max_tokens = options.max_step_tokens().max(1);
            let packed_random = matches!(
                source,
                WeightSource::Random { format, .. } if format != StackFormat::Bf16
            );
            let (config, tied, formats) = match (&rank, source) {
                (Some(_), WeightSource::Checkpoint(_)) | (None, WeightSource::Shard { .. }) => {
                    return Err(CudaError::UnsupportedModel(
                        "a rank of a sharded engine takes its shard or random bf16 weights, and a \
                         shard needs its rank"
                            .into(),
                    ))
                }
                (Some(_), _) if packed_random => {
                    return Err(CudaError::UnsupportedModel(
                        "a rank of a sharded engine takes random weights in bf16 only".into(),
                    ))
                }
                (Some(r), source) => {
                    let shard = match source {
                        WeightSource::Shard { weights, .. } => Some(weights),
                        _ => None,
                    };
                    (rank::plan_config(full, &r.shard), false, rank::formats(full, shard))
                }
                (None, WeightSource::Checkpoint(w)) => {
                    (w.config.clone(), is_tied(w), weight_formats(w))
                }
                (None, WeightSource::Random { config, format, .. }) => {
                    let formats = vec![LayerFormats::all(format); config.num_layers];
                    (config.clone(), config.tie_word_embeddings, formats)
                }
            };
            let device = CudaDevice::new(options.device)?;
            device
                .context()
                .bind_to_thread()
                .map_err(CudaError::driver("making the CUDA context current"))?;
            let mut kernels = Kernels::load(&device)?;
            let (free, total) = device
                .context()
                .mem_get_info()
                .map_err(CudaError::driver("reading free device memory"))?;
            let weight_bytes = match &rank {
                Some(r) => rank::rank_bytes(full, &r.shard, &formats, max_tokens),
                None => device_weight_bytes(&config, tied, &formats, max_tokens),
            };
            // The CUTLASS expert scratch, when asked for, whether or not its self-check passes:
            // the 8-bit kernels' when every layer's experts are FP8 (or every layer's INT8).
            let q8_experts = q8_experts(&formats);
            let cutlass_bytes = match (options.cutlass_experts, q8_experts) {
                (false, _) => 0,
                (true, q8) => {
                    let dims = Dims::of(&config);
                    let shape = dims.expert_shape(max_tokens, None);
                    let features = projection_features(&dims, dims.vocab).unwrap_or_default();
                    let sm_count = device.multiprocessors() as u32;
                    let linear =
                        ops::LinearCutlassScratch::bytes(&features, max_tokens as u32, sm_count);
                    linear
                        + match q8 {
                            Some(_) => ops::MoeCutlassQ8Scratch::bytes(&shape),
                            None => ops::MoeCutlassScratch::bytes(&shape),
                        }
                }
            };
            let weight_bytes = weight_bytes + cutlass_bytes;
            let sizes = plan_sizes(&config, &options, free.saturating_sub(weight_bytes))?;
            let needed = weight_bytes + plan_bytes(&config, &sizes) + options.reserve_bytes;
            if needed > free {
                return Err(CudaError::OutOfMemory {
                    what: format!(
                        "the weights ({weight_bytes} bytes) and {} KV blocks of {} tokens",
                        sizes.num_blocks, sizes.block_size
                    ),
                    bytes: needed,
                    free,
                    total,
                });
            }
            let stream = Arc::clone(device.stream());
            let mut arena = DeviceArena::new(Arc::clone(&stream));
            let mut gpu_weights = match &rank {
                Some(r) => {
                    rank::allocate_rank_weights(full, &r.shard, &formats, max_tokens, &mut arena)?
                }
                None => allocate_weights(&config, tied, &formats, max_tokens, &mut arena)?,
            };
            match source {
                WeightSource::Shard { weights, .. } => {
                    upload_weights(weights, &mut gpu_weights, device.context(), &stream, progress)?
                }
                WeightSource::Checkpoint(w) => {
                    upload_weights(w, &mut gpu_weights, device.context(), &stream, progress)?
                }
                WeightSource::Random { seed, .. } => randomize_weights(
                    &mut gpu_weights,
                    &config,
                    seed,
                    &kernels,
                    device.context(),
                    &stream,
                )?,
            }
            let packed_stacks = formats
                .iter()
                .flat_map(|f| [f.qkv, f.o, f.w13, f.w13, f.w2])
                .filter(|f| *f != StackFormat::Bf16)
                .count();
            let weights_allocated = arena.bytes();
            let mut plan = Plan::new(&config, sizes, &mut arena)?;
            plan.mma_decode = options.mma_decode;
            plan.fast_sampling = options.fast_sampling;
            plan.multiprocessors = device.multiprocessors();
            let mut watchdog = None;
            if let Some(r) = rank {
                let dog = Watchdog::start("mixtral rank watchdog", r.timeout, r.comms.aborter())
                    .map_err(|e| CudaError::Collective(format!("starting the watchdog: {e}")))?;
                watchdog = Some(dog);
                let rank_plan = rank::rank_plan(full, &r.shard, r.comms, max_tokens, &mut arena)?;
                plan.rank = Some(rank_plan);
            }
            let cutlass_check = if options.cutlass_experts {
                let max = plan.expert_shape();
                let check = match q8_experts {
                    Some(format) => ops::moe_cutlass_q8_self_check(&stream, format)?,
                    None => ops::moe_cutlass_self_check(&kernels, &stream)?,
                };
                let check = check.and(ops::linear_cutlass_self_check(&kernels, &stream)?);
                if check.passed() {
                    if let Some(features) = projection_features(&plan.dims, plan.vocab_rows()) {
                        let tokens = max_tokens as u32;
                        let linear =
                            ops::LinearCutlassScratch::new(&mut arena, &stream, &features, tokens)?;
                        gpu_weights.scratch.linear = Some(linear);
                    }
                    plan.grouped = match q8_experts {
                        Some(format) => {
                            let scratch =
                                ops::MoeCutlassQ8Scratch::new(&mut arena, &stream, &max, format)?;
                            GroupedExperts::CutlassQ8(Box::new(scratch))
                        }
                        None => {
                            let scratch = ops::MoeCutlassScratch::new(&mut arena, &stream, &max)?;
                            GroupedExperts::Cutlass(Box::new(scratch))
                        }
                    };
                }
                Some(check)
            } else {
                None
            };
            let kv = PagedKv::new(KvLimits {
                block_size: sizes.block_size,
                num_blocks: sizes.num_blocks,
                max_context: options.max_context(&config),
                max_sequences: sizes.max_sequences,
                vocab_size: config.vocab_size,
            })
            .map(|kv| {
                kv.with_prefix_caching(true)
                    .with_sliding_window(config.sliding_window)
            })
            .map_err(|e| CudaError::UnsupportedModel(e.to_string()))?;
            let staging = StepStaging::new(device.context(), &sizes)?;
            if options.dependent_launches {
                kernels.enable_dependent_launches(&device);
            }
            let mut engine = CudaEngine {
                watchdog,
                graphs: Vec::new(),
                plan,
                weights: gpu_weights,
                memory: MemoryUse {
                    weights: weights_allocated,
                    packed_stacks,
                    plan: arena.bytes() - weights_allocated,
                    kv_blocks: sizes.num_blocks,
                    free_before: free,
                },
                arena,
                kernels,
                device,
                config,
                kv,
                seq_rows: HashMap::new(),
                free_rows: (0..sizes.max_sequences).rev().collect(),
                staging,
                hopper_check: cutlass_check,
                dead: None,
            };
            engine.watched(|e| e.warm_up_and_capture(options.cuda_graphs))?;
            Ok(engine)
        }
    }

    /// Runs every decode bucket once eagerly (all tokens padding: nothing is written to the cache),
    /// then captures it.
    fn warm_up_and_capture(&mut self, capture: bool) -> Result<(), CudaError> {
        let sizes = self.plan.sizes;
        for bucket in decode_buckets(sizes.max_decode_tokens, sizes.max_tokens) {
            self.upload_inputs(&Chunk::padding(bucket))?;
            let stream = Arc::clone(self.device.stream());
            self.plan.forward(
                &self.kernels,
                &stream,
                &mut self.weights,
                Pass::decode(bucket),
            )?;
            self.staging.finish(&stream)?;
            if capture {
                let graph = DecodeGraph::capture(
                    &mut self.plan,
                    &self.kernels,
                    &stream,
                    &mut self.weights,
                    bucket,
                )?;
                self.graphs.push(graph);
            }
        }
        Ok(())
    }

    testing_pub! {
        /// The device name.
        fn device_name(&self) -> &str {
            self.device.name()
        }
    }

    /// Device memory held.
    pub fn memory(&self) -> MemoryUse {
        MemoryUse {
            plan: self.arena.bytes() - self.memory.weights,
            ..self.memory
        }
    }

    testing_pub! {
        /// The kernels that run the expert GEMMs of prefill chunks, and the result of the CUTLASS
        /// kernels' self-check when [`CudaEngineOptions::cutlass_experts`] asked for one.
        fn prefill_experts(&self) -> (GroupedKernel, Option<HopperCheck>) {
            (self.plan.grouped.kernel(), self.hopper_check)
        }
    }

    testing_pub! {
        /// Whether kernels are issued as programmatic dependent launches
        /// ([`CudaEngineOptions::dependent_launches`] on a compute capability 9.0+ GPU).
        fn dependent_launches(&self) -> bool {
            self.kernels.dependent_launches()
        }
    }

    testing_pub! {
        /// The captured decode batch sizes (empty with graphs off).
        fn graph_buckets(&self) -> Vec<usize> {
            self.graphs.iter().map(|g| g.bucket).collect()
        }
    }

    testing_pub! {
        /// Like [`Engine::step`], but reads back only the greedy token of every logits row (argmax on
        /// the device, ties to the lowest id) instead of the logits: the fast path of greedy decoding.
        /// A row whose logits hold a NaN or an infinity is [`EngineError::NonFiniteLogits`] (the step
        /// itself was applied), never a token.
        fn step_greedy(&mut self, batch: &[SeqStep<'_>]) -> Result<Vec<u32>, EngineError> {
            self.run_step(batch, Readback::Greedy, None)
                .map(Output::ids)
        }
    }

    testing_pub! {
        /// Grows `seq` to `len` cached tokens without computing them: their keys and values are whatever
        /// the blocks hold. For benchmarks of long-context decode, whose cost does not depend on the
        /// values; never use it for generation.
        fn extend_unfilled(&mut self, seq: SeqId, len: usize) -> Result<(), EngineError> {
            self.check_alive()?;
            let cached = self.kv.sequence_len(seq)?;
            if len <= cached {
                return Ok(());
            }
            self.bind()?;
            let filler = vec![0u32; len - cached];
            self.kv.apply_step(&[SeqStep {
                seq,
                tokens: &filler,
                start_pos: cached,
                logits: LogitsFor::None,
            }])?;
            let stream = Arc::clone(self.device.stream());
            let synced = self
                .sync_block_tables(&[seq])
                .and_then(|()| self.staging.finish(&stream));
            synced.map_err(|e| self.fail(e))
        }
    }

    testing_pub! {
        /// Like [`CudaEngine::step_greedy`], but draws each logits row's token on the device with
        /// `samplers[i]` (one per logits row, in output order): temperature, top-k and top-p exactly as
        /// [`Sampler::sample`] defines them, from the sampler's own random stream, which advances as
        /// the host sampler's would. Greedy samplers take the device argmax. The repetition penalty is
        /// not applied on the device: a sampler using it is refused (before anything changes; the
        /// [`Engine::step_tokens`] of this engine samples such steps on the host), and so is a sampler
        /// count other than the step's rows ([`EngineError::SamplerCount`]). A row whose logits are
        /// not finite is [`EngineError::NonFiniteLogits`] (the step itself was applied).
        fn step_sample(
            &mut self,
            batch: &[SeqStep<'_>],
            samplers: &mut [Sampler],
        ) -> Result<Vec<u32>, EngineError> {
            check_sampler_count(batch, samplers.len())?;
            if let Some(s) = samplers
                .iter()
                .find(|s| s.params().repetition_penalty != 1.0)
            {
                return Err(EngineError::InvalidOptions(format!(
                    "repetition penalty {} is not applied by device sampling",
                    s.params().repetition_penalty
                )));
            }
            self.run_step(batch, Readback::Greedy, Some(samplers))
                .map(Output::ids)
        }
    }

    /// Marks the engine dead after `error` (the first failure is kept) and returns the dead
    /// backend error holding it.
    fn fail(&mut self, error: CudaError) -> EngineError {
        if self.dead.is_none() {
            self.dead = Some(error.to_string());
        }
        EngineError::dead(error)
    }

    fn check_alive(&self) -> Result<(), EngineError> {
        match &self.dead {
            Some(first) => Err(EngineError::dead(CudaError::Dead(first.clone()))),
            None => Ok(()),
        }
    }

    /// Runs `work` (device work that may issue collectives) under a sharded engine rank's
    /// watchdog; unsharded, just runs it. When the work still waits on the other ranks after the
    /// rank's timeout, the watchdog aborts the rank's communicators, which ends the wait, and the
    /// answer is [`CudaError::CollectiveTimeout`] whatever the work returned.
    fn watched<T>(
        &mut self,
        work: impl FnOnce(&mut Self) -> Result<T, CudaError>,
    ) -> Result<T, CudaError> {
        let Some(dog) = self.watchdog.take() else {
            return work(self);
        };
        dog.arm();
        let result = work(self);
        let expired = dog.disarm();
        let timeout = dog.timeout();
        self.watchdog = Some(dog);
        if expired {
            return Err(CudaError::CollectiveTimeout { timeout });
        }
        result
    }

    /// Makes the engine's context current on the calling thread (the engine may move between
    /// threads; the raw copies below do not bind it themselves).
    fn bind(&mut self) -> Result<(), EngineError> {
        let bound = self
            .device
            .context()
            .bind_to_thread()
            .map_err(CudaError::driver("making the CUDA context current"));
        bound.map_err(|e| self.fail(e))
    }

    fn run_step(
        &mut self,
        batch: &[SeqStep<'_>],
        readback: Readback,
        mut samplers: Option<&mut [Sampler]>,
    ) -> Result<Output, EngineError> {
        self.check_alive()?;
        let applied = self.kv.apply(batch)?;
        let plan = applied.plan;
        if plan.entries.is_empty() {
            return Ok(match readback {
                Readback::Logits => Output::Logits(StepOutput {
                    vocab: self.plan.dims.vocab,
                    ..StepOutput::default()
                }),
                Readback::Greedy => Output::Greedy(Vec::new()),
            });
        }
        self.bind()?;
        let mut seq_rows = Vec::with_capacity(plan.entries.len());
        for e in &plan.entries {
            let Some(&row) = self.seq_rows.get(&e.seq) else {
                return Err(EngineError::UnknownSequence(e.seq));
            };
            seq_rows.push(row);
        }
        let tokens: Vec<u32> = batch.iter().flat_map(|s| s.tokens).copied().collect();
        let seqs: Vec<SeqId> = plan.entries.iter().map(|e| e.seq).collect();
        let result = self.watched(|engine| {
            engine.copy_blocks(&applied.copies)?;
            engine.sync_block_tables(&seqs)?;
            let buckets = engine.graph_buckets();
            let buckets = if buckets.is_empty() {
                decode_buckets(
                    engine.plan.sizes.max_decode_tokens,
                    engine.plan.sizes.max_tokens,
                )
            } else {
                buckets
            };
            let schedule = schedule_step(
                &plan,
                &tokens,
                &seq_rows,
                &buckets,
                engine.plan.sizes.max_tokens,
            );
            let mut out = match readback {
                Readback::Logits => Output::Logits(StepOutput {
                    vocab: engine.plan.dims.vocab,
                    logits: Vec::with_capacity(schedule.rows.len() * engine.plan.dims.vocab),
                    rows: schedule.rows.clone(),
                }),
                Readback::Greedy => Output::Greedy(Vec::with_capacity(schedule.rows.len())),
            };
            let mut produced = 0;
            for chunk in &schedule.chunks {
                let n = chunk.logit_rows.len();
                let part = samplers
                    .as_deref_mut()
                    .and_then(|all| all.get_mut(produced..produced + n));
                if let Some(row) = engine.run_chunk(chunk, &mut out, part)? {
                    return Ok(Err(EngineError::NonFiniteLogits {
                        row: produced + row,
                    }));
                }
                produced += n;
            }
            Ok(Ok(out))
        });
        match result {
            Ok(done) => done,
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Copies every layer's K and V of each block `src` over block `dst` (copy-on-write of a block
    /// shared through the prefix cache or a fork), in stream order before the step writes them.
    fn copy_blocks(&mut self, copies: &[BlockCopy]) -> Result<(), CudaError> {
        let blocks = self.plan.sizes.num_blocks;
        let stream = self.device.stream();
        for copy in copies {
            for layer in &mut self.plan.cache {
                for cache in [&mut layer.k, &mut layer.v] {
                    let per_block = cache.len() / blocks.max(1);
                    cache.copy_within(
                        stream,
                        copy.src * per_block,
                        copy.dst * per_block,
                        per_block,
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Uploads the block-table rows of `seqs` that differ from the device copy (one copy of the
    /// rows from the first to the last changed one; no host sync).
    fn sync_block_tables(&mut self, seqs: &[SeqId]) -> Result<(), CudaError> {
        let width = self.plan.sizes.max_blocks_per_seq;
        let tables = self.staging.tables.host()?;
        let mut changed: Option<(usize, usize)> = None;
        for &seq in seqs {
            let (Some(&row), Ok(table)) = (self.seq_rows.get(&seq), self.kv.block_table(seq))
            else {
                continue;
            };
            let Some(current) = tables.get_mut(row * width..(row + 1) * width) else {
                return Err(CudaError::Dead(format!(
                    "block-table row {row} out of range"
                )));
            };
            // No block, or one released by the sliding window (never read): -1.
            let wanted = (0..width).map(|i| match table.get(i) {
                Some(&b) if b != RELEASED => b as i32,
                _ => -1,
            });
            if current.iter().copied().eq(wanted.clone()) {
                continue;
            }
            for (c, w) in current.iter_mut().zip(wanted) {
                *c = w;
            }
            changed = Some(changed.map_or((row, row), |(lo, hi)| (lo.min(row), hi.max(row))));
        }
        let Some((lo, hi)) = changed else {
            return Ok(());
        };
        let rows = (hi + 1 - lo) * width;
        let target = self
            .plan
            .block_tables
            .view_mut()
            .sub(lo * width, rows)
            .ok_or_else(|| CudaError::Dead(format!("block-table rows {lo}..={hi} out of range")))?;
        self.staging
            .tables
            .upload(self.device.stream(), lo * width, target)
    }

    /// Starts uploading the chunk's token ids, positions, sequence rows and logit rows.
    fn upload_inputs(&mut self, chunk: &Chunk) -> Result<(), CudaError> {
        let m = self.plan.sizes.max_tokens;
        let words = self.staging.inputs.host()?;
        words.fill(0);
        words[2 * m..3 * m].fill(NO_SEQUENCE);
        // A rank holds the embedding rows of its token ids only: the others read a zero row.
        let vocab = self.plan.rank.as_ref().map(|r| r.vocab.clone());
        for (i, &id) in chunk.ids.iter().enumerate() {
            words[i] = match &vocab {
                None => id as i32,
                Some(v) if v.contains(&(id as usize)) => (id as usize - v.start) as i32,
                Some(_) => -1,
            };
            words[m + i] = chunk.positions[i];
            words[2 * m + i] = chunk.token_seq[i];
        }
        for (i, &r) in chunk.logit_rows.iter().enumerate() {
            words[3 * m + i] = r as i32;
        }
        let all = self.plan.inputs.all().view_mut();
        self.staging.inputs.upload(self.device.stream(), 0, all)
    }

    /// Runs one chunk and appends its rows to `out`; with `samplers` (one per row of the chunk) the
    /// rows are drawn on the device. Returns the first row (of the chunk) whose logits were not
    /// finite, if any. Waits for the device once, at the end.
    fn run_chunk(
        &mut self,
        chunk: &Chunk,
        out: &mut Output,
        mut samplers: Option<&mut [Sampler]>,
    ) -> Result<Option<usize>, CudaError> {
        self.upload_inputs(chunk)?;
        let stream = Arc::clone(self.device.stream());
        let greedy = matches!(out, Output::Greedy(_));
        let wanted = chunk.logit_rows.len();
        // The device logits row holding the chunk's `k`-th wanted row.
        let decode = matches!(chunk.kind, ChunkKind::Decode { .. });
        let row = |k: usize| {
            if decode {
                chunk.logit_rows[k] as usize
            } else {
                k
            }
        };
        match &chunk.kind {
            ChunkKind::Decode { bucket } => {
                match self.graphs.iter().find(|g| g.bucket == *bucket) {
                    Some(graph) => graph.replay()?,
                    None => self.plan.forward(
                        &self.kernels,
                        &stream,
                        &mut self.weights,
                        Pass::decode(*bucket),
                    )?,
                }
            }
            ChunkKind::Prefill { pieces } => {
                self.plan.forward(
                    &self.kernels,
                    &stream,
                    &mut self.weights,
                    Pass {
                        tokens: chunk.tokens(),
                        rows: wanted,
                        attention: Attention::Prefill(pieces),
                        greedy,
                    },
                )?;
            }
        }
        let Some(rows) = (0..wanted).map(row).max().map(|last| last + 1) else {
            self.staging.finish(&stream)?;
            return Ok(None);
        };
        let ids = match out {
            Output::Logits(step) => {
                self.staging.finish(&stream)?;
                let vocab = self.plan.dims.vocab;
                let all = download(&stream, &self.plan.logits, rows * vocab)?;
                for r in (0..wanted).map(row) {
                    step.logits
                        .extend_from_slice(&all[r * vocab..(r + 1) * vocab]);
                }
                return Ok(None);
            }
            Output::Greedy(ids) => ids,
        };
        let greedy_ids = self.plan.greedy.view();
        self.staging
            .greedy
            .download_first(&stream, greedy_ids, rows)?;
        if let Some(samplers) = samplers.as_deref() {
            self.start_sampling(&stream, rows, &row, samplers)?;
        }
        self.staging.finish(&stream)?;
        let greedy = self.staging.greedy.host()?;
        let drawn = self.staging.drawn.host()?;
        let states = self.staging.rng_after.host()?;
        for k in 0..wanted {
            let r = row(k);
            let mut id = greedy[r];
            let drawing = samplers
                .as_deref_mut()
                .and_then(|all| all.get_mut(k))
                .filter(|s| !s.params().is_greedy());
            if let Some(sampler) = drawing {
                id = drawn[r];
                if id == SAMPLE_ID_BAD_PARAMS {
                    return Err(CudaError::Dead(format!(
                        "device sampling refused the validated parameters of row {k}"
                    )));
                }
                if id != SAMPLE_ID_NON_FINITE {
                    let mut state = [0u64; RNG_STATE_WORDS];
                    state.copy_from_slice(&states[r * RNG_STATE_WORDS..(r + 1) * RNG_STATE_WORDS]);
                    sampler.set_rng(Rng::from_state(state));
                }
            }
            if id == SAMPLE_ID_NON_FINITE {
                return Ok(Some(k));
            }
            ids.push(id);
        }
        Ok(None)
    }

    /// Enqueues the device draw of the first `rows` logits rows: sampler `k` (of the chunk's wanted
    /// rows) draws device row `row(k)`; greedy samplers and rows nobody reads get a cheap top-1
    /// draw. The drawn ids and advanced random states come back through the staging buffers.
    fn start_sampling(
        &mut self,
        stream: &Arc<cudarc::driver::CudaStream>,
        rows: usize,
        row: &dyn Fn(usize) -> usize,
        samplers: &[Sampler],
    ) -> Result<(), CudaError> {
        let s = &mut self.staging;
        let (temperature, top_k) = (s.temperature.host()?, s.top_k.host()?);
        let (top_p, rng) = (s.top_p.host()?, s.rng_state.host()?);
        let seed0 = Rng::new(0).state();
        temperature[..rows].fill(1.0);
        top_k[..rows].fill(1);
        top_p[..rows].fill(1.0);
        for state in rng[..rows * RNG_STATE_WORDS].chunks_exact_mut(RNG_STATE_WORDS) {
            state.copy_from_slice(&seed0);
        }
        for (k, sampler) in samplers.iter().enumerate() {
            let (r, p) = (row(k), *sampler.params());
            if p.is_greedy() {
                continue;
            }
            temperature[r] = p.temperature;
            top_k[r] = u32::try_from(p.top_k).unwrap_or(u32::MAX);
            top_p[r] = p.top_p;
            rng[r * RNG_STATE_WORDS..(r + 1) * RNG_STATE_WORDS]
                .copy_from_slice(&sampler.rng().state());
        }
        let vocab = self.plan.dims.vocab as u32;
        let b = &mut self.plan.sampling;
        let words = rows * RNG_STATE_WORDS;
        s.temperature
            .upload_first(stream, b.temperature.view_mut(), rows)?;
        s.top_k.upload_first(stream, b.top_k.view_mut(), rows)?;
        s.top_p.upload_first(stream, b.top_p.view_mut(), rows)?;
        s.rng_state
            .upload_first(stream, b.rng_state.view_mut(), words)?;
        ops::sample(
            &self.kernels,
            stream,
            &SampleScalars {
                rows: rows as u32,
                vocab,
                fast: self.plan.fast_sampling as u32,
            },
            SampleArgs {
                logits: self.plan.logits.view(),
                temperature: b.temperature.view(),
                top_k: b.top_k.view(),
                top_p: b.top_p.view(),
                rng_state: b.rng_state.view_mut(),
                out_ids: b.ids.view_mut(),
            },
        )?;
        s.drawn.download_first(stream, b.ids.view(), rows)?;
        s.rng_after
            .download_first(stream, b.rng_state.view(), words)
    }
}

impl Drop for CudaEngine {
    fn drop(&mut self) {
        // Nothing may still be copying from the pinned inputs or into freed memory when the fields go.
        let _ = self.device.stream().synchronize();
    }
}

/// Reads the first `len` elements of `src` back to the host (a host sync).
fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(
    stream: &Arc<cudarc::driver::CudaStream>,
    src: &DeviceBuffer<T>,
    len: usize,
) -> Result<Vec<T>, CudaError> {
    let Some(part) = src.view().sub(0, len) else {
        return Err(CudaError::Dead(format!(
            "reading {len} elements from a buffer of {}",
            src.len()
        )));
    };
    copy_to_host(stream, part)
}

#[derive(Debug, Clone, Copy)]
enum Readback {
    Logits,
    Greedy,
}

enum Output {
    Logits(StepOutput),
    Greedy(Vec<u32>),
}

impl Output {
    /// The token ids of a greedy or sampled readback (none for logits).
    fn ids(self) -> Vec<u32> {
        match self {
            Output::Greedy(ids) => ids,
            Output::Logits(_) => Vec::new(),
        }
    }
}

impl Engine for CudaEngine {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn max_context(&self) -> usize {
        self.kv.limits().max_context
    }

    fn new_sequence(&mut self) -> Result<SeqId, EngineError> {
        self.check_alive()?;
        let seq = self.kv.new_sequence()?;
        match self.free_rows.pop() {
            Some(row) => {
                self.seq_rows.insert(seq, row);
                Ok(seq)
            }
            None => {
                // Unreachable while the pool and the rows share the same limit; undo and refuse.
                let _ = self.kv.free_sequence(seq);
                Err(EngineError::TooManySequences {
                    limit: self.kv.limits().max_sequences,
                })
            }
        }
    }

    fn free_sequence(&mut self, seq: SeqId) -> Result<(), EngineError> {
        self.kv.free_sequence(seq)?;
        if let Some(row) = self.seq_rows.remove(&seq) {
            self.free_rows.push(row);
        }
        Ok(())
    }

    fn sequence_len(&self, seq: SeqId) -> Result<usize, EngineError> {
        self.kv.sequence_len(seq)
    }

    fn reuse_prefix(&mut self, seq: SeqId, tokens: &[u32]) -> Result<usize, EngineError> {
        self.check_alive()?;
        self.kv.reuse_prefix(seq, tokens)
    }

    fn fork_sequence(&mut self, seq: SeqId) -> Result<SeqId, EngineError> {
        self.check_alive()?;
        let Some(row) = self.free_rows.pop() else {
            return Err(EngineError::TooManySequences {
                limit: self.kv.limits().max_sequences,
            });
        };
        match self.kv.fork(seq) {
            Ok(forked) => {
                self.seq_rows.insert(forked, row);
                Ok(forked)
            }
            Err(e) => {
                self.free_rows.push(row);
                Err(e)
            }
        }
    }

    fn kv_block_size(&self) -> Option<usize> {
        Some(self.kv.limits().block_size)
    }

    fn free_kv_blocks(&self) -> usize {
        self.kv.free_blocks()
    }

    fn total_kv_blocks(&self) -> usize {
        self.kv.total_blocks()
    }

    fn step(&mut self, batch: &[SeqStep<'_>]) -> Result<StepOutput, EngineError> {
        self.run_step(batch, Readback::Logits, None)
            .map(|r| match r {
                Output::Logits(step) => step,
                Output::Greedy(_) => StepOutput::default(),
            })
    }

    /// On the device: the argmax kernel when every sampler is greedy, else the sampling kernel
    /// (each sampler's stream moved to where the device left it).
    /// Samplers with a repetition penalty, which the device does not apply, make the whole step
    /// read its logits back and sample on the host ([`sample_on_host`]).
    fn step_tokens(
        &mut self,
        batch: &[SeqStep<'_>],
        samplers: &mut [RowSampler<'_>],
    ) -> Result<Vec<u32>, EngineError> {
        if !samplers.iter().all(RowSampler::ignores_history) {
            return sample_on_host(self, batch, samplers);
        }
        check_sampler_count(batch, samplers.len())?;
        if samplers.iter().all(|s| s.sampler.params().is_greedy()) {
            return self.step_greedy(batch);
        }
        let mut device: Vec<Sampler> = samplers.iter().map(|s| s.sampler.clone()).collect();
        let drawn = self.step_sample(batch, &mut device);
        for (row, moved) in samplers.iter_mut().zip(device) {
            *row.sampler = moved;
        }
        drawn
    }

    fn describe(&self) -> Option<String> {
        const GIB: f64 = (1u64 << 30) as f64;
        let memory = self.memory();
        let packed = if memory.packed_stacks > 0 {
            format!(", {} projection stacks packed", memory.packed_stacks)
        } else {
            String::new()
        };
        Some(format!(
            "cuda: {}: weights {:.2} GiB{packed}, cache and activations {:.2} GiB ({} KV blocks), decode graphs for batch {:?}",
            self.device_name(),
            memory.weights as f64 / GIB,
            memory.plan as f64 / GIB,
            memory.kv_blocks,
            self.graph_buckets()
        ))
    }
}

#[cfg(test)]
mod tests;
