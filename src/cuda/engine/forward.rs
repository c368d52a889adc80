//! The forward pass of one chunk, as the model reads (per chunk of `T` tokens, `H` hidden,
//! `Q = heads * head_dim`, `K = kv_heads * head_dim`):
//!
//! ```text
//! residual [T, H] f32 = embed(ids)
//! per layer: xn = norm(residual += previous layer's expert slots)
//!            qkv [T, Q + 2K] = xn @ w_qkv;  rope on q and k, k/v into the paged cache
//!            attn [T, Q] = attention(q, cache)            (split-KV decode, or flash prefill)
//!            xn = norm(residual += attn @ w_o)
//!            slots [T, top_k, H] f32 = experts(xn, router(xn))
//! logits [R, vocab] f32 = norm(residual += slots)[rows] @ lm_head;  greedy = argmax(logits)
//! ```
//!
//! A fixed sequence of checked kernel launches on the engine's stream (no allocation, no host sync,
//! no string lookup), so a decode chunk can be captured into a graph. A rank of a sharded engine
//! ([`Plan::rank`]) runs the same lines at its shard's sizes, with its collectives after the
//! embedding, o_proj and the experts and around the LM head ([`super::rank`]). `Step` fills each op's
//! scalars from the model dimensions and the chunk's token count, so each line below is one op.

use std::ops::Range;

use cudarc::driver::CudaStream;
use half::bf16;

use super::super::args::{
    ArgmaxArgs, ArgmaxScalars, AttentionDecodeArgs, AttentionPrefillArgs, EmbeddingArgs,
    EmbeddingScalars, LinearArgs, LinearScalars, RmsnormArgs, RmsnormScalars, RopeKvArgs,
    RopeKvScalars, RouterArgs, RouterScalars,
};
use super::super::error::{CudaError, KernelError};
use super::super::memory::{AnyView, AnyViewMut, DeviceBuffer, Rows, View, ViewMut};
use super::super::module::Kernels;
use super::super::ops::{
    self, AttentionDecodeShape, AttentionPrefillShape, LinearCutlassScratch, PagedCacheShape,
};
use super::super::select::{self, Device};
use super::inputs::PrefillPiece;
use super::matrix::{self, DeviceMatrix, ExpertIo, GroupedExperts, ProductScratch, Products};
use super::plan::{Activations, Dims, Inputs, LayerCache, Plan, Routing, SPLIT_KEYS};
use super::rank::Group;
use super::upload::GpuWeights;

/// One forward pass: how many tokens, which logits, which attention.
#[derive(Debug, Clone, Copy)]
pub struct Pass<'a> {
    /// Tokens whose inputs are in [`Plan::inputs`].
    pub tokens: usize,
    /// Logits rows: `tokens` reads every token in order without a gather; fewer gathers the rows
    /// listed first in the inputs' row indices.
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

/// The routing, the activations, the output slots and the grouped kernels (with their scratch) of
/// the expert MLPs.
type ExpertBuffers<'a> = (
    &'a Routing,
    &'a mut DeviceBuffer<bf16>,
    &'a mut DeviceBuffer<f32>,
    &'a mut GroupedExperts,
);

