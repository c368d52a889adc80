//! `attention_prefill` against the CPU reference `mixtral::cpu::attention::attention`: random
//! head_dim (every compiled value), GQA groups 1, 2, 3, 4 and 6, block sizes 1..=16 with shuffled
//! block tables shared by several sequences, queries with and without a cached prefix, a single token, windows
//! shorter and longer than the sequence and none, q inside a wider (fused QKV) row. Also holds the
//! paged-pool fixture the decode test reuses.

use half::bf16;
use mixtral::cpu::attention::{attention, AttentionShape, SequenceCache};
use mixtral::cpu::matmul::active_kernel;
use mixtral::cuda::args::AttentionPrefillArgs;
use mixtral::cuda::ops::{
    attention_prefill, attention_prefill_emulated, AttentionPrefillShape, PagedCacheShape,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use crate::common::{self, launch, Guarded, Target};

/// Random K/V caches holding several sequences in shuffled blocks, and their block tables.
pub(crate) struct Pool {
    /// The cache and table dimensions.
    pub(crate) cache: PagedCacheShape,
    /// Key/value heads.
    pub(crate) kv_heads: usize,
    /// Head dimension.
    pub(crate) head_dim: usize,
    /// `[num_blocks, block_size, kv_heads, head_dim]` keys, bf16-rounded.
    pub(crate) k: Vec<f32>,
    /// `[num_blocks, block_size, kv_heads, head_dim]` values, bf16-rounded.
    pub(crate) v: Vec<f32>,
    /// `[num_seqs, max_blocks_per_seq]` block tables; columns past a sequence's blocks hold
    /// out-of-range entries (-1 or >= num_blocks) the kernels must never follow.
    pub(crate) tables: Vec<i32>,
    /// Blocks each sequence uses.
    needs: Vec<usize>,
}

impl Pool {
    /// A pool where row `r` holds `lengths[r]` positions, `spare_cols` unused table columns past the
    /// longest sequence and a few blocks nobody owns; blocks are handed out in a shuffled order.
    pub(crate) fn new(
        seed: u64,
        lengths: &[usize],
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        spare_cols: usize,
    ) -> Pool {
        let needs: Vec<usize> = lengths.iter().map(|&n| n.div_ceil(block_size)).collect();
        let max_blocks_per_seq = needs.iter().copied().max().unwrap_or(0) + spare_cols.max(1);
        let num_blocks = needs.iter().sum::<usize>() + 3;
        let keys = common::random_values(seed ^ 0x0b10_c5ed, num_blocks, 1.0);
        let mut order: Vec<usize> = (0..num_blocks).collect();
        order.sort_by(|&a, &b| keys[a].total_cmp(&keys[b]));
        let mut free = order.into_iter();
        let mut tables = Vec::with_capacity(needs.len() * max_blocks_per_seq);
        for (row, &need) in needs.iter().enumerate() {
            for col in 0..max_blocks_per_seq {
                tables.push(if col < need {
                    free.next().expect("enough blocks") as i32
                } else if (row + col) % 2 == 0 {
                    -1
                } else {
                    (num_blocks + col) as i32
                });
            }
        }
        let elems = num_blocks * block_size * kv_heads * head_dim;
        Pool {
            cache: PagedCacheShape {
                num_blocks,
                block_size,
                num_seqs: lengths.len(),
                max_blocks_per_seq,
            },
            kv_heads,
            head_dim,
            k: common::round_bf16(&common::random_values(seed.wrapping_add(1), elems, 1.0)),
            v: common::round_bf16(&common::random_values(seed.wrapping_add(2), elems, 1.0)),
            tables,
            needs,
        }
    }

    /// Row `row`'s blocks of `data` (`k` or `v`) in position order.
    fn blocks<'a>(&self, data: &'a [f32], row: usize) -> Vec<&'a [f32]> {
        let width = self.cache.block_size * self.kv_heads * self.head_dim;
        let columns = &self.tables[row * self.cache.max_blocks_per_seq..];
        columns[..self.needs[row]]
            .iter()
            .map(|&b| &data[b as usize * width..(b as usize + 1) * width])
            .collect()
    }

    /// The CPU reference: queries `q: [n, heads, head_dim]` of row `row` at positions
    /// `start_pos ..`, returning `[n, heads, head_dim]`.
    pub(crate) fn reference(
        &self,
        row: usize,
        q: &[f32],
        heads: usize,
        start_pos: usize,
        window: Option<usize>,
    ) -> Vec<f32> {
        let (k, v) = (self.blocks(&self.k, row), self.blocks(&self.v, row));
        let block_size = self.cache.block_size;
        let mut out = vec![0.0; q.len()];
        attention(
            active_kernel(),
            q,
            AttentionShape {
                heads,
                kv_heads: self.kv_heads,
                head_dim: self.head_dim,
            },
            start_pos,
            SequenceCache {
                k: &k,
                v: &v,
                block_size,
            },
            window,
            &mut out,
        );
        out
    }
}

