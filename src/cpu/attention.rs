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
/// docs. Parallel over tiles of consecutive queries (one query when there are few) and runs of
/// their KV heads; each output is computed in one fixed order, with `kernel`'s instructions (a
/// kernel this CPU cannot run is replaced by [`Kernel::Scalar`]): the same bits with every kernel,
/// thread count and tiling.
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
    let threads = rayon::current_num_threads();
    let tasks = tasks_per_query(kv_heads, group, n, threads);
    let task_heads = heads / tasks;
    let tile = query_tile(n, tasks, threads);
    // Tasks in order: query tile `index / tasks`, part `index % tasks` of its heads (one part,
    // all the heads, when the tile holds more than one query).
    out.par_chunks_mut(tile * task_heads * head_dim)
        .zip(q.par_chunks(tile * task_heads * head_dim))
        .enumerate()
        .for_each(|(index, (out, q))| {
            let first_kv_head = index % tasks * task_heads / group;
            let task = GroupTask {
                q,
                cache,
                col: first_kv_head * head_dim,
                width: task_heads.div_ceil(group) * head_dim,
                row_width: kv_heads * head_dim,
                head_dim,
                group,
                heads: task_heads,
                first_pos: start_pos + index / tasks * tile,
                window,
            };
            task.run(kernel, out);
        });
}

/// Most consecutive queries one task takes: each key and value row a tile reads comes from memory
/// (or the shared cache) once for all of them, then from the core's own caches.
const MAX_QUERY_TILE: usize = 16;

/// Key positions a tile's pass handles at a time, for each of its queries in turn: the block's
/// rows (128 KiB of keys or values in the mid-size model) stay in the core's cache between them.
const KEY_BLOCK: usize = 64;

/// Keys scored together for each head (the AVX-512 kernel sums the lanes of sixteen at once).
const SCORE_ROWS: usize = 16;

/// Output elements of one head accumulated in registers over a run of value rows, by four heads
/// at once: 16 AVX-512 registers ([`WIDE_PIECE`]), or 8 of the 16 AVX2 and SSE registers.
const WIDE_PIECE: usize = 64;
/// See [`WIDE_PIECE`].
const NARROW_PIECE: usize = 16;

