//! Prefix caching in the CPU engine's paged KV pool, by property: for random trees of prompts that
//! share prefixes (each a cut of an earlier prompt plus new tokens), run in one engine that
//! reuses cached blocks ([`Engine::reuse_prefix`]), forks sequences and continues both copies
//! (copy-on-write), and frees some sequences (their blocks stay cached, then get evicted from a
//! small pool), every logits row is bitwise equal to a fresh prefill of the same tokens; the pool's
//! invariants (reference counts equal the tables holding each block, no count below zero, free
//! lists consistent) hold after every operation, and the pool is free at the end.
//!
//! Two models: the shipped `models/tiny-mixtral`, and a seeded random one with a sliding window
//! of 5 tokens (blocks falling out of the window are released while the cache still names them).

use mixtral::cpu::{CpuEngine, CpuEngineOptions};
use mixtral::random_model::{write_random_model, RandomModelSpec};
use mixtral::weights::ModelWeights;
use mixtral::{Engine, LoadOptions, LogitsFor, Model, SeqId, SeqStep, StepOutput};
use proptest::prelude::*;
use std::path::Path;
use std::sync::{Arc, OnceLock};

fn weights(window: bool) -> Arc<ModelWeights> {
    static SHIPPED: OnceLock<Arc<ModelWeights>> = OnceLock::new();
    static WINDOWED: OnceLock<Arc<ModelWeights>> = OnceLock::new();
    if !window {
        return SHIPPED
            .get_or_init(|| {
                let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-mixtral");
                Model::load(&dir, &LoadOptions::default()).unwrap().weights
            })
            .clone();
    }
    WINDOWED
        .get_or_init(|| {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("prefix_cache_window5");
            let spec = RandomModelSpec::tiny(7).with("sliding_window", 5);
            write_random_model(&dir, &spec).unwrap();
            Model::load(&dir, &LoadOptions::default()).unwrap().weights
        })
        .clone()
}

fn engine(weights: &Arc<ModelWeights>, block_size: usize, kv_blocks: usize) -> CpuEngine {
    let options = CpuEngineOptions {
        max_context: Some(64),
        block_size,
        kv_blocks: Some(kv_blocks),
        max_sequences: 16,
    };
    CpuEngine::new(weights.clone(), options).unwrap()
}

/// Logits rows of `tokens[from..]` computed from scratch in a new sequence of `fresh`.
fn fresh_rows(fresh: &mut CpuEngine, tokens: &[u32], from: usize) -> Vec<Vec<u32>> {
    let seq = fresh.new_sequence().unwrap();
    let out = step(fresh, seq, tokens, 0, LogitsFor::All);
    fresh.free_sequence(seq).unwrap();
    bits(&out)[from..].to_vec()
}

fn step(
    e: &mut CpuEngine,
    seq: SeqId,
    tokens: &[u32],
    start: usize,
    logits: LogitsFor,
) -> StepOutput {
    e.step(&[SeqStep {
        seq,
        tokens: &tokens[start..],
        start_pos: start,
        logits,
    }])
    .unwrap()
}

/// Each row's logits as bits (bitwise comparison, NaN-safe).
fn bits(out: &StepOutput) -> Vec<Vec<u32>> {
    (0..out.len())
        .map(|i| out.row(i).iter().map(|x| x.to_bits()).collect())
        .collect()
}

/// One node of the tree: cut an earlier prompt, add tokens, maybe fork and continue both.
#[derive(Debug, Clone)]
struct Op {
    /// Which earlier prompt (modulo their number).
    parent: usize,
    /// How many of its tokens to keep (modulo its length + 1).
    cut: usize,
    extra: Vec<u32>,
    fork: Option<(Vec<u32>, Vec<u32>)>,
    keep: bool,
}

fn op(vocab: u32) -> impl Strategy<Value = Op> {
    let tokens = |n| proptest::collection::vec(1..vocab, n);
    (
        any::<usize>(),
        any::<usize>(),
        tokens(1..10),
        proptest::option::of((tokens(1..4), tokens(1..4))),
        any::<bool>(),
    )
        .prop_map(|(parent, cut, extra, fork, keep)| Op {
            parent,
            cut,
            extra,
            fork,
            keep,
        })
}

