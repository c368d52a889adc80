//! [`CpuEngine`]: a whole Mixtral-family forward pass on the CPU over a paged KV cache, one
//! batched step at a time.
//!
//! A step flattens the new tokens of every entry into one activation `[T, hidden]`. Per layer:
//! RMSNorm; q/k/v projections of all `T` tokens at once; RoPE at each token's absolute position;
//! k/v written into the sequence's cache slots; attention per entry over its cached keys; o_proj
//! and residual; RMSNorm; the MoE block over all `T` tokens at once; residual. The final norm and
//! LM head run only for the positions whose logits were requested (and the last layer's
//! feed-forward block only for those positions, as nothing else reads it).
//!
//! K/V storage: per layer, one f32 buffer `[block_rows, kv_heads, head_dim]` per block id for K and
//! one for V, allocated when a block id is first used (`block_rows = min(block_size,
//! max_context)`), so an unused context costs nothing.
//!
//! A pool of a given size ([`CpuEngineOptions::kv_blocks`]) caches prefixes ([`crate::kv`]):
//! [`Engine::reuse_prefix`] starts a sequence on cached blocks. [`Engine::fork_sequence`] shares a
//! sequence's blocks, and a step first copies the blocks the pool asks for (copy-on-write). Blocks
//! a sliding window no longer sees are released.

use super::attention::{attention, AttentionShape, SequenceCache};
use super::embedding::embed;
use super::matmul::{active_kernel, matmul};
use super::moe::{moe_block, Expert};
use super::norm::{add_rms_norm, rms_norm};
use super::packed_matmul::Matrix;
use super::rope::Rope;
use crate::config::ModelConfig;
use crate::engine::{Engine, EngineError, SeqId, SeqStep, StepOutput};
use crate::kv::{BlockCopy, KvLimits, PagedKv, Slot, StepPlan, RELEASED};
use crate::weights::{LayerWeights, ModelWeights};
use std::sync::Arc;

/// Largest K (or V) block of one layer, in f32 elements (1 GiB).
const MAX_BLOCK_ELEMENTS: usize = 1 << 28;

/// Options of a [`CpuEngine`].
#[derive(Debug, Clone)]
pub struct CpuEngineOptions {
    /// Longest sequence, in tokens; `None` = the model's `max_position_embeddings`.
    pub max_context: Option<usize>,
    /// Tokens per KV-cache block.
    pub block_size: usize,
    /// Blocks in the KV pool; `None` = enough for `max_sequences` full contexts (bookkeeping
    /// only: block storage is allocated on first use). A pool given here also caches prefixes
    /// ([`Engine::reuse_prefix`]): blocks no sequence uses keep their storage until the pool needs
    /// them, so its memory can grow to the whole pool. The default pool caches nothing, so its
    /// memory stays at the most blocks ever in use at once.
    pub kv_blocks: Option<usize>,
    /// Most sequences alive at once.
    pub max_sequences: usize,
}

impl Default for CpuEngineOptions {
    fn default() -> Self {
        CpuEngineOptions {
            max_context: None,
            block_size: 16,
            kv_blocks: None,
            max_sequences: 256,
        }
    }
}

/// K and V block storage of one layer, indexed by block id; empty until first used.
#[derive(Debug, Default)]
struct LayerCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

/// Activations reused from step to step.
#[derive(Debug, Default)]
struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    o: Vec<f32>,
    ffn: Vec<f32>,
}

/// The CPU reference engine.
pub struct CpuEngine {
    weights: Arc<ModelWeights>,
    kv: PagedKv,
    /// Elements of one K (or V) block of one layer.
    block_elements: usize,
    cache: Vec<LayerCache>,
    rope: Rope,
    scratch: Scratch,
}

impl std::fmt::Debug for CpuEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuEngine")
            .field("kv", &self.kv.limits())
            .finish_non_exhaustive()
    }
}

