//! The static execution plan: every activation buffer, the paged KV cache and the per-step input
//! words, allocated once when the engine is built (no allocation afterwards), each an owned
//! [`DeviceBuffer`] the forward pass ([`forward`](super::forward)) borrows views of.

use half::bf16;

use super::super::args::MoeScalars;
use super::super::error::CudaError;
use super::super::memory::{DeviceArena, DeviceBuffer, View};
use super::super::ops::{attention_splits, PagedCacheShape, RNG_STATE_WORDS};
use super::matrix::GroupedExperts;
use super::rank::RankPlan;
use crate::config::ModelConfig;
use crate::cpu::rope::Rope;

/// Keys per split of the decode attention.
pub const SPLIT_KEYS: usize = 256;

/// Sizes the plan is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanSizes {
    /// Most tokens in one forward pass (prefill chunk size).
    pub max_tokens: usize,
    /// Most tokens of a decode pass (the largest bucket); attention scratch is sized for it.
    pub max_decode_tokens: usize,
    /// Rows of the block tables (sequences alive at once).
    pub max_sequences: usize,
    /// KV blocks per layer.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Block-table columns: blocks of the longest sequence.
    pub max_blocks_per_seq: usize,
}

/// Model dimensions the launches use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dims {
    /// Hidden size.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// `heads * head_dim`.
    pub q_width: usize,
    /// `kv_heads * head_dim`.
    pub kv_width: usize,
    /// `q_width + 2 * kv_width`: a row of the fused q/k/v.
    pub qkv_width: usize,
    /// Expert intermediate size.
    pub inter: usize,
    /// Experts (at least 1).
    pub experts: usize,
    /// Experts per token (at least 1, at most `experts`).
    pub top_k: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Sliding window, if any.
    pub window: Option<usize>,
}

impl Dims {
    /// The expert MLPs' shape for `tokens` tokens over `held` experts (`None`: all of them).
    pub fn expert_shape(&self, tokens: usize, held: Option<usize>) -> MoeScalars {
        MoeScalars {
            tokens: tokens as u32,
            hidden: self.hidden as u32,
            inter: self.inter as u32,
            experts: held.unwrap_or(self.experts) as u32,
            top_k: self.top_k as u32,
        }
    }

    /// The `(in, out)` features of the dense projections: q/k/v, o, and the LM head over
    /// `vocab_rows` rows of the vocabulary.
    pub fn projections(&self, vocab_rows: usize) -> [(usize, usize); 3] {
        [
            (self.hidden, self.qkv_width),
            (self.q_width, self.hidden),
            (self.hidden, vocab_rows),
        ]
    }

    /// The dimensions of `c`.
    pub fn of(c: &ModelConfig) -> Dims {
        Dims {
            hidden: c.hidden_size,
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            q_width: c.q_width(),
            kv_width: c.kv_width(),
            qkv_width: c.q_width() + 2 * c.kv_width(),
            inter: c.intermediate_size,
            experts: c.num_experts.max(1),
            top_k: c.experts_per_token.max(1).min(c.num_experts.max(1)),
            vocab: c.vocab_size,
            eps: c.rms_norm_eps,
            window: c.sliding_window,
        }
    }
}

/// Device bytes of the activations, inputs and KV cache for `sizes` (what [`Plan::new`] allocates
/// besides the weights), for the memory check before allocating.
pub fn plan_bytes(config: &ModelConfig, sizes: &PlanSizes) -> usize {
    let d = Dims::of(config);
    let m = sizes.max_tokens;
    let slots = m * d.top_k;
    let splits = attention_splits(sizes.max_blocks_per_seq * sizes.block_size, SPLIT_KEYS);
    let f32s = m * d.hidden * 2
        + m * d.experts
        + slots
        + slots * d.hidden
        + sizes.max_decode_tokens * d.heads * splits * (d.head_dim + 1)
        + m * d.vocab
        + d.head_dim / 2;
    let bf16s = m * d.hidden * 2 + m * d.qkv_width + m * d.q_width + slots * d.inter;
    // The router's counts, offsets and its one counter of finished blocks among them, and decode
    // attention's counters of finished splits.
    let i32s = 4 * m
        + slots * 2
        + 2 * d.experts
        + 2
        + m
        + sizes.max_sequences * sizes.max_blocks_per_seq
        + sizes.max_decode_tokens * d.kv_heads;
    let cache = 2 * config.num_layers * sizes.num_blocks * sizes.block_size * d.kv_width;
    let sampling = m * (4 * 4 + 8 * RNG_STATE_WORDS);
    4 * f32s + 2 * bf16s + 4 * i32s + 2 * cache + sampling
}

