//! Load and cancellation on the CPU engine: 100 sequences generated together through the batched
//! API, 10 of them cancelled midway. Every survivor's greedy tokens equal what it produces alone,
//! the cancelled ones equal the prefix of theirs, and the KV pool is back to its starting size.

use mixtral::cpu::{CpuEngine, CpuEngineOptions};
use mixtral::generate::{generate, generate_batch, FinishReason, GenerateOptions};
use mixtral::Engine;
use std::ops::ControlFlow;

const SEQUENCES: usize = 100;
const NEW_TOKENS: usize = 8;
const CANCEL_AFTER: usize = 3;

#[test]
fn hundred_sequences_with_cancellations_match_each_alone() {
    let model = crate::common::repo::tiny_mixtral();
    let tokenizer = model.tokenizer.as_ref().unwrap();
    let options = CpuEngineOptions {
        max_context: Some(64),
        max_sequences: SEQUENCES,
        kv_blocks: Some(SEQUENCES * 4),
        ..Default::default()
    };
    let mut engine = CpuEngine::new(model.weights.clone(), options).unwrap();
    let free_at_start = engine.free_kv_blocks();

    // Prompts of different lengths and contents (never one repeated prompt).
    let words = [
        "river", "stone", "violet", "engine", "quiet", "harbor", "seven", "amber", "north",
        "lantern",
    ];
    let prompts: Vec<Vec<u32>> = (0..SEQUENCES)
        .map(|i| {
            let text: Vec<&str> = (0..1 + i % 7)
                .map(|j| words[(i * 3 + j * 7) % words.len()])
                .collect();
            tokenizer.encode(&text.join(" "), true).unwrap()
        })
        .collect();
    let cancelled = |i: usize| i % 10 == 3;
    let opts = GenerateOptions::greedy(NEW_TOKENS);

    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let mut seen = vec![0usize; SEQUENCES];
    let together = generate_batch(&mut engine, tokenizer, &refs, &opts, |i, _| {
        seen[i] += 1;
        if cancelled(i) && seen[i] == CANCEL_AFTER {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert_eq!(
        engine.free_kv_blocks(),
        free_at_start,
        "KV blocks leaked by the batch"
    );

    for (i, out) in together.iter().enumerate() {
        let alone = generate(&mut engine, tokenizer, &prompts[i], &opts, |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
        if cancelled(i) {
            assert_eq!(out.finish_reason, FinishReason::Cancelled, "sequence {i}");
            assert_eq!(
                out.generated_ids,
                alone.generated_ids[..CANCEL_AFTER],
                "sequence {i}"
            );
        } else {
            assert_eq!(out.generated_ids, alone.generated_ids, "sequence {i}");
            assert_eq!(out.text, alone.text, "sequence {i}");
        }
    }
    assert_eq!(
        engine.free_kv_blocks(),
        free_at_start,
        "KV blocks leaked by single runs"
    );
}
