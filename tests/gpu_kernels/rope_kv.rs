//! `rope_kv` against `cpu::rope::Rope::apply`: q rotated in place (row padding untouched), k
//! rotated and v copied into the paged cache at each token's slot, positions up to 32k, strided
//! rows, several sequences and block sizes, a token whose sequence has no block table row (q still
//! rotated, nothing written). Every cache slot no token maps to keeps its poison.

use std::collections::{BTreeMap, BTreeSet};

use half::bf16;
use mixtral::cpu::rope::Rope;
use mixtral::cuda::args::{PagedCacheScalars, RopeKvArgs, RopeKvScalars};
use mixtral::cuda::ops::{rope_kv, rope_kv_emulated};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use crate::common::{
    self, assert_close, bf16_bound, launch, random_values, to_bf16, to_f32, Guarded, Poison,
};

const MAX_POSITION: usize = 32_768;

/// `[tokens, heads * head_dim]` rows taken out of a buffer whose rows are `stride` apart.
fn compact(data: &[f32], tokens: usize, stride: usize, width: usize) -> Vec<f32> {
    (0..tokens)
        .flat_map(|t| data[t * stride..t * stride + width].iter().copied())
        .collect()
}

#[test]
fn rope_kv_rotates_and_fills_the_paged_cache() {
    let gpu = common::target("rope_kv_rotates_and_fills_the_paged_cache");
    let strategy = (
        (
            1usize..8,
            1usize..4,
            prop::sample::select(vec![1usize, 2, 4]),
        ),
        prop::sample::select(vec![2usize, 6, 16, 64, 128]),
        (0usize..5, 0usize..5, 0usize..5),
        (prop::sample::select(vec![1usize, 4, 16]), 1usize..4),
        prop::sample::select(vec![10_000.0f32, 1_000_000.0]),
        any::<u64>(),
        any::<bool>(),
    );
    let mut runner = TestRunner::new(Config::with_cases(gpu.cases(20, 6)));
    runner
        .run(
            &strategy,
            |(
                (tokens, n_kv_heads, group),
                head_dim,
                (pq, pk, pv),
                (block_size, num_seqs),
                theta,
                seed,
                orphan,
            )| {
                let stream = gpu.stream();
                let n_heads = n_kv_heads * group;
                let (q_width, kv_width) = (n_heads * head_dim, n_kv_heads * head_dim);
                let (q_stride, k_stride, v_stride) = (q_width + pq, kv_width + pk, kv_width + pv);

                // Sequences and distinct positions per sequence, up to 32k.
                let raw = random_values(seed, tokens, 1.0);
                let mut token_seq: Vec<i32> = (0..tokens).map(|t| (t % num_seqs) as i32).collect();
                let mut used: BTreeSet<(i32, usize)> = BTreeSet::new();
                let mut positions = Vec::with_capacity(tokens);
                for t in 0..tokens {
                    let mut pos = (((raw[t] + 1.0) * 0.5 * MAX_POSITION as f32) as usize)
                        .min(MAX_POSITION - 1);
                    while !used.insert((token_seq[t], pos)) {
                        pos = (pos + 1) % MAX_POSITION;
                    }
                    positions.push(pos);
                }
                // Physical blocks for every (sequence, logical block) a token uses; all else -1.
                let max_blocks_per_seq = MAX_POSITION.div_ceil(block_size);
                let mut block_tables = vec![-1i32; num_seqs * max_blocks_per_seq];
                let mut physical: BTreeMap<(i32, usize), usize> = BTreeMap::new();
                for t in 0..tokens {
                    let key = (token_seq[t], positions[t] / block_size);
                    let next = physical.len() + 1; // block 0 stays unused
                    physical.entry(key).or_insert(next);
                }
                for (&(seq, logical), &block) in &physical {
                    block_tables[seq as usize * max_blocks_per_seq + logical] = block as i32;
                }
                let num_blocks = physical.len() + 2;
                if orphan {
                    // The last token names a sequence with no block table row.
                    token_seq[tokens - 1] = num_seqs as i32;
                }

                let q = to_bf16(&random_values(seed ^ 1, tokens * q_stride, 2.0));
                let k = to_bf16(&random_values(seed ^ 2, tokens * k_stride, 2.0));
                let v = to_bf16(&random_values(seed ^ 3, tokens * v_stride, 2.0));
                let rope = Rope::new(head_dim, theta);
                let mut q_ref = compact(&to_f32(&q), tokens, q_stride, q_width);
                let mut k_ref = compact(&to_f32(&k), tokens, k_stride, kv_width);
                rope.apply(&mut q_ref, n_heads, &positions);
                rope.apply(&mut k_ref, n_kv_heads, &positions);

                let scalars = RopeKvScalars {
                    tokens: tokens as u32,
                    n_heads: n_heads as u32,
                    n_kv_heads: n_kv_heads as u32,
                    head_dim: head_dim as u32,
                    cache: PagedCacheScalars {
                        block_size: block_size as u32,
                        max_blocks_per_seq: max_blocks_per_seq as u32,
                        num_blocks: num_blocks as u32,
                        num_seqs: num_seqs as u32,
                    },
                };
                let cache_len = num_blocks * block_size * kv_width;
                let positions_i32: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
                let mut q_d = Guarded::with(stream, &q);
                let mut k_d = Guarded::with(stream, &k);
                let mut v_d = Guarded::with(stream, &v);
                let mut k_cache = Guarded::<bf16>::poisoned(stream, cache_len);
                let mut v_cache = Guarded::<bf16>::poisoned(stream, cache_len);
                let tables_d = Guarded::with(stream, &block_tables);
                let seq_d = Guarded::with(stream, &token_seq);
                let pos_d = Guarded::with(stream, &positions_i32);
                let freq_d = Guarded::with(stream, rope.inv_freq());
                {
                    let [q_rows, _] = q_d
                        .dev_mut()
                        .column_groups([q_width, pq])
                        .expect("whole rows of q");
                    let [k_rows, _] = k_d
                        .dev_mut()
                        .column_groups([kv_width, pk])
                        .expect("whole rows of k");
                    let [v_rows, _] = v_d
                        .dev_mut()
                        .column_groups([kv_width, pv])
                        .expect("whole rows of v");
                    launch!(
                        gpu.on(),
                        rope_kv | rope_kv_emulated,
                        &scalars,
                        RopeKvArgs {
                            q: q_rows,
                            k: k_rows.into(),
                            v: v_rows.into(),
                            k_cache: k_cache.dev_mut(),
                            v_cache: v_cache.dev_mut(),
                            block_tables: tables_d.dev(),
                            token_seq: seq_d.dev(),
                            positions: pos_d.dev(),
                            inv_freq: freq_d.dev(),
                        },
                    )
                    .expect("rope_kv");
                }
                let q_out = to_f32(&q_d.read(stream, "q"));
                // Two f32 products and a sum per element (cos and sin accurate to an f32 ulp on
                // both sides), then one rounding at the bf16 store.
                assert_close(
                    "q",
                    &compact(&q_out, tokens, q_stride, q_width),
                    &q_ref,
                    bf16_bound(2, 1),
                );
                let q_in = to_f32(&q);
                for t in 0..tokens {
                    for i in t * q_stride + q_width..(t + 1) * q_stride {
                        prop_assert_eq!(
                            q_out[i].to_bits(),
                            q_in[i].to_bits(),
                            "q padding {} changed",
                            i
                        );
                    }
                }

                let k_out = k_cache.read(stream, "k_cache");
                let v_out = v_cache.read(stream, "v_cache");
                let mut written = vec![false; num_blocks * block_size];
                let mut k_got = Vec::new();
                let mut k_want = Vec::new();
                for t in 0..tokens {
                    let Some(&block) = physical.get(&(token_seq[t], positions[t] / block_size))
                    else {
                        continue;
                    };
                    let slot = block * block_size + positions[t] % block_size;
                    written[slot] = true;
                    let row = slot * kv_width..(slot + 1) * kv_width;
                    k_got.extend(to_f32(&k_out[row.clone()]));
                    k_want.extend_from_slice(&k_ref[t * kv_width..(t + 1) * kv_width]);
                    let v_row = &v[t * v_stride..t * v_stride + kv_width];
                    for (i, (got, want)) in v_out[row].iter().zip(v_row).enumerate() {
                        prop_assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "v of token {} element {}",
                            t,
                            i
                        );
                    }
                }
                if !k_want.is_empty() {
                    assert_close("k in the cache", &k_got, &k_want, bf16_bound(2, 1));
                }
                for (slot, &w) in written.iter().enumerate() {
                    if w {
                        continue;
                    }
                    let row = slot * kv_width..(slot + 1) * kv_width;
                    prop_assert!(
                        k_out[row.clone()]
                            .iter()
                            .chain(&v_out[row])
                            .all(|&x| bf16::same_bits(x, bf16::POISON)),
                        "cache slot {} written but no token maps to it",
                        slot
                    );
                }
                Ok(())
            },
        )
        .unwrap();
}
