//! The CPU engine end to end on seeded random tiny checkpoints (top-2 MoE, top-2 with a sliding
//! window shorter than the sequences, top-1 in bf16, dense Mistral): incremental decode and
//! random chunkings agree with one full forward; the paged cache gives the same logits for every
//! block size; a batch of sequences equals each sequence alone; refused steps change nothing;
//! rewinding recomputes; the pool returns to full.

use mixtral::cpu::{CpuEngine, CpuEngineOptions};
use mixtral::dtype::DType;
use mixtral::random_model::{write_random_model, RandomModelSpec};
use mixtral::weights::ModelWeights;
use mixtral::{Engine, EngineError, LoadOptions, LogitsFor, Model, SeqId, SeqStep, StepOutput};
use proptest::prelude::*;
use serde_json::json;
use std::path::Path;
use std::sync::{Arc, OnceLock};

const REL_L2: f64 = 1e-5;

/// The test models, written once per run under cargo's temporary directory.
fn models() -> &'static [(&'static str, Arc<ModelWeights>)] {
    static MODELS: OnceLock<Vec<(&'static str, Arc<ModelWeights>)>> = OnceLock::new();
    MODELS.get_or_init(|| {
        let specs = [
            ("top2", RandomModelSpec::tiny(1)),
            (
                "top2-window5",
                RandomModelSpec::tiny(2).with("sliding_window", 5),
            ),
            (
                "top1-bf16",
                RandomModelSpec::tiny(3)
                    .with("num_experts_per_tok", 1)
                    .with_dtype(DType::BF16),
            ),
            (
                "dense",
                RandomModelSpec::tiny(4)
                    .with("architectures", json!(["MistralForCausalLM"]))
                    .with("model_type", "mistral")
                    .without("num_local_experts")
                    .without("num_experts_per_tok"),
            ),
        ];
        specs
            .into_iter()
            .map(|(name, spec)| {
                let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
                    .join("cpu_engine")
                    .join(name);
                write_random_model(&dir, &spec).expect("write model");
                let model = Model::load(&dir, &LoadOptions::default()).expect("load model");
                (name, model.weights.clone())
            })
            .collect()
    })
}

fn model(name: &str) -> Arc<ModelWeights> {
    models()
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, w)| w.clone())
        .unwrap()
}

fn engine(weights: &Arc<ModelWeights>, block_size: usize, kv_blocks: Option<usize>) -> CpuEngine {
    let options = CpuEngineOptions {
        max_context: Some(64),
        block_size,
        kv_blocks,
        max_sequences: 8,
    };
    CpuEngine::new(weights.clone(), options).expect("engine")
}

/// Pseudo-random token ids below `vocab` (never constant).
fn tokens(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

fn step_one(engine: &mut CpuEngine, seq: SeqId, toks: &[u32], start: usize) -> StepOutput {
    engine
        .step(&[SeqStep {
            seq,
            tokens: toks,
            start_pos: start,
            logits: LogitsFor::All,
        }])
        .unwrap()
}

/// Feeds `toks` to a new sequence in chunks of the given sizes (the rest as one last chunk),
/// returning every position's logits row.
fn run_chunked(engine: &mut CpuEngine, toks: &[u32], chunks: &[usize]) -> Vec<Vec<f32>> {
    let seq = engine.new_sequence().unwrap();
    let mut rows = Vec::new();
    let mut start = 0;
    let mut sizes = chunks.iter().copied().chain(std::iter::once(usize::MAX));
    while start < toks.len() {
        let n = sizes.next().unwrap().clamp(1, toks.len() - start);
        let out = step_one(engine, seq, &toks[start..start + n], start);
        assert_eq!(out.len(), n);
        for i in 0..n {
            assert_eq!(out.rows[i], (0, start + i));
            rows.push(out.row(i).to_vec());
        }
        start += n;
    }
    assert_eq!(engine.sequence_len(seq), Ok(toks.len()));
    engine.free_sequence(seq).unwrap();
    rows
}

fn rel_l2(a: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(a.len(), reference.len());
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&x, &r) in a.iter().zip(reference) {
        assert!(x.is_finite() && r.is_finite(), "non-finite logit");
        diff += (x as f64 - r as f64).powi(2);
        norm += (r as f64).powi(2);
    }
    (diff / norm).sqrt()
}

