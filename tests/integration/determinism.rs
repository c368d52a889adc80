//! Determinism of the CPU engine on `models/tiny-mixtral`:
//! - seeded sampling gives the same tokens run after run (same engine or a fresh one), and the seed
//!   matters (different seeds give different continuations);
//! - a sequence's tokens (greedy and seeded) do not depend on which other sequences share its
//!   batches, nor on their order, lengths or early exits;
//! - a sequence's logits are bitwise identical whether computed alone or batched, with 1, 2 or 3
//!   rayon threads, prefilled in one step or fed one token per step.

use crate::common::repo::tiny_mixtral;
use mixtral::cpu::{CpuEngine, CpuEngineOptions};
use mixtral::generate::{generate, generate_batch, GenerateOptions, GenerationOutput};
use mixtral::sampling::SamplingParams;
use mixtral::tokenizer::Tokenizer;
use mixtral::{Engine, LogitsFor, SeqStep};
use std::ops::ControlFlow;

const NEW_TOKENS: usize = 16;

fn tokenizer() -> &'static Tokenizer {
    tiny_mixtral().tokenizer.as_ref().unwrap()
}

fn engine() -> CpuEngine {
    let options = CpuEngineOptions {
        max_context: Some(128),
        max_sequences: 16,
        ..Default::default()
    };
    CpuEngine::new(tiny_mixtral().weights.clone(), options).unwrap()
}

fn encode(text: &str) -> Vec<u32> {
    tokenizer().encode(text, true).unwrap()
}

/// Temperature sampling with every filter on.
fn seeded(seed: u64) -> GenerateOptions {
    GenerateOptions::greedy(NEW_TOKENS).with_sampling(SamplingParams {
        temperature: 0.9,
        top_k: 50,
        top_p: 0.95,
        repetition_penalty: 1.1,
        seed,
    })
}

/// A batch of prompts, the index of the target in it, and after how many tokens its neighbours
/// are cancelled (`None`: never).
type Batch<'a> = (Vec<&'a [u32]>, usize, Option<usize>);

fn alone(engine: &mut CpuEngine, prompt: &[u32], options: &GenerateOptions) -> GenerationOutput {
    generate(engine, tokenizer(), prompt, options, |_| {
        ControlFlow::Continue(())
    })
    .unwrap()
}

#[test]
fn seeded_sampling_repeats_run_after_run() {
    let prompt = encode("Once upon a time, in a small village by the sea,");
    let options = seeded(1234);
    let mut engine_a = engine();
    let first = alone(&mut engine_a, &prompt, &options);
    assert_eq!(first.generated_ids.len(), NEW_TOKENS);
    let again = alone(&mut engine_a, &prompt, &options);
    let fresh = alone(&mut engine(), &prompt, &options);
    assert_eq!(again.generated_ids, first.generated_ids);
    assert_eq!(again.text, first.text);
    assert_eq!(fresh.generated_ids, first.generated_ids);
    assert_eq!(fresh.text, first.text);

    // The seed is used: several seeds do not all give the same continuation.
    let distinct: std::collections::BTreeSet<Vec<u32>> = (1..=4)
        .map(|seed| alone(&mut engine_a, &prompt, &seeded(seed)).generated_ids)
        .collect();
    assert!(
        distinct.len() > 1,
        "four seeds gave one continuation: sampling ignores the seed"
    );
}