/// Queries a task takes: one when a query's heads are split over tasks (decode), else up to
/// [`MAX_QUERY_TILE`], leaving about four tiles a thread.
fn query_tile(queries: usize, tasks_per_query: usize, threads: usize) -> usize {
    match tasks_per_query {
        1 => (queries / (4 * threads.max(1))).clamp(1, MAX_QUERY_TILE),
        _ => 1,
    }
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

/// Query heads of a tile of consecutive queries: whole groups sharing consecutive KV heads, or
/// (for a tile of one query) a part of one group.
struct GroupTask<'a> {
    /// `[queries, heads of the task, head_dim]`.
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
    /// Query heads of the task, for each of its queries.
    heads: usize,
    /// Position of the tile's first query (the others follow it).
    first_pos: usize,
    window: Option<usize>,
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
            _ => self.run_with::<NARROW_PIECE>(out, score_rows),
        }
    }

    /// # Safety
    /// The CPU must have AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_avx512(&self, out: &mut [f32]) {
        // SAFETY: this function's features.
        self.run_with::<WIDE_PIECE>(out, |q, rows, col, scale, scores| unsafe {
            x86::score_rows_avx512(q, rows, col, scale, scores)
        })
    }

    /// # Safety
    /// The CPU must have AVX2, FMA and F16C (the AVX2 kernel's features).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run_avx2(&self, out: &mut [f32]) {
        // SAFETY: this function's features.
        self.run_with::<NARROW_PIECE>(out, |q, rows, col, scale, scores| unsafe {
            x86::score_rows_avx2(q, rows, col, scale, scores)
        })
    }

    /// For each query of the tile: scores each visible row for every head of the task (scaled
    /// `q . k`, with `score`: [`score_rows`] or a SIMD form of it giving the same bits, over
    /// [`SCORE_ROWS`] rows at a time), the softmax of each head's scores, then each head's
    /// probability-weighted sum of the value rows in position order ([`sum_values`], the heads
    /// sharing a KV head together, in pieces of `PIECE` elements). The rows are visited in blocks
    /// of [`KEY_BLOCK`] positions, each block for every query of the tile in turn: each output
    /// sees the same operations in the same order as with a tile of one.
    #[inline(always)]
    fn run_with<const PIECE: usize>(
        &self,
        out: &mut [f32],
        score: impl Fn(&[f32], &[&[f32]], usize, f32, &mut [f32]),
    ) {
        let d = self.head_dim;
        let per_query = self.heads * d;
        let queries = self.q.len() / per_query;
        let scale = 1.0 / (d as f32).sqrt();
        // Query i's scores at offsets[i]: [heads of the task, keys(i).len()], head h's row
        // holding key position keys(i).start + t at t.
        let mut offsets = Vec::with_capacity(queries + 1);
        offsets.push(0);
        for i in 0..queries {
            offsets.push(offsets[i] + self.heads * self.keys(i).len());
        }
        let mut scores = vec![0.0f32; offsets[queries]];
        let kv_of = |h: usize| h / self.group * d;
        self.for_each_run(queries, |i, run| {
            let (visible, qi) = (self.keys(i), &self.q[i * per_query..(i + 1) * per_query]);
            let row = &mut scores[offsets[i]..offsets[i + 1]];
            // Sixteen keys at a time, for every head: their prefetches spread over the run.
            for from in run.clone().step_by(SCORE_ROWS) {
                let part = from..(from + SCORE_ROWS).min(run.end);
                let rows = self.rows(self.cache.k, i, part.clone());
                let first = from - visible.start;
                for (h, qh) in qi.chunks_exact(d).enumerate() {
                    let at = h * visible.len() + first;
                    score(
                        qh,
                        rows.as_slice(),
                        kv_of(h),
                        scale,
                        &mut row[at..at + part.len()],
                    );
                }
            }
        });
        // Each head's scores become its probabilities `exp(s - max) / sum` in place.
        for i in 0..queries {
            let count = self.keys(i).len();
            for row in scores[offsets[i]..offsets[i + 1]].chunks_exact_mut(count) {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for s in row.iter_mut() {
                    *s = exp(*s - max);
                }
                let sum = lane_sum(row);
                for s in row.iter_mut() {
                    *s /= sum;
                }
            }
        }
        out.fill(0.0);
        self.for_each_run(queries, |i, run| {
            let visible = self.keys(i);
            let probabilities = &scores[offsets[i]..offsets[i + 1]];
            let oi = &mut out[i * per_query..(i + 1) * per_query];
            let rows = self.rows(self.cache.v, i, run.clone());
            let rows = rows.as_slice();
            let first = run.start - visible.start;
            // The heads sharing a KV head take its value rows together, VALUE_HEADS at a time.
            let per_kv = self.group.min(self.heads);
            for (g, og) in oi.chunks_mut(per_kv * d).enumerate() {
                for (c, oc) in og.chunks_mut(VALUE_HEADS * d).enumerate() {
                    let head = g * per_kv + c * VALUE_HEADS;
                    let p = |k: usize| {
                        &probabilities[(head + k) * visible.len() + first..][..run.len()]
                    };
                    let col = kv_of(head);
                    // One arm for each count of heads up to VALUE_HEADS (checked to be 4 below).
                    match oc.len() / d {
                        4 => sum_values::<4, PIECE>(oc, std::array::from_fn(p), rows, col),
                        3 => sum_values::<3, PIECE>(oc, std::array::from_fn(p), rows, col),
                        2 => sum_values::<2, PIECE>(oc, std::array::from_fn(p), rows, col),
                        1 => sum_values::<1, PIECE>(oc, [p(0)], rows, col),
                        n => unreachable!("{n} heads in a chunk of at most {VALUE_HEADS}"),
                    }
                }
            }
        });
    }

    /// The key positions query `i` of the tile sees.
    #[inline(always)]
    fn keys(&self, i: usize) -> Range<usize> {
        let pos = self.first_pos + i;
        first_visible(pos, self.window)..pos + 1
    }

    /// Calls `visit(i, run)` for each query `i` of the tile and each run of positions it sees:
    /// blocks of [`KEY_BLOCK`] positions in order, each for every query in turn.
    #[inline(always)]
    fn for_each_run(&self, queries: usize, mut visit: impl FnMut(usize, Range<usize>)) {
        // Both ends of the visible range grow with the position: the first query's start and the
        // last query's end bound the tile's.
        let span = self.keys(0).start..self.keys(queries - 1).end;
        for block_start in span.clone().step_by(KEY_BLOCK) {
            let block_end = (block_start + KEY_BLOCK).min(span.end);
            for i in 0..queries {
                let visible = self.keys(i);
                let run = visible.start.max(block_start)..visible.end.min(block_end);
                if !run.is_empty() {
                    visit(i, run);
                }
            }
        }
    }

    /// The task's slices of `blocks` (the keys or the values) at the positions of `run` (at most
    /// [`KEY_BLOCK`]), prefetching ahead for query `i`.
    #[inline(always)]
    fn rows<'b>(&self, blocks: &[&'b [f32]], i: usize, run: Range<usize>) -> RunRows<'b> {
        let mut rows = RunRows {
            rows: [&[]; KEY_BLOCK],
            len: run.len(),
        };
        for (slot, j) in rows.rows.iter_mut().zip(run) {
            self.prefetch_new(blocks, i, j);
            *slot = self.row(blocks, j);
        }
        rows
    }

    /// Prefetches the task's slice of row `j + PREFETCH_ROWS` of `blocks` (the keys or the
    /// values) when query `i` sees it and is the tile's first query to (it lies past the end of
    /// the previous query's range).
    #[inline(always)]
    fn prefetch_new(&self, blocks: &[&[f32]], i: usize, j: usize) {
        let ahead = j + PREFETCH_ROWS;
        let new_from = match i {
            0 => 0,
            _ => self.keys(i - 1).end,
        };
        if ahead < self.keys(i).end && ahead >= new_from {
            prefetch_lines(self.row(blocks, ahead));
        }
    }

    /// The task's KV heads' values at position `pos` in `blocks` (the keys or the values).
    #[inline(always)]
    fn row<'b>(&self, blocks: &[&'b [f32]], pos: usize) -> &'b [f32] {
        let block_size = self.cache.block_size;
        let start = (pos % block_size) * self.row_width + self.col;
        &blocks[pos / block_size][start..start + self.width]
    }
}

