//! `attention_decode` (split-KV decode, the splits merged in the same launch) against the CPU reference
//! `mixtral::cpu::attention::attention`: several sequences in one launch, each with 1 to 3 query
//! tokens at its last positions, listed in an order other than their block-table rows; random
//! head_dim (every compiled value), GQA groups 1/2/4, block sizes 1..=16 with shuffled block tables,
//! split sizes from 1 key to the maximum, windows shorter and longer than the sequences and none,
//! and a padding token (no sequence: zeros); the same with the scores on the tensor cores
//! (`attention_decode_mma`: head_dim 64 and 128, groups 4, 6 and 8). Each case launches twice over the same split
//! counters, which must come back to 0, with the same output. The split scratch buffers are
//! guard-banded too.

use half::bf16;
use mixtral::cuda::args::AttentionDecodeArgs;
use mixtral::cuda::ops::{
    attention_decode, attention_decode_emulated, attention_splits, AttentionDecodeShape,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use crate::attention_prefill::{strided_queries, Pool};
use crate::common::{self, launch, Guarded, Target};

/// One random decode case: sequence r holds `cached[r] + queries[r]` positions and asks for its
/// last `queries[r]` of them.
#[derive(Debug, Clone)]
struct Case {
    head_dim: usize,
    group: usize,
    kv_heads: usize,
    block_size: usize,
    cached: Vec<usize>,
    queries: Vec<usize>,
    window: Option<usize>,
    split_keys: usize,
    /// The multiprocessor count the planner spreads the keys for (0: fixed splits of
    /// `split_keys`).
    multiprocessors: usize,
    fused_q: bool,
    seed: u64,
    /// The scores on the tensor cores.
    tensor_cores: bool,
}

/// Random cases on CUDA cores (every compiled head_dim, groups 1, 2 and 4) or, with
/// `tensor_cores`, on the tensor cores (the shapes they are compiled for).
fn cases(tensor_cores: bool) -> impl Strategy<Value = Case> {
    let (head_dims, groups) = if tensor_cores {
        (vec![64usize, 128], vec![4usize, 6, 8])
    } else {
        (vec![16, 32, 64, 128], vec![1, 2, 4])
    };
    (
        (
            prop::sample::select(head_dims),
            prop::sample::select(groups),
            1usize..=2,
            1usize..=16,
        ),
        proptest::collection::vec((prop_oneof![Just(0usize), 1usize..300], 1usize..=3), 1..=4),
        (
            prop_oneof![
                Just(None),
                (1usize..=40).prop_map(Some),
                (400usize..800).prop_map(Some)
            ],
            prop_oneof![Just(1usize), 2usize..=40, Just(64), Just(512)],
            prop_oneof![Just(0usize), Just(132), 1usize..=200],
            any::<bool>(),
            any::<u64>(),
        ),
    )
        .prop_map(
            move |(
                (head_dim, group, kv_heads, block_size),
                seqs,
                (window, split_keys, multiprocessors, fused_q, seed),
            )| {
                Case {
                    head_dim,
                    group,
                    kv_heads,
                    block_size,
                    cached: seqs.iter().map(|s| s.0).collect(),
                    queries: seqs.iter().map(|s| s.1).collect(),
                    window,
                    split_keys,
                    multiprocessors,
                    fused_q,
                    seed,
                    tensor_cores,
                }
            },
        )
}

fn check(gpu: &Target, case: &Case) {
    let stream = gpu.stream();
    let heads = case.group * case.kv_heads;
    let width = heads * case.head_dim;
    let q_stride = if case.fused_q {
        width + 2 * case.kv_heads * case.head_dim
    } else {
        width
    };
    let lengths: Vec<usize> = case
        .cached
        .iter()
        .zip(&case.queries)
        .map(|(c, q)| c + q)
        .collect();
    let pool = Pool::new(
        case.seed,
        &lengths,
        case.block_size,
        case.kv_heads,
        case.head_dim,
        (case.seed % 3) as usize,
    );
    // The sequences' query tokens, then one padding token (no sequence), as the engine pads a decode
    // batch: it attends to nothing and gets zeros.
    let tokens: usize = case.queries.iter().sum::<usize>() + 1;
    let (q_rows, q) = strided_queries(case.seed.wrapping_add(3), tokens, width, q_stride);

    // Tokens are listed sequence by sequence in reverse row order.
    let mut token_seq = Vec::with_capacity(tokens);
    let mut positions = Vec::with_capacity(tokens);
    let mut reference = Vec::with_capacity(tokens * width);
    for row in (0..lengths.len()).rev() {
        let first = token_seq.len();
        let n = case.queries[row];
        for i in 0..n {
            token_seq.push(row as i32);
            positions.push((case.cached[row] + i) as i32);
        }
        let q_seq = &q[first * width..(first + n) * width];
        reference.extend(pool.reference(row, q_seq, heads, case.cached[row], case.window));
    }
    token_seq.push(-1);
    positions.push(0);
    reference.extend(std::iter::repeat_n(0.0, width));

    let max_splits = attention_splits(pool.cache.capacity(), case.split_keys);
    let mut q_dev = Guarded::with(stream, &common::to_bf16(&q_rows));
    let k_cache = Guarded::with(stream, &common::to_bf16(&pool.k));
    let v_cache = Guarded::with(stream, &common::to_bf16(&pool.v));
    let block_tables = Guarded::with(stream, &pool.tables);
    let token_seq_dev = Guarded::with(stream, &token_seq);
    let positions_dev = Guarded::with(stream, &positions);
    let mut part_out =
        Guarded::<f32>::poisoned(stream, tokens * heads * max_splits * case.head_dim);
    let mut part_lse = Guarded::<f32>::poisoned(stream, tokens * heads * max_splits);
    // Zeroed once, as the engine does: each launch leaves the counters at 0 for the next.
    let mut split_done = Guarded::with(stream, &vec![0u32; tokens * case.kv_heads]);
    let shape = AttentionDecodeShape {
        tokens,
        n_heads: heads,
        n_kv_heads: case.kv_heads,
        head_dim: case.head_dim,
        cache: pool.cache,
        window: case.window,
        split_keys: case.split_keys,
        multiprocessors: case.multiprocessors,
        tensor_cores: case.tensor_cores,
    };
    // Two launches on the same counters: the second merges as the first did.
    let mut rounds = Vec::new();
    for _ in 0..2 {
        let mut out = Guarded::<bf16>::poisoned(stream, tokens * width);
        let [q, _] = q_dev
            .dev_mut()
            .column_groups([width, q_stride - width])
            .expect("whole rows of q");
        launch!(
            gpu.on(),
            attention_decode | attention_decode_emulated,
            &shape,
            AttentionDecodeArgs {
                q: q.into(),
                k_cache: k_cache.dev(),
                v_cache: v_cache.dev(),
                block_tables: block_tables.dev(),
                token_seq: token_seq_dev.dev(),
                positions: positions_dev.dev(),
                out: out.dev_mut(),
                part_out: part_out.dev_mut(),
                part_lse: part_lse.dev_mut(),
                split_done: split_done.dev_mut(),
            },
        )
        .expect("attention_decode launch");
        rounds.push(out.read_written(stream, "out"));
    }
    part_out.read(stream, "part_out");
    part_lse.read(stream, "part_lse");
    let left = split_done.read(stream, "split_done");
    assert!(
        left.iter().all(|&c| c == 0),
        "{case:?}: split counters left at {left:?}"
    );
    let bits = |r: &[bf16]| r.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&rounds[0]),
        bits(&rounds[1]),
        "{case:?}: the second launch differs"
    );
    let out = common::to_f32(&rounds[0]);
    assert!(
        out[(tokens - 1) * width..].iter().all(|&v| v == 0.0),
        "{case:?}: the padding token's output is not zero"
    );
    // Scores, softmax, weighted sums and the merge of the splits all in f32 (over at most the longest
    // sequence's keys), then one rounding at the bf16 store.
    let keys = lengths.iter().copied().max().unwrap_or(0);
    common::assert_close(
        &format!("{case:?}"),
        &out,
        &reference,
        common::bf16_bound(keys, 1),
    );
}

/// 16 random cases of `cases(tensor_cores)` against the CPU reference.
fn matches_the_cpu_reference(name: &str, tensor_cores: bool) {
    let gpu = common::target(name);
    let mut runner = TestRunner::new(Config {
        cases: 16,
        ..Config::default()
    });
    if let Err(e) = runner.run(&cases(tensor_cores), |case| {
        check(&gpu, &case);
        Ok(())
    }) {
        panic!("{e}");
    }
}

#[test]
fn attention_decode_matches_the_cpu_reference() {
    matches_the_cpu_reference("attention_decode_matches_the_cpu_reference", false);
}

/// The tensor-core scores: the same bound, derived for f32 sums, holds (a bf16 product is exact in
/// f32 and the tensor cores sum in f32).
#[test]
fn attention_decode_on_tensor_cores_matches_the_cpu_reference() {
    matches_the_cpu_reference(
        "attention_decode_on_tensor_cores_matches_the_cpu_reference",
        true,
    );
}
