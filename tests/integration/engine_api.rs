//! The backend-independent engine API on the CPU engine of `models/tiny-mixtral`:
//! - [`open`] builds a working engine from `cpu`, and refuses a bad device string, `cuda` in a build
//!   without the `cuda` feature, and bad options, each with a typed error naming the string;
//! - the default token step ([`Engine::step_tokens`]) gives exactly the argmax of [`Engine::step`]'s
//!   logits for greedy samplers, and exactly the host sampler's draw (repetition penalty included)
//!   for the others, advancing each sampler's stream as the host draw does;
//! - a sampler count that does not match the rows is refused before anything changes.

use crate::common::numeric::argmax;
use crate::common::repo::tiny_mixtral;
use mixtral::engine::{open, Device, EngineOptions, OpenError, RowSampler};
use mixtral::sampling::{Sampler, SamplingParams};
use mixtral::{Engine, EngineError, LogitsFor, SeqId, SeqStep};

fn options() -> EngineOptions {
    EngineOptions {
        max_context: Some(64),
        max_sequences: Some(4),
        ..EngineOptions::default()
    }
}

fn cpu() -> Box<dyn Engine> {
    open("cpu", &tiny_mixtral().weights, &options(), None).expect("cpu engine")
}

/// Prompts of different lengths.
const PROMPTS: [&[u32]; 3] = [
    &[1, 415, 5565, 302],
    &[1, 22557],
    &[1, 330, 2936, 349, 1179, 28723],
];

/// A step giving each of `seqs` its prompt, logits of the last position.
fn prefill<'a>(seqs: &[SeqId]) -> Vec<SeqStep<'a>> {
    seqs.iter()
        .zip(PROMPTS)
        .map(|(&seq, tokens)| SeqStep {
            seq,
            tokens,
            start_pos: 0,
            logits: LogitsFor::Last,
        })
        .collect()
}

fn sequences(engine: &mut dyn Engine, n: usize) -> Vec<SeqId> {
    (0..n).map(|_| engine.new_sequence().unwrap()).collect()
}