fn assert_close(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: row count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = rel_l2(g, w);
        assert!(err <= REL_L2, "{what}: row {i} relative L2 {err:e}");
    }
}

#[test]
fn logits_are_peaked_and_differ_between_positions() {
    // Guards the other tests against vacuous agreement (e.g. all-equal rows).
    for (name, weights) in models() {
        let mut e = engine(weights, 4, None);
        let toks = tokens(9, 12, weights.config.vocab_size);
        let rows = run_chunked(&mut e, &toks, &[]);
        for pair in rows.windows(2) {
            assert!(
                rel_l2(&pair[0], &pair[1]) > 0.1,
                "{name}: adjacent rows alike"
            );
        }
        let spread = rows[0].iter().fold(f32::MIN, |m, &x| m.max(x))
            - rows[0].iter().fold(f32::MAX, |m, &x| m.min(x));
        assert!(spread > 1.0, "{name}: flat logits");
    }
}

#[test]
fn prefill_then_one_token_at_a_time_equals_the_full_forward() {
    for (name, weights) in models() {
        let mut e = engine(weights, 4, None);
        let toks = tokens(17, 30, weights.config.vocab_size);
        let full = run_chunked(&mut e, &toks, &[]);
        let mut chunks = vec![1; 30];
        for prefill in [1, 9] {
            chunks[0] = prefill;
            let incremental = run_chunked(&mut e, &toks, &chunks);
            assert_close(&incremental, &full, name);
        }
        assert_eq!(e.free_kv_blocks(), e.total_kv_blocks());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn random_chunkings_equal_the_full_forward(
        which in 0usize..4, len in 1usize..40, seed in any::<u64>(),
        chunks in prop::collection::vec(1usize..9, 0..40), block_size in 1usize..7
    ) {
        let (name, weights) = &models()[which];
        let mut e = engine(weights, block_size, None);
        let toks = tokens(seed, len, weights.config.vocab_size);
        let full = run_chunked(&mut e, &toks, &[]);
        let chunked = run_chunked(&mut e, &toks, &chunks);
        assert_close(&chunked, &full, name);
    }
}

#[test]
fn every_block_size_gives_the_logits_of_a_contiguous_cache() {
    for (name, weights) in models() {
        let toks = tokens(23, 40, weights.config.vocab_size);
        let chunks = [7, 1, 1, 13, 2, 1];
        let contiguous = run_chunked(&mut engine(weights, 64, None), &toks, &chunks);
        for block_size in [1, 3, 16] {
            let mut e = engine(weights, block_size, None);
            // Interleave another sequence so this one's blocks are not consecutive.
            let other = e.new_sequence().unwrap();
            step_one(&mut e, other, &toks[..5], 0);
            let paged = run_chunked(&mut e, &toks, &chunks);
            assert_eq!(paged, contiguous, "{name}: block size {block_size}");
        }
    }
}

#[test]
fn a_batch_equals_each_sequence_alone() {
    for (name, weights) in models() {
        let vocab = weights.config.vocab_size;
        let prompts: Vec<Vec<u32>> = (0..4)
            .map(|i| tokens(40 + i, 3 + 5 * i as usize, vocab))
            .collect();
        let decoded: Vec<Vec<u32>> = (0..4).map(|i| tokens(50 + i, 4, vocab)).collect();

        // Alone: each sequence in its own engine.
        let alone: Vec<Vec<Vec<f32>>> = (0..4)
            .map(|i| {
                let all = [prompts[i].clone(), decoded[i].clone()].concat();
                run_chunked(
                    &mut engine(weights, 4, None),
                    &all,
                    &[prompts[i].len(), 1, 1, 1, 1],
                )
            })
            .collect();

        // Together: one prefill step for all four, then one decode step per token for all.
        let mut e = engine(weights, 4, None);
        let seqs: Vec<SeqId> = (0..4).map(|_| e.new_sequence().unwrap()).collect();
        let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 4];
        let batch: Vec<SeqStep<'_>> = (0..4)
            .map(|i| SeqStep {
                seq: seqs[i],
                tokens: &prompts[i],
                start_pos: 0,
                logits: LogitsFor::All,
            })
            .collect();
        let out = e.step(&batch).unwrap();
        for (r, &(b, pos)) in out.rows.iter().enumerate() {
            assert_eq!(pos, got[b].len());
            got[b].push(out.row(r).to_vec());
        }
        for t in 0..4 {
            // Batch order reversed, to show the order does not matter either.
            let batch: Vec<SeqStep<'_>> = (0..4)
                .rev()
                .map(|i| SeqStep {
                    seq: seqs[i],
                    tokens: &decoded[i][t..t + 1],
                    start_pos: prompts[i].len() + t,
                    logits: LogitsFor::Last,
                })
                .collect();
            let out = e.step(&batch).unwrap();
            assert_eq!(out.len(), 4);
            for (r, &(b, pos)) in out.rows.iter().enumerate() {
                let i = 3 - b;
                assert_eq!(pos, prompts[i].len() + t);
                got[i].push(out.row(r).to_vec());
            }
        }
        for i in 0..4 {
            assert_eq!(got[i], alone[i], "{name}: sequence {i}");
        }
    }
}