/// The KV pool of a CPU engine for `options` (unset: the model's context, enough blocks for
/// `max_sequences` full contexts) and the rows one block stores (`min(block_size, max_context)`).
/// Refuses a zero block size, a block count that overflows and a block of one layer above 2^28
/// f32 elements with [`EngineError::InvalidOptions`].
pub(crate) fn kv_limits(
    config: &ModelConfig,
    options: &CpuEngineOptions,
) -> Result<(KvLimits, usize), EngineError> {
    let max_context = options
        .max_context
        .unwrap_or(config.max_position_embeddings);
    let invalid = |what: &str| EngineError::InvalidOptions(what.to_string());
    if options.block_size == 0 {
        return Err(invalid("block_size must be at least 1"));
    }
    let num_blocks = match options.kv_blocks {
        Some(n) => n,
        None => max_context
            .div_ceil(options.block_size)
            .checked_mul(options.max_sequences)
            .ok_or_else(|| invalid("max_sequences * blocks per context overflows"))?,
    };
    let block_rows = options.block_size.min(max_context);
    block_rows
        .checked_mul(config.kv_width())
        .filter(|&n| n <= MAX_BLOCK_ELEMENTS)
        .ok_or_else(|| {
            invalid("block_size * kv_heads * head_dim exceeds 2^28 elements per block")
        })?;
    let limits = KvLimits {
        block_size: options.block_size,
        num_blocks,
        max_context,
        max_sequences: options.max_sequences,
        vocab_size: config.vocab_size,
    };
    Ok((limits, block_rows))
}

impl CpuEngine {
    /// Builds an engine over `weights`. Refuses zero sizes, a pool whose block count overflows,
    /// and a block of one layer above 2^28 f32 elements with [`EngineError::InvalidOptions`].
    pub fn new(weights: Arc<ModelWeights>, options: CpuEngineOptions) -> Result<Self, EngineError> {
        let config = &weights.config;
        let (limits, block_rows) = kv_limits(config, &options)?;
        let block_elements = block_rows * config.kv_width();
        let kv = PagedKv::new(limits)?
            .with_prefix_caching(options.kv_blocks.is_some())
            .with_sliding_window(config.sliding_window);
        let cache = (0..config.num_layers)
            .map(|_| LayerCache::default())
            .collect();
        let rope = Rope::new(config.head_dim, config.rope_theta);
        Ok(CpuEngine {
            weights,
            kv,
            block_elements,
            cache,
            rope,
            scratch: Scratch::default(),
        })
    }

    /// The paged-KV bookkeeping (block tables, free blocks).
    pub fn kv(&self) -> &PagedKv {
        &self.kv
    }
}

impl Engine for CpuEngine {
    fn config(&self) -> &ModelConfig {
        &self.weights.config
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
        let applied = self.kv.apply(batch)?;
        self.copy_blocks(&applied.copies);
        // The whole pass on one of rayon's threads (of the caller's pool when it has one): each
        // parallel product then starts from a worker, where a call from outside would hand its
        // work to the pool and sleep until woken, about 20 microseconds a product (about a
        // hundred products a decode token).
        Ok(rayon::scope(|_| self.forward(batch, &applied.plan)))
    }

    fn reuse_prefix(&mut self, seq: SeqId, tokens: &[u32]) -> Result<usize, EngineError> {
        self.kv.reuse_prefix(seq, tokens)
    }

    fn fork_sequence(&mut self, seq: SeqId) -> Result<SeqId, EngineError> {
        self.kv.fork(seq)
    }

    fn kv_block_size(&self) -> Option<usize> {
        Some(self.kv.limits().block_size)
    }
}

impl CpuEngine {
    /// Copies K and V of every layer from block `src` to block `dst` (copy-on-write).
    fn copy_blocks(&mut self, copies: &[BlockCopy]) {
        for c in copies {
            for layer in &mut self.cache {
                for blocks in [&mut layer.k, &mut layer.v] {
                    let src = blocks.get(c.src).cloned().unwrap_or_default();
                    let dst = block_mut(blocks, c.dst, self.block_elements);
                    if src.len() == dst.len() {
                        dst.copy_from_slice(&src);
                    }
                }
            }
        }
    }

