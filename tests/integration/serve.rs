//! The serving core on `models/tiny-mixtral` (CPU engine):
//! - 64 requests arriving at seeded random steps on a KV pool small enough to force preemption:
//!   every output (greedy and seeded sampling) equals the same request run alone by
//!   `generate`, the pool's invariants hold after every step, and the pool is free afterwards;
//! - `n > 1` (forked choices) gives each choice what a single request with its seed gives;
//! - log-probabilities equal the perplexity scorer's;
//! - an abort (and a dropped stream of the engine handle) frees the request's blocks within one
//!   step;
//! - a request that cannot fit the pool even alone fails with a typed error, freeing everything;
//! - the handle serves tasks of a single-threaded tokio runtime without blocking it.

use crate::common::repo::tiny_mixtral;
use mixtral::cpu::{CpuEngine, CpuEngineOptions};
use mixtral::generate::{generate, perplexity, FinishReason, GenerateOptions};
use mixtral::sampling::SamplingParams;
use mixtral::serve::{
    EngineHandle, Event, Request, RequestId, Scheduler, SchedulerOptions, ServeError,
};
use mixtral::tokenizer::Tokenizer;
use mixtral::Engine;
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

fn tokenizer() -> Arc<Tokenizer> {
    static TOKENIZER: OnceLock<Arc<Tokenizer>> = OnceLock::new();
    TOKENIZER
        .get_or_init(|| {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-mixtral");
            Arc::new(Tokenizer::from_dir(&dir).unwrap())
        })
        .clone()
}

fn engine(block_size: usize, kv_blocks: Option<usize>) -> CpuEngine {
    let options = CpuEngineOptions {
        max_context: Some(64),
        block_size,
        kv_blocks,
        max_sequences: 64,
    };
    CpuEngine::new(tiny_mixtral().weights.clone(), options).unwrap()
}

/// A xorshift stream for the test's random choices.
struct Rand(u64);

impl Rand {
    fn next(&mut self, below: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % below as u64) as usize
    }
}

const WORDS: &[&str] = &[
    "the", "river", "light", "of", "a", "small", "town", "where", "people", "sing", "every",
    "morning", "and", "night", "under", "stars", "green", "hills", "quiet",
];

/// A prompt of `words` random words, after a shared preamble for some requests (so prefixes
/// repeat and the cache is hit).
fn prompt(rand: &mut Rand, shared: bool) -> Vec<u32> {
    let mut text = String::from(if shared {
        "Once upon a time, in a land far away, there lived"
    } else {
        ""
    });
    for _ in 0..2 + rand.next(8) {
        text.push(' ');
        text.push_str(WORDS[rand.next(WORDS.len())]);
    }
    tokenizer().encode(text.trim_start(), true).unwrap()
}

fn random_request(rand: &mut Rand, i: usize) -> Request {
    let prompt = prompt(rand, i.is_multiple_of(3));
    let sampling = if i.is_multiple_of(2) {
        SamplingParams::greedy()
    } else {
        SamplingParams {
            temperature: 0.9,
            top_k: 40,
            top_p: 0.95,
            seed: 1000 + i as u64,
            ..SamplingParams::greedy()
        }
    };
    let options = GenerateOptions::greedy(4 + rand.next(13))
        .with_sampling(sampling)
        .with_eos(&tiny_mixtral().config.eos_token_ids);
    Request::new(prompt, options)
}

/// What a request produced: per choice, the token ids, the text and the reason.
#[derive(Debug, Clone, Default, PartialEq)]
struct Output {
    ids: Vec<u32>,
    text: String,
    reason: Option<FinishReason>,
}

/// Collects events into per-(request, choice) outputs.
fn collect(outputs: &mut HashMap<(RequestId, usize), Output>, events: Vec<(RequestId, Event)>) {
    for (id, event) in events {
        match event {
            Event::Token { choice, token } => {
                let out = outputs.entry((id, choice)).or_default();
                assert_eq!(token.index, out.ids.len());
                out.ids.push(token.id);
                out.text.push_str(&token.text);
            }
            Event::Finished { choice, reason, .. } => {
                let out = outputs.entry((id, choice)).or_default();
                assert_eq!(out.reason, None, "a choice finished twice");
                out.reason = Some(reason);
            }
            Event::Error(e) => panic!("request {id:?} failed: {e}"),
        }
    }
}

/// The request run alone by `generate` on a fresh engine.
fn alone(request: &Request) -> Output {
    let mut e = engine(16, None);
    let out = generate(
        &mut e,
        &tokenizer(),
        &request.prompt,
        &request.generate,
        |_| ControlFlow::Continue(()),
    )
    .unwrap();
    Output {
        ids: out.generated_ids,
        text: out.text,
        reason: Some(out.finish_reason),
    }
}

