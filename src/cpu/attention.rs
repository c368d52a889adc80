//! Causal grouped-query attention of a run of query positions of one sequence over its paged
//! K/V cache, with an optional sliding window, softmax in f32.
//!
//! Queries `q: [n, heads, head_dim]` sit at positions `start_pos .. start_pos + n`; the cache holds
//! the keys and values of positions `0 .. start_pos + n` (these queries' own included) as blocks of
//! `[block_size, kv_heads, head_dim]` (position `p` in row `p % block_size` of block
//! `p / block_size`). Query head `h` reads KV head `h / (heads / kv_heads)`. The query at position
//! `i` sees keys `j` with `i - W < j <= i` for a window `W`, else `0 <= j <= i`. Scores are
//! `(q . k) * (1 / sqrt(head_dim))`; softmax subtracts the row maximum and exponentiates with
//! [`exp`] (within 1.45 u of the true value, vectorized). Output `out: [n, heads, head_dim]`.

use std::ops::Range;

use rayon::prelude::*;

use super::exp::exp;
use super::matmul::Kernel;

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

/// One sequence's cached keys and values: `k[b]` and `v[b]` are its block `b` of each,
/// `[block_size, kv_heads, head_dim]` (or longer; only the rows used are read).
#[derive(Debug, Clone, Copy)]
pub struct SequenceCache<'a> {
    /// The key blocks in position order (the block table resolved to storage).
    pub k: &'a [&'a [f32]],
    /// The value blocks, likewise.
    pub v: &'a [&'a [f32]],
    /// Token rows per block.
    pub block_size: usize,
}

/// The first key position the query at `pos` sees: `pos + 1 - W` with window `W` (at least 1),
/// else 0.
pub fn first_visible(pos: usize, window: Option<usize>) -> usize {
    match window {
        Some(w) => (pos + 1).saturating_sub(w.max(1)),
        None => 0,
    }
}

/// Attention of the queries at `start_pos ..` over the cached keys and values; see the module
/// docs. Parallel over (query, KV head) pairs; each output is computed in one fixed order, with
/// `kernel`'s instructions (a kernel this CPU cannot run is replaced by [`Kernel::Scalar`]): the
/// same bits with every kernel.
///
/// # Panics
/// When the shapes disagree: `heads` not a multiple of `kv_heads`, `q`/`out` not
/// `[n, heads, head_dim]`, or the cache too short for position `start_pos + n - 1`.
pub fn attention(
    kernel: Kernel,
    q: &[f32],
    shape: AttentionShape,
    start_pos: usize,
    cache: SequenceCache<'_>,
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
    let blocks = last.checked_div(cache.block_size).map(|b| b + 1);
    assert!(
        blocks.is_some_and(|b| b <= cache.k.len() && b <= cache.v.len()),
        "attention: cache too short for position {last}"
    );
    let kernel = if kernel.is_available() {
        kernel
    } else {
        Kernel::Scalar
    };
    let group = heads / kv_heads;
    let tasks = tasks_per_query(kv_heads, group, n, rayon::current_num_threads());
    let task_heads = heads / tasks;
    out.par_chunks_mut(task_heads * head_dim)
        .zip(q.par_chunks(task_heads * head_dim))
        .enumerate()
        .for_each(|(index, (out, q))| {
            let pos = start_pos + index / tasks;
            let first_kv_head = index % tasks * task_heads / group;
            let task = GroupTask {
                q,
                cache,
                col: first_kv_head * head_dim,
                width: task_heads.div_ceil(group) * head_dim,
                row_width: kv_heads * head_dim,
                head_dim,
                group,
                keys: first_visible(pos, window)..pos + 1,
            };
            task.run(kernel, out);
        });
}

/// How many tasks share one query's heads: the fewest that give every thread a task (all of them
/// if none does). A task takes whole groups of query heads that share a KV head, as many KV heads
/// as divide evenly, so it reads one slice of each cached row (all of the row with one task) for
/// all of them at once; past one KV head a task, a group's heads are split into equal parts,
/// each of which reads the KV head's slice again. Each head's output is computed alone, in the
/// same order, whatever the split.
fn tasks_per_query(kv_heads: usize, group: usize, queries: usize, threads: usize) -> usize {
    let divisors = |n: usize| (1..=n).filter(move |&d| n.is_multiple_of(d));
    let by_kv_heads = divisors(kv_heads);
    let by_parts = divisors(group).skip(1).map(|p| kv_heads * p);
    by_kv_heads
        .chain(by_parts)
        .find(|&tasks| queries * tasks >= threads)
        .unwrap_or(kv_heads * group)
}