/// Queries `[tokens, heads, head_dim]` stored in rows of `stride` elements (bf16-rounded), and the
/// same queries packed contiguously for the reference.
pub(crate) fn strided_queries(
    seed: u64,
    tokens: usize,
    width: usize,
    stride: usize,
) -> (Vec<f32>, Vec<f32>) {
    // Scale 2: peakier softmaxes than unit scores would give.
    let rows = common::round_bf16(&common::random_values(seed, tokens * stride, 2.0));
    let packed = rows
        .chunks(stride)
        .flat_map(|r| r[..width].iter().copied())
        .collect();
    (rows, packed)
}

/// One random prefill case.
#[derive(Debug, Clone)]
struct Case {
    head_dim: usize,
    group: usize,
    kv_heads: usize,
    block_size: usize,
    start_pos: usize,
    tokens: usize,
    window: Option<usize>,
    fused_q: bool,
    other_lengths: Vec<usize>,
    seq_row: usize,
    seed: u64,
}

fn cases() -> impl Strategy<Value = Case> {
    (
        (
            prop_oneof![Just(16usize), Just(32), Just(64), Just(128)],
            prop_oneof![Just(1usize), Just(2), Just(4), Just(3), Just(6)],
            1usize..=2,
            1usize..=16,
        ),
        (
            prop_oneof![Just(0usize), 1usize..150],
            prop_oneof![Just(1usize), 2usize..=140],
            prop_oneof![
                Just(None),
                (1usize..=40).prop_map(Some),
                (300usize..600).prop_map(Some)
            ],
            any::<bool>(),
        ),
        (
            proptest::collection::vec(1usize..200, 0..=2),
            any::<prop::sample::Index>(),
            any::<u64>(),
        ),
    )
        .prop_map(
            |(
                (head_dim, group, kv_heads, block_size),
                (start_pos, tokens, window, fused_q),
                (other_lengths, row, seed),
            )| Case {
                head_dim,
                group,
                kv_heads,
                block_size,
                start_pos,
                tokens,
                window,
                fused_q,
                seq_row: row.index(other_lengths.len() + 1),
                other_lengths,
                seed,
            },
        )
}

/// Runs the op on `pool`'s row `seq_row` and returns its output (guards and full coverage checked).
#[allow(clippy::too_many_arguments)]
fn run(
    gpu: &Target,
    pool: &Pool,
    tables: &[i32],
    seq_row: usize,
    heads: usize,
    q_rows: &[f32],
    q_stride: usize,
    start_pos: usize,
    tokens: usize,
    window: Option<usize>,
) -> Vec<f32> {
    let stream = gpu.stream();
    let mut q = Guarded::with(stream, &common::to_bf16(q_rows));
    let k_cache = Guarded::with(stream, &common::to_bf16(&pool.k));
    let v_cache = Guarded::with(stream, &common::to_bf16(&pool.v));
    let block_tables = Guarded::with(stream, tables);
    let mut out = Guarded::<bf16>::poisoned(stream, tokens * heads * pool.head_dim);
    let shape = AttentionPrefillShape {
        tokens,
        start_pos,
        seq_row,
        n_heads: heads,
        n_kv_heads: pool.kv_heads,
        head_dim: pool.head_dim,
        cache: pool.cache,
        window,
    };
    let width = heads * pool.head_dim;
    let [q, _] = q
        .dev_mut()
        .column_groups([width, q_stride - width])
        .expect("whole rows of q");
    launch!(
        gpu.on(),
        attention_prefill | attention_prefill_emulated,
        &shape,
        AttentionPrefillArgs {
            q: q.into(),
            k_cache: k_cache.dev(),
            v_cache: v_cache.dev(),
            block_tables: block_tables.dev(),
            out: out.dev_mut(),
        },
    )
    .expect("attention_prefill launch");
    common::to_f32(&out.read_written(stream, "out"))
}

