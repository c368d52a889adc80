//! [`CpuEngine`]: the reference implementation of the [`Engine`] step API, f32 compute over the
//! memory-mapped weights.
//!
//! A step flattens every entry's new tokens into one activation `[T, hidden]`; each layer then runs
//! RMSNorm, the q/k/v projections for all T tokens, RoPE at each token's absolute position, the K/V
//! append into the paged cache, attention per entry over its cached positions, the output projection
//! and residual, RMSNorm and the MoE block over all T tokens together, and the second residual. The
//! final norm and LM head run only for the rows whose logits were asked for.
//!
//! K/V storage: one f32 array per cache block, `[layers, 2 (k, v), block_size, kv_heads * head_dim]`,
//! allocated the first time the block is used, so a long default context costs nothing until used.

use super::attention::{attention, AttentionShape};
use super::embedding::embed;
use super::matmul::matmul;
use super::moe::moe_block;
use super::norm::rms_norm;
use super::rope::Rope;
use crate::config::ModelConfig;
use crate::engine::{Engine, EngineError, LogitsFor, SeqId, SeqStep, StepOutput};
use crate::kv::PagedKv;
use crate::weights::ModelWeights;
use std::sync::Arc;

/// Options of a [`CpuEngine`].
#[derive(Debug, Clone)]
pub struct CpuEngineOptions {
    /// Longest sequence, in tokens; `None` = the model's `max_position_embeddings`.
    pub max_context: Option<usize>,
    /// Tokens per KV-cache block.
    pub block_size: usize,
    /// Blocks in the KV pool; `None` = enough for `max_sequences` sequences at full context (block
    /// memory is only allocated when first used).
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

/// The CPU reference engine.
pub struct CpuEngine {
    weights: Arc<ModelWeights>,
    kv: PagedKv,
    /// Per block: `[layers, 2, block_size, kv_width]`, `None` until first used.
    blocks: Vec<Option<Box<[f32]>>>,
    rope: Rope,
}

/// One token of a step: which entry it belongs to and its absolute position.
#[derive(Clone, Copy)]
struct TokenSlot {
    entry: usize,
    pos: usize,
}

impl CpuEngine {
    /// Builds an engine over `weights`. Rejects zero sizes and a context beyond what block ids can
    /// address.
    pub fn new(weights: Arc<ModelWeights>, options: CpuEngineOptions) -> Result<Self, EngineError> {
        let config = &weights.config;
        let max_context = options
            .max_context
            .unwrap_or(config.max_position_embeddings);
        if max_context == 0 || options.block_size == 0 || options.max_sequences == 0 {
            return Err(EngineError::Backend(format!(
                "invalid engine options: max_context {max_context}, block_size {}, max_sequences {}",
                options.block_size, options.max_sequences
            )));
        }
        let blocks_per_seq = max_context.div_ceil(options.block_size);
        let total = match options.kv_blocks {
            Some(n) => n,
            None => blocks_per_seq.saturating_mul(options.max_sequences),
        };
        if total == 0 || total > u32::MAX as usize {
            return Err(EngineError::Backend(format!(
                "invalid KV block count {total}"
            )));
        }
        let kv = PagedKv::new(
            options.block_size,
            total,
            options.max_sequences,
            max_context,
        );
        let rope = Rope::new(config.head_dim, config.rope_theta);
        Ok(CpuEngine {
            blocks: vec![None; total],
            kv,
            rope,
            weights,
        })
    }

    /// The KV bookkeeping (block tables), for inspection.
    pub fn kv(&self) -> &PagedKv {
        &self.kv
    }

    fn block_floats(&self) -> usize {
        let c = &self.weights.config;
        c.num_layers * 2 * self.kv.block_size() * c.kv_width()
    }

    /// Offset of (layer, k or v, slot) inside a block.
    fn offset(&self, layer: usize, which: usize, slot: usize) -> usize {
        let kv_width = self.weights.config.kv_width();
        ((layer * 2 + which) * self.kv.block_size() + slot) * kv_width
    }