/// Query heads of one query, consecutive: whole groups sharing consecutive KV heads, or a part
/// of one group; and the key positions they see.
struct GroupTask<'a> {
    /// `[heads of the task, head_dim]`.
    q: &'a [f32],
    cache: SequenceCache<'a>,
    /// The first KV head's first column in a cache row: `kv_head * head_dim`.
    col: usize,
    /// Columns of a cache row the task reads: its KV heads times `head_dim`.
    width: usize,
    /// Width of a cache row: `kv_heads * head_dim`.
    row_width: usize,
    head_dim: usize,
    /// Query heads per KV head (a task holds whole groups, or a part of one).
    group: usize,
    /// Visible key positions.
    keys: Range<usize>,
}

impl GroupTask<'_> {
    /// Writes the task's outputs `[heads of the task, head_dim]` into `out`, compiled for `kernel`'s
    /// instructions (the same operations in the same order with each).
    fn run(&self, kernel: Kernel, out: &mut [f32]) {
        match kernel {
            // SAFETY: `attention` chose an available kernel.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { self.run_avx512(out) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { self.run_avx2(out) },
            _ => self.run_with(out, dot),
        }
    }

    /// # Safety
    /// The CPU must have AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_avx512(&self, out: &mut [f32]) {
        // SAFETY: this function's features.
        self.run_with(out, |a, b| unsafe { x86::dot_avx512(a, b) })
    }

    /// # Safety
    /// The CPU must have AVX2, FMA and F16C (the AVX2 kernel's features).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run_avx2(&self, out: &mut [f32]) {
        // SAFETY: this function's features.
        self.run_with(out, |a, b| unsafe { x86::dot_avx2(a, b) })
    }

    /// Scores each visible row for every head of the task (scaled `q . k`, with `dot`: [`dot`]
    /// or a SIMD form of it giving the same bits), the softmax of each head's scores, then each
    /// head's probability-weighted sum of the value rows.
    #[inline(always)]
    fn run_with(&self, out: &mut [f32], dot: impl Fn(&[f32], &[f32]) -> f32) {
        let (d, count) = (self.head_dim, self.keys.len());
        let scale = 1.0 / (d as f32).sqrt();
        // scores[h * count + t]: head h of the task, key position keys.start + t.
        let mut scores = vec![0.0f32; self.q.len() / d * count];
        let kv_of = |h: usize| h / self.group * d;
        for (t, j) in self.keys.clone().enumerate() {
            self.prefetch(self.cache.k, j);
            let keys = self.row(self.cache.k, j);
            for (h, qh) in self.q.chunks_exact(d).enumerate() {
                scores[h * count + t] = dot(qh, &keys[kv_of(h)..kv_of(h) + d]) * scale;
            }
        }
        // Each head's scores become its probabilities `exp(s - max) / sum` in place.
        for row in scores.chunks_exact_mut(count) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for s in row.iter_mut() {
                *s = exp(*s - max);
            }
            let sum = lane_sum(row);
            for s in row.iter_mut() {
                *s /= sum;
            }
        }
        out.fill(0.0);
        for (t, j) in self.keys.clone().enumerate() {
            self.prefetch(self.cache.v, j);
            let values = self.row(self.cache.v, j);
            for (h, oh) in out.chunks_exact_mut(d).enumerate() {
                let p = scores[h * count + t];
                for (acc, &x) in oh.iter_mut().zip(&values[kv_of(h)..kv_of(h) + d]) {
                    *acc += p * x;
                }
            }
        }
    }

    /// The task's KV heads' values at position `pos` in `blocks` (the keys or the values).
    #[inline(always)]
    fn row<'b>(&self, blocks: &[&'b [f32]], pos: usize) -> &'b [f32] {
        let block_size = self.cache.block_size;
        let start = (pos % block_size) * self.row_width + self.col;
        &blocks[pos / block_size][start..start + self.width]
    }

    /// Asks for the task's slice of the row `PREFETCH_ROWS` positions after `pos`, if visible:
    /// the slices are strided and spread over blocks, and without this each waits for memory.
    #[inline(always)]
    fn prefetch(&self, blocks: &[&[f32]], pos: usize) {
        let ahead = pos + PREFETCH_ROWS;
        if ahead < self.keys.end {
            prefetch_lines(self.row(blocks, ahead));
        }
    }
}

/// How many positions ahead [`GroupTask`] prefetches: at context 4000 (mid-size model, one
/// decode query, slices of 256 and of 512 bytes a row) 8 measured fastest of 4, 8, 16 and 32.
const PREFETCH_ROWS: usize = 8;