/// Runs the tree; returns the prompt tokens that came from the cache.
fn run_tree(
    window: bool,
    block_size: usize,
    root: Vec<u32>,
    ops: Vec<Op>,
) -> Result<usize, TestCaseError> {
    let w = weights(window);
    // At most 6 sequences live at once (4 kept, plus a prompt and its fork), each at most 24 + 3
    // tokens: a pool of 6 * 28 token slots (plus a block each for rounding) always fits them,
    // while the tree's freed prompts (up to 10 ops of up to 27 tokens) overflow it, so cached
    // blocks get evicted.
    let blocks = (6 * 28usize).div_ceil(block_size) + 6;
    let mut e = engine(&w, block_size, blocks);
    let mut fresh = engine(&w, block_size, blocks);
    let mut prompts = vec![root];
    let mut live: Vec<SeqId> = Vec::new();
    let mut reused = 0;
    for op in ops {
        let parent = prompts[op.parent % prompts.len()].clone();
        let mut prompt = parent[..op.cut % (parent.len() + 1)].to_vec();
        prompt.extend_from_slice(&op.extra);
        prompt.truncate(24);
        let seq = e.new_sequence().unwrap();
        let cached = e.reuse_prefix(seq, &prompt).unwrap();
        prop_assert_eq!(cached % block_size, 0);
        prop_assert!(cached < prompt.len());
        reused += cached;
        e.kv().check_invariants().map_err(TestCaseError::fail)?;
        let out = step(&mut e, seq, &prompt, cached, LogitsFor::All);
        e.kv().check_invariants().map_err(TestCaseError::fail)?;
        prop_assert_eq!(
            bits(&out),
            fresh_rows(&mut fresh, &prompt, cached),
            "prompt"
        );
        let mut seqs = vec![seq];
        if let Some((a, b)) = &op.fork {
            // The child rewinds one token (writing the shared last block), the parent grows.
            let child = e.fork_sequence(seq).unwrap();
            e.kv().check_invariants().map_err(TestCaseError::fail)?;
            let mut child_tokens = prompt.clone();
            child_tokens.extend_from_slice(a);
            let mut parent_tokens = prompt.clone();
            parent_tokens.extend_from_slice(b);
            let start_child = prompt.len() - 1;
            let outs = e
                .step(&[
                    SeqStep {
                        seq: child,
                        tokens: &child_tokens[start_child..],
                        start_pos: start_child,
                        logits: LogitsFor::All,
                    },
                    SeqStep {
                        seq,
                        tokens: &parent_tokens[prompt.len()..],
                        start_pos: prompt.len(),
                        logits: LogitsFor::All,
                    },
                ])
                .unwrap();
            e.kv().check_invariants().map_err(TestCaseError::fail)?;
            // Both wrote the block that held the prompt's last token: each has its own now.
            let shared = (prompt.len() - 1) / block_size;
            let child_block = e.kv().block_table(child).unwrap()[shared];
            let parent_block = e.kv().block_table(seq).unwrap()[shared];
            prop_assert_ne!(child_block, parent_block, "copy-on-write");
            let all = bits(&outs);
            let n_child = child_tokens.len() - start_child;
            prop_assert_eq!(
                all[..n_child].to_vec(),
                fresh_rows(&mut fresh, &child_tokens, start_child),
                "forked child"
            );
            prop_assert_eq!(
                all[n_child..].to_vec(),
                fresh_rows(&mut fresh, &parent_tokens, prompt.len()),
                "parent after the fork"
            );
            prompts.push(child_tokens);
            prompts.push(parent_tokens);
            seqs.push(child);
        } else {
            prompts.push(prompt);
        }
        if op.keep {
            live.extend(seqs);
        } else {
            for s in seqs {
                e.free_sequence(s).unwrap();
            }
        }
        while live.len() > 4 {
            e.free_sequence(live.remove(0)).unwrap();
        }
        e.kv().check_invariants().map_err(TestCaseError::fail)?;
    }
    for s in live {
        e.free_sequence(s).unwrap();
    }
    e.kv().check_invariants().map_err(TestCaseError::fail)?;
    prop_assert_eq!(e.free_kv_blocks(), e.total_kv_blocks());
    Ok(reused)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn cached_prefixes_give_the_logits_of_a_fresh_prefill(
        window in any::<bool>(),
        block_size in prop::sample::select(vec![1usize, 2, 4]),
        root in proptest::collection::vec(1u32..250, 1..30),
        ops in proptest::collection::vec(op(250), 1..10),
    ) {
        run_tree(window, block_size, root, ops)?;
    }
}