/// The per-chunk inputs: one buffer `[4, max_tokens]` of 32-bit words uploaded in one copy: token
/// ids, positions, block-table rows (-1: padding), logits-row indices.
#[derive(Debug)]
pub struct Inputs {
    words: DeviceBuffer<i32>,
    max_tokens: usize,
}

impl Inputs {
    /// All `[4, max_tokens]` words (the upload target).
    pub fn all(&mut self) -> &mut DeviceBuffer<i32> {
        &mut self.words
    }

    fn segment(&self, i: usize) -> View<'_, i32> {
        let m = self.max_tokens;
        self.words
            .view()
            .sub(i * m, m)
            .expect("the inputs hold four segments")
    }

    /// `[max_tokens]` token ids.
    pub fn ids(&self) -> View<'_, u32> {
        self.segment(0).cast()
    }

    /// `[max_tokens]` absolute positions.
    pub fn positions(&self) -> View<'_, i32> {
        self.segment(1)
    }

    /// `[max_tokens]` block-table row of each token (-1: padding).
    pub fn token_seq(&self) -> View<'_, i32> {
        self.segment(2)
    }

    /// `[max_tokens]` indices of the tokens whose logits are computed.
    pub fn rows(&self) -> View<'_, u32> {
        self.segment(3).cast()
    }
}

/// The buffers of device sampling, one row per logits row.
#[derive(Debug)]
pub struct SamplingBuffers {
    /// `[max_tokens]` temperatures.
    pub temperature: DeviceBuffer<f32>,
    /// `[max_tokens]` top-k (0 = off).
    pub top_k: DeviceBuffer<u32>,
    /// `[max_tokens]` top-p.
    pub top_p: DeviceBuffer<f32>,
    /// `[max_tokens, RNG_STATE_WORDS]` random states.
    pub rng_state: DeviceBuffer<u64>,
    /// `[max_tokens]` drawn ids.
    pub ids: DeviceBuffer<u32>,
}

/// The router's outputs: top-k choices and the slots grouped by expert.
#[derive(Debug)]
pub struct Routing {
    /// `[max_tokens, experts]` router logits.
    pub logits: DeviceBuffer<f32>,
    /// `[max_tokens, top_k]` chosen experts.
    pub topk_ids: DeviceBuffer<i32>,
    /// `[max_tokens, top_k]` routing weights.
    pub topk_weights: DeviceBuffer<f32>,
    /// `[experts]` slots per expert.
    pub expert_counts: DeviceBuffer<i32>,
    /// `[experts + 1]` start of each expert's slots.
    pub expert_offsets: DeviceBuffer<i32>,
    /// `[max_tokens * top_k]` slots grouped by expert.
    pub sorted_slots: DeviceBuffer<i32>,
    /// `[1]` the router's count of blocks done (0 between launches).
    pub done: DeviceBuffer<u32>,
}

/// One layer's paged KV cache `[num_blocks, block_size, kv_heads, head_dim]` each.
#[derive(Debug)]
pub struct LayerCache {
    /// Keys.
    pub k: DeviceBuffer<bf16>,
    /// Values.
    pub v: DeviceBuffer<bf16>,
}