/// Hints the cache lines of `x` into the cache (reads nothing; a no-op off x86-64).
#[inline(always)]
fn prefetch_lines(x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in x.chunks(16) {
        // SAFETY: a prefetch of an address inside a live slice; it never faults.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// Lanes of [`dot`]'s independent partial sums.
const DOT_LANES: usize = 16;

/// `sum_i a[i] * b[i]` in one fixed order on every CPU: lane `l` sums the products at `i % 16 == l`
/// of the whole groups of 16 in turn; the lanes are added by [`tree`], then [`dot_rest`]. Sixteen
/// independent sums and a reduction four additions deep, where one running sum made each addition
/// wait for the last.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (a_groups, b_groups) = (a.chunks_exact(DOT_LANES), b.chunks_exact(DOT_LANES));
    let rest = dot_rest(a_groups.remainder(), b_groups.remainder());
    let mut lanes = [0.0f32; DOT_LANES];
    for (x, y) in a_groups.zip(b_groups) {
        for l in 0..DOT_LANES {
            lanes[l] += x[l] * y[l];
        }
    }
    tree(lanes) + rest
}

/// `sum_i x[i]` in [`dot`]'s order: sixteen lane sums, [`tree`], then the rest in order.
fn lane_sum(x: &[f32]) -> f32 {
    let groups = x.chunks_exact(DOT_LANES);
    let rest: f32 = groups.remainder().iter().sum();
    let mut lanes = [0.0f32; DOT_LANES];
    for group in groups {
        for l in 0..DOT_LANES {
            lanes[l] += group[l];
        }
    }
    tree(lanes) + rest
}

/// The lanes added as a tree: lane `l` plus lane `l + 8`, then `l + 4`, `l + 2`, `l + 1`.
#[inline(always)]
fn tree(mut lanes: [f32; DOT_LANES]) -> f32 {
    let mut width = DOT_LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            lanes[l] += lanes[l + width];
        }
    }
    lanes[0]
}

/// The products past the whole groups of [`dot`], summed in order.
#[inline(always)]
fn dot_rest(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// [`dot`] in SIMD registers: the same products and lane sums, then the tree's first level
/// (lane `l` plus `l + 8`) and the matmul's `reduce8`, whose order (`l + 4`, `l + 2`, `l + 1`)
/// is the rest of the tree; so the same bits.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{dot_rest, DOT_LANES};
    use crate::cpu::matmul::x86::reduce8;

    /// [`super::dot`] with the 16 lanes in one AVX-512 register.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `a` and `b` of one length.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
        let whole = a.len() / DOT_LANES * DOT_LANES;
        let mut lanes = _mm512_setzero_ps();
        for i in (0..whole).step_by(DOT_LANES) {
            let product = _mm512_mul_ps(
                _mm512_loadu_ps(a.as_ptr().add(i)),
                _mm512_loadu_ps(b.as_ptr().add(i)),
            );
            lanes = _mm512_add_ps(lanes, product);
        }
        let low = _mm512_castps512_ps256(lanes);
        let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(lanes)));
        reduce8(_mm256_add_ps(low, high)) + dot_rest(&a[whole..], &b[whole..])
    }

    /// [`super::dot`] with lanes 0-7 and 8-15 in two AVX2 registers.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `a` and `b` of one length.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        let whole = a.len() / DOT_LANES * DOT_LANES;
        let (mut low, mut high) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for i in (0..whole).step_by(DOT_LANES) {
            let (x, y) = (a.as_ptr().add(i), b.as_ptr().add(i));
            low = _mm256_add_ps(low, _mm256_mul_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(y)));
            high = _mm256_add_ps(
                high,
                _mm256_mul_ps(_mm256_loadu_ps(x.add(8)), _mm256_loadu_ps(y.add(8))),
            );
        }
        reduce8(_mm256_add_ps(low, high)) + dot_rest(&a[whole..], &b[whole..])
    }
}

#[cfg(test)]
mod tests {
    use super::tasks_per_query;

    #[test]
    fn tasks_take_whole_kv_heads_before_splitting_a_group() {
        // (kv_heads, group, queries, threads) -> tasks per query.
        let cases = [
            ((4, 4, 1, 2), 2),   // two tasks of two KV heads each
            ((4, 4, 1, 4), 4),   // one KV head each
            ((8, 4, 1, 16), 16), // each group in two halves
            ((4, 4, 100, 2), 1), // prefill: whole rows
            ((4, 4, 1, 64), 16), // one head a task at most
            ((3, 2, 1, 4), 6),   // no even run of KV heads gives 4: split the groups
            ((1, 1, 1, 8), 1),
        ];
        for ((kv_heads, group, queries, threads), tasks) in cases {
            assert_eq!(
                tasks_per_query(kv_heads, group, queries, threads),
                tasks,
                "kv_heads {kv_heads}, group {group}, queries {queries}, threads {threads}"
            );
        }
    }
}