/// Query heads whose outputs [`sum_values`] accumulates at once (a GQA group of 4 shares each
/// value row it loads).
const VALUE_HEADS: usize = 4;
// `run_with` has one `sum_values` arm for each count of heads up to VALUE_HEADS.
const _: () = assert!(VALUE_HEADS == 4);

/// `out[n] += sum_r p[n][r] * rows[r][col ..]` for `N` heads sharing a KV head, `out` their
/// outputs `[N, head_dim]`: each element adds its products in row order, so the bits do not
/// depend on `N` or `PIECE`. Each piece of `PIECE` elements of the `N` heads stays in registers
/// over the rows.
#[inline(always)]
fn sum_values<const N: usize, const PIECE: usize>(
    out: &mut [f32],
    p: [&[f32]; N],
    rows: &[&[f32]],
    col: usize,
) {
    let d = out.len() / N;
    assert!(p.iter().all(|p| p.len() == rows.len()));
    let mut start = 0;
    while start < d {
        let len = PIECE.min(d - start);
        let at = col + start;
        if len == PIECE {
            let mut acc: [[f32; PIECE]; N] =
                std::array::from_fn(|n| out[n * d + start..][..PIECE].try_into().unwrap());
            for (r, row) in rows.iter().enumerate() {
                let values: &[f32; PIECE] = row[at..at + PIECE].try_into().unwrap();
                for (acc, p) in acc.iter_mut().zip(&p) {
                    let pj = p[r];
                    for (a, &x) in acc.iter_mut().zip(values) {
                        *a += pj * x;
                    }
                }
            }
            for (n, acc) in acc.iter().enumerate() {
                out[n * d + start..][..PIECE].copy_from_slice(acc);
            }
        } else {
            for (n, p) in p.iter().enumerate() {
                let piece = &mut out[n * d + start..][..len];
                for (row, &pj) in rows.iter().zip(*p) {
                    for (a, &x) in piece.iter_mut().zip(&row[at..]) {
                        *a += pj * x;
                    }
                }
            }
        }
        start += len;
    }
}

