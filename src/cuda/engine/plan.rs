//! The static execution plan: every activation buffer, the paged KV cache and the per-step input
//! buffers, allocated once when the engine is built, and [`Plan::forward`], which issues the whole
//! forward pass of one chunk as a fixed sequence of checked kernel launches on the engine's stream
//! (no allocation, no host sync, no string lookup), so a decode chunk can be captured into a graph.
//!
//! Per chunk of `T` tokens (`H` hidden, `Q = heads * head_dim`, `K = kv_heads * head_dim`):
//! `embedding` ids → residual `[T, H]` f32; per layer: `rmsnorm` (adding the previous layer's MoE
//! slots `[T, top_k, H]` f32) → `xn` `[T, H]` bf16; `linear` → `qkv` `[T, Q + 2K]`; `rope_kv` (q in
//! place, k/v into the cache); attention (split-KV decode over all tokens, or flash prefill per
//! piece) → `attn` `[T, Q]`; `linear` → `o_out` `[T, H]` f32; `rmsnorm` (adding `o_out`) → `xn`;
//! `router` → top-k and per-expert grouping; `moe_experts` → slots `[T, top_k, H]` f32. Finally
//! `rmsnorm` (adding the last slots) with the final norm, the logits rows gathered (an `embedding`
//! lookup into `xn`), and the LM head `linear` → logits `[R, vocab]` f32; for decode also `argmax`.

use std::sync::Arc;

use cudarc::driver::CudaStream;
use half::bf16;

use super::super::args::{
    ArgmaxArgs, ArgmaxScalars, AttentionDecodeArgs, AttentionPrefillArgs, EmbeddingArgs,
    EmbeddingScalars, LinearArgs, LinearScalars, MoeScalars, RmsnormArgs, RmsnormScalars,
    RopeKvArgs, RopeKvScalars, RouterArgs, RouterScalars,
};
use super::super::error::CudaError;
use super::super::memory::Rows;
use super::super::module::Kernels;
use super::super::ops::{
    self, attention_splits, AttentionDecodeShape, AttentionPrefillShape, PagedCacheShape,
    RNG_STATE_WORDS,
};
use super::super::region::{DeviceArena, Region};
use super::inputs::PrefillPiece;
use super::matrix::{self, ExpertIo, GroupedKernel};
use super::upload::GpuWeights;
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
struct Dims {
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    q_width: usize,
    kv_width: usize,
    qkv_width: usize,
    inter: usize,
    experts: usize,
    top_k: usize,
    vocab: usize,
    eps: f32,
    window: Option<usize>,
}

