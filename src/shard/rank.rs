//! One rank's forward pass over its [`RankWeights`], with the CPU reference kernels of
//! [`crate::cpu`] on its shard and the plan's collectives between them.
//!
//! A step's activations `x: [T, hidden]` are replicated on every rank. Per step:
//! embedding rows of the rank's token ids (zero rows for the others), all-reduced over the world;
//! per layer: RMSNorm; q/k/v of the rank's heads `[T, heads_local * head_dim]`; RoPE; the rank's
//! K/V heads into its own paged cache `[block_rows, kv_heads_local, head_dim]` per block; attention
//! of its heads; its partial o_proj `[T, hidden]`, all-reduced over its TP group; residual and
//! RMSNorm; router (replicated) and its experts' partial outputs, all-reduced over the world;
//! residual. Then the final norm and its vocabulary's logits for the requested positions,
//! all-gathered over the world into `[rows, vocab]`.

use super::collective::{Collective, CollectiveError};
use super::weights::{RankLayer, RankWeights};
use crate::config::ModelConfig;
use crate::cpu::attention::{attention, AttentionShape, SequenceCache};
use crate::cpu::embedding::embed;
use crate::cpu::matmul::active_kernel;
use crate::cpu::moe::{expert_mlp, moe_experts, route_tokens, Expert};
use crate::cpu::norm::{add_rms_norm, rms_norm};
use crate::cpu::rope::Rope;
use crate::kv::Slot;
use std::ops::Range;
use std::sync::Arc;

/// One sequence's part of a step, as every rank sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEntry {
    /// Position of the entry's first new token.
    pub start_pos: usize,
    /// Its tokens' rows in the step's flattened token list.
    pub rows: Range<usize>,
    /// The sequence's block table after the step was applied.
    pub table: Vec<usize>,
}

/// An applied step, identical for every rank (the coordinator owns the block tables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepJob {
    /// Token ids, entries concatenated in batch order.
    pub tokens: Vec<u32>,
    /// Absolute position of each token.
    pub positions: Vec<usize>,
    /// Cache slot of each token.
    pub slots: Vec<Slot>,
    /// The entries, in batch order.
    pub entries: Vec<JobEntry>,
    /// Flat token indices whose logits were requested, in output order.
    pub selected: Vec<usize>,
    /// Tokens per cache block.
    pub block_size: usize,
}

/// A rank's handles on its two groups.
#[derive(Debug)]
pub struct RankComms<C> {
    /// Every rank (the embedding, the experts, the LM head).
    pub world: C,
    /// The rank's TP group (attention).
    pub tp: C,
}

/// K and V block storage of one layer, indexed by block id; empty until first used.
#[derive(Debug, Default)]
struct LayerCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

/// Block `id` of `blocks`, allocated (zeroed) on first use.
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

/// One rank: its weights, its cache, its groups.
#[derive(Debug)]
pub struct Rank<C> {
    config: Arc<ModelConfig>,
    /// Shared with each step's body (never copied).
    weights: Arc<RankWeights>,
    comms: RankComms<C>,
    cache: Vec<LayerCache>,
    /// Rows of one cache block (`min(block_size, max_context)`).
    block_rows: usize,
    rope: Rope,
}

/// Rows `which` of `x: [rows, width]`, in that order.
fn gather_rows(x: &[f32], width: usize, which: &[usize]) -> Vec<f32> {
    which
        .iter()
        .flat_map(|&r| x[r * width..(r + 1) * width].iter().copied())
        .collect()
}

impl<C: Collective<Mem<f32> = [f32]>> Rank<C> {
    /// A rank over `weights` whose cache blocks hold `block_rows` positions.
    pub fn new(
        config: Arc<ModelConfig>,
        weights: RankWeights,
        comms: RankComms<C>,
        block_rows: usize,
    ) -> Self {
        let cache = (0..config.num_layers)
            .map(|_| LayerCache::default())
            .collect();
        let rope = Rope::new(config.head_dim, config.rope_theta);
        Rank {
            config,
            weights: Arc::new(weights),
            comms,
            cache,
            block_rows,
            rope,
        }
    }