/// The slices of a run of at most [`KEY_BLOCK`] cached rows, in position order.
struct RunRows<'b> {
    rows: [&'b [f32]; KEY_BLOCK],
    len: usize,
}

impl<'b> RunRows<'b> {
    fn as_slice(&self) -> &[&'b [f32]] {
        &self.rows[..self.len]
    }
}

/// How many positions ahead [`GroupTask`] prefetches (the slices are strided and spread over
/// blocks, and without this each waits for memory): at context 4000 (mid-size model, one decode
/// query, slices of 256 and of 512 bytes a row) 8 measured fastest of 4, 8, 16 and 32.
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

/// `scores[t] = dot(q, rows[t][col .. col + q.len()]) * scale` for each row: one head's scaled
/// scores of a run of cached keys.
fn score_rows(q: &[f32], rows: &[&[f32]], col: usize, scale: f32, scores: &mut [f32]) {
    score_each(q, rows, col, scale, scores, dot)
}

/// [`score_rows`] with `dot` ([`dot`] or a SIMD form of it), one row at a time.
#[inline(always)]
fn score_each(
    q: &[f32],
    rows: &[&[f32]],
    col: usize,
    scale: f32,
    scores: &mut [f32],
    dot: impl Fn(&[f32], &[f32]) -> f32,
) {
    for (s, row) in scores.iter_mut().zip(rows) {
        *s = dot(q, &row[col..col + q.len()]) * scale;
    }
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

    use super::{dot_rest, score_each, DOT_LANES};
    use crate::cpu::matmul::x86::reduce8;

    /// [`super::score_rows`] by `block`, `N` rows at a time, where the head is whole groups of
    /// 16 lanes; the other rows (and every row of other heads) one at a time by `dot`.
    #[inline(always)]
    fn score_blocks<const N: usize>(
        q: &[f32],
        rows: &[&[f32]],
        col: usize,
        scale: f32,
        scores: &mut [f32],
        mut block: impl FnMut(&[&[f32]; N], &mut [f32; N]),
        dot: impl Fn(&[f32], &[f32]) -> f32,
    ) {
        let mut done = 0;
        if q.len().is_multiple_of(DOT_LANES) {
            for (rows, out) in rows.chunks_exact(N).zip(scores.chunks_exact_mut(N)) {
                block(rows.try_into().unwrap(), out.try_into().unwrap());
                done += N;
            }
        }
        let (rows, scores) = (&rows[done..], &mut scores[done..]);
        score_each(q, rows, col, scale, scores, dot);
    }

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

    /// [`super::score_rows`] with [`dot_avx512`]'s bits, sixteen rows at a time where the head
    /// is whole groups of 16 ([`score_blocks`]).
    ///
    /// # Safety
    /// The CPU must have AVX-512F; each row at least `col + q.len()` long.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn score_rows_avx512(
        q: &[f32],
        rows: &[&[f32]],
        col: usize,
        scale: f32,
        scores: &mut [f32],
    ) {
        let d = q.len();
        let block = |block: &[&[f32]; 16], out: &mut [f32; 16]| {
            // Each row's lane sums in its own register, then the sixteen trees together.
            let keys: [*const f32; 16] = std::array::from_fn(|r| block[r][col..col + d].as_ptr());
            let mut lanes = [_mm512_setzero_ps(); 16];
            for i in (0..d).step_by(DOT_LANES) {
                let x = _mm512_loadu_ps(q.as_ptr().add(i));
                for (acc, k) in lanes.iter_mut().zip(keys) {
                    *acc = _mm512_add_ps(*acc, _mm512_mul_ps(x, _mm512_loadu_ps(k.add(i))));
                }
            }
            let sums = _mm512_mul_ps(trees16(lanes), _mm512_set1_ps(scale));
            _mm512_storeu_ps(out.as_mut_ptr(), sums);
        };
        score_blocks(q, rows, col, scale, scores, block, |a, b| dot_avx512(a, b));
    }

    /// Row `n`'s lanes summed by [`super::tree`] into lane `n`, for sixteen rows' lanes at once:
    /// each level adds lane `l + width` to lane `l` of every row, as the tree does, packing two
    /// rows' halves into one register.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn trees16(lanes: [__m512; 16]) -> __m512 {
        // Width 8: rows 2p, 2p+1 -> their lanes l + (l + 8), in 256-bit halves.
        let halves: [__m512; 8] = std::array::from_fn(|p| {
            let (a, b) = (lanes[2 * p], lanes[2 * p + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(a, b),
                _mm512_shuffle_f32x4::<0xEE>(a, b),
            )
        });
        // Width 4: rows 4p .. 4p+3 -> lanes l + (l + 4), 128-bit block j holding row 4p + j.
        let quarters: [__m512; 4] = std::array::from_fn(|p| {
            let (a, b) = (halves[2 * p], halves[2 * p + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(a, b),
                _mm512_shuffle_f32x4::<0xDD>(a, b),
            )
        });
        // Width 2: block j holds rows 8p + j and 8p + 4 + j, two lanes each.
        let pairs: [__m512; 2] = std::array::from_fn(|p| {
            let (a, b) = (quarters[2 * p], quarters[2 * p + 1]);
            _mm512_add_ps(
                _mm512_shuffle_ps::<0x44>(a, b),
                _mm512_shuffle_ps::<0xEE>(a, b),
            )
        });
        // Width 1: block j holds rows j, 4 + j, 8 + j, 12 + j; then into row order.
        let (a, b) = (pairs[0], pairs[1]);
        let sums = _mm512_add_ps(
            _mm512_shuffle_ps::<0x88>(a, b),
            _mm512_shuffle_ps::<0xDD>(a, b),
        );
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        _mm512_permutexvar_ps(order, sums)
    }

    /// [`super::score_rows`] with [`dot_avx2`]'s bits, four rows at a time where the head is
    /// whole groups of 16 ([`score_blocks`]).
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; each row at least `col + q.len()` long.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn score_rows_avx2(
        q: &[f32],
        rows: &[&[f32]],
        col: usize,
        scale: f32,
        scores: &mut [f32],
    ) {
        let d = q.len();
        let block = |block: &[&[f32]; 4], out: &mut [f32; 4]| {
            // Each row's lane sums in its own two registers, then the four trees together.
            let (mut low, mut high) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
            for i in (0..d).step_by(DOT_LANES) {
                let x = q.as_ptr().add(i);
                let (x_low, x_high) = (_mm256_loadu_ps(x), _mm256_loadu_ps(x.add(8)));
                for (r, row) in block.iter().enumerate() {
                    let k = row[col..col + d].as_ptr().add(i);
                    low[r] = _mm256_add_ps(low[r], _mm256_mul_ps(x_low, _mm256_loadu_ps(k)));
                    let k_high = _mm256_loadu_ps(k.add(8));
                    high[r] = _mm256_add_ps(high[r], _mm256_mul_ps(x_high, k_high));
                }
            }
            let lanes = std::array::from_fn(|r| _mm256_add_ps(low[r], high[r]));
            let sums = _mm_mul_ps(trees4(lanes), _mm_set1_ps(scale));
            _mm_storeu_ps(out.as_mut_ptr(), sums);
        };
        score_blocks(q, rows, col, scale, scores, block, |a, b| dot_avx2(a, b));
    }

    /// Row `n`'s eight lanes summed in [`reduce8`]'s order into lane `n`, for four rows at once.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn trees4(lanes: [__m256; 4]) -> __m128 {
        // Width 4: rows 2p, 2p+1 -> lanes l + (l + 4), one row per 128-bit half.
        let halves: [__m256; 2] = std::array::from_fn(|p| {
            let (a, b) = (lanes[2 * p], lanes[2 * p + 1]);
            _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(a, b),
                _mm256_permute2f128_ps::<0x31>(a, b),
            )
        });
        // Width 2: half j holds rows j and 2 + j, two lanes each.
        let (a, b) = (halves[0], halves[1]);
        let pairs = _mm256_add_ps(
            _mm256_shuffle_ps::<0x44>(a, b),
            _mm256_shuffle_ps::<0xEE>(a, b),
        );
        // Width 1: half j holds rows j, 2 + j (twice); then into row order.
        let sums = _mm256_add_ps(
            _mm256_shuffle_ps::<0x88>(pairs, pairs),
            _mm256_shuffle_ps::<0xDD>(pairs, pairs),
        );
        let order = _mm256_setr_epi32(0, 4, 1, 5, 0, 4, 1, 5);
        _mm256_castps256_ps128(_mm256_permutevar8x32_ps(sums, order))
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
    use super::{attention, query_tile, tasks_per_query, AttentionShape, SequenceCache};
    use super::{KEY_BLOCK, MAX_QUERY_TILE, WIDE_PIECE};
    use crate::cpu::matmul::Kernel;

    /// Tiles of many queries over several blocks of keys (one thread) give each output the bits
    /// of tiles of one query (64 threads: one query a task), with and without a window, for a
    /// head wider than one output piece and every kernel.
    #[test]
    fn query_tiles_do_not_change_the_bits() {
        let (queries, start, head_dim, block_size) = (300, 40, WIDE_PIECE + 16, 7);
        let shape = AttentionShape {
            heads: 4,
            kv_heads: 2,
            head_dim,
        };
        assert_eq!(query_tile(queries, 1, 1), MAX_QUERY_TILE);
        assert_eq!(query_tile(queries, 1, 64), 1);
        assert!(start + queries > 3 * KEY_BLOCK);
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut values = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
                })
                .collect()
        };
        let width = shape.kv_heads * head_dim;
        let q = values(queries * shape.heads * head_dim);
        let blocks = (start + queries).div_ceil(block_size);
        let k: Vec<Vec<f32>> = (0..blocks).map(|_| values(block_size * width)).collect();
        let v: Vec<Vec<f32>> = (0..blocks).map(|_| values(block_size * width)).collect();
        let k: Vec<&[f32]> = k.iter().map(Vec::as_slice).collect();
        let v: Vec<&[f32]> = v.iter().map(Vec::as_slice).collect();
        let cache = SequenceCache {
            k: &k,
            v: &v,
            block_size,
        };
        for window in [None, Some(100)] {
            for kernel in Kernel::available() {
                let run = |threads: usize| {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut out = vec![f32::NAN; q.len()];
                    pool.install(|| attention(kernel, &q, shape, start, cache, window, &mut out));
                    out.iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
                };
                assert_eq!(run(1), run(64), "{kernel:?}, window {window:?}");
            }
        }
    }

    /// The SIMD scorers sum the lanes of several keys at once; each score keeps [`dot`]'s bits
    /// (times the scale), for heads of whole and partial lane groups and runs that are not whole
    /// blocks, with sums that cancel (where a different order would show).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn block_scores_keep_the_bits_of_one_dot_a_key() {
        use super::{score_rows, x86};
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut value = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Magnitudes spread over 2^-8 .. 2^8: the lane sums round differently by order.
            let m = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            m * f32::from_bits((127 - 8 + (state % 17) as u32) << 23)
        };
        for head_dim in [16, 20, 48, 64, 128] {
            for count in [1, 3, 4, 5, 15, 16, 17, 33] {
                let col = 3;
                let q: Vec<f32> = (0..head_dim).map(|_| value()).collect();
                let rows: Vec<Vec<f32>> = (0..count)
                    .map(|_| (0..col + head_dim + 2).map(|_| value()).collect())
                    .collect();
                let rows: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
                let scale = 0.125f32;
                let mut want = vec![0.0f32; count];
                score_rows(&q, &rows, col, scale, &mut want);
                for (i, row) in rows.iter().enumerate() {
                    assert_eq!(want[i], super::dot(&q, &row[col..col + head_dim]) * scale);
                }
                let want: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
                let bits = |scores: &[f32]| scores.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let mut got = vec![f32::NAN; count];
                if Kernel::Avx2.is_available() {
                    // SAFETY: the CPU has the AVX2 kernel's features; the rows are long enough.
                    unsafe { x86::score_rows_avx2(&q, &rows, col, scale, &mut got) };
                    assert_eq!(bits(&got), want, "AVX2, head_dim {head_dim}, {count} rows");
                }
                if Kernel::Avx512.is_available() {
                    // SAFETY: the CPU has AVX-512F; the rows are long enough.
                    unsafe { x86::score_rows_avx512(&q, &rows, col, scale, &mut got) };
                    assert_eq!(
                        bits(&got),
                        want,
                        "AVX-512, head_dim {head_dim}, {count} rows"
                    );
                }
            }
        }
    }

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