#[test]
fn bad_device_strings_are_refused_naming_the_string() {
    for bad in ["tpu", "gpu", "cuda:x", "cuda:", "CPU", ""] {
        match open(bad, &tiny_mixtral().weights, &options(), None) {
            Err(OpenError::BadDevice { device }) => assert_eq!(device, bad),
            Err(other) => panic!("{bad:?}: {other}"),
            Ok(_) => panic!("{bad:?} opened an engine"),
        }
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_is_refused_naming_the_string() {
    for text in ["cuda", "cuda:0", "cuda:7"] {
        match open(text, &tiny_mixtral().weights, &options(), None) {
            Err(error @ OpenError::NoCudaSupport { .. }) => {
                let message = error.to_string();
                assert!(message.contains(text), "{message}");
                assert!(message.contains("no CUDA support"), "{message}");
            }
            Err(other) => panic!("{text}: {other}"),
            Ok(_) => panic!("{text} opened an engine without the cuda feature"),
        }
    }
}

#[test]
fn bad_options_are_the_backend_refusal_naming_the_device() {
    let bad = EngineOptions {
        block_size: Some(0),
        ..options()
    };
    match open("cpu", &tiny_mixtral().weights, &bad, None) {
        Err(OpenError::Engine {
            device,
            source: EngineError::InvalidOptions(what),
        }) => {
            assert_eq!(device, "cpu");
            assert!(what.contains("block_size"), "{what}");
        }
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("block_size 0 accepted"),
    }
}

#[test]
fn the_factory_applies_the_options() {
    let engine = cpu();
    assert_eq!(engine.max_context(), 64);
    assert_eq!(engine.config().vocab_size, tiny_mixtral().config.vocab_size);
    assert!(
        engine.describe().is_none(),
        "the CPU engine has nothing to add"
    );
    let mut engine = cpu();
    sequences(engine.as_mut(), 4);
    assert!(matches!(
        engine.new_sequence(),
        Err(EngineError::TooManySequences { limit: 4 })
    ));
    let opened =
        mixtral::engine::open_device(Device::Cpu, &tiny_mixtral().weights, &options(), None);
    assert_eq!(opened.expect("cpu").max_context(), 64);
}

#[test]
fn greedy_token_steps_are_the_argmax_of_the_logits() {
    let (mut by_logits, mut by_tokens) = (cpu(), cpu());
    let (a, b) = (
        sequences(by_logits.as_mut(), 3),
        sequences(by_tokens.as_mut(), 3),
    );
    let mut greedy: Vec<Sampler> = (0..3)
        .map(|_| Sampler::new(SamplingParams::greedy()).unwrap())
        .collect();
    let mut histories: Vec<Vec<u32>> = PROMPTS.iter().map(|p| p.to_vec()).collect();
    let out = by_logits.step(&prefill(&a)).unwrap();
    let mut rows: Vec<RowSampler<'_>> = greedy
        .iter_mut()
        .zip(&histories)
        .map(|(s, h)| RowSampler::new(s, h))
        .collect();
    let mut ids = by_tokens.step_tokens(&prefill(&b), &mut rows).unwrap();
    drop(rows);
    let expected: Vec<u32> = (0..out.len()).map(|i| argmax(out.row(i))).collect();
    assert_eq!(ids, expected, "prefill");
    for step in 0..6 {
        for (h, &id) in histories.iter_mut().zip(&ids) {
            h.push(id);
        }
        let batch = |seqs: &[SeqId]| -> Vec<SeqStep<'_>> {
            seqs.iter()
                .zip(&histories)
                .map(|(&seq, h)| SeqStep {
                    seq,
                    tokens: &h[h.len() - 1..],
                    start_pos: h.len() - 1,
                    logits: LogitsFor::Last,
                })
                .collect()
        };
        let out = by_logits.step(&batch(&a)).unwrap();
        let expected: Vec<u32> = (0..out.len()).map(|i| argmax(out.row(i))).collect();
        let mut rows: Vec<RowSampler<'_>> = greedy
            .iter_mut()
            .zip(&histories)
            .map(|(s, h)| RowSampler::new(s, h))
            .collect();
        ids = by_tokens.step_tokens(&batch(&b), &mut rows).unwrap();
        assert_eq!(ids, expected, "decode step {step}");
    }
}

#[test]
fn sampled_token_steps_are_the_host_draw() {
    let params = |seed: u64, repetition_penalty: f32| SamplingParams {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.9,
        repetition_penalty,
        seed,
    };
    // A greedy row, seeded rows with and without the repetition penalty, and an `All` entry
    // (one row per token).
    let all: &[u32] = &[1, 851, 349, 264];
    let mut samplers = vec![
        Sampler::new(SamplingParams::greedy()).unwrap(),
        Sampler::new(params(7, 1.0)).unwrap(),
        Sampler::new(params(8, 1.3)).unwrap(),
    ];
    samplers.extend((0..all.len()).map(|i| Sampler::new(params(20 + i as u64, 1.2)).unwrap()));
    let mut host = samplers.clone();
    let mut histories: Vec<&[u32]> = PROMPTS.to_vec();
    histories.extend((1..=all.len()).map(|n| &all[..n]));

    let (mut by_logits, mut by_tokens) = (cpu(), cpu());
    let build = |engine: &mut dyn Engine| {
        let seqs = sequences(engine, 4);
        let mut batch = prefill(&seqs[..3]);
        batch.push(SeqStep {
            seq: seqs[3],
            tokens: all,
            start_pos: 0,
            logits: LogitsFor::All,
        });
        batch
    };
    let batch = build(by_logits.as_mut());
    let out = by_logits.step(&batch).unwrap();
    assert_eq!(out.len(), samplers.len());
    // Row 2's history repeats the row's most likely token, so its penalty changes the draw's
    // distribution.
    let repeated = [PROMPTS[1], &[argmax(out.row(2))]].concat();
    histories[2] = &repeated;
    let expected: Vec<u32> = host
        .iter_mut()
        .zip(&histories)
        .enumerate()
        .map(|(i, (s, h))| s.sample(out.row(i), h).unwrap())
        .collect();

    let batch = build(by_tokens.as_mut());
    let mut rows: Vec<RowSampler<'_>> = samplers
        .iter_mut()
        .zip(&histories)
        .map(|(s, h)| RowSampler::new(s, h))
        .collect();
    let ids = by_tokens.step_tokens(&batch, &mut rows).unwrap();
    assert_eq!(ids, expected);
    for (i, (s, h)) in samplers.iter().zip(&host).enumerate() {
        assert_eq!(s.rng().state(), h.rng().state(), "row {i}: random stream");
    }
    // The penalty reads the history: without it row 2's distribution differs.
    let penalised = Sampler::new(params(8, 1.3)).unwrap();
    assert_ne!(
        penalised.distribution(out.row(2), histories[2]).unwrap(),
        penalised.distribution(out.row(2), &[]).unwrap(),
        "the test's history does not matter to the penalty"
    );
}

#[test]
fn a_wrong_sampler_count_changes_nothing() {
    let mut engine = cpu();
    let seqs = sequences(engine.as_mut(), 2);
    let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
    let mut one = [RowSampler::new(&mut sampler, &[])];
    let refused = engine.step_tokens(&prefill(&seqs), &mut one);
    assert_eq!(
        refused,
        Err(EngineError::SamplerCount {
            samplers: 1,
            rows: 2
        })
    );
    for &seq in &seqs {
        assert_eq!(engine.sequence_len(seq), Ok(0));
    }
    // No rows asked for: no samplers, the step applied.
    let quiet = [SeqStep {
        seq: seqs[0],
        tokens: PROMPTS[0],
        start_pos: 0,
        logits: LogitsFor::None,
    }];
    assert_eq!(engine.step_tokens(&quiet, &mut []), Ok(Vec::new()));
    assert_eq!(engine.sequence_len(seqs[0]), Ok(PROMPTS[0].len()));
}