    /// Runs one step; returns the logits `[job.selected.len(), vocab]` (every rank gets them).
    pub fn step(&mut self, job: &StepJob) -> Result<Vec<f32>, CollectiveError> {
        let config = Arc::clone(&self.config);
        let weights = Arc::clone(&self.weights);
        let hidden = config.hidden_size;
        let mut x = self.embed(&job.tokens)?;
        let num_layers = weights.layers.len();
        for (li, layer) in weights.layers.iter().enumerate() {
            let mut o = self.attention_block(li, layer, job, &x)?;
            if li + 1 == num_layers {
                // Only the requested positions are read after the last attention block.
                x = gather_rows(&x, hidden, &job.selected);
                o = gather_rows(&o, hidden, &job.selected);
                if job.selected.is_empty() {
                    break;
                }
            }
            let mut h = vec![0.0f32; x.len()];
            add_rms_norm(
                &mut x,
                &o,
                layer.ffn_norm.data(),
                config.rms_norm_eps,
                &mut h,
            );
            let ffn = self.ffn_block(layer, &h)?;
            for (x, f) in x.iter_mut().zip(&ffn) {
                *x += f;
            }
        }
        if num_layers == 0 {
            x = gather_rows(&x, hidden, &job.selected);
        }
        self.logits(&x, job.selected.len())
    }

    /// Embedding rows of the rank's token ids, zero rows for the rest, summed over the world.
    fn embed(&mut self, tokens: &[u32]) -> Result<Vec<f32>, CollectiveError> {
        let hidden = self.config.hidden_size;
        let vocab = self.weights.shard.vocab.clone();
        let mut x = vec![0.0f32; tokens.len() * hidden];
        for (&id, row) in tokens.iter().zip(x.chunks_exact_mut(hidden)) {
            if vocab.contains(&(id as usize)) {
                let local = id - vocab.start as u32;
                embed(&[local], self.weights.embed.data(), hidden, row);
            }
        }
        self.comms.world.all_reduce::<f32>(&mut x[..])?;
        Ok(x)
    }

    /// `x` -> the attention block's output `[T, hidden]`, summed over the TP group.
    fn attention_block(
        &mut self,
        li: usize,
        layer: &RankLayer,
        job: &StepJob,
        x: &[f32],
    ) -> Result<Vec<f32>, CollectiveError> {
        let config = &self.config;
        let (hidden, hd) = (config.hidden_size, config.head_dim);
        let shard = &self.weights.shard;
        let (heads, kv_heads) = (shard.num_heads(), shard.num_kv_heads());
        let (q_width, kv_width) = (heads * hd, kv_heads * hd);
        let total = job.tokens.len();
        let mut h = vec![0.0f32; total * hidden];
        rms_norm(x, layer.attn_norm.data(), config.rms_norm_eps, &mut h);
        let mut q = vec![0.0f32; total * q_width];
        let mut k = vec![0.0f32; total * kv_width];
        let mut v = vec![0.0f32; total * kv_width];
        layer.q_proj.matrix().product(&h, q_width, hidden, &mut q);
        layer.k_proj.matrix().product(&h, kv_width, hidden, &mut k);
        layer.v_proj.matrix().product(&h, kv_width, hidden, &mut v);
        self.rope.apply(&mut q, heads, &job.positions);
        self.rope.apply(&mut k, kv_heads, &job.positions);

        let elements = self.block_rows * kv_width;
        let cache = &mut self.cache[li];
        for (t, slot) in job.slots.iter().enumerate() {
            let row = slot.offset * kv_width..(slot.offset + 1) * kv_width;
            let src = t * kv_width..(t + 1) * kv_width;
            block_mut(&mut cache.k, slot.block, elements)[row.clone()]
                .copy_from_slice(&k[src.clone()]);
            block_mut(&mut cache.v, slot.block, elements)[row].copy_from_slice(&v[src]);
        }

        let shape = AttentionShape {
            heads,
            kv_heads,
            head_dim: hd,
        };
        let mut attn = vec![0.0f32; total * q_width];
        for e in &job.entries {
            let k_blocks: Vec<&[f32]> = e.table.iter().map(|&b| cache.k[b].as_slice()).collect();
            let v_blocks: Vec<&[f32]> = e.table.iter().map(|&b| cache.v[b].as_slice()).collect();
            let rows = e.rows.start * q_width..e.rows.end * q_width;
            attention(
                active_kernel(),
                &q[rows.clone()],
                shape,
                e.start_pos,
                SequenceCache {
                    k: &k_blocks,
                    v: &v_blocks,
                    block_size: job.block_size,
                },
                config.sliding_window,
                &mut attn[rows],
            );
        }
        let mut o = vec![0.0f32; total * hidden];
        layer
            .o_proj
            .matrix()
            .product(&attn, hidden, q_width, &mut o);
        self.comms.tp.all_reduce::<f32>(&mut o[..])?;
        Ok(o)
    }

