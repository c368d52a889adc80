//! The generation loop and perplexity over a deterministic fake engine (logits a seeded function of
//! the last token and its position, optionally with a scripted token made certain), with the real
//! Mixtral tokenizer of `models/tiny-mixtral`.

use crate::common::numeric::argmax;
use mixtral::config::ModelConfig;
use mixtral::engine::{Engine, EngineError, LogitsFor, SeqId, SeqStep, StepOutput};
use mixtral::generate::{
    generate, generate_batch, perplexity, perplexity_chunked, FinishReason, GenerateError,
    GenerateOptions, GenerationOutput, TokenEvent,
};
use mixtral::sampling::SamplingParams;
use mixtral::tokenizer::Tokenizer;
use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;

const VOCAB: usize = 32000;
const EOS: u32 = 2;

fn model_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-mixtral"))
}

/// The tokenizer of `models/tiny-mixtral`, loaded once.
fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
    TOKENIZER
        .get_or_init(|| Tokenizer::from_dir(model_dir()).expect("tokenizer of models/tiny-mixtral"))
}

/// splitmix64 of a value: the fake engine's hash.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The fake model: logits in [-4, 4) seeded by the token and its position.
fn fake_logits(token: u32, position: usize) -> Vec<f32> {
    let seed = mix(((token as u64) << 32) ^ position as u64);
    (0..VOCAB as u64)
        .map(|i| (mix(seed ^ i) >> 40) as f32 / (1u64 << 24) as f32 * 8.0 - 4.0)
        .collect()
}

/// A deterministic engine with the [`Engine`] contract's bookkeeping.
struct FakeEngine {
    config: ModelConfig,
    max_context: usize,
    sequences: BTreeMap<SeqId, Vec<u32>>,
    next_seq: u64,
    created: usize,
    /// Every step: for each entry, (tokens, start position, logits asked for).
    steps: Vec<Vec<(Vec<u32>, usize, LogitsFor)>>,
    /// `script[i]` is made certain as the token at position `script_start + i`.
    script: Vec<u32>,
    script_start: usize,
    /// The step (0-based) that fails with a backend error.
    fail_at_step: Option<usize>,
    /// The step (0-based) whose logits get a NaN.
    nan_at_step: Option<usize>,
}

impl FakeEngine {
    fn new(max_context: usize) -> Self {
        let text = std::fs::read_to_string(model_dir().join("config.json")).unwrap();
        let config = ModelConfig::from_json_str(&text, &model_dir().join("config.json")).unwrap();
        assert_eq!(config.vocab_size, VOCAB);
        FakeEngine {
            config,
            max_context,
            sequences: BTreeMap::new(),
            next_seq: 0,
            created: 0,
            steps: Vec::new(),
            script: Vec::new(),
            script_start: 0,
            fail_at_step: None,
            nan_at_step: None,
        }
    }

    /// Makes the tokens after a prompt of `prompt_len` tokens follow `script`.
    fn scripted(mut self, prompt_len: usize, script: &[u32]) -> Self {
        self.script = script.to_vec();
        self.script_start = prompt_len;
        self
    }

    /// The logits this engine gives at `position` (whose token is `token`).
    fn logits_at(&self, token: u32, position: usize) -> Vec<f32> {
        let mut row = fake_logits(token, position);
        let scripted = (position + 1)
            .checked_sub(self.script_start)
            .and_then(|i| self.script.get(i));
        if let Some(&target) = scripted {
            row[target as usize] = 50.0;
        }
        row
    }
}

impl Engine for FakeEngine {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn max_context(&self) -> usize {
        self.max_context
    }

    fn new_sequence(&mut self) -> Result<SeqId, EngineError> {
        let seq = SeqId(self.next_seq);
        self.next_seq += 1;
        self.created += 1;
        self.sequences.insert(seq, Vec::new());
        Ok(seq)
    }

    fn free_sequence(&mut self, seq: SeqId) -> Result<(), EngineError> {
        self.sequences
            .remove(&seq)
            .map(|_| ())
            .ok_or(EngineError::UnknownSequence(seq))
    }

    fn sequence_len(&self, seq: SeqId) -> Result<usize, EngineError> {
        self.sequences
            .get(&seq)
            .map(Vec::len)
            .ok_or(EngineError::UnknownSequence(seq))
    }

    fn free_kv_blocks(&self) -> usize {
        0
    }

