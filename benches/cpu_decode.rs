//! CPU decode latency (one token per step, ms/token) and prefill throughput (tokens/s) of the
//! reference engine, on the shipped tiny model and on a mid-size random model (hidden 1024, 8 layers,
//! 8 experts top-2, intermediate 3584, 16 query / 4 KV heads, vocab 32000; bf16 and f32) written to a
//! temporary directory at start.
//!
//! Decode is measured at a fixed context: each iteration rewinds the sequence to the prompt length
//! and appends one token, so every sample does the same work.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mixtral::cpu::{CpuEngine, CpuEngineOptions};
use mixtral::dtype::DType;
use mixtral::random_model::{write_random_model, RandomModelSpec};
use mixtral::{Engine, LoadOptions, LogitsFor, Model, SeqStep};
use std::path::Path;
use std::time::Duration;

/// Prompt used for decode: `len` pseudo-random token ids (never constant), BOS first.
fn prompt(len: usize, vocab: usize) -> Vec<u32> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut ids = vec![1u32];
    while ids.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ids.push(3 + (state % (vocab as u64 - 3)) as u32);
    }
    ids
}

/// Waits until the freshly written model is on disk, so that page-cache writeback does not compete
/// with the measurement.
fn flush_to_disk(dir: &Path) {
    for entry in std::fs::read_dir(dir).expect("model dir") {
        let file = std::fs::File::open(entry.expect("entry").path()).expect("open");
        file.sync_all().expect("sync");
    }
}

fn engine_for(dir: &Path) -> CpuEngine {
    let model = Model::load(dir, &LoadOptions::default()).expect("load model");
    let options = CpuEngineOptions {
        max_context: Some(4096),
        max_sequences: 4,
        ..Default::default()
    };
    CpuEngine::new(model.weights.clone(), options).expect("engine")
}

fn bench_model(c: &mut Criterion, name: &str, dir: &Path) {
    let mut engine = engine_for(dir);
    let vocab = engine.config().vocab_size;
    let seq = engine.new_sequence().expect("sequence");
    let mut group = c.benchmark_group(format!("cpu/{name}"));
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(8));

    for context in [16usize, 256] {
        let ids = prompt(context + 1, vocab);
        let prefill = SeqStep {
            seq,
            tokens: &ids[..context],
            start_pos: 0,
            logits: LogitsFor::None,
        };
        engine.step(&[prefill]).expect("prefill");
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(
            BenchmarkId::new("decode_token", context),
            &context,
            |b, &context| {
                b.iter(|| {
                    let step = SeqStep {
                        seq,
                        tokens: &ids[context..],
                        start_pos: context,
                        logits: LogitsFor::Last,
                    };
                    engine.step(&[step]).expect("decode step")
                })
            },
        );
    }

    for tokens in [32usize, 128] {
        let ids = prompt(tokens, vocab);
        group.throughput(Throughput::Elements(tokens as u64));
        group.bench_with_input(BenchmarkId::new("prefill", tokens), &tokens, |b, _| {
            b.iter(|| {
                let step = SeqStep {
                    seq,
                    tokens: &ids,
                    start_pos: 0,
                    logits: LogitsFor::Last,
                };
                engine.step(&[step]).expect("prefill step")
            })
        });
    }
    group.finish();
    engine.free_sequence(seq).expect("free");
}

fn cpu_benches(c: &mut Criterion) {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-mixtral");
    bench_model(c, "tiny-mixtral", &shipped);

    for (name, dtype) in [("mid-size-bf16", DType::BF16), ("mid-size-f32", DType::F32)] {
        let dir = tempfile::tempdir().expect("temp dir");
        let spec = RandomModelSpec::mid_size(7).with_dtype(dtype);
        write_random_model(dir.path(), &spec).expect("write mid-size model");
        flush_to_disk(dir.path());
        bench_model(c, name, dir.path());
    }
}

criterion_group!(benches, cpu_benches);
criterion_main!(benches);