/// A case's host data: the pool, q in its strided rows, and the reference output.
struct Prepared {
    pool: Pool,
    heads: usize,
    q_rows: Vec<f32>,
    q_stride: usize,
    reference: Vec<f32>,
}

fn prepare(case: &Case) -> Prepared {
    let heads = case.group * case.kv_heads;
    let width = heads * case.head_dim;
    let q_stride = if case.fused_q {
        width + 2 * case.kv_heads * case.head_dim
    } else {
        width
    };
    let mut lengths = case.other_lengths.clone();
    lengths.insert(case.seq_row, case.start_pos + case.tokens);
    let pool = Pool::new(
        case.seed,
        &lengths,
        case.block_size,
        case.kv_heads,
        case.head_dim,
        (case.seed % 3) as usize,
    );
    let (q_rows, q) = strided_queries(case.seed.wrapping_add(3), case.tokens, width, q_stride);
    let reference = pool.reference(case.seq_row, &q, heads, case.start_pos, case.window);
    Prepared {
        pool,
        heads,
        q_rows,
        q_stride,
        reference,
    }
}

/// The bound of a prefill output: two bf16 roundings over f32 sums of at most `keys` terms. The
/// probabilities P are rounded to bf16 for the P V tensor-core product, and their error reaches
/// the output through a softmax-weighted average (no amplification on average); the output is
/// rounded again at its bf16 store.
fn prefill_bound(keys: usize) -> f64 {
    common::bf16_bound(keys, 2)
}

fn check(gpu: &Target, case: &Case) {
    let p = prepare(case);
    let out = run(
        gpu,
        &p.pool,
        &p.pool.tables,
        case.seq_row,
        p.heads,
        &p.q_rows,
        p.q_stride,
        case.start_pos,
        case.tokens,
        case.window,
    );
    common::assert_close(
        &format!("{case:?}"),
        &out,
        &p.reference,
        prefill_bound(case.start_pos + case.tokens),
    );
}