/// What the norm before a block adds into the residual stream first.
enum Add<'a> {
    /// Nothing (the first layer).
    Nothing,
    /// The attention projection `[T, H]`.
    Attention(View<'a, f32>),
    /// The expert slots `[T, top_k, H]` of the previous layer.
    Experts(View<'a, f32>),
}

impl Plan {
    /// Issues the forward pass `pass` over the inputs already in [`Plan::inputs`].
    pub fn forward(
        &mut self,
        kernels: &Kernels,
        stream: &CudaStream,
        weights: &mut GpuWeights,
        pass: Pass<'_>,
    ) -> Result<(), CudaError> {
        let Pass {
            tokens,
            rows,
            attention,
            greedy,
        } = pass;
        if tokens == 0 || tokens > self.sizes.max_tokens || rows > tokens {
            return Err(CudaError::Kernel(KernelError::Unsupported {
                op: "forward",
                what: "tokens",
                value: tokens,
                reason: format!(
                    "must be in 1..={} with at most that many logits rows ({rows})",
                    self.sizes.max_tokens
                ),
            }));
        }
        let d = self.dims;
        let vocab_rows = self.vocab_rows();
        let held = self.rank.as_ref();
        let step = Step {
            kernels,
            stream,
            d,
            cache: self.cache_shape(),
            tokens: tokens as u32,
            vocab_rows,
            held_experts: held.map_or(0..d.experts, |r| r.experts.clone()),
            mma_decode: self.mma_decode,
            multiprocessors: self.multiprocessors,
        };
        let (a, inputs, rank) = (&mut self.act, &self.inputs, self.rank.as_mut());
        let grouped = &mut self.grouped;
        let scratch = &mut weights.scratch;
        // A rank's activations [T, hidden] and expert slots [T, top_k, hidden].
        let (hidden_len, slots_len) = (tokens * d.hidden, tokens * d.top_k * d.hidden);
        step.embed(inputs.ids(), weights.embed.view(), a.residual.view_mut())?;
        if let Some(r) = &rank {
            r.reduce(Group::World, stream, &mut a.residual, hidden_len)?;
        }
        let [qkv, o, _] = d.projections(vocab_rows);
        for (l, w) in weights.layers.iter().enumerate() {
            let slots = if l == 0 {
                Add::Nothing
            } else {
                Add::Experts(a.moe_out.view())
            };
            step.norm(&mut a.residual, slots, &w.attn_norm, &mut a.xn)?;
            step.project(a.xn.view(), &w.qkv, qkv, a.qkv.view_mut().into(), scratch)?;
            let cache = (
                &mut self.cache[l],
                self.block_tables.view(),
                self.inv_freq.view(),
            );
            step.attention(a, cache, inputs, attention)?;
            step.project(a.attn.view(), &w.o, o, a.o_out.view_mut().into(), scratch)?;
            if let Some(r) = &rank {
                r.reduce(Group::Tp, stream, &mut a.o_out, hidden_len)?;
            }
            let o_out = Add::Attention(a.o_out.view());
            step.norm(&mut a.residual, o_out, &w.ffn_norm, &mut a.xn)?;
            step.route(a.xn.view(), &w.gate, &mut a.routing)?;
            if let Some(r) = rank.as_ref().filter(|r| r.partial_experts) {
                r.zero(stream, &mut a.moe_out, slots_len)?;
            }
            let stacks = [&w.w1, &w.w3, &w.w2];
            let io = (&a.routing, &mut a.act, &mut a.moe_out, &mut *grouped);
            step.experts(a.xn.view(), stacks, io, scratch)?;
            if let Some(r) = &rank {
                r.reduce(Group::World, stream, &mut a.moe_out, slots_len)?;
            }
        }
        let slots = Add::Experts(a.moe_out.view());
        step.norm(&mut a.residual, slots, &weights.final_norm, &mut a.xn)?;
        let head_input = step.head_input(rows, inputs, a)?;
        let (lm_head, scratch) = weights.head_and_scratch();
        let head = (lm_head, scratch.linear.as_mut());
        match rank {
            None => step.lm_head(rows, head_input, head, self.logits.view_mut())?,
            Some(r) => {
                step.lm_head(rows, head_input, head, r.logits_part.view_mut())?;
                r.gather_logits(stream, rows, self.logits.view_mut())?;
            }
        }
        if greedy {
            step.argmax(rows, self.logits.view(), self.greedy.view_mut())?;
        }
        Ok(())
    }
}

/// The launches of one chunk: the model dimensions, the cache shape and the token count every op
/// of the chunk shares, so that each op of [`Plan::forward`] is one line.
struct Step<'k> {
    kernels: &'k Kernels,
    stream: &'k CudaStream,
    d: Dims,
    cache: PagedCacheShape,
    tokens: u32,
    /// Rows of the embedding and LM head held (the vocabulary, or a rank's part of it).
    vocab_rows: usize,
    /// Experts of the stacks held, as indices of the router's experts.
    held_experts: Range<usize>,
    /// Decode batches on the tensor-core decode kernels ([`Plan::mma_decode`]).
    mma_decode: bool,
    /// The device's multiprocessors ([`Plan::multiprocessors`]).
    multiprocessors: usize,
}