/// The activations of one chunk (`M` = max tokens, `S = M * top_k` slots).
#[derive(Debug)]
pub struct Activations {
    /// `[M, hidden]` f32 residual stream.
    pub residual: DeviceBuffer<f32>,
    /// `[M, hidden]` normalised activations.
    pub xn: DeviceBuffer<bf16>,
    /// `[M, q + 2 kv]` fused q/k/v.
    pub qkv: DeviceBuffer<bf16>,
    /// `[M, q]` attention output.
    pub attn: DeviceBuffer<bf16>,
    /// `[M, hidden]` f32 attention projection.
    pub o_out: DeviceBuffer<f32>,
    /// The router's outputs.
    pub routing: Routing,
    /// `[S, inter]` SwiGLU activations.
    pub act: DeviceBuffer<bf16>,
    /// `[S, hidden]` f32 weighted expert outputs.
    pub moe_out: DeviceBuffer<f32>,
    /// `[decode tokens, heads, splits, head_dim]` attention split outputs.
    pub part_out: DeviceBuffer<f32>,
    /// `[decode tokens, heads, splits]` attention split sums.
    pub part_lse: DeviceBuffer<f32>,
    /// `[decode tokens, kv heads]` attention splits done (0 between launches).
    pub split_done: DeviceBuffer<u32>,
    /// `[M, hidden]` the rows whose logits are computed, gathered.
    pub gathered: DeviceBuffer<bf16>,
}

/// Every buffer of the plan.
#[derive(Debug)]
pub struct Plan {
    /// The model dimensions.
    pub dims: Dims,
    /// The sizes the plan was built for.
    pub sizes: PlanSizes,
    /// The tensor-core kernels of the expert GEMMs of large chunks, with their scratch.
    pub grouped: GroupedExperts,
    /// Decode batches over bf16 weights and the packed ones the tensor-core decode kernels read run
    /// on them instead of the GEMVs
    /// ([`CudaEngineOptions::mma_decode`](super::CudaEngineOptions::mma_decode)).
    pub mma_decode: bool,
    /// Device sampling takes the `sample` kernel's fast paths
    /// ([`CudaEngineOptions::fast_sampling`](super::CudaEngineOptions::fast_sampling)).
    pub fast_sampling: bool,
    /// The device's multiprocessors: decode attention spreads each token's keys over enough splits
    /// to fill them (0: fixed splits of [`SPLIT_KEYS`] keys).
    pub multiprocessors: usize,
    /// Step inputs (uploaded before each chunk).
    pub inputs: Inputs,
    /// The activations.
    pub act: Activations,
    /// `[max_tokens, vocab]` logits of the last chunk.
    pub logits: DeviceBuffer<f32>,
    /// `[max_tokens]` greedy ids of the last decode chunk.
    pub greedy: DeviceBuffer<u32>,
    /// Per-row sampling inputs and outputs.
    pub sampling: SamplingBuffers,
    /// `[head_dim / 2]` RoPE inverse frequencies.
    pub inv_freq: DeviceBuffer<f32>,
    /// `[max_sequences, max_blocks_per_seq]` block tables.
    pub block_tables: DeviceBuffer<i32>,
    /// Each layer's KV cache.
    pub cache: Vec<LayerCache>,
    /// A sharded engine's rank: what it holds and its collectives (`None`: the whole model).
    pub rank: Option<RankPlan>,
}

impl Plan {
    /// The expert MLPs' shape of the largest chunk, over the experts this plan holds.
    pub fn expert_shape(&self) -> MoeScalars {
        let held = self.rank.as_ref().map(|r| r.experts.len());
        self.dims.expert_shape(self.sizes.max_tokens, held)
    }

    /// The rows of the vocabulary this plan's LM head holds (all of them, or a rank's part).
    pub fn vocab_rows(&self) -> usize {
        self.rank.as_ref().map_or(self.dims.vocab, |r| r.vocab.len())
    }