/// Runs without a device: the fixture the GPU tests rely on is what they claim. Every sequence's
/// table columns name distinct in-range blocks (no two sequences share one), every other column is
/// out of range, the blocks are not handed out in order, and the reference output is finite and
/// not constant.
#[test]
fn attention_fixture_is_a_shuffled_partition_of_the_pool() {
    let mut runner = TestRunner::new(Config {
        cases: 16,
        ..Config::default()
    });
    let shuffled = std::cell::Cell::new(0);
    let result = runner.run(&cases(), |case| {
        let p = prepare(&case);
        let cache = p.pool.cache;
        let mut owner = vec![None; cache.num_blocks];
        let mut in_order = true;
        for row in 0..cache.num_seqs {
            let columns =
                &p.pool.tables[row * cache.max_blocks_per_seq..][..cache.max_blocks_per_seq];
            let used = p.pool.needs[row];
            for (col, &entry) in columns.iter().enumerate() {
                let in_range = entry >= 0 && (entry as usize) < cache.num_blocks;
                prop_assert_eq!(
                    in_range,
                    col < used,
                    "row {} column {} = {}",
                    row,
                    col,
                    entry
                );
                if in_range {
                    prop_assert!(owner[entry as usize].is_none(), "block {} shared", entry);
                    owner[entry as usize] = Some(row);
                    in_order &= col == 0 || columns[col - 1] + 1 == entry;
                }
            }
        }
        if !in_order {
            shuffled.set(shuffled.get() + 1);
        }
        let len = case.tokens * p.heads * case.head_dim;
        prop_assert_eq!(p.reference.len(), len);
        prop_assert!(p.reference.iter().all(|x| x.is_finite()));
        prop_assert!(p.reference.iter().any(|&x| x != p.reference[0]));
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(shuffled.get() > 0, "block tables were never shuffled");
}

#[test]
fn attention_prefill_matches_the_cpu_reference() {
    let gpu = common::target("attention_prefill_matches_the_cpu_reference");
    let mut runner = TestRunner::new(Config {
        cases: 16,
        ..Config::default()
    });
    if let Err(e) = runner.run(&cases(), |case| {
        check(&gpu, &case);
        Ok(())
    }) {
        panic!("{e}");
    }
}

/// Fixed cases at the tile edges: with 4 query heads per KV head, 31, 32 and 33 tokens (one tile of
/// 128 query rows and one past it) and 64 and 65; with 6, 21 and 22 tokens (a tile ending inside a
/// token's heads); keys ending at, and one past, a 32-key tile; a window of exactly one key, and a
/// window equal to the sequence.
#[test]
fn attention_prefill_tile_edges() {
    let gpu = common::target("attention_prefill_tile_edges");
    for (seed, (group, tokens, start_pos, window)) in (12..).zip([
        (4, 31, 0, None),
        (4, 32, 0, None),
        (4, 33, 0, None),
        (4, 64, 0, None),
        (4, 65, 0, None),
        (4, 64, 64, None),
        (4, 32, 32, None),
        (4, 33, 32, None),
        (4, 65, 1, Some(1)),
        (4, 70, 30, Some(100)),
        (4, 129, 7, Some(64)),
        (6, 21, 0, None),
        (6, 22, 11, Some(32)),
        (1, 129, 0, None),
    ]) {
        check(
            &gpu,
            &Case {
                head_dim: 128,
                group,
                kv_heads: 2,
                block_size: 16,
                start_pos,
                tokens,
                window,
                fused_q: true,
                other_lengths: vec![40],
                seq_row: 1,
                seed,
            },
        );
    }
}

/// A block-table entry outside `[0, num_blocks)` inside the sequence is skipped, never followed: with
/// the sequence's first block replaced by -1 or by `num_blocks`, queries whose window does not reach
/// that block still match the reference, and every output of the full-causal run is finite
/// and inside the buffer; with no entry in range every output is zero.
#[test]
fn attention_prefill_skips_out_of_range_block_table_entries() {
    let gpu = common::target("attention_prefill_skips_out_of_range_block_table_entries");
    let (heads, head_dim, block_size, start_pos, tokens) = (4, 32, 4, 20, 10);
    let pool = Pool::new(99, &[start_pos + tokens], block_size, 2, head_dim, 1);
    let (q_rows, q) = strided_queries(100, tokens, heads * head_dim, heads * head_dim);
    for bad in [-1, pool.cache.num_blocks as i32] {
        let mut tables = pool.tables.clone();
        tables[0] = bad;
        // Window 8: the first query (position 20) sees keys 13..=20, block 0 holds 0..=3.
        let window = Some(8);
        let reference = pool.reference(0, &q, heads, start_pos, window);
        let out = run(
            &gpu,
            &pool,
            &tables,
            0,
            heads,
            &q_rows,
            heads * head_dim,
            start_pos,
            tokens,
            window,
        );
        common::assert_close(
            "windowed past the bad block",
            &out,
            &reference,
            prefill_bound(start_pos + tokens),
        );
        let out = run(
            &gpu,
            &pool,
            &tables,
            0,
            heads,
            &q_rows,
            heads * head_dim,
            start_pos,
            tokens,
            None,
        );
        assert!(out.iter().all(|x| x.is_finite()), "non-finite output");
        // The full-causal output differs from the reference (block 0's keys are skipped).
        let full = pool.reference(0, &q, heads, start_pos, None);
        assert!(common::rel_l2(&out, &full) > 1e-4, "block 0 was read");
    }
    // With every entry of the row out of range no key is left: every output is exactly zero.
    let mut tables = pool.tables.clone();
    for (col, entry) in tables.iter_mut().enumerate() {
        *entry = if col % 2 == 0 { -7 } else { i32::MAX };
    }
    let out = run(
        &gpu,
        &pool,
        &tables,
        0,
        heads,
        &q_rows,
        heads * head_dim,
        start_pos,
        tokens,
        None,
    );
    assert!(
        out.iter().all(|&x| x == 0.0),
        "a query without keys must give zeros"
    );
}
