//! Causal grouped-query attention of one sequence's new tokens over its cached keys and values,
//! with an optional sliding window.
//!
//! Queries `q`: `[n, heads, head_dim]` at positions `start .. start + n`; keys and values of every
//! position `0 .. start + n` come from an accessor returning `[kv_heads, head_dim]` rows (the paged
//! cache in the engine, plain arrays in tests). Query head `h` reads KV head `h / (heads / kv_heads)`.
//! The query at position `i` sees keys `j` with `i - W < j <= i` (W keys, itself included) when the
//! window is `Some(W)`, `0 <= j <= i` otherwise. Scores are scaled by `1/sqrt(head_dim)`; the
//! softmax is computed in f32 after subtracting the row maximum. Output: `[n, heads, head_dim]`.

use rayon::prelude::*;

/// Head layout and masking of an attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (divides `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Sliding window W, or `None` for full causal attention.
    pub window: Option<usize>,
}

impl AttentionShape {
    /// First key position visible from the query at `pos`.
    pub fn first_visible(&self, pos: usize) -> usize {
        match self.window {
            Some(w) => (pos + 1).saturating_sub(w),
            None => 0,
        }
    }
}

/// Attention of queries at `start ..` over keys/values from `kv(position) -> (k_row, v_row)`,
/// written to `out` (same shape as `q`).
pub fn attention<'a, F>(q: &[f32], start: usize, shape: &AttentionShape, kv: F, out: &mut [f32])
where
    F: Fn(usize) -> (&'a [f32], &'a [f32]) + Sync,
{
    let AttentionShape {
        num_heads,
        num_kv_heads,
        head_dim,
        ..
    } = *shape;
    let width = num_heads * head_dim;
    assert!(
        q.len().is_multiple_of(width) && out.len() == q.len(),
        "attention: shape mismatch"
    );
    assert!(
        num_kv_heads > 0 && num_heads % num_kv_heads == 0,
        "attention: bad GQA grouping"
    );
    let group = num_heads / num_kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    out.par_chunks_mut(head_dim)
        .enumerate()
        .for_each(|(index, out_head)| {
            let (token, head) = (index / num_heads, index % num_heads);
            let pos = start + token;
            let query = &q[index * head_dim..(index + 1) * head_dim];
            let kv_offset = (head / group) * head_dim;
            let first = shape.first_visible(pos);
            let mut scores: Vec<f32> = (first..=pos)
                .map(|j| {
                    let key = &kv(j).0[kv_offset..kv_offset + head_dim];
                    query.iter().zip(key).map(|(a, b)| a * b).sum::<f32>() * scale
                })
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut total = 0.0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                total += *s;
            }
            out_head.fill(0.0);
            for (j, p) in (first..=pos).zip(&scores) {
                let value = &kv(j).1[kv_offset..kv_offset + head_dim];
                for (o, v) in out_head.iter_mut().zip(value) {
                    *o += p * v;
                }
            }
            for o in out_head.iter_mut() {
                *o /= total;
            }
        });
}