#[test]
fn mixed_prefill_and_decode_in_one_step_equals_separate_steps() {
    let weights = model("top2");
    let vocab = weights.config.vocab_size;
    let a = tokens(61, 12, vocab);
    let b = tokens(62, 9, vocab);
    let mut e = engine(&weights, 4, None);
    let (sa, sb) = (e.new_sequence().unwrap(), e.new_sequence().unwrap());
    step_one(&mut e, sa, &a[..10], 0);
    let out = e
        .step(&[
            SeqStep {
                seq: sb,
                tokens: &b,
                start_pos: 0,
                logits: LogitsFor::Last,
            },
            SeqStep {
                seq: sa,
                tokens: &a[10..11],
                start_pos: 10,
                logits: LogitsFor::None,
            },
            SeqStep {
                seq: sa,
                tokens: &a[11..],
                start_pos: 11,
                logits: LogitsFor::All,
            },
        ])
        .map(|_| ());
    assert_eq!(out, Err(EngineError::DuplicateSequence(sa)));
    let out = e
        .step(&[
            SeqStep {
                seq: sb,
                tokens: &b,
                start_pos: 0,
                logits: LogitsFor::Last,
            },
            SeqStep {
                seq: sa,
                tokens: &a[10..],
                start_pos: 10,
                logits: LogitsFor::None,
            },
        ])
        .unwrap();
    assert_eq!(out.rows, vec![(0, 8)]);
    let ref_b = run_chunked(&mut engine(&weights, 4, None), &b, &[]);
    assert_eq!(out.row(0), &ref_b[8][..]);
    let next = step_one(&mut e, sa, &a[11..], 11);
    let ref_a = run_chunked(&mut engine(&weights, 4, None), &a, &[]);
    assert_eq!(next.row(0), &ref_a[11][..]);
}

#[test]
fn rewinding_recomputes_from_the_new_start() {
    for (name, weights) in models() {
        let vocab = weights.config.vocab_size;
        let first = tokens(71, 20, vocab);
        let second = tokens(72, 9, vocab);
        let mut e = engine(weights, 3, None);
        let seq = e.new_sequence().unwrap();
        step_one(&mut e, seq, &first, 0);
        let blocks_long = e.total_kv_blocks() - e.free_kv_blocks();
        // Rewind to 8 tokens and continue differently.
        let out = step_one(&mut e, seq, &second[..3], 8);
        assert_eq!(e.sequence_len(seq), Ok(11));
        assert!(e.total_kv_blocks() - e.free_kv_blocks() < blocks_long);
        let out2 = step_one(&mut e, seq, &second[3..], 11);
        let expected_tokens = [&first[..8], &second[..]].concat();
        let reference = run_chunked(&mut engine(weights, 3, None), &expected_tokens, &[]);
        let got: Vec<Vec<f32>> = (0..out.len())
            .map(|i| out.row(i).to_vec())
            .chain((0..out2.len()).map(|i| out2.row(i).to_vec()))
            .collect();
        assert_close(&got, &reference[8..], name);
    }
}