    fn total_kv_blocks(&self) -> usize {
        0
    }

    fn step(&mut self, batch: &[SeqStep<'_>]) -> Result<StepOutput, EngineError> {
        let index = self.steps.len();
        self.steps.push(
            batch
                .iter()
                .map(|s| (s.tokens.to_vec(), s.start_pos, s.logits))
                .collect(),
        );
        if self.fail_at_step == Some(index) {
            return Err(EngineError::backend("injected failure"));
        }
        // Check every entry before changing anything.
        for (k, step) in batch.iter().enumerate() {
            if batch[..k].iter().any(|s| s.seq == step.seq) {
                return Err(EngineError::DuplicateSequence(step.seq));
            }
            if step.tokens.is_empty() {
                return Err(EngineError::EmptyStep(step.seq));
            }
            if let Some(&token) = step.tokens.iter().find(|&&t| t as usize >= VOCAB) {
                return Err(EngineError::TokenOutOfRange {
                    token,
                    vocab: VOCAB,
                });
            }
            let cached = self.sequence_len(step.seq)?;
            if step.start_pos > cached {
                return Err(EngineError::BadStartPosition {
                    seq: step.seq,
                    cached,
                    start_pos: step.start_pos,
                });
            }
            let needed = step.start_pos + step.tokens.len();
            if needed > self.max_context {
                return Err(EngineError::ContextOverflow {
                    seq: step.seq,
                    needed,
                    max_context: self.max_context,
                });
            }
        }
        let mut out = StepOutput {
            vocab: VOCAB,
            ..Default::default()
        };
        for (k, step) in batch.iter().enumerate() {
            let cached = self.sequences.get_mut(&step.seq).unwrap();
            cached.truncate(step.start_pos);
            cached.extend_from_slice(step.tokens);
            let end = step.start_pos + step.tokens.len();
            let positions: Vec<usize> = match step.logits {
                LogitsFor::None => vec![],
                LogitsFor::Last => vec![end - 1],
                LogitsFor::All => (step.start_pos..end).collect(),
            };
            for p in positions {
                let token = step.tokens[p - step.start_pos];
                out.logits.extend(self.logits_at(token, p));
                out.rows.push((k, p));
            }
        }
        if self.nan_at_step == Some(index) {
            out.logits[7] = f32::NAN;
        }
        Ok(out)
    }
}

/// Runs `generate`, collecting the events.
fn run(
    engine: &mut FakeEngine,
    prompt: &[u32],
    options: &GenerateOptions,
    mut cancel_at: Option<usize>,
) -> (Result<GenerationOutput, GenerateError>, Vec<TokenEvent>) {
    let tokenizer = tokenizer();
    let mut events = Vec::new();
    let result = generate(engine, tokenizer, prompt, options, |event| {
        events.push(event.clone());
        if cancel_at.take_if(|&mut i| i == event.index).is_some() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    (result, events)
}

fn prompt(tokenizer: &Tokenizer) -> Vec<u32> {
    tokenizer.encode("Once upon a time", true).unwrap()
}

/// Text the tokenizer gives `ids` after `prompt`.
fn continuation(tokenizer: &Tokenizer, prompt: &[u32], ids: &[u32]) -> String {
    let all: Vec<u32> = prompt.iter().chain(ids).copied().collect();
    let full = tokenizer.decode(&all).unwrap();
    let head = tokenizer.decode(prompt).unwrap();
    full.strip_prefix(&head).unwrap().to_string()
}

fn joined(events: &[TokenEvent]) -> String {
    events.iter().map(|e| e.text.as_str()).collect()
}

#[test]
fn greedy_follows_the_argmax_of_each_position_and_stops_at_max_tokens() {
    let tokenizer = tokenizer();
    let prompt = prompt(tokenizer);
    let mut engine = FakeEngine::new(64);
    let (out, events) = run(&mut engine, &prompt, &GenerateOptions::greedy(6), None);
    let out = out.unwrap();

    let mut expected = Vec::new();
    let mut last = *prompt.last().unwrap();
    for position in prompt.len() - 1..prompt.len() + 5 {
        last = argmax(&fake_logits(last, position));
        expected.push(last);
    }
    assert_eq!(out.generated_ids, expected);
    assert_eq!(out.prompt_ids, prompt);
    assert_eq!(out.finish_reason, FinishReason::Length);
    assert_eq!(out.decode_steps, 5);
    assert_eq!(out.text, continuation(tokenizer, &prompt, &expected));
    assert_eq!(joined(&events), out.text);
    let ids: Vec<u32> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids, expected);
    assert!(events.iter().enumerate().all(|(i, e)| e.index == i));

    // One prefill step of the whole prompt, then one token per step at its position.
    assert_eq!(engine.steps.len(), 6);
    assert_eq!(engine.steps[0], [(prompt.clone(), 0, LogitsFor::Last)]);
    for (k, step) in engine.steps[1..].iter().enumerate() {
        assert_eq!(
            *step,
            [(vec![expected[k]], prompt.len() + k, LogitsFor::Last)]
        );
    }
    assert!(engine.sequences.is_empty(), "sequence not freed");
}

#[test]
fn eos_ends_generation_and_is_kept_in_ids_but_not_in_text() {
    let tokenizer = tokenizer();
    let prompt = prompt(tokenizer);
    let words = tokenizer.encode("Hello world", false).unwrap();
    let mut script = words.clone();
    script.push(EOS);
    script.push(words[0]);
    let mut engine = FakeEngine::new(64).scripted(prompt.len(), &script);
    let options = GenerateOptions::greedy(10).with_eos(&[EOS]);
    let (out, events) = run(&mut engine, &prompt, &options, None);
    let out = out.unwrap();
    assert_eq!(out.finish_reason, FinishReason::Eos);
    assert_eq!(out.generated_ids, script[..words.len() + 1]);
    assert_eq!(out.text, " Hello world");
    assert_eq!(joined(&events), out.text);
    assert_eq!(events.last().unwrap().id, EOS);
    assert!(engine.sequences.is_empty());
}

#[test]
fn stop_string_split_across_tokens_is_never_emitted() {
    let tokenizer = tokenizer();
    let prompt = prompt(tokenizer);
    let script = tokenizer.encode("Hello world, again", false).unwrap();
    let mut engine = FakeEngine::new(64).scripted(prompt.len(), &script);
    let options = GenerateOptions::greedy(10).with_stop("lo wor");
    let (out, events) = run(&mut engine, &prompt, &options, None);
    let out = out.unwrap();
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.text, " Hel");
    assert_eq!(joined(&events), " Hel");
    // The token that completed the stop string is generated; nothing after it.
    let through_world = tokenizer.encode("Hello world", false).unwrap();
    assert_eq!(out.generated_ids, through_world);
    assert!(engine.sequences.is_empty());
}

#[test]
fn text_that_may_become_a_stop_string_is_held_back_then_released() {
    let tokenizer = tokenizer();
    let prompt = prompt(tokenizer);
    let script = tokenizer.encode("Hello world, again", false).unwrap();
    let first_two = tokenizer.encode("Hello world", false).unwrap();
    assert_eq!(
        first_two.len(),
        2,
        "' Hello' and ' world' are one token each"
    );
    let mut engine = FakeEngine::new(64).scripted(prompt.len(), &script);
    let options = GenerateOptions::greedy(script.len()).with_stop("world!");
    let (out, events) = run(&mut engine, &prompt, &options, None);
    let out = out.unwrap();
    assert_eq!(out.finish_reason, FinishReason::Length);
    assert_eq!(out.text, " Hello world, again");
    let texts: Vec<&str> = events.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(texts[0], " Hello");
    // " world" could still become "world!": only the space is final.
    assert_eq!(texts[1], " ");
    assert!(texts[2].starts_with("world,"), "{texts:?}");
}

#[test]
fn held_back_text_is_released_at_the_end() {
    let tokenizer = tokenizer();
    let prompt = prompt(tokenizer);
    let script = tokenizer.encode("Hello world", false).unwrap();
    let mut engine = FakeEngine::new(64).scripted(prompt.len(), &script);
    let options = GenerateOptions::greedy(script.len()).with_stop("world peace");
    let (out, events) = run(&mut engine, &prompt, &options, None);
    let out = out.unwrap();
    assert_eq!(out.finish_reason, FinishReason::Length);
    assert_eq!(out.text, " Hello world");
    assert_eq!(events.last().unwrap().text, " world");
}

#[test]
fn callback_break_cancels_after_that_token() {
    let tokenizer = tokenizer();
    let prompt = prompt(tokenizer);
    let mut engine = FakeEngine::new(64);
    let (out, events) = run(&mut engine, &prompt, &GenerateOptions::greedy(10), Some(2));
    let out = out.unwrap();
    assert_eq!(out.finish_reason, FinishReason::Cancelled);
    assert_eq!(out.generated_ids.len(), 3);
    assert_eq!(events.len(), 3);
    assert_eq!(engine.steps.len(), 3, "no step after the cancellation");
    assert_eq!(joined(&events), out.text);
    assert!(engine.sequences.is_empty());
}

#[test]
fn sequence_is_freed_when_the_engine_fails() {
    let tokenizer = tokenizer();
    let prompt = prompt(tokenizer);
    for fail_at in 0..3 {
        let mut engine = FakeEngine::new(64);
        engine.fail_at_step = Some(fail_at);
        let (out, events) = run(&mut engine, &prompt, &GenerateOptions::greedy(10), None);
        assert!(
            matches!(out, Err(GenerateError::Engine(EngineError::Backend { .. }))),
            "{out:?}"
        );
        assert_eq!(events.len(), fail_at);
        assert_eq!(engine.created, 1);
        assert!(
            engine.sequences.is_empty(),
            "sequence leaked at step {fail_at}"
        );
    }
}

#[test]
fn sequence_is_freed_when_sampling_fails() {
    let tokenizer = tokenizer();
    let prompt = prompt(tokenizer);
    let mut engine = FakeEngine::new(64);
    engine.nan_at_step = Some(1);
    let (out, events) = run(&mut engine, &prompt, &GenerateOptions::greedy(10), None);
    assert!(
        matches!(
            out,
            Err(GenerateError::Sampling(
                mixtral::sampling::SamplingError::NonFiniteLogits { index: 7, .. }
            ))
        ),
        "{out:?}"
    );
    assert_eq!(events.len(), 1);
    assert!(engine.sequences.is_empty());
}

#[test]
fn sequence_is_freed_when_the_callback_panics() {
    let tokenizer = tokenizer();
    let prompt = prompt(tokenizer);
    let mut engine = FakeEngine::new(64);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        generate(
            &mut engine,
            tokenizer,
            &prompt,
            &GenerateOptions::greedy(5),
            |_| panic!("callback failure"),
        )
    }));
    assert!(result.is_err());
    assert_eq!(engine.created, 1);
    assert!(engine.sequences.is_empty());
}