#[test]
fn a_fixed_tree_reuses_cached_blocks() {
    let op = |parent: usize, cut: usize, extra: &[u32], fork: bool, keep: bool| Op {
        parent,
        cut,
        extra: extra.to_vec(),
        fork: fork.then(|| (vec![5, 6], vec![7])),
        keep,
    };
    // Each prompt continues the latest one, uncut (the modulus keeps `len`).
    // The first prompt shares nothing (the root never ran); the second and third each start with
    // the first's 20 tokens, so at least 20 of each come from the cache, whatever the block size.
    let ops = vec![
        op(0, 17, &[11, 12, 13], true, false),
        op(2, 21, &[14], false, true),
        op(1, 22, &[15, 16], true, true),
    ];
    let root: Vec<u32> = (20..37).collect();
    for window in [false, true] {
        for block_size in [1, 2, 4] {
            let reused = run_tree(window, block_size, root.clone(), ops.clone()).unwrap();
            assert!(
                reused >= 40,
                "window {window}, block size {block_size}: {reused}"
            );
        }
    }
}

#[test]
fn a_shared_prefix_is_found_and_counted() {
    let w = weights(false);
    let mut e = engine(&w, 4, 40);
    let prompt: Vec<u32> = (1..=13).collect();
    let a = e.new_sequence().unwrap();
    assert_eq!(e.reuse_prefix(a, &prompt).unwrap(), 0);
    step(&mut e, a, &prompt, 0, LogitsFor::Last);
    e.free_sequence(a).unwrap();
    // 13 tokens: 3 full blocks are named and stay cached after the sequence ends.
    assert_eq!(e.kv().cached_blocks(), 3);
    assert_eq!(e.free_kv_blocks(), e.total_kv_blocks());
    let b = e.new_sequence().unwrap();
    assert_eq!(e.reuse_prefix(b, &prompt).unwrap(), 12);
    assert_eq!(
        e.reuse_prefix(b, &prompt),
        Err(mixtral::EngineError::SequenceNotEmpty { seq: b, len: 12 })
    );
    // A prompt of exactly 12 tokens reuses 2 blocks: its last token must be computed.
    let c = e.new_sequence().unwrap();
    assert_eq!(e.reuse_prefix(c, &prompt[..12]).unwrap(), 8);
    // A different first token shares nothing.
    let mut other = prompt.clone();
    other[0] = 99;
    let d = e.new_sequence().unwrap();
    assert_eq!(e.reuse_prefix(d, &other).unwrap(), 0);
    e.kv().check_invariants().unwrap();
}

#[test]
fn unused_cached_blocks_are_evicted_least_recently_used_first() {
    let w = weights(false);
    // 8 blocks of 4 tokens; each prompt of 13 tokens holds 4 blocks and names its first 3. A
    // freed sequence parks its named blocks last block first, so a chain's tail goes before its
    // head.
    let mut e = engine(&w, 4, 8);
    let prompts: Vec<Vec<u32>> = (0..3u32)
        .map(|p| (0..13).map(|i| 1 + p * 20 + i).collect())
        .collect();
    let run = |e: &mut CpuEngine, prompt: &[u32]| {
        let seq = e.new_sequence().unwrap();
        let cached = e.reuse_prefix(seq, prompt).unwrap();
        step(e, seq, prompt, cached, LogitsFor::Last);
        e.free_sequence(seq).unwrap();
        e.kv().check_invariants().unwrap();
        cached
    };
    assert_eq!(run(&mut e, &prompts[0]), 0);
    assert_eq!(run(&mut e, &prompts[1]), 0);
    // Used again: prompt 0's blocks become the most recently used.
    assert_eq!(run(&mut e, &prompts[0]), 12);
    assert_eq!(e.kv().cached_blocks(), 6);
    // Prompt 2 takes the one recycled block, the last never-used one, then the two least recently
    // used cached blocks: prompt 1's last two.
    assert_eq!(run(&mut e, &prompts[2]), 0);
    assert_eq!(run(&mut e, &prompts[0]), 12, "prompt 0 was kept");
    assert_eq!(
        run(&mut e, &prompts[1]),
        4,
        "prompt 1 kept only its first block"
    );
    assert_eq!(e.free_kv_blocks(), e.total_kv_blocks());
}

#[test]
fn the_default_pool_caches_nothing_and_reuses_freed_storage() {
    let options = CpuEngineOptions {
        max_context: Some(64),
        block_size: 4,
        ..CpuEngineOptions::default()
    };
    let mut e = CpuEngine::new(weights(false), options).unwrap();
    let prompt: Vec<u32> = (1..=13).collect();
    for round in 0..3 {
        let seq = e.new_sequence().unwrap();
        assert_eq!(e.reuse_prefix(seq, &prompt).unwrap(), 0, "round {round}");
        step(&mut e, seq, &prompt, 0, LogitsFor::Last);
        e.free_sequence(seq).unwrap();
        // Storage for 4 blocks, reused every round.
        assert_eq!(e.kv().high_water_mark(), 4);
    }
    assert_eq!(e.kv().cached_blocks(), 0);
}