#[test]
fn sixty_four_requests_arriving_at_random_with_preemption_each_equal_the_request_alone() {
    let mut rand = Rand(0x5eed_1234_abcd_0001);
    let requests: Vec<Request> = (0..64).map(|i| random_request(&mut rand, i)).collect();
    let arrivals: Vec<usize> = (0..64).map(|_| rand.next(60)).collect();
    // Blocks of 4 tokens, 24 in the pool (96 tokens): one request needs at most 11 blocks
    // (27 prompt + 16 new tokens), so each fits alone but a few together exhaust the pool.
    let longest = requests
        .iter()
        .map(|r| r.prompt.len() + r.generate.max_new_tokens)
        .max()
        .unwrap();
    assert!(longest.div_ceil(4) <= 24, "a request must fit alone");
    let mut e = engine(4, Some(24));
    let options = SchedulerOptions {
        max_num_seqs: 16,
        max_num_batched_tokens: 48,
        prefix_caching: true,
    };
    let mut scheduler = Scheduler::new(&e, tokenizer(), options);
    let mut outputs = HashMap::new();
    let mut step = 0;
    while step < 60 || !scheduler.is_idle() {
        for (i, _) in arrivals.iter().enumerate().filter(|(_, &a)| a == step) {
            scheduler.add(RequestId(i as u64), &requests[i]).unwrap();
        }
        collect(&mut outputs, scheduler.step(&mut e));
        e.kv().check_invariants().unwrap();
        step += 1;
        assert!(step < 5000, "the scheduler does not make progress");
    }
    let stats = scheduler.stats(&e);
    assert!(stats.preemptions > 0, "the pool never ran out: {stats:?}");
    assert!(
        stats.prefix_cache_hits > 0,
        "no prefix was reused: {stats:?}"
    );
    assert_eq!(stats.requests_finished, 64);
    assert_eq!(e.free_kv_blocks(), e.total_kv_blocks());
    assert_eq!(e.kv().num_sequences(), 0);
    for (i, request) in requests.iter().enumerate() {
        let got = outputs.get(&(RequestId(i as u64), 0)).cloned();
        assert_eq!(got, Some(alone(request)), "request {i}");
    }
}

#[test]
fn forked_choices_equal_single_requests_with_their_seeds() {
    let mut rand = Rand(77);
    let prompt = prompt(&mut rand, true);
    let sampling = SamplingParams {
        temperature: 1.0,
        seed: 40,
        ..SamplingParams::greedy()
    };
    let mut request = Request::new(prompt, GenerateOptions::greedy(10).with_sampling(sampling));
    request.n = 3;
    let mut e = engine(4, Some(64));
    let mut scheduler = Scheduler::new(&e, tokenizer(), SchedulerOptions::default());
    scheduler.add(RequestId(0), &request).unwrap();
    let mut outputs = HashMap::new();
    while !scheduler.is_idle() {
        collect(&mut outputs, scheduler.step(&mut e));
        e.kv().check_invariants().unwrap();
    }
    assert_eq!(
        scheduler.stats(&e).forks,
        2,
        "choices 1 and 2 share choice 0's prompt"
    );
    assert_eq!(e.free_kv_blocks(), e.total_kv_blocks());
    for choice in 0..3 {
        let mut single = request.clone();
        single.n = 1;
        single.generate.sampling.seed += choice as u64;
        let got = outputs.get(&(RequestId(0), choice)).cloned();
        assert_eq!(got, Some(alone(&single)), "choice {choice}");
    }
}

#[test]
fn logprobs_equal_the_perplexity_scorer() {
    let mut rand = Rand(5);
    let mut request = Request::new(prompt(&mut rand, false), GenerateOptions::greedy(8));
    request.logprobs = Some(3);
    let mut e = engine(4, Some(64));
    let mut scheduler = Scheduler::new(&e, tokenizer(), SchedulerOptions::default());
    scheduler.add(RequestId(0), &request).unwrap();
    let mut tokens = Vec::new();
    while !scheduler.is_idle() {
        for (_, event) in scheduler.step(&mut e) {
            if let Event::Token { token, .. } = event {
                tokens.push(token);
            }
        }
    }
    let mut ids = request.prompt.clone();
    ids.extend(tokens.iter().map(|t| t.id));
    let scored = perplexity(&mut engine(16, None), &ids).unwrap();
    let n = request.prompt.len();
    // Both read bitwise-equal logits (the CPU engine is batch-invariant) through the same f64
    // log-softmax; the stream rounds to f32: |error| <= |logprob| * 2^-24 < 1e-6 for |logprob|
    // < 16. 1e-5 is the bound servers are held to.
    for (i, t) in tokens.iter().enumerate() {
        let lp = t.logprob.as_ref().unwrap();
        let want = scored.token_logprobs[n - 1 + i];
        assert!((lp.logprob as f64 - want).abs() < 1e-5, "token {i}");
        assert_eq!(lp.top.len(), 3);
        assert_eq!(lp.top[0].0, t.id, "greedy picks the most likely token");
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
    }
}