#[test]
fn context_overflow_is_refused_before_any_work() {
    let tokenizer = tokenizer();
    let prompt = prompt(tokenizer);
    let mut engine = FakeEngine::new(prompt.len() + 3);
    let (out, _) = run(&mut engine, &prompt, &GenerateOptions::greedy(4), None);
    match out {
        Err(GenerateError::ContextOverflow {
            prompt_tokens,
            new_tokens,
            max_context,
        }) => {
            assert_eq!(
                (prompt_tokens, new_tokens, max_context),
                (prompt.len(), 4, prompt.len() + 3)
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(engine.created, 0);
    assert!(engine.steps.is_empty());
    // Exactly filling the context is fine.
    let (out, _) = run(&mut engine, &prompt, &GenerateOptions::greedy(3), None);
    assert_eq!(out.unwrap().generated_ids.len(), 3);
}

#[test]
fn bad_requests_are_typed_errors() {
    let tokenizer = tokenizer();
    let prompt = prompt(tokenizer);
    let mut engine = FakeEngine::new(64);
    let (out, _) = run(&mut engine, &[], &GenerateOptions::greedy(4), None);
    assert!(matches!(out, Err(GenerateError::EmptyPrompt)), "{out:?}");
    let options = GenerateOptions::greedy(4).with_stop("x").with_stop("");
    let (out, _) = run(&mut engine, &prompt, &options, None);
    assert!(
        matches!(out, Err(GenerateError::EmptyStopString { index: 1 })),
        "{out:?}"
    );
    let mut bad = SamplingParams::greedy();
    bad.temperature = f32::NAN;
    let (out, _) = run(
        &mut engine,
        &prompt,
        &GenerateOptions::greedy(4).with_sampling(bad),
        None,
    );
    assert!(matches!(out, Err(GenerateError::Sampling(_))), "{out:?}");
    let (out, _) = run(&mut engine, &[1, 40_000], &GenerateOptions::greedy(4), None);
    assert!(out.is_err(), "out-of-vocabulary prompt accepted");
    assert_eq!(engine.created, 0, "a refused request started a sequence");
    assert!(engine.sequences.is_empty());
}

#[test]
fn zero_new_tokens_returns_without_running_the_engine() {
    let tokenizer = tokenizer();
    let prompt = prompt(tokenizer);
    let mut engine = FakeEngine::new(64);
    let (out, events) = run(&mut engine, &prompt, &GenerateOptions::greedy(0), None);
    let out = out.unwrap();
    assert!(out.generated_ids.is_empty() && events.is_empty());
    assert_eq!(out.finish_reason, FinishReason::Length);
    assert!(engine.steps.is_empty());
}

#[test]
fn seeded_sampling_repeats_and_depends_on_the_seed() {
    let tokenizer = tokenizer();
    let prompt = prompt(tokenizer);
    let sampled = |seed: u64| {
        let params = SamplingParams {
            temperature: 1.5,
            seed,
            ..SamplingParams::greedy()
        };
        let mut engine = FakeEngine::new(64);
        let options = GenerateOptions::greedy(12).with_sampling(params);
        run(&mut engine, &prompt, &options, None)
            .0
            .unwrap()
            .generated_ids
    };
    assert_eq!(sampled(11), sampled(11));
    assert_ne!(sampled(11), sampled(12));
}

#[test]
fn repetition_penalty_history_includes_the_prompt() {
    let tokenizer = tokenizer();
    let prompt = prompt(tokenizer);
    // The prompt's last token is scripted as the certain next token.
    let repeated = *prompt.last().unwrap();
    let mut engine = FakeEngine::new(64).scripted(prompt.len(), &[repeated]);
    let (out, _) = run(&mut engine, &prompt, &GenerateOptions::greedy(1), None);
    assert_eq!(out.unwrap().generated_ids, [repeated]);
    let params = SamplingParams {
        repetition_penalty: 100.0,
        ..SamplingParams::greedy()
    };
    let mut engine = FakeEngine::new(64).scripted(prompt.len(), &[repeated]);
    let options = GenerateOptions::greedy(1).with_sampling(params);
    let (out, _) = run(&mut engine, &prompt, &options, None);
    assert_ne!(out.unwrap().generated_ids, [repeated]);
}

/// The test's own log-softmax, accumulated in f64.
fn own_logprob(row: &[f32], target: u32) -> f64 {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    row[target as usize] as f64 - max - sum.ln()
}

#[test]
fn perplexity_equals_the_log_softmax_of_each_position() {
    let ids: Vec<u32> = (0..23).map(|i| (mix(i) % VOCAB as u64) as u32).collect();
    let expected: Vec<f64> = (1..ids.len())
        .map(|i| own_logprob(&fake_logits(ids[i - 1], i - 1), ids[i]))
        .collect();
    let mean = expected.iter().sum::<f64>() / expected.len() as f64;

    let mut engine = FakeEngine::new(64);
    let scored = perplexity(&mut engine, &ids).unwrap();
    assert_eq!(scored.token_logprobs.len(), ids.len() - 1);
    for (a, b) in scored.token_logprobs.iter().zip(&expected) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }
    assert!((scored.perplexity - (-mean).exp()).abs() <= 1e-12 * scored.perplexity);
    assert_eq!(engine.steps.len(), 1);
    assert_eq!(engine.steps[0], [(ids[..22].to_vec(), 0, LogitsFor::All)]);
    assert!(engine.sequences.is_empty());

    // In chunks of 5 the sequence continues: same numbers, steps at 0, 5, 10, ...
    let mut engine = FakeEngine::new(64);
    let chunked = perplexity_chunked(&mut engine, &ids, 5).unwrap();
    assert_eq!(chunked, scored);
    let starts: Vec<usize> = engine.steps.iter().map(|s| s[0].1).collect();
    assert_eq!(starts, [0, 5, 10, 15, 20]);
    assert!(engine.steps.iter().all(|s| s[0].2 == LogitsFor::All));
    assert!(engine.sequences.is_empty());
}

#[test]
fn perplexity_refuses_short_long_and_non_finite_input() {
    let mut engine = FakeEngine::new(8);
    assert!(matches!(
        perplexity(&mut engine, &[1]),
        Err(GenerateError::TooFewTokens { len: 1 })
    ));
    let long: Vec<u32> = (1..=10).collect();
    assert!(matches!(
        perplexity(&mut engine, &long),
        Err(GenerateError::ContextOverflow { .. })
    ));
    assert_eq!(engine.created, 0);
    // Nine tokens feed eight: fits.
    assert_eq!(
        perplexity(&mut engine, &long[..9])
            .unwrap()
            .token_logprobs
            .len(),
        8
    );
    let mut engine = FakeEngine::new(64);
    engine.nan_at_step = Some(0);
    assert!(matches!(
        perplexity(&mut engine, &long),
        Err(GenerateError::NonFiniteLogits { index: 7, .. })
    ));
    assert!(engine.sequences.is_empty());
    let mut engine = FakeEngine::new(64);
    assert!(matches!(
        perplexity(&mut engine, &[1, 5, VOCAB as u32 + 3]),
        Err(GenerateError::Engine(EngineError::TokenOutOfRange { .. }))
    ));
    assert!(engine.sequences.is_empty());
}

/// Three prompts of different lengths.
fn prompts(tokenizer: &Tokenizer) -> Vec<Vec<u32>> {
    [
        "Once upon a time",
        "The river runs",
        "In the morning the fishermen check their nets",
    ]
    .iter()
    .map(|t| tokenizer.encode(t, true).unwrap())
    .collect()
}

#[test]
fn batch_outputs_equal_single_generation() {
    let tokenizer = tokenizer();
    let prompts = prompts(tokenizer);
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let sampled = SamplingParams {
        temperature: 1.2,
        top_k: 50,
        seed: 4,
        ..SamplingParams::greedy()
    };
    for options in [
        GenerateOptions::greedy(7),
        GenerateOptions::greedy(9)
            .with_sampling(sampled)
            .with_stop("e"),
    ] {
        let mut engine = FakeEngine::new(64);
        let mut events: Vec<Vec<TokenEvent>> = vec![Vec::new(); 3];
        let batch = generate_batch(&mut engine, tokenizer, &refs, &options, |i, e| {
            events[i].push(e.clone());
            ControlFlow::Continue(())
        })
        .unwrap();
        assert!(engine.sequences.is_empty());
        // One prefill step with all three prompts.
        assert_eq!(engine.steps[0].len(), 3);
        for (i, prompt) in prompts.iter().enumerate() {
            let mut single_engine = FakeEngine::new(64);
            let (single, single_events) = run(&mut single_engine, prompt, &options, None);
            let single = single.unwrap();
            assert_eq!(batch[i].generated_ids, single.generated_ids, "prompt {i}");
            assert_eq!(batch[i].text, single.text);
            assert_eq!(batch[i].finish_reason, single.finish_reason);
            assert_eq!(batch[i].decode_steps, single.decode_steps);
            assert_eq!(events[i], single_events);
        }
    }
}

#[test]
fn batch_cancels_one_sequence_and_frees_it_at_once() {
    let tokenizer = tokenizer();
    let prompts = prompts(tokenizer);
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let mut engine = FakeEngine::new(64);
    let outputs = generate_batch(
        &mut engine,
        tokenizer,
        &refs,
        &GenerateOptions::greedy(6),
        |i, e| {
            if i == 1 && e.index == 1 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
    )
    .unwrap();
    let reasons: Vec<FinishReason> = outputs.iter().map(|o| o.finish_reason).collect();
    assert_eq!(
        reasons,
        [
            FinishReason::Length,
            FinishReason::Cancelled,
            FinishReason::Length
        ]
    );
    assert_eq!(outputs[1].generated_ids.len(), 2);
    // Decode steps: two with all three sequences... then the cancelled one leaves the batch.
    let sizes: Vec<usize> = engine.steps.iter().map(Vec::len).collect();
    assert_eq!(sizes, [3, 3, 2, 2, 2, 2]);
    assert!(engine.sequences.is_empty());
}

#[test]
fn batch_error_frees_every_sequence() {
    let tokenizer = tokenizer();
    let prompts = prompts(tokenizer);
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let mut engine = FakeEngine::new(64);
    engine.fail_at_step = Some(2);
    let out = generate_batch(
        &mut engine,
        tokenizer,
        &refs,
        &GenerateOptions::greedy(6),
        |_, _| ControlFlow::Continue(()),
    );
    assert!(matches!(
        out,
        Err(GenerateError::Engine(EngineError::Backend { .. }))
    ));
    assert_eq!(engine.created, 3);
    assert!(engine.sequences.is_empty());
}
