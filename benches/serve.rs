//! Serving throughput (generated tokens/s) and time to first token of the scheduler over the CPU
//! engine on the shipped tiny model, against concurrency: 1, 8 and 32 requests submitted together,
//! each a distinct 32-token prompt and 32 greedy new tokens (no EOS, so every request generates all
//! of them), the default token budget (512 per step). Prefix caching is off so that every
//! iteration computes the same work.
//!
//! - `serve/throughput/N`: all N requests from submission to their last token;
//! - `serve/ttft/N`: mean over the N requests of the time from submission to the first token;
//! - `serve/ttft_shared_prefix/{miss,hit}`: one request of a 1024-token prefix shared by every
//!   iteration plus a 16-token suffix that differs each time, to its first token, with prefix
//!   caching off (`miss`) or on and the prefix cached by an earlier request (`hit`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mixtral::cpu::{CpuEngine, CpuEngineOptions};
use mixtral::generate::GenerateOptions;
use mixtral::serve::{Event, Request, RequestId, Scheduler, SchedulerOptions};
use mixtral::tokenizer::Tokenizer;
use mixtral::{LoadOptions, Model};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PROMPT: usize = 32;
const NEW: usize = 32;
const SHARED: usize = 1024;
const SUFFIX: usize = 16;

/// Request `i`'s prompt of `len` tokens: BOS and pseudo-random ids (distinct per request).
fn prompt(i: usize, len: usize, vocab: usize) -> Vec<u32> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
    let mut ids = vec![1u32];
    while ids.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ids.push(3 + (state % (vocab as u64 - 3)) as u32);
    }
    ids
}

struct Setup {
    model: Model,
    tokenizer: Arc<Tokenizer>,
}

impl Setup {
    fn engine(&self) -> CpuEngine {
        let options = CpuEngineOptions {
            max_context: Some(SHARED + SUFFIX + NEW),
            max_sequences: 32,
            // A sized pool caches prefixes (storage is still allocated on first use).
            kv_blocks: Some(32 * (SHARED + SUFFIX + NEW).div_ceil(16)),
            ..Default::default()
        };
        CpuEngine::new(self.model.weights.clone(), options).expect("engine")
    }

    /// Runs `n` requests together to completion; returns the mean time to first token.
    fn run(&self, n: usize) -> Duration {
        let mut engine = self.engine();
        let options = SchedulerOptions {
            prefix_caching: false,
            ..SchedulerOptions::default()
        };
        let mut scheduler = Scheduler::new(&engine, Arc::clone(&self.tokenizer), options);
        let vocab = self.model.config.vocab_size;
        let started = Instant::now();
        for i in 0..n {
            let request = Request::new(prompt(i, PROMPT, vocab), GenerateOptions::greedy(NEW));
            scheduler.add(RequestId(i as u64), &request).expect("add");
        }
        let mut first = HashSet::new();
        let mut ttft = Duration::ZERO;
        while !scheduler.is_idle() {
            for (id, event) in scheduler.step(&mut engine) {
                match event {
                    Event::Token { .. } if first.insert(id) => ttft += started.elapsed(),
                    Event::Error(e) => panic!("{e}"),
                    _ => {}
                }
            }
        }
        ttft / n as u32
    }
}

/// Time from submitting `request` to its first token.
fn first_token(scheduler: &mut Scheduler, engine: &mut CpuEngine, request: &Request) -> Duration {
    let started = Instant::now();
    scheduler.add(RequestId(u64::MAX), request).expect("add");
    let mut ttft = None;
    while !scheduler.is_idle() {
        for (_, event) in scheduler.step(engine) {
            match event {
                Event::Token { .. } if ttft.is_none() => ttft = Some(started.elapsed()),
                Event::Error(e) => panic!("{e}"),
                _ => {}
            }
        }
    }
    ttft.expect("a token")
}

fn bench(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-mixtral");
    let mut model = Model::load(&dir, &LoadOptions::default()).expect("load model");
    let tokenizer = Arc::new(model.tokenizer.take().expect("tokenizer.json"));
    let setup = Setup { model, tokenizer };

    let mut group = c.benchmark_group("serve/throughput");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    for n in [1usize, 8, 32] {
        group.throughput(Throughput::Elements((n * NEW) as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| setup.run(n))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("serve/ttft");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    for n in [1usize, 8, 32] {
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_custom(|iters| (0..iters).map(|_| setup.run(n)).sum())
        });
    }
    group.finish();

    let mut group = c.benchmark_group("serve/ttft_shared_prefix");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    let vocab = setup.model.config.vocab_size;
    let shared = prompt(0, SHARED, vocab);
    for hit in [false, true] {
        let mut engine = setup.engine();
        let options = SchedulerOptions {
            prefix_caching: hit,
            ..SchedulerOptions::default()
        };
        let mut scheduler = Scheduler::new(&engine, Arc::clone(&setup.tokenizer), options);
        let mut round = 0;
        let prefix = shared.clone();
        let mut request = move || {
            round += 1;
            let mut ids = prefix.clone();
            ids.extend(prompt(round, SUFFIX + 1, vocab).into_iter().skip(1));
            Request::new(ids, GenerateOptions::greedy(1))
        };
        // Caches the prefix (when on).
        first_token(&mut scheduler, &mut engine, &request());
        let name = if hit { "hit" } else { "miss" };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| first_token(&mut scheduler, &mut engine, &request()))
                    .sum()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