    fn run(&mut self, batch: &[SeqStep<'_>]) -> StepOutput {
        let weights = Arc::clone(&self.weights);
        let c: &ModelConfig = &weights.config;
        let (hidden, q_width, kv_width) = (c.hidden_size, c.q_width(), c.kv_width());

        // Allocate the storage of every block the batch now uses.
        let floats = self.block_floats();
        let tables: Vec<Vec<u32>> = batch
            .iter()
            .map(|e| self.kv.sequence(e.seq).expect("validated").blocks.clone())
            .collect();
        for &block in tables.iter().flatten() {
            self.blocks[block as usize].get_or_insert_with(|| vec![0.0; floats].into_boxed_slice());
        }

        let ids: Vec<u32> = batch
            .iter()
            .flat_map(|e| e.tokens.iter().copied())
            .collect();
        let slots: Vec<TokenSlot> = batch
            .iter()
            .enumerate()
            .flat_map(|(entry, e)| {
                (0..e.tokens.len()).map(move |i| TokenSlot {
                    entry,
                    pos: e.start_pos + i,
                })
            })
            .collect();
        let positions: Vec<usize> = slots.iter().map(|s| s.pos).collect();
        let t = ids.len();

        let mut x = vec![0.0f32; t * hidden];
        embed(weights.embed.data(), hidden, &ids, &mut x);
        let mut normed = vec![0.0f32; t * hidden];
        let mut q = vec![0.0f32; t * q_width];
        let mut k = vec![0.0f32; t * kv_width];
        let mut v = vec![0.0f32; t * kv_width];
        let mut attn = vec![0.0f32; t * q_width];
        let mut projected = vec![0.0f32; t * hidden];
        let shape = AttentionShape {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            window: c.sliding_window,
        };

        for (l, layer) in weights.layers.iter().enumerate() {
            rms_norm(&x, layer.attn_norm.data(), c.rms_norm_eps, &mut normed);
            matmul(&normed, t, layer.q_proj.data(), q_width, hidden, &mut q);
            matmul(&normed, t, layer.k_proj.data(), kv_width, hidden, &mut k);
            matmul(&normed, t, layer.v_proj.data(), kv_width, hidden, &mut v);
            self.rope.apply(&mut q, &positions);
            self.rope.apply(&mut k, &positions);
            for (i, s) in slots.iter().enumerate() {
                let (block, slot) = self.kv.slot(&tables[s.entry], s.pos);
                let (k_at, v_at) = (self.offset(l, 0, slot), self.offset(l, 1, slot));
                let storage = self.blocks[block as usize]
                    .as_mut()
                    .expect("allocated above");
                storage[k_at..k_at + kv_width]
                    .copy_from_slice(&k[i * kv_width..(i + 1) * kv_width]);
                storage[v_at..v_at + kv_width]
                    .copy_from_slice(&v[i * kv_width..(i + 1) * kv_width]);
            }
            let mut first = 0;
            for (entry, e) in batch.iter().enumerate() {
                let n = e.tokens.len();
                let table = &tables[entry];
                let (blocks, kv) = (&self.blocks, &self.kv);
                let (k_base, v_base) = (self.offset(l, 0, 0), self.offset(l, 1, 0));
                let read = |pos: usize| {
                    let (block, slot) = kv.slot(table, pos);
                    let storage = blocks[block as usize].as_deref().expect("allocated above");
                    let (k_at, v_at) = (k_base + slot * kv_width, v_base + slot * kv_width);
                    (
                        &storage[k_at..k_at + kv_width],
                        &storage[v_at..v_at + kv_width],
                    )
                };
                let rows = first * q_width..(first + n) * q_width;
                attention(&q[rows.clone()], e.start_pos, &shape, read, &mut attn[rows]);
                first += n;
            }
            matmul(
                &attn,
                t,
                layer.o_proj.data(),
                hidden,
                q_width,
                &mut projected,
            );
            add_into(&mut x, &projected);
            rms_norm(&x, layer.ffn_norm.data(), c.rms_norm_eps, &mut normed);
            let moe = moe_block(layer, c.experts_per_token, &normed, t, hidden);
            add_into(&mut x, &moe);
        }

        // Final norm and LM head for the requested rows only.
        let mut rows = Vec::new();
        let mut first = 0;
        for (entry, e) in batch.iter().enumerate() {
            let n = e.tokens.len();
            let wanted = match e.logits {
                LogitsFor::None => 0..0,
                LogitsFor::Last => n - 1..n,
                LogitsFor::All => 0..n,
            };
            rows.extend(wanted.map(|i| (entry, e.start_pos + i, first + i)));
            first += n;
        }
        let vocab = c.vocab_size;
        let mut selected = Vec::with_capacity(rows.len() * hidden);
        for &(_, _, row) in &rows {
            selected.extend_from_slice(&x[row * hidden..(row + 1) * hidden]);
        }
        let mut final_normed = vec![0.0f32; selected.len()];
        rms_norm(
            &selected,
            weights.final_norm.data(),
            c.rms_norm_eps,
            &mut final_normed,
        );
        let mut logits = vec![0.0f32; rows.len() * vocab];
        if !rows.is_empty() {
            matmul(
                &final_normed,
                rows.len(),
                weights.lm_head.data(),
                vocab,
                hidden,
                &mut logits,
            );
        }
        StepOutput {
            vocab,
            logits,
            rows: rows.iter().map(|&(entry, pos, _)| (entry, pos)).collect(),
        }
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

impl Engine for CpuEngine {
    fn config(&self) -> &ModelConfig {
        &self.weights.config
    }

    fn max_context(&self) -> usize {
        self.kv.max_context()
    }

    fn new_sequence(&mut self) -> Result<SeqId, EngineError> {
        self.kv.new_sequence()
    }

    fn free_sequence(&mut self, seq: SeqId) -> Result<(), EngineError> {
        self.kv.free_sequence(seq)
    }

    fn sequence_len(&self, seq: SeqId) -> Result<usize, EngineError> {
        self.kv.len(seq)
    }

    fn free_kv_blocks(&self) -> usize {
        self.kv.free_blocks()
    }

    fn total_kv_blocks(&self) -> usize {
        self.kv.total_blocks()
    }

    fn step(&mut self, batch: &[SeqStep<'_>]) -> Result<StepOutput, EngineError> {
        self.kv
            .prepare_step(batch, self.weights.config.vocab_size)?;
        Ok(self.run(batch))
    }
}