impl Dims {
    fn of(c: &ModelConfig) -> Dims {
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
    let i32s =
        4 * m + slots * 2 + 2 * d.experts + 1 + m + sizes.max_sequences * sizes.max_blocks_per_seq;
    let cache = 2 * config.num_layers * sizes.num_blocks * sizes.block_size * d.kv_width;
    let sampling = m * (4 * 4 + 8 * RNG_STATE_WORDS);
    4 * f32s + 2 * bf16s + 4 * i32s + 2 * cache + sampling
}

/// The per-chunk inputs, one allocation `[4, max_tokens]` of 32-bit words uploaded in one copy:
/// ids, positions, block-table rows, logits-row indices.
#[derive(Debug)]
pub struct Inputs {
    /// The whole `[4, max_tokens]` words.
    pub all: Region<i32>,
    /// `[max_tokens]` token ids.
    pub ids: Region<u32>,
    /// `[max_tokens]` absolute positions.
    pub positions: Region<i32>,
    /// `[max_tokens]` block-table row per token (-1: padding).
    pub token_seq: Region<i32>,
    /// `[max_tokens]` indices of the tokens whose logits are computed.
    pub rows: Region<u32>,
}

/// The buffers of device sampling, one row per logits row.
#[derive(Debug)]
pub struct SamplingBuffers {
    /// `[max_tokens]` temperatures.
    pub temperature: Region<f32>,
    /// `[max_tokens]` top-k (0 = off).
    pub top_k: Region<u32>,
    /// `[max_tokens]` top-p.
    pub top_p: Region<f32>,
    /// `[max_tokens, RNG_STATE_WORDS]` random states.
    pub rng_state: Region<u64>,
    /// `[max_tokens]` drawn ids.
    pub ids: Region<u32>,
}

/// Every buffer of the plan.
#[derive(Debug)]
pub struct Plan {
    dims: Dims,
    sizes: PlanSizes,
    /// The tensor-core kernels of the expert GEMMs of large chunks.
    pub grouped: GroupedKernel,
    /// Step inputs (uploaded before each chunk).
    pub inputs: Inputs,
    residual: Region<f32>,
    xn: Region<bf16>,
    qkv: Region<bf16>,
    attn: Region<bf16>,
    o_out: Region<f32>,
    router_logits: Region<f32>,
    topk_ids: Region<i32>,
    topk_weights: Region<f32>,
    expert_counts: Region<i32>,
    expert_offsets: Region<i32>,
    sorted_slots: Region<i32>,
    act: Region<bf16>,
    moe_out: Region<f32>,
    part_out: Region<f32>,
    part_lse: Region<f32>,
    gathered: Region<bf16>,
    /// `[max_tokens, vocab]` logits of the last chunk.
    pub logits: Region<f32>,
    /// `[max_tokens]` greedy ids of the last decode chunk.
    pub greedy: Region<u32>,
    /// Per-row sampling inputs and outputs of [`ops::sample`] (`[max_tokens]` each, the random
    /// state `[max_tokens, RNG_STATE_WORDS]`).
    pub sampling: SamplingBuffers,
    inv_freq: Region<f32>,
    /// `[max_sequences, max_blocks_per_seq]` block tables.
    pub block_tables: Region<i32>,
    k_cache: Vec<Region<bf16>>,
    v_cache: Vec<Region<bf16>>,
}

/// One forward pass: how many tokens, which logits, which attention.
#[derive(Debug, Clone, Copy)]
pub struct Pass<'a> {
    /// Tokens whose inputs are in [`Plan::inputs`].
    pub tokens: usize,
    /// Logits rows: `tokens` reads every token in order without a gather; fewer gathers the rows
    /// listed first in `inputs.rows`.
    pub rows: usize,
    /// The attention kernels to use.
    pub attention: Attention<'a>,
    /// Also the argmax of every logits row into [`Plan::greedy`].
    pub greedy: bool,
}

impl Pass<'_> {
    /// A decode pass of `bucket` tokens: logits and greedy ids for every token.
    pub fn decode(bucket: usize) -> Pass<'static> {
        Pass {
            tokens: bucket,
            rows: bucket,
            attention: Attention::Decode,
            greedy: true,
        }
    }
}

/// What a forward pass computes besides the cache writes.
#[derive(Debug, Clone, Copy)]
pub enum Attention<'a> {
    /// Split-KV decode attention over every token at once (each token at its own position).
    Decode,
    /// Flash prefill attention, once per piece.
    Prefill(&'a [PrefillPiece]),
}