#[test]
fn tokens_do_not_depend_on_batch_neighbours() {
    let target = encode("The capital of France is");
    let neighbours = [
        encode("A"),
        encode("river stone violet engine quiet harbor seven amber north lantern"),
        encode("1 2 3 4 5"),
        encode("Why is the sky blue? Because"),
    ];
    for options in [GenerateOptions::greedy(NEW_TOKENS), seeded(99)] {
        let mut engine = engine();
        let reference = alone(&mut engine, &target, &options);
        let batches: Vec<Batch<'_>> = vec![
            (vec![&target, &neighbours[0], &neighbours[1]], 0, None),
            (vec![&neighbours[2], &target], 1, None),
            (
                vec![
                    &neighbours[3],
                    &neighbours[1],
                    &neighbours[0],
                    &target,
                    &neighbours[2],
                ],
                3,
                Some(2),
            ),
            (vec![&neighbours[1], &target, &neighbours[3]], 1, Some(5)),
        ];
        for (batch, at, cancel_after) in batches {
            let mut seen = vec![0usize; batch.len()];
            let outputs = generate_batch(&mut engine, tokenizer(), &batch, &options, |i, _| {
                seen[i] += 1;
                match cancel_after {
                    Some(n) if i != at && seen[i] == n => ControlFlow::Break(()),
                    _ => ControlFlow::Continue(()),
                }
            })
            .unwrap();
            assert_eq!(
                outputs[at].generated_ids,
                reference.generated_ids,
                "sampling {:?}, batch of {} with the target at {at}",
                options.sampling,
                batch.len()
            );
            assert_eq!(outputs[at].text, reference.text);
        }
    }
}

/// Logits rows of `target` (one per position, as f32 bits), computed in an engine built inside a
/// rayon pool of `threads` threads. With `neighbours`, every step also carries those sequences
/// (prefilled together with the target, or each decoding alongside it). `prefill_at_once` feeds the
/// whole prompt in one step; otherwise one token per step.
fn target_logits(
    target: &[u32],
    neighbours: &[Vec<u32>],
    threads: usize,
    prefill_at_once: bool,
) -> Vec<Vec<u32>> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let mut engine = engine();
        let target_seq = engine.new_sequence().unwrap();
        let others: Vec<_> = neighbours
            .iter()
            .map(|_| engine.new_sequence().unwrap())
            .collect();
        // The target goes in the middle of the batch when there are neighbours.
        let place = neighbours.len() / 2;
        let mut rows = Vec::new();
        let chunks: Vec<(usize, usize)> = if prefill_at_once {
            vec![(0, target.len())]
        } else {
            (0..target.len()).map(|p| (p, p + 1)).collect()
        };
        for (begin, end) in chunks {
            let mut batch: Vec<SeqStep<'_>> = Vec::new();
            for (seq, tokens) in others.iter().zip(neighbours) {
                // Each neighbour advances by its own chunk of up to 3 tokens while it has any.
                let done = engine.sequence_len(*seq).unwrap();
                if done < tokens.len() {
                    batch.push(SeqStep {
                        seq: *seq,
                        tokens: &tokens[done..(done + 3).min(tokens.len())],
                        start_pos: done,
                        logits: LogitsFor::All,
                    });
                }
            }
            let at = place.min(batch.len());
            batch.insert(
                at,
                SeqStep {
                    seq: target_seq,
                    tokens: &target[begin..end],
                    start_pos: begin,
                    logits: LogitsFor::All,
                },
            );
            let out = engine.step(&batch).unwrap();
            for (i, &(entry, position)) in out.rows.iter().enumerate() {
                if entry == at {
                    assert_eq!(position, rows.len());
                    rows.push(out.row(i).iter().map(|v| v.to_bits()).collect());
                }
            }
        }
        assert_eq!(rows.len(), target.len());
        rows
    })
}

#[test]
fn logits_are_bitwise_independent_of_batch_threads_and_chunking() {
    let target = encode("Seven amber lanterns hung over the quiet northern harbor");
    let neighbours = [
        encode("Hello"),
        encode("river stone violet engine quiet harbor seven amber north lantern river stone"),
        encode("Why is the sky blue?"),
    ];
    let reference = target_logits(&target, &[], 1, true);
    // Not a constant row: the comparison below could fail.
    assert!(reference[0] != reference[1]);
    for threads in [1, 2, 3] {
        for (with_neighbours, at_once) in
            [(false, true), (true, true), (false, false), (true, false)]
        {
            let others = if with_neighbours {
                &neighbours[..]
            } else {
                &[]
            };
            let rows = target_logits(&target, others, threads, at_once);
            for (position, (got, want)) in rows.iter().zip(&reference).enumerate() {
                assert!(
                    got == want,
                    "position {position} differs with {threads} threads, neighbours: \
                     {with_neighbours}, prefill in one step: {at_once}"
                );
            }
        }
    }
}