    /// Runs an applied step (validated, blocks reserved).
    fn forward(&mut self, batch: &[SeqStep<'_>], plan: &StepPlan) -> StepOutput {
        let weights = Arc::clone(&self.weights);
        let config = &weights.config;
        let hidden = config.hidden_size;
        let vocab = config.vocab_size;
        let total = plan.total_tokens;

        let tokens: Vec<u32> = batch.iter().flat_map(|s| s.tokens).copied().collect();
        let positions: Vec<usize> = plan
            .entries
            .iter()
            .flat_map(|e| e.start_pos..e.start_pos + e.len)
            .collect();
        let slots = self.slots(plan);
        // Flat token indices whose logits were requested, with their (batch index, position).
        let mut selected = Vec::new();
        let mut rows = Vec::new();
        for (b, e) in plan.entries.iter().enumerate() {
            for i in e.logit_rows() {
                selected.push(e.token_offset + i);
                rows.push((b, e.start_pos + i));
            }
        }

        let s = &mut self.scratch;
        s.x.resize(total * hidden, 0.0);
        embed(&tokens, weights.embed.data(), hidden, &mut s.x);
        let num_layers = weights.layers.len();
        for (li, layer) in weights.layers.iter().enumerate() {
            self.attention_block(li, layer, plan, &positions, &slots);
            let s = &mut self.scratch;
            if li + 1 == num_layers {
                // Only the requested positions are read after the last attention block.
                s.x = gather_rows(&s.x, hidden, &selected);
                s.o = gather_rows(&s.o, hidden, &selected);
                if selected.is_empty() {
                    break;
                }
            }
            let n = s.x.len() / hidden;
            s.h.resize(n * hidden, 0.0);
            add_rms_norm(
                &mut s.x,
                &s.o,
                layer.ffn_norm.data(),
                config.rms_norm_eps,
                &mut s.h,
            );
            s.ffn.resize(n * hidden, 0.0);
            let experts: Vec<Expert<'_>> = layer
                .experts
                .iter()
                .map(|e| Expert {
                    w1: Matrix::of(&e.w1),
                    w2: Matrix::of(&e.w2),
                    w3: Matrix::of(&e.w3),
                })
                .collect();
            moe_block(
                &s.h,
                layer.router.as_ref().map(|r| r.data()),
                &experts,
                config.experts_per_token,
                hidden,
                config.intermediate_size,
                &mut s.ffn,
            );
            for (x, f) in s.x.iter_mut().zip(&s.ffn) {
                *x += f;
            }
        }

        let s = &mut self.scratch;
        if num_layers == 0 {
            s.x = gather_rows(&s.x, hidden, &selected);
        }
        let mut logits = vec![0.0f32; rows.len() * vocab];
        if !rows.is_empty() {
            s.h.resize(s.x.len(), 0.0);
            rms_norm(
                &s.x,
                weights.final_norm.data(),
                config.rms_norm_eps,
                &mut s.h,
            );
            matmul(&s.h, weights.lm_head.data(), vocab, hidden, &mut logits);
        }
        StepOutput {
            vocab,
            logits,
            rows,
        }
    }

    /// The cache slot of every token of the step, in flattened order.
    fn slots(&self, plan: &StepPlan) -> Vec<Slot> {
        let mut slots = Vec::with_capacity(plan.total_tokens);
        for e in &plan.entries {
            for pos in e.start_pos..e.start_pos + e.len {
                // Every position of an applied step has a slot.
                if let Some(slot) = self.kv.slot(e.seq, pos) {
                    slots.push(slot);
                }
            }
        }
        assert_eq!(slots.len(), plan.total_tokens, "KV slots missing");
        slots
    }

    /// `scratch.x` -> `scratch.o`: RMSNorm, q/k/v, RoPE, cache write, attention, o_proj.
    fn attention_block(
        &mut self,
        li: usize,
        layer: &LayerWeights,
        plan: &StepPlan,
        positions: &[usize],
        slots: &[Slot],
    ) {
        let config = &self.weights.config;
        let (hidden, hd) = (config.hidden_size, config.head_dim);
        let (q_width, kv_width) = (config.q_width(), config.kv_width());
        let total = plan.total_tokens;
        let s = &mut self.scratch;
        s.h.resize(total * hidden, 0.0);
        rms_norm(&s.x, layer.attn_norm.data(), config.rms_norm_eps, &mut s.h);
        s.q.resize(total * q_width, 0.0);
        s.k.resize(total * kv_width, 0.0);
        s.v.resize(total * kv_width, 0.0);
        Matrix::of(&layer.q_proj).product(&s.h, q_width, hidden, &mut s.q);
        Matrix::of(&layer.k_proj).product(&s.h, kv_width, hidden, &mut s.k);
        Matrix::of(&layer.v_proj).product(&s.h, kv_width, hidden, &mut s.v);
        self.rope.apply(&mut s.q, config.num_heads, positions);
        self.rope.apply(&mut s.k, config.num_kv_heads, positions);

        let cache = &mut self.cache[li];
        for (t, slot) in slots.iter().enumerate() {
            let row = slot.offset * kv_width..(slot.offset + 1) * kv_width;
            let src = t * kv_width..(t + 1) * kv_width;
            block_mut(&mut cache.k, slot.block, self.block_elements)[row.clone()]
                .copy_from_slice(&s.k[src.clone()]);
            block_mut(&mut cache.v, slot.block, self.block_elements)[row]
                .copy_from_slice(&s.v[src]);
        }

        let shape = AttentionShape {
            heads: config.num_heads,
            kv_heads: config.num_kv_heads,
            head_dim: hd,
        };
        s.attn.resize(total * q_width, 0.0);
        for e in &plan.entries {
            let table = self.kv.block_table(e.seq).unwrap_or(&[]);
            // A released block (out of the sliding window) is never read: an empty view.
            let k_blocks: Vec<&[f32]> = table.iter().map(|&b| view(&cache.k, b)).collect();
            let v_blocks: Vec<&[f32]> = table.iter().map(|&b| view(&cache.v, b)).collect();
            let block_size = self.kv.limits().block_size;
            let rows = e.tokens();
            attention(
                active_kernel(),
                &s.q[rows.start * q_width..rows.end * q_width],
                shape,
                e.start_pos,
                SequenceCache {
                    k: &k_blocks,
                    v: &v_blocks,
                    block_size,
                },
                config.sliding_window,
                &mut s.attn[rows.start * q_width..rows.end * q_width],
            );
        }
        s.o.resize(total * hidden, 0.0);
        Matrix::of(&layer.o_proj).product(&s.attn, hidden, q_width, &mut s.o);
    }
}

/// Block `id` of one layer's K or V storage, allocated (zeroed) on first use.
fn block_mut(blocks: &mut Vec<Vec<f32>>, id: usize, elements: usize) -> &mut [f32] {
    if blocks.len() <= id {
        blocks.resize_with(id + 1, Vec::new);
    }
    let block = &mut blocks[id];
    if block.is_empty() {
        block.resize(elements, 0.0);
    }
    block
}

/// The storage of block `b` in `blocks`; empty for a [`RELEASED`] block (never read).
fn view(blocks: &[Vec<f32>], b: usize) -> &[f32] {
    match b {
        RELEASED => &[],
        b => blocks[b].as_slice(),
    }
}

/// Rows `which` of `x: [rows, width]`, in that order.
fn gather_rows(x: &[f32], width: usize, which: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(which.len() * width);
    for &r in which {
        out.extend_from_slice(&x[r * width..(r + 1) * width]);
    }
    out
}