#[test]
fn bias_forces_a_token_and_penalties_change_greedy_output() {
    let mut rand = Rand(9);
    let base = Request::new(prompt(&mut rand, false), GenerateOptions::greedy(6));
    let run = |request: &Request| {
        let mut e = engine(4, Some(64));
        let mut s = Scheduler::new(&e, tokenizer(), SchedulerOptions::default());
        s.add(RequestId(0), request).unwrap();
        let mut outputs = HashMap::new();
        while !s.is_idle() {
            collect(&mut outputs, s.step(&mut e));
        }
        outputs.remove(&(RequestId(0), 0)).unwrap().ids
    };
    let plain = run(&base);
    assert_eq!(plain, alone(&base).ids);
    let mut biased = base.clone();
    biased.logit_bias = vec![(1234, 100.0)];
    assert_eq!(run(&biased), vec![1234; 6]);
    let mut penalised = base.clone();
    penalised.frequency_penalty = 100.0;
    let ids = run(&penalised);
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        ids.len(),
        "a penalty of 100 repeats no token: {ids:?}"
    );
}

#[test]
fn an_abort_frees_the_blocks_at_the_next_step() {
    let mut rand = Rand(11);
    let request = Request::new(prompt(&mut rand, true), GenerateOptions::greedy(30));
    let other = Request::new(prompt(&mut rand, false), GenerateOptions::greedy(40));
    let mut e = engine(4, Some(64));
    let mut scheduler = Scheduler::new(&e, tokenizer(), SchedulerOptions::default());
    scheduler.add(RequestId(0), &other).unwrap();
    for _ in 0..3 {
        scheduler.step(&mut e);
    }
    let used_by_other = e.total_kv_blocks() - e.free_kv_blocks();
    scheduler.add(RequestId(1), &request).unwrap();
    for _ in 0..3 {
        scheduler.step(&mut e);
    }
    assert!(scheduler.abort(RequestId(1)));
    assert!(!scheduler.is_active(RequestId(1)));
    let events = scheduler.step(&mut e);
    let cancelled = events.iter().any(|(id, ev)| {
        *id == RequestId(1)
            && matches!(
                ev,
                Event::Finished {
                    reason: FinishReason::Cancelled,
                    ..
                }
            )
    });
    assert!(cancelled, "{events:?}");
    // One step later only the other request holds blocks (it grew by at most one block).
    let used = e.total_kv_blocks() - e.free_kv_blocks();
    assert!(
        used <= used_by_other + 2,
        "{used} used, {used_by_other} before"
    );
    e.kv().check_invariants().unwrap();
    assert_eq!(e.kv().num_sequences(), 1);
    assert!(!scheduler.abort(RequestId(1)), "already ended");
}