    /// Allocates every buffer for `config` and `sizes` in `arena` (zero-filled), and uploads the
    /// RoPE inverse frequencies. Block tables start at -1 (no block).
    pub fn new(
        config: &ModelConfig,
        sizes: PlanSizes,
        arena: &mut DeviceArena,
    ) -> Result<Plan, CudaError> {
        let d = Dims::of(config);
        let m = sizes.max_tokens;
        let slots = m * d.top_k;
        let splits = attention_splits(sizes.max_blocks_per_seq * sizes.block_size, SPLIT_KEYS);
        let cache_len = sizes.num_blocks * sizes.block_size * d.kv_width;
        let mut cache = Vec::with_capacity(config.num_layers);
        for l in 0..config.num_layers {
            cache.push(LayerCache {
                k: arena.zeroed(cache_len, &format!("layer {l} key cache"))?,
                v: arena.zeroed(cache_len, &format!("layer {l} value cache"))?,
            });
        }
        let rope = Rope::new(d.head_dim, config.rope_theta);
        let inv_freq = arena.upload(rope.inv_freq(), "the RoPE frequencies")?;
        let tables = vec![-1; sizes.max_sequences * sizes.max_blocks_per_seq];
        let block_tables = arena.upload(&tables, "the block tables")?;
        let decode = sizes.max_decode_tokens * d.heads * splits;
        let act = Activations {
            residual: arena.zeroed(m * d.hidden, "residual stream")?,
            xn: arena.zeroed(m * d.hidden, "normalised activations")?,
            qkv: arena.zeroed(m * d.qkv_width, "q/k/v activations")?,
            attn: arena.zeroed(m * d.q_width, "attention output")?,
            o_out: arena.zeroed(m * d.hidden, "attention projection")?,
            routing: Routing {
                logits: arena.zeroed(m * d.experts, "router logits")?,
                topk_ids: arena.zeroed(slots, "routed experts")?,
                topk_weights: arena.zeroed(slots, "routing weights")?,
                expert_counts: arena.zeroed(d.experts, "expert counts")?,
                expert_offsets: arena.zeroed(d.experts + 1, "expert offsets")?,
                sorted_slots: arena.zeroed(slots, "slots by expert")?,
                done: arena.zeroed(1, "router counter")?,
            },
            act: arena.zeroed(slots * d.inter, "expert activations")?,
            moe_out: arena.zeroed(slots * d.hidden, "expert outputs")?,
            part_out: arena.zeroed(decode * d.head_dim, "attention split outputs")?,
            part_lse: arena.zeroed(decode, "attention split sums")?,
            split_done: arena.zeroed(
                sizes.max_decode_tokens * d.kv_heads,
                "attention split counters",
            )?,
            gathered: arena.zeroed(m * d.hidden, "gathered rows")?,
        };
        Ok(Plan {
            dims: d,
            sizes,
            grouped: GroupedExperts::Mma,
            mma_decode: false,
            fast_sampling: false,
            multiprocessors: 0,
            inputs: Inputs {
                words: arena.zeroed(4 * m, "step inputs")?,
                max_tokens: m,
            },
            act,
            logits: arena.zeroed(m * d.vocab, "logits")?,
            greedy: arena.zeroed(m, "greedy ids")?,
            sampling: SamplingBuffers {
                temperature: arena.zeroed(m, "sampling temperatures")?,
                top_k: arena.zeroed(m, "sampling top-k")?,
                top_p: arena.zeroed(m, "sampling top-p")?,
                rng_state: arena.zeroed(m * RNG_STATE_WORDS, "sampling random states")?,
                ids: arena.zeroed(m, "sampled ids")?,
            },
            inv_freq,
            block_tables,
            cache,
            rank: None,
        })
    }

    /// The sizes the plan was built for.
    pub fn sizes(&self) -> &PlanSizes {
        &self.sizes
    }

    /// Vocabulary size (logits row length).
    pub fn vocab(&self) -> usize {
        self.dims.vocab
    }

    /// The shape of each layer's cache and of the block tables.
    pub fn cache_shape(&self) -> PagedCacheShape {
        PagedCacheShape {
            num_blocks: self.sizes.num_blocks,
            block_size: self.sizes.block_size,
            num_seqs: self.sizes.max_sequences,
            max_blocks_per_seq: self.sizes.max_blocks_per_seq,
        }
    }
}