impl Plan {
    /// Allocates every buffer for `config` and `sizes` in `arena` (zero-filled), and uploads the
    /// RoPE inverse frequencies. Block tables start at -1 (no block).
    pub fn new(
        config: &ModelConfig,
        sizes: PlanSizes,
        arena: &mut DeviceArena,
        stream: &Arc<CudaStream>,
    ) -> Result<Plan, CudaError> {
        let d = Dims::of(config);
        let m = sizes.max_tokens;
        let slots = m * d.top_k;
        let splits = attention_splits(sizes.max_blocks_per_seq * sizes.block_size, SPLIT_KEYS);
        let all = arena.zeroed::<i32>(4 * m, "step inputs")?;
        let segment = |i: usize| all.sub(i * m, m).expect("inside the inputs region");
        let inputs = Inputs {
            ids: segment(0).cast(),
            positions: segment(1),
            token_seq: segment(2),
            rows: segment(3).cast(),
            all: all.clone(),
        };
        let mut k_cache = Vec::with_capacity(config.num_layers);
        let mut v_cache = Vec::with_capacity(config.num_layers);
        let cache_len = sizes.num_blocks * sizes.block_size * d.kv_width;
        for l in 0..config.num_layers {
            k_cache.push(arena.zeroed::<bf16>(cache_len, &format!("layer {l} key cache"))?);
            v_cache.push(arena.zeroed::<bf16>(cache_len, &format!("layer {l} value cache"))?);
        }
        let inv_freq = arena.zeroed::<f32>(d.head_dim / 2, "RoPE frequencies")?;
        let rope = Rope::new(d.head_dim, config.rope_theta);
        upload(stream, &inv_freq, rope.inv_freq(), "the RoPE frequencies")?;
        let block_tables = arena.zeroed::<i32>(
            sizes.max_sequences * sizes.max_blocks_per_seq,
            "block tables",
        )?;
        upload(
            stream,
            &block_tables,
            &vec![-1; sizes.max_sequences * sizes.max_blocks_per_seq],
            "the block tables",
        )?;
        Ok(Plan {
            dims: d,
            sizes,
            grouped: GroupedKernel::Mma,
            inputs,
            residual: arena.zeroed(m * d.hidden, "residual stream")?,
            xn: arena.zeroed(m * d.hidden, "normalised activations")?,
            qkv: arena.zeroed(m * d.qkv_width, "q/k/v activations")?,
            attn: arena.zeroed(m * d.q_width, "attention output")?,
            o_out: arena.zeroed(m * d.hidden, "attention projection")?,
            router_logits: arena.zeroed(m * d.experts, "router logits")?,
            topk_ids: arena.zeroed(slots, "routed experts")?,
            topk_weights: arena.zeroed(slots, "routing weights")?,
            expert_counts: arena.zeroed(d.experts, "expert counts")?,
            expert_offsets: arena.zeroed(d.experts + 1, "expert offsets")?,
            sorted_slots: arena.zeroed(slots, "slots by expert")?,
            act: arena.zeroed(slots * d.inter, "expert activations")?,
            moe_out: arena.zeroed(slots * d.hidden, "expert outputs")?,
            part_out: arena.zeroed(
                sizes.max_decode_tokens * d.heads * splits * d.head_dim,
                "attention split outputs",
            )?,
            part_lse: arena.zeroed(
                sizes.max_decode_tokens * d.heads * splits,
                "attention split sums",
            )?,
            gathered: arena.zeroed(m * d.hidden, "gathered rows")?,
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
            k_cache,
            v_cache,
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

    fn cache_shape(&self) -> PagedCacheShape {
        PagedCacheShape {
            num_blocks: self.sizes.num_blocks,
            block_size: self.sizes.block_size,
            num_seqs: self.sizes.max_sequences,
            max_blocks_per_seq: self.sizes.max_blocks_per_seq,
        }
    }

    /// Issues the forward pass `pass` over the inputs already in [`Plan::inputs`].
    pub fn forward(
        &mut self,
        kernels: &Kernels,
        stream: &CudaStream,
        weights: &GpuWeights,
        pass: Pass<'_>,
    ) -> Result<(), CudaError> {
        let Pass {
            tokens,
            rows,
            attention,
            greedy,
        } = pass;
        let d = self.dims;
        if tokens == 0 || tokens > self.sizes.max_tokens || rows > tokens {
            return Err(CudaError::Unsupported {
                op: "forward",
                what: "tokens",
                value: tokens,
                reason: format!(
                    "must be in 1..={} with at most that many logits rows ({rows})",
                    self.sizes.max_tokens
                ),
            });
        }
        ops::embedding(
            kernels,
            stream,
            &EmbeddingScalars {
                tokens: tokens as u32,
                hidden: d.hidden as u32,
                vocab: d.vocab as u32,
            },
            EmbeddingArgs {
                ids: self.inputs.ids.view(),
                table: weights.embed.view(),
                out: self.residual.view_mut().into(),
            },
        )?;
        let norm = |addend_count: usize| RmsnormScalars {
            rows: tokens as u32,
            hidden: d.hidden as u32,
            addend_count: addend_count as u32,
            eps: d.eps,
        };
        for (l, w) in weights.layers.iter().enumerate() {
            let addend_count = if l == 0 { 0 } else { d.top_k };
            ops::rmsnorm(
                kernels,
                stream,
                &norm(addend_count),
                RmsnormArgs {
                    residual: self.residual.view_mut(),
                    addend: (l > 0).then(|| self.moe_out.view().into()),
                    weight: w.attn_norm.view(),
                    out: self.xn.view_mut(),
                },
            )?;
            matrix::project(
                kernels,
                stream,
                &LinearScalars {
                    tokens: tokens as u32,
                    in_features: d.hidden as u32,
                    out_features: d.qkv_width as u32,
                },
                self.xn.view(),
                &w.qkv,
                self.qkv.view_mut().into(),
                &weights.scratch,
            )?;
            self.attention_block(kernels, stream, l, tokens, attention)?;
            matrix::project(
                kernels,
                stream,
                &LinearScalars {
                    tokens: tokens as u32,
                    in_features: d.q_width as u32,
                    out_features: d.hidden as u32,
                },
                self.attn.view(),
                &w.o,
                self.o_out.view_mut().into(),
                &weights.scratch,
            )?;
            ops::rmsnorm(
                kernels,
                stream,
                &norm(1),
                RmsnormArgs {
                    residual: self.residual.view_mut(),
                    addend: Some(self.o_out.view().into()),
                    weight: w.ffn_norm.view(),
                    out: self.xn.view_mut(),
                },
            )?;
            ops::router(
                kernels,
                stream,
                &RouterScalars {
                    tokens: tokens as u32,
                    hidden: d.hidden as u32,
                    experts: d.experts as u32,
                    top_k: d.top_k as u32,
                },
                RouterArgs {
                    x: self.xn.view(),
                    gate: w.gate.view(),
                    logits: self.router_logits.view_mut(),
                    topk_ids: self.topk_ids.view_mut(),
                    topk_weights: self.topk_weights.view_mut(),
                    expert_counts: self.expert_counts.view_mut(),
                    expert_offsets: self.expert_offsets.view_mut(),
                    sorted_slots: self.sorted_slots.view_mut(),
                },
            )?;
            matrix::experts(
                kernels,
                stream,
                &MoeScalars {
                    tokens: tokens as u32,
                    hidden: d.hidden as u32,
                    inter: d.inter as u32,
                    experts: d.experts as u32,
                    top_k: d.top_k as u32,
                },
                [&w.w1, &w.w3, &w.w2],
                ExpertIo {
                    x: &self.xn,
                    topk_weights: &self.topk_weights,
                    expert_offsets: &self.expert_offsets,
                    sorted_slots: &self.sorted_slots,
                    act: &mut self.act,
                    out: &mut self.moe_out,
                },
                &weights.scratch,
                self.grouped,
            )?;
        }
        ops::rmsnorm(
            kernels,
            stream,
            &norm(d.top_k),
            RmsnormArgs {
                residual: self.residual.view_mut(),
                addend: Some(self.moe_out.view().into()),
                weight: weights.final_norm.view(),
                out: self.xn.view_mut(),
            },
        )?;
        let head_input = if rows == tokens {
            &self.xn
        } else {
            // Gather the rows: an embedding lookup whose "table" is the normalised activations.
            ops::embedding(
                kernels,
                stream,
                &EmbeddingScalars {
                    tokens: rows as u32,
                    hidden: d.hidden as u32,
                    vocab: tokens as u32,
                },
                EmbeddingArgs {
                    ids: self.inputs.rows.view(),
                    table: self.xn.view(),
                    out: self.gathered.view_mut().into(),
                },
            )?;
            &self.gathered
        };
        ops::linear(
            kernels,
            stream,
            &LinearScalars {
                tokens: rows as u32,
                in_features: d.hidden as u32,
                out_features: d.vocab as u32,
            },
            LinearArgs {
                x: head_input.view(),
                w: weights.lm_head.view(),
                out: self.logits.view_mut().into(),
            },
        )?;
        if greedy {
            ops::argmax(
                kernels,
                stream,
                &ArgmaxScalars {
                    rows: rows as u32,
                    vocab: d.vocab as u32,
                },
                ArgmaxArgs {
                    logits: self.logits.view(),
                    out_ids: self.greedy.view_mut(),
                },
            )?;
        }
        Ok(())
    }

    /// RoPE + cache append, then attention of layer `l` into `attn`.
    fn attention_block(
        &mut self,
        kernels: &Kernels,
        stream: &CudaStream,
        l: usize,
        tokens: usize,
        attention: Attention<'_>,
    ) -> Result<(), CudaError> {
        let d = self.dims;
        let cache = self.cache_shape();
        let Some([mut q, k, v]) = self
            .qkv
            .view_mut()
            .column_groups([d.q_width, d.kv_width, d.kv_width])
        else {
            return Err(CudaError::UnsupportedModel(
                "the q/k/v buffer is not whole rows of q, k and v".into(),
            ));
        };
        ops::rope_kv(
            kernels,
            stream,
            &RopeKvScalars {
                tokens: tokens as u32,
                n_heads: d.heads as u32,
                n_kv_heads: d.kv_heads as u32,
                head_dim: d.head_dim as u32,
                block_size: cache.block_size as u32,
                max_blocks_per_seq: cache.max_blocks_per_seq as u32,
                num_blocks: cache.num_blocks as u32,
                num_seqs: cache.num_seqs as u32,
            },
            RopeKvArgs {
                q: q.reborrow(),
                k: k.into(),
                v: v.into(),
                k_cache: self.k_cache[l].view_mut(),
                v_cache: self.v_cache[l].view_mut(),
                block_tables: self.block_tables.view(),
                token_seq: self.inputs.token_seq.view(),
                positions: self.inputs.positions.view(),
                inv_freq: self.inv_freq.view(),
            },
        )?;
        let q: Rows<'_, bf16> = q.into();
        match attention {
            Attention::Decode => ops::attention_decode(
                kernels,
                stream,
                &AttentionDecodeShape {
                    tokens,
                    n_heads: d.heads,
                    n_kv_heads: d.kv_heads,
                    head_dim: d.head_dim,
                    cache,
                    window: d.window,
                    split_keys: SPLIT_KEYS,
                },
                AttentionDecodeArgs {
                    q,
                    k_cache: self.k_cache[l].view(),
                    v_cache: self.v_cache[l].view(),
                    block_tables: self.block_tables.view(),
                    token_seq: self.inputs.token_seq.view(),
                    positions: self.inputs.positions.view(),
                    out: self.attn.view_mut(),
                    part_out: self.part_out.view_mut(),
                    part_lse: self.part_lse.view_mut(),
                },
            ),
            Attention::Prefill(pieces) => {
                for piece in pieces {
                    let q = q.sub_rows(piece.token_offset, piece.len);
                    let out = self
                        .attn
                        .view_mut()
                        .sub(piece.token_offset * d.q_width, piece.len * d.q_width);
                    let (Some(q), Some(out)) = (q, out) else {
                        return Err(CudaError::Unsupported {
                            op: "attention_prefill",
                            what: "piece end",
                            value: piece.token_offset + piece.len,
                            reason: format!("must be at most {tokens} tokens"),
                        });
                    };
                    ops::attention_prefill(
                        kernels,
                        stream,
                        &AttentionPrefillShape {
                            tokens: piece.len,
                            start_pos: piece.start_pos,
                            seq_row: piece.seq_row,
                            n_heads: d.heads,
                            n_kv_heads: d.kv_heads,
                            head_dim: d.head_dim,
                            cache,
                            window: d.window,
                        },
                        AttentionPrefillArgs {
                            q,
                            k_cache: self.k_cache[l].view(),
                            v_cache: self.v_cache[l].view(),
                            block_tables: self.block_tables.view(),
                            out,
                        },
                    )?;
                }
                Ok(())
            }
        }
    }
}

/// Synchronous upload of a small host table into `dst` (at load only).
pub fn upload<T: cudarc::driver::DeviceRepr>(
    stream: &Arc<CudaStream>,
    dst: &Region<T>,
    host: &[T],
    what: &str,
) -> Result<(), CudaError> {
    let Some(target) = dst.sub(0, host.len()) else {
        return Err(CudaError::UnsupportedModel(format!(
            "{what}: {} elements do not fit a region of {}",
            host.len(),
            dst.len_elems()
        )));
    };
    // SAFETY: the destination range is inside a live region; the host slice stays borrowed until the
    // stream is synchronised below.
    unsafe {
        cudarc::driver::result::memcpy_htod_async(target.address(), host, stream.cu_stream())
    }
    .map_err(CudaError::driver(format!("uploading {what}")))?;
    stream
        .synchronize()
        .map_err(CudaError::driver(format!("uploading {what}")))
}
