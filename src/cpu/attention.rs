//! Causal grouped-query attention of a run of query positions of one sequence over its paged
//! K/V cache, with an optional sliding window, softmax in f32.
//!
//! Queries `q: [n, heads, head_dim]` sit at positions `start_pos .. start_pos + n`; the cache holds
//! the keys and values of positions `0 .. start_pos + n` (these queries' own included) as blocks of
//! `[block_size, kv_heads, head_dim]` (position `p` in row `p % block_size` of block
//! `p / block_size`). Query head `h` reads KV head `h / (heads / kv_heads)`. The query at position
//! `i` sees keys `j` with `i - W < j <= i` for a window `W`, else `0 <= j <= i`. Scores are
//! `(q . k) * (1 / sqrt(head_dim))`; softmax subtracts the row maximum. Output
//! `out: [n, heads, head_dim]`.

use rayon::prelude::*;

/// Head counts and width of an attention layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads (a multiple of `kv_heads`).
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

/// One sequence's cached keys (or values): `blocks[b]` is `[block_size, kv_heads, head_dim]` (or
/// longer; only the rows used are read).
#[derive(Debug, Clone, Copy)]
pub struct PagedView<'a> {
    /// The sequence's blocks in position order (its block table resolved to storage).
    pub blocks: &'a [&'a [f32]],
    /// Token rows per block.
    pub block_size: usize,
}

impl PagedView<'_> {
    /// The `width` values of position `pos` starting at column `col` (`width` = `head_dim`,
    /// `col` = `kv_head * head_dim`), in a row of `row_width` (`kv_heads * head_dim`).
    fn at(&self, pos: usize, row_width: usize, col: usize, width: usize) -> &[f32] {
        let block = self.blocks[pos / self.block_size];
        let start = (pos % self.block_size) * row_width + col;
        &block[start..start + width]
    }
}

/// The first key position the query at `pos` sees: `pos + 1 - W` with window `W` (at least 1),
/// else 0.
pub fn first_visible(pos: usize, window: Option<usize>) -> usize {
    match window {
        Some(w) => (pos + 1).saturating_sub(w.max(1)),
        None => 0,
    }
}

/// Attention of the queries at `start_pos ..` over the cached `k` and `v`; see the module docs.
/// Parallel over (query, head) pairs; each output is computed in one fixed order.
///
/// # Panics
/// When the shapes disagree: `heads` not a multiple of `kv_heads`, `q`/`out` not
/// `[n, heads, head_dim]`, or the views too short for position `start_pos + n - 1`.
pub fn attention(
    q: &[f32],
    shape: AttentionShape,
    start_pos: usize,
    k: PagedView<'_>,
    v: PagedView<'_>,
    window: Option<usize>,
    out: &mut [f32],
) {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim,
    } = shape;
    assert!(
        kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0,
        "attention: bad shape {shape:?}"
    );
    assert_eq!(q.len() % (heads * head_dim), 0, "attention: q shape");
    assert_eq!(out.len(), q.len(), "attention: out shape");
    let n = q.len() / (heads * head_dim);
    if n == 0 {
        return;
    }
    let last = start_pos + n - 1;
    for view in [&k, &v] {
        assert!(
            view.block_size > 0 && last / view.block_size < view.blocks.len(),
            "attention: cache too short for position {last}"
        );
    }
    let group = heads / kv_heads;
    let row_width = kv_heads * head_dim;
    let scale = 1.0 / (head_dim as f32).sqrt();
    out.par_chunks_mut(head_dim)
        .enumerate()
        .for_each(|(idx, o)| {
            let (i, h) = (idx / heads, idx % heads);
            let pos = start_pos + i;
            let col = (h / group) * head_dim;
            let qh = &q[idx * head_dim..(idx + 1) * head_dim];
            let first = first_visible(pos, window);
            let mut scores: Vec<f32> = (first..=pos)
                .map(|j| dot(qh, k.at(j, row_width, col, head_dim)) * scale)
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            o.fill(0.0);
            for (j, s) in (first..=pos).zip(&scores) {
                let p = s / sum;
                for (acc, &x) in o.iter_mut().zip(v.at(j, row_width, col, head_dim)) {
                    *acc += p * x;
                }
            }
        });
}

/// Lanes of [`dot`]'s independent partial sums.
const DOT_LANES: usize = 16;

/// `sum_i a[i] * b[i]` in one fixed order on every CPU: lane `l` sums the products at `i % 16 == l`
/// of the whole groups of 16 in turn, the lanes are added in order, then the products of the rest.
/// Sixteen independent sums, where one running sum made each product wait for the one before.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (a_groups, b_groups) = (a.chunks_exact(DOT_LANES), b.chunks_exact(DOT_LANES));
    let rest: f32 = a_groups
        .remainder()
        .iter()
        .zip(b_groups.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut lanes = [0.0f32; DOT_LANES];
    for (x, y) in a_groups.zip(b_groups) {
        for l in 0..DOT_LANES {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + rest
}