#[test]
fn refused_steps_change_nothing_and_others_continue_identically() {
    // The block counts below assume every block stays held; the windowed model releases blocks
    // that fall out of its window (tested in `a_sliding_window_releases_blocks_it_no_longer_sees`).
    for (name, weights) in models().iter().filter(|(n, _)| !n.contains("window")) {
        let vocab = weights.config.vocab_size;
        let a = tokens(81, 16, vocab);
        let b = tokens(82, 16, vocab);
        // Blocks of 4 tokens, 6 in the pool: a and b start with 8 tokens (2 blocks each).
        let options = CpuEngineOptions {
            max_context: Some(16),
            block_size: 4,
            kv_blocks: Some(6),
            max_sequences: 2,
        };
        let mut e = CpuEngine::new(weights.clone(), options).unwrap();
        let (sa, sb) = (e.new_sequence().unwrap(), e.new_sequence().unwrap());
        step_one(&mut e, sa, &a[..8], 0);
        step_one(&mut e, sb, &b[..8], 0);
        assert_eq!(e.free_kv_blocks(), 2);
        assert_eq!(
            e.new_sequence(),
            Err(EngineError::TooManySequences { limit: 2 })
        );

        let bad = [vocab as u32];
        let step = |seq, tokens, start_pos| SeqStep {
            seq,
            tokens,
            start_pos,
            logits: LogitsFor::All,
        };
        let refusals: Vec<(Vec<SeqStep<'_>>, EngineError)> = vec![
            (
                vec![step(sa, &a[8..9], 8), step(sb, &bad, 8)],
                EngineError::TokenOutOfRange {
                    token: vocab as u32,
                    vocab,
                },
            ),
            (
                vec![step(sb, &b[8..9], 8), step(sa, &b[..9], 8)],
                EngineError::ContextOverflow {
                    seq: sa,
                    needed: 17,
                    max_context: 16,
                },
            ),
            (
                // a grows to 16 tokens (+2 blocks), b to 9 (+1 block): 3 needed, 2 free.
                vec![step(sa, &a[8..16], 8), step(sb, &b[8..9], 8)],
                EngineError::KvCacheFull {
                    seq: sb,
                    needed: 3,
                    free: 2,
                },
            ),
            (
                vec![step(sa, &a[8..9], 8), step(SeqId(999), &a[..1], 0)],
                EngineError::UnknownSequence(SeqId(999)),
            ),
            (
                vec![step(sb, &b[8..9], 8), step(sb, &b[8..9], 8)],
                EngineError::DuplicateSequence(sb),
            ),
            (
                vec![step(sa, &a[8..9], 8), step(sb, &b[9..10], 9)],
                EngineError::BadStartPosition {
                    seq: sb,
                    cached: 8,
                    start_pos: 9,
                },
            ),
            (
                vec![step(sa, &a[8..9], 8), step(sb, &[], 8)],
                EngineError::EmptyStep(sb),
            ),
        ];
        for (batch, want) in refusals {
            assert_eq!(e.step(&batch).map(|_| ()), Err(want), "{name}");
            assert_eq!(e.sequence_len(sa), Ok(8));
            assert_eq!(e.sequence_len(sb), Ok(8));
            assert_eq!(e.free_kv_blocks(), 2);
        }
        // Both continue, in one batch, exactly as in a fresh engine that saw no refusals.
        let out = e
            .step(&[step(sa, &a[8..9], 8), step(sb, &b[8..9], 8)])
            .unwrap();
        let ref_a = run_chunked(&mut engine(weights, 4, None), &a[..9], &[]);
        let ref_b = run_chunked(&mut engine(weights, 4, None), &b[..9], &[]);
        assert_eq!(out.row(0), &ref_a[8][..], "{name}");
        assert_eq!(out.row(1), &ref_b[8][..], "{name}");
        assert_eq!(e.free_kv_blocks(), 0);
        // The pool is exhausted; a rewind inside owned blocks still works.
        let more = e.step(&[step(sa, &a[9..13], 9)]);
        assert_eq!(
            more.map(|_| ()),
            Err(EngineError::KvCacheFull {
                seq: sa,
                needed: 1,
                free: 0
            })
        );
        let again = step_one(&mut e, sa, &a[7..9], 7);
        assert_eq!(again.row(1), &ref_a[8][..], "{name}");
        e.free_sequence(sa).unwrap();
        e.free_sequence(sb).unwrap();
        assert_eq!(e.free_kv_blocks(), e.total_kv_blocks());
        assert_eq!(e.free_sequence(sa), Err(EngineError::UnknownSequence(sa)));
    }
}