#[test]
fn a_dropped_stream_of_the_handle_frees_its_blocks_within_one_step() {
    let mut rand = Rand(12);
    let e = Box::new(engine(4, Some(64)));
    let handle = EngineHandle::spawn(e, tokenizer(), SchedulerOptions::default()).unwrap();
    let total = handle.stats().kv_blocks_total;
    let request = Request::new(prompt(&mut rand, false), GenerateOptions::greedy(50));
    let mut stream = handle.submit(request).unwrap();
    let first = stream.blocking_recv().unwrap();
    assert!(first.token().is_some(), "{first:?}");
    drop(stream);
    let started = Instant::now();
    let stats = loop {
        let stats = handle.stats();
        if stats.requests_aborted == 1 {
            break stats;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{stats:?}");
        std::thread::sleep(Duration::from_millis(1));
    };
    // The abort and the freeing step publish together: the first snapshot showing the abort
    // already shows the pool free.
    assert_eq!(stats.kv_blocks_free, total, "{stats:?}");
    assert_eq!((stats.running, stats.waiting, stats.requests), (0, 0, 0));

    // Refusals come back at submit, before the engine thread.
    let empty = Request::new(Vec::new(), GenerateOptions::greedy(4));
    assert!(matches!(handle.submit(empty), Err(ServeError::EmptyPrompt)));
    let long = Request::new(vec![1; 60], GenerateOptions::greedy(5));
    assert!(matches!(
        handle.submit(long),
        Err(ServeError::ContextOverflow { .. })
    ));
}

#[test]
fn the_handle_streams_what_generate_gives_from_many_threads() {
    let handle = Arc::new(
        EngineHandle::spawn(
            Box::new(engine(4, Some(96))),
            tokenizer(),
            SchedulerOptions::default(),
        )
        .unwrap(),
    );
    let mut rand = Rand(21);
    let requests: Vec<Request> = (0..8).map(|i| random_request(&mut rand, i)).collect();
    let threads: Vec<_> = requests
        .iter()
        .cloned()
        .map(|request| {
            let handle = Arc::clone(&handle);
            std::thread::spawn(move || {
                let mut stream = handle.submit(request).unwrap();
                let mut out = Output::default();
                while let Some(event) = stream.blocking_recv() {
                    match event {
                        Event::Token { token, .. } => {
                            out.ids.push(token.id);
                            out.text.push_str(&token.text);
                        }
                        Event::Finished { reason, usage, .. } => {
                            assert_eq!(usage.completion_tokens, out.ids.len());
                            out.reason = Some(reason);
                        }
                        Event::Error(e) => panic!("{e}"),
                    }
                }
                out
            })
        })
        .collect();
    for (request, thread) in requests.iter().zip(threads) {
        assert_eq!(thread.join().unwrap(), alone(request));
    }
    let stats = handle.stats();
    assert_eq!(stats.requests_finished, 8);
    assert_eq!(stats.kv_blocks_free, stats.kv_blocks_total);
}

#[test]
fn a_request_larger_than_the_pool_fails_alone_and_frees_everything() {
    let mut rand = Rand(31);
    // 3 blocks of 4 tokens: a prompt of more than 12 tokens cannot be held.
    let mut e = engine(4, Some(3));
    let mut scheduler = Scheduler::new(&e, tokenizer(), SchedulerOptions::default());
    let big = Request::new(prompt(&mut rand, true), GenerateOptions::greedy(4));
    assert!(big.prompt.len() > 12);
    let small = Request::new(vec![1, 415], GenerateOptions::greedy(4));
    scheduler.add(RequestId(0), &big).unwrap();
    scheduler.add(RequestId(1), &small).unwrap();
    let mut failed = Vec::new();
    let mut finished = Vec::new();
    while !scheduler.is_idle() {
        for (id, event) in scheduler.step(&mut e) {
            match event {
                Event::Error(ServeError::DoesNotFit { .. }) => failed.push(id),
                Event::Finished { .. } => finished.push(id),
                Event::Error(other) => panic!("{other}"),
                Event::Token { .. } => {}
            }
        }
        e.kv().check_invariants().unwrap();
    }
    assert_eq!(failed, vec![RequestId(0)]);
    assert_eq!(finished, vec![RequestId(1)], "the next request still runs");
    assert_eq!(scheduler.stats(&e).requests_failed, 1);
    assert_eq!(e.free_kv_blocks(), e.total_kv_blocks());
}

#[test]
fn the_handle_serves_a_single_threaded_tokio_runtime_without_blocking_it() {
    let handle = Arc::new(
        EngineHandle::spawn(
            Box::new(engine(4, Some(96))),
            tokenizer(),
            SchedulerOptions::default(),
        )
        .unwrap(),
    );
    let mut rand = Rand(41);
    let requests: Vec<Request> = (0..4).map(|i| random_request(&mut rand, i)).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let ticks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let outputs = runtime.block_on(async {
        // A task that only runs while the streams' tasks wait: if awaiting an event blocked the
        // runtime's one thread, it could not tick before they all finish.
        let ticker = {
            let ticks = Arc::clone(&ticks);
            tokio::task::spawn(async move {
                loop {
                    ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            })
        };
        let tasks: Vec<_> = requests
            .iter()
            .cloned()
            .map(|request| {
                let handle = Arc::clone(&handle);
                tokio::task::spawn(async move {
                    let mut stream = handle.submit(request).unwrap();
                    let mut out = Output::default();
                    while let Some(event) = stream.recv().await {
                        match event {
                            Event::Token { token, .. } => {
                                out.ids.push(token.id);
                                out.text.push_str(&token.text);
                            }
                            Event::Finished { reason, .. } => out.reason = Some(reason),
                            Event::Error(e) => panic!("{e}"),
                        }
                    }
                    out
                })
            })
            .collect();
        let mut outputs = Vec::new();
        for task in tasks {
            outputs.push(task.await.unwrap());
        }
        ticker.abort();
        outputs
    });
    assert!(ticks.load(std::sync::atomic::Ordering::Relaxed) > 0);
    for (request, out) in requests.iter().zip(outputs) {
        assert_eq!(out, alone(request));
    }
}