    /// `h: [n, hidden]` -> the MoE block's output, the rank's experts' partial sums summed over
    /// the world.
    fn ffn_block(&mut self, layer: &RankLayer, h: &[f32]) -> Result<Vec<f32>, CollectiveError> {
        let config = &self.config;
        let hidden = config.hidden_size;
        let inter = self.weights.shard.inter.len();
        let experts: Vec<(usize, Expert<'_>)> = layer
            .experts
            .iter()
            .map(|e| {
                let m = Expert {
                    w1: e.w1.matrix(),
                    w2: e.w2.matrix(),
                    w3: e.w3.matrix(),
                };
                (e.id, m)
            })
            .collect();
        let mut out = vec![0.0f32; h.len()];
        match &layer.router {
            Some(router) => {
                let routing = route_tokens(
                    h,
                    router.data(),
                    config.num_experts,
                    config.experts_per_token,
                    hidden,
                );
                moe_experts(
                    h,
                    &routing,
                    &experts,
                    config.num_experts,
                    hidden,
                    inter,
                    &mut out,
                );
            }
            // A dense model: one MLP, owned by every rank (split by intermediate rows).
            None => {
                if let Some((_, mlp)) = experts.first() {
                    expert_mlp(h, mlp, hidden, inter, &mut out);
                }
            }
        }
        self.comms.world.all_reduce::<f32>(&mut out[..])?;
        Ok(out)
    }

    /// Final norm and LM head of `x: [rows, hidden]`: the rank's vocabulary columns, gathered
    /// over the world into `[rows, vocab]`.
    fn logits(&mut self, x: &[f32], rows: usize) -> Result<Vec<f32>, CollectiveError> {
        let config = &self.config;
        let (hidden, vocab) = (config.hidden_size, config.vocab_size);
        let local = self.weights.shard.vocab.len();
        if rows == 0 {
            // Every rank runs the same job, so every rank skips the gather.
            return Ok(Vec::new());
        }
        let mut part = vec![0.0f32; rows * local];
        let mut h = vec![0.0f32; x.len()];
        rms_norm(
            x,
            self.weights.final_norm.data(),
            config.rms_norm_eps,
            &mut h,
        );
        self.weights
            .lm_head
            .matrix()
            .product(&h, local, hidden, &mut part);
        let world = self.comms.world.size();
        let mut gathered = vec![0.0f32; world * part.len()];
        self.comms
            .world
            .all_gather::<f32>(&part[..], &mut gathered[..])?;
        // gathered: [world, rows, local] -> logits: [rows, world * local].
        let mut logits = vec![0.0f32; rows * vocab];
        for (r, block) in gathered.chunks_exact(rows * local).enumerate() {
            for (i, src) in block.chunks_exact(local).enumerate() {
                logits[i * vocab + r * local..i * vocab + (r + 1) * local].copy_from_slice(src);
            }
        }
        Ok(logits)
    }
}