#[test]
fn options_are_checked_and_a_default_pool_costs_nothing_until_used() {
    let weights = model("top2");
    let bad = CpuEngineOptions {
        block_size: 0,
        ..Default::default()
    };
    assert!(matches!(
        CpuEngine::new(weights.clone(), bad),
        Err(EngineError::InvalidOptions(_))
    ));
    let overflow = CpuEngineOptions {
        max_context: Some(usize::MAX),
        block_size: 1,
        ..Default::default()
    };
    assert!(matches!(
        CpuEngine::new(weights.clone(), overflow),
        Err(EngineError::InvalidOptions(_))
    ));
    // Default: the model's full context for 256 sequences, as bookkeeping only.
    let mut e = CpuEngine::new(weights.clone(), CpuEngineOptions::default()).unwrap();
    let context = weights.config.max_position_embeddings;
    assert_eq!(e.max_context(), context);
    assert_eq!(e.total_kv_blocks(), 256 * context.div_ceil(16));
    let seq = e.new_sequence().unwrap();
    let toks = tokens(91, 20, weights.config.vocab_size);
    let out = step_one(&mut e, seq, &toks, 0);
    assert_eq!(out.len(), 20);
    assert_eq!(e.kv().high_water_mark(), 2);
    let none = e
        .step(&[SeqStep {
            seq,
            tokens: &toks[..3],
            start_pos: 20,
            logits: LogitsFor::None,
        }])
        .unwrap();
    assert!(none.is_empty() && none.logits.is_empty());
    assert_eq!(e.sequence_len(seq), Ok(23));
    assert_eq!(
        e.step(&[]),
        Ok(StepOutput {
            vocab: 256,
            ..Default::default()
        })
    );
}

#[test]
fn a_sliding_window_releases_blocks_it_no_longer_sees() {
    let weights = model("top2-window5");
    let vocab = weights.config.vocab_size;
    let toks = tokens(93, 40, vocab);
    // Blocks of 2 tokens: a query at position p sees keys p - 4 ..= p, so before the step at p
    // the blocks wholly below p - 4 are released and a sequence holds at most 4 blocks.
    let mut e = engine(&weights, 2, Some(8));
    let seq = e.new_sequence().unwrap();
    let mut rows = Vec::new();
    for p in 0..toks.len() {
        let out = step_one(&mut e, seq, &toks[p..p + 1], p);
        rows.push(out.row(0).to_vec());
        let held = e.kv().block_table(seq).unwrap().iter();
        let held = held.filter(|&&b| b != mixtral::kv::RELEASED).count();
        assert!(held <= 4, "position {p}: {held} blocks held");
        e.kv().check_invariants().unwrap();
    }
    assert!(e.free_kv_blocks() >= 4);
    // 40 tokens ran through a pool of 16 token slots, with the logits of a whole prefill.
    let reference = run_chunked(&mut engine(&weights, 2, None), &toks, &[]);
    assert_close(&rows, &reference, "top2-window5");
    // Rewinding to where released blocks would be needed is refused, changing nothing.
    let refused = e.step(&[SeqStep {
        seq,
        tokens: &toks[10..11],
        start_pos: 10,
        logits: LogitsFor::Last,
    }]);
    assert!(
        matches!(refused, Err(EngineError::WindowReleased { seq: s, start_pos: 10, .. }) if s == seq),
        "{refused:?}"
    );
    assert_eq!(e.sequence_len(seq), Ok(40));
    e.free_sequence(seq).unwrap();
    assert_eq!(e.free_kv_blocks(), e.total_kv_blocks());
}