impl Step<'_> {
    /// The kernels and stream the weight products launch on.
    fn products(&self) -> Products<'_> {
        Products {
            kernels: self.kernels,
            stream: self.stream,
            mma_decode: self.mma_decode,
        }
    }

    /// `out[t] = table[ids[t]]` into the f32 residual stream.
    fn embed(
        &self,
        ids: View<'_, u32>,
        table: View<'_, bf16>,
        out: ViewMut<'_, f32>,
    ) -> Result<(), CudaError> {
        let vocab = self.vocab_rows as u32;
        self.lookup((self.tokens, vocab), ids, table, out.into())
    }

    /// `out[t] = table[ids[t]]` for `tokens` ids into a table of `vocab` rows of the hidden size.
    fn lookup(
        &self,
        (tokens, vocab): (u32, u32),
        ids: View<'_, u32>,
        table: View<'_, bf16>,
        out: AnyViewMut<'_>,
    ) -> Result<(), CudaError> {
        let s = EmbeddingScalars {
            tokens,
            hidden: self.d.hidden as u32,
            vocab,
        };
        let args = EmbeddingArgs { ids, table, out };
        ops::embedding(self.kernels, self.stream, &s, args)
    }

    /// `residual += add`, then `out = rmsnorm(residual) * weight`.
    fn norm(
        &self,
        residual: &mut DeviceBuffer<f32>,
        add: Add<'_>,
        weight: &DeviceBuffer<bf16>,
        out: &mut DeviceBuffer<bf16>,
    ) -> Result<(), CudaError> {
        let (addend, count) = match add {
            Add::Nothing => (None, 0),
            Add::Attention(v) => (Some(AnyView::F32(v)), 1),
            Add::Experts(v) => (Some(AnyView::F32(v)), self.d.top_k),
        };
        let s = RmsnormScalars {
            rows: self.tokens,
            hidden: self.d.hidden as u32,
            addend_count: count as u32,
            eps: self.d.eps,
        };
        let args = RmsnormArgs {
            out: out.view_mut(),
            residual: residual.view_mut(),
            addend,
            weight: weight.view(),
        };
        ops::rmsnorm(self.kernels, self.stream, &s, args)
    }

    /// `out = x @ w^T` for `w` of `(in, out)` features, bf16 or packed.
    fn project(
        &self,
        x: View<'_, bf16>,
        w: &DeviceMatrix,
        features: (usize, usize),
        out: AnyViewMut<'_>,
        scratch: &mut ProductScratch,
    ) -> Result<(), CudaError> {
        let s = linear_scalars(self.tokens, features);
        matrix::project(self.products(), &s, x, w, out, scratch)
    }

    /// RoPE on q and k with k/v appended to the layer's cache, then attention into `a.attn`.
    fn attention(
        &self,
        a: &mut Activations,
        (cache, block_tables, inv_freq): (&mut LayerCache, View<'_, i32>, View<'_, f32>),
        inputs: &Inputs,
        attention: Attention<'_>,
    ) -> Result<(), CudaError> {
        let d = self.d;
        let Some([mut q, k, v]) = a
            .qkv
            .view_mut()
            .column_groups([d.q_width, d.kv_width, d.kv_width])
        else {
            return Err(CudaError::UnsupportedModel(
                "the q/k/v buffer is not whole rows of q, k and v".into(),
            ));
        };
        let s = RopeKvScalars {
            tokens: self.tokens,
            n_heads: d.heads as u32,
            n_kv_heads: d.kv_heads as u32,
            head_dim: d.head_dim as u32,
            cache: self.cache.into(),
        };
        let args = RopeKvArgs {
            q: q.reborrow(),
            k: k.into(),
            v: v.into(),
            k_cache: cache.k.view_mut(),
            v_cache: cache.v.view_mut(),
            block_tables,
            token_seq: inputs.token_seq(),
            positions: inputs.positions(),
            inv_freq,
        };
        ops::rope_kv(self.kernels, self.stream, &s, args)?;
        let q: Rows<'_, bf16> = q.into();
        match attention {
            Attention::Decode => {
                let shape = AttentionDecodeShape {
                    tokens: self.tokens as usize,
                    n_heads: d.heads,
                    n_kv_heads: d.kv_heads,
                    head_dim: d.head_dim,
                    cache: self.cache,
                    window: d.window,
                    split_keys: SPLIT_KEYS,
                    multiprocessors: self.multiprocessors,
                    tensor_cores: select::attention_decode_on_tensor_cores(
                        Device {
                            mma_decode: self.mma_decode,
                            ..Device::default()
                        },
                        d.head_dim,
                        d.heads / d.kv_heads.max(1),
                    ),
                };
                let args = AttentionDecodeArgs {
                    q,
                    k_cache: cache.k.view(),
                    v_cache: cache.v.view(),
                    block_tables,
                    token_seq: inputs.token_seq(),
                    positions: inputs.positions(),
                    out: a.attn.view_mut(),
                    part_out: a.part_out.view_mut(),
                    part_lse: a.part_lse.view_mut(),
                    split_done: a.split_done.view_mut(),
                };
                ops::attention_decode(self.kernels, self.stream, &shape, args)
            }
            Attention::Prefill(pieces) => {
                for piece in pieces {
                    let piece_q = q.sub_rows(piece.token_offset, piece.len);
                    let out = a
                        .attn
                        .view_mut()
                        .sub(piece.token_offset * d.q_width, piece.len * d.q_width);
                    let (Some(piece_q), Some(out)) = (piece_q, out) else {
                        return Err(CudaError::Kernel(KernelError::Unsupported {
                            op: "attention_prefill",
                            what: "piece end",
                            value: piece.token_offset + piece.len,
                            reason: format!("must be at most {} tokens", q.rows()),
                        }));
                    };
                    let shape = AttentionPrefillShape {
                        tokens: piece.len,
                        start_pos: piece.start_pos,
                        seq_row: piece.seq_row,
                        n_heads: d.heads,
                        n_kv_heads: d.kv_heads,
                        head_dim: d.head_dim,
                        cache: self.cache,
                        window: d.window,
                    };
                    let args = AttentionPrefillArgs {
                        q: piece_q,
                        k_cache: cache.k.view(),
                        v_cache: cache.v.view(),
                        block_tables,
                        out,
                    };
                    ops::attention_prefill(self.kernels, self.stream, &shape, args)?;
                }
                Ok(())
            }
        }
    }

    /// Router logits, softmax, top-k and the slots grouped by expert.
    fn route(
        &self,
        x: View<'_, bf16>,
        gate: &DeviceBuffer<bf16>,
        r: &mut Routing,
    ) -> Result<(), CudaError> {
        let s = RouterScalars {
            tokens: self.tokens,
            hidden: self.d.hidden as u32,
            experts: self.d.experts as u32,
            top_k: self.d.top_k as u32,
        };
        let args = RouterArgs {
            x,
            gate: gate.view(),
            logits: r.logits.view_mut(),
            topk_ids: r.topk_ids.view_mut(),
            topk_weights: r.topk_weights.view_mut(),
            expert_counts: r.expert_counts.view_mut(),
            expert_offsets: r.expert_offsets.view_mut(),
            sorted_slots: r.sorted_slots.view_mut(),
            done: r.done.view_mut(),
        };
        ops::router(self.kernels, self.stream, &s, args)
    }

    /// The routed expert MLPs: `out[slot] = weight * w2(silu(w1 x) * w3 x)`.
    fn experts(
        &self,
        x: View<'_, bf16>,
        stacks: [&DeviceMatrix; 3],
        (r, act, out, grouped): ExpertBuffers<'_>,
        scratch: &mut ProductScratch,
    ) -> Result<(), CudaError> {
        let held = Some(self.held_experts.len());
        let s = self.d.expert_shape(self.tokens as usize, held);
        // The slot offsets of the experts held (all of them, or a rank's range).
        let offsets = r.expert_offsets.view();
        let first = self.held_experts.start;
        let Some(expert_offsets) = offsets.sub(first, self.held_experts.len() + 1) else {
            return Err(CudaError::UnsupportedModel(format!(
                "experts {:?} are not all routed experts of {}",
                self.held_experts,
                offsets.len().saturating_sub(1)
            )));
        };
        let io = ExpertIo {
            x,
            topk_weights: r.topk_weights.view(),
            expert_offsets,
            sorted_slots: r.sorted_slots.view(),
            act: act.view_mut(),
            out: out.view_mut(),
        };
        matrix::experts(self.products(), &s, stacks, io, scratch, grouped)
    }

    /// The LM head's input, `rows` rows of the final normalised activations `a.xn`: all of them
    /// when `rows` is the token count, else the rows listed first in the inputs' row indices,
    /// gathered into `a.gathered` (an embedding lookup whose table is the activations).
    fn head_input<'a>(
        &self,
        rows: usize,
        inputs: &Inputs,
        a: &'a mut Activations,
    ) -> Result<View<'a, bf16>, CudaError> {
        if rows == self.tokens as usize {
            return Ok(a.xn.view());
        }
        let (ids, x) = (inputs.rows(), a.xn.view());
        self.lookup(
            (rows as u32, self.tokens),
            ids,
            x,
            a.gathered.view_mut().into(),
        )?;
        Ok(a.gathered.view())
    }

    /// `logits = x @ lm_head^T` in f32 for `rows` rows (CUTLASS's workspace where the engine has
    /// one).
    fn lm_head(
        &self,
        rows: usize,
        x: View<'_, bf16>,
        (w, cutlass): (View<'_, bf16>, Option<&mut LinearCutlassScratch>),
        logits: ViewMut<'_, f32>,
    ) -> Result<(), CudaError> {
        let [_, _, head] = self.d.projections(self.vocab_rows);
        let s = linear_scalars(rows as u32, head);
        let args = LinearArgs {
            x,
            w,
            out: logits.into(),
        };
        matrix::project_bf16(self.products(), &s, args, cutlass)
    }

    /// The greedy id of each logits row.
    fn argmax(
        &self,
        rows: usize,
        logits: View<'_, f32>,
        out: ViewMut<'_, u32>,
    ) -> Result<(), CudaError> {
        let s = ArgmaxScalars {
            rows: rows as u32,
            vocab: self.d.vocab as u32,
        };
        let args = ArgmaxArgs {
            logits,
            out_ids: out,
        };
        ops::argmax(self.kernels, self.stream, &s, args)
    }
}

/// The scalars of a projection of `tokens` rows with `(in, out)` features.
fn linear_scalars(tokens: u32, (in_features, out_features): (usize, usize)) -> LinearScalars {
    LinearScalars {
        tokens,
        in_features: in_features as u32,
        out_features: out_features as u32,
    }
}
