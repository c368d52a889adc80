//! CPU decode latency (one token per step, ms/token) and prefill throughput (tokens/s) of the
//! reference engine, on the shipped tiny model and on a mid-size random model (hidden 1024, 8 layers,
//! 8 experts top-2, intermediate 3584, 16 query / 4 KV heads, vocab 32000; bf16 and f32) written to a
//! temporary directory at start.
//!
//! Decode is measured at a fixed context: each iteration rewinds the sequence to the prompt length
//! and appends one token, so every sample does the same work.
//!
//! The mid-size models are also measured against their floor, printed beside criterion's figures:
//! the bytes of weights a decode token reads ([`decode_weight_bytes`]) over the copy bandwidth
//! measured at start (read + write bytes of a parallel copy larger than any cache, median of
//! nine). Each is run with the CPU's fastest kernel and, where that is AVX-512, again with AVX2
//! (the kernel of most desktop CPUs). The bf16 model is also quantized on load to FP8, INT8 and
//! 4-bit and its decode printed beside the floor of the packed bytes (no criterion run). These
//! lines are at context 16; the bf16 model's is printed again at context 4000, whose floor adds
//! the bytes of the cached keys and values (f32) a token reads, with the time of the one-step
//! prefill of those 4000 tokens.
//!
//! The one-token products with packed matrices alone are printed too: bytes of codes read a second
//! by one thread and by every thread, for each kind and SIMD kernel, over matrices of the mid-size
//! experts' shape (`[3584, 1024]`) larger together than any cache.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mixtral::cpu::matmul::{active_kernel, set_active_kernel, Kernel};
use mixtral::cpu::packed_matmul::packed_matmul_with;
use mixtral::cpu::{CpuEngine, CpuEngineOptions};
use mixtral::dtype::DType;
use mixtral::packed::lut4::Lut4;
use mixtral::quant::{decode_weight_bytes, PackedKind, PackedMatrix, QuantFormat};
use mixtral::random_model::{write_random_model, RandomModelSpec};
use mixtral::{Engine, LoadOptions, LogitsFor, Model, SeqStep};
use rayon::prelude::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// Median of nine timings of `f`, in seconds.
fn median_seconds(mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..9)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[4]
}

/// Copy bandwidth of this machine in bytes per second (read + write), over 256 MiB copied in
/// parallel chunks by every thread.
fn copy_bandwidth() -> f64 {
    const BYTES: usize = 256 << 20;
    let src = vec![1u8; BYTES];
    let mut dst = vec![0u8; BYTES];
    let mut copy = || {
        dst.par_chunks_mut(1 << 20)
            .zip(src.par_chunks(1 << 20))
            .for_each(|(d, s)| d.copy_from_slice(s));
    };
    copy();
    2.0 * BYTES as f64 / median_seconds(copy)
}

/// The next state of a xorshift64 generator (never 0 from a non-zero state).
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Prompt used for decode: `len` pseudo-random token ids (never constant), BOS first.
fn prompt(len: usize, vocab: usize) -> Vec<u32> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut ids = vec![1u32];
    while ids.len() < len {
        ids.push(3 + (xorshift(&mut state) % (vocab as u64 - 3)) as u32);
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

fn engine_for(dir: &Path, quant: Option<QuantFormat>) -> CpuEngine {
    let load = LoadOptions {
        quant,
        ..Default::default()
    };
    let model = Model::load(dir, &load).expect("load model");
    let options = CpuEngineOptions {
        max_context: Some(4096),
        max_sequences: 4,
        ..Default::default()
    };
    CpuEngine::new(model.weights.clone(), options).expect("engine")
}

/// Prints the decode floor of the model at `dir` (quantized on load to `quant`) beside a median of
/// nine decode steps at `context` cached tokens, measured outside criterion so that the two sit on
/// one line. The floor reads the weights a token uses and the cached keys and values (f32).
fn print_floor(
    name: &str,
    dir: &Path,
    dtype: DType,
    quant: Option<QuantFormat>,
    bandwidth: f64,
    context: usize,
) {
    let mut engine = engine_for(dir, quant);
    let config = engine.config().clone();
    let weight_bytes = match quant {
        Some(format) => decode_weight_bytes(&config, format),
        // Every tensor of the random model is stored in `dtype`: bf16's bytes scale with it.
        None => decode_weight_bytes(&config, QuantFormat::Bf16) * dtype.size() as u64 / 2,
    };
    let cache_bytes = (config.num_layers
        * context
        * 2
        * config.num_kv_heads
        * config.head_dim
        * std::mem::size_of::<f32>()) as u64;
    let seq = engine.new_sequence().expect("sequence");
    let ids = prompt(context + 1, config.vocab_size);
    let prefill = SeqStep {
        seq,
        tokens: &ids[..context],
        start_pos: 0,
        logits: LogitsFor::None,
    };
    let started = Instant::now();
    engine.step(&[prefill]).expect("prefill");
    let prefill_seconds = started.elapsed().as_secs_f64();
    let step = SeqStep {
        seq,
        tokens: &ids[context..],
        start_pos: context,
        logits: LogitsFor::Last,
    };
    let mut decode = || {
        engine.step(&[step]).expect("decode step");
    };
    decode();
    let seconds = median_seconds(decode);
    let floor = (weight_bytes + cache_bytes) as f64 / bandwidth;
    println!(
        "cpu/{name} ({}): decode {:.1} ms a token at context {context}, floor {:.1} ms \
         ({:.0} MB of weights + {:.0} MB of cache at {:.1} GB/s), {:.2}x the floor",
        active_kernel().name(),
        seconds * 1e3,
        floor * 1e3,
        weight_bytes as f64 / 1e6,
        cache_bytes as f64 / 1e6,
        bandwidth / 1e9,
        seconds / floor
    );
    if context > SHORT_CONTEXT {
        println!(
            "cpu/{name} ({}): prefill of those {context} tokens in one step took {:.2} s \
             ({:.0} tokens/s, one run)",
            active_kernel().name(),
            prefill_seconds,
            context as f64 / prefill_seconds
        );
    }
    engine.free_sequence(seq).expect("free");
}

/// `count` matrices `[rows, cols]` of `kind` with pseudo-random codes (FP8 NaN codes left out), unit
/// scales and INT4 zeros of 7.5.
fn packed_matrices(kind: PackedKind, rows: usize, cols: usize, count: usize) -> Vec<PackedMatrix> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next_byte = move || {
        let byte = (xorshift(&mut state) >> 32) as u8;
        match kind {
            PackedKind::Fp8 if byte & 0x7F == 0x7F => byte ^ 1,
            _ => byte,
        }
    };
    let (code_bytes, params) = match kind {
        PackedKind::Fp8 | PackedKind::Int8 => (rows * cols, vec![1.0; rows]),
        PackedKind::Int4 { group_size } => {
            let groups = rows * cols / group_size;
            (rows * cols / 2, [1.0, 7.5].repeat(groups))
        }
        PackedKind::Lut4 { group_size, .. } => {
            (rows * cols / 2, vec![1.0; rows * cols / group_size])
        }
    };
    (0..count)
        .map(|_| PackedMatrix {
            kind,
            rows,
            cols,
            codes: (0..code_bytes).map(|_| next_byte()).collect(),
            params: params.clone(),
            perm: None,
        })
        .collect()
}

/// Prints the one-token packed products' rate in bytes of codes a second, with one thread and with
/// every thread, for each kind and SIMD kernel of this CPU.
fn print_packed_products(kernels: &[Kernel]) {
    let (rows, cols, count) = (3584, 1024, 24);
    let kinds = [
        PackedKind::Fp8,
        PackedKind::Int8,
        PackedKind::Int4 { group_size: 128 },
        PackedKind::Lut4 {
            table: Lut4::Nf4,
            group_size: 64,
        },
    ];
    let x: Vec<f32> = (0..cols).map(|i| (i % 17) as f32 / 8.0 - 1.0).collect();
    let mut y = vec![0.0f32; rows];
    let threads = rayon::current_num_threads();
    let pools = [1, threads].map(|n| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .expect("thread pool")
    });
    for kind in kinds {
        let matrices = packed_matrices(kind, rows, cols, count);
        let bytes: usize = matrices.iter().map(|m| m.codes.len()).sum();
        for &kernel in kernels {
            let rates = pools.each_ref().map(|pool| {
                let seconds = median_seconds(|| {
                    pool.install(|| {
                        for m in &matrices {
                            packed_matmul_with(kernel, &x, m, &mut y);
                        }
                    })
                });
                bytes as f64 / seconds / 1e9
            });
            println!(
                "cpu/packed-product {kind:?} ({}): {:.1} GB/s of codes with 1 thread, {:.1} GB/s \
                 with {}",
                kernel.name(),
                rates[0],
                rates[1],
                threads
            );
        }
    }
}

fn bench_model(c: &mut Criterion, name: &str, dir: &Path) {
    let mut engine = engine_for(dir, None);
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

/// The context of every floor line.
const SHORT_CONTEXT: usize = 16;
/// The context of the bf16 model's second floor line (with its prefill's time): most of the
/// engine's 4096-token limit.
const LONG_CONTEXT: usize = 4000;

fn cpu_benches(c: &mut Criterion) {
    let bandwidth = copy_bandwidth();
    println!("copy bandwidth: {:.1} GB/s (read + write)", bandwidth / 1e9);
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-mixtral");
    bench_model(c, "tiny-mixtral", &shipped);

    let fastest = active_kernel();
    let mut kernels = vec![fastest];
    if fastest == Kernel::Avx512 && Kernel::Avx2.is_available() {
        kernels.push(Kernel::Avx2);
    }
    print_packed_products(&kernels);
    for (name, dtype) in [("mid-size-bf16", DType::BF16), ("mid-size-f32", DType::F32)] {
        let dir = tempfile::tempdir().expect("temp dir");
        let spec = RandomModelSpec::mid_size(7).with_dtype(dtype);
        write_random_model(dir.path(), &spec).expect("write mid-size model");
        flush_to_disk(dir.path());
        for &kernel in &kernels {
            set_active_kernel(kernel).expect("available kernel");
            let name = match kernel == fastest {
                true => name.to_string(),
                false => format!("{name}-{}", kernel.name()),
            };
            print_floor(&name, dir.path(), dtype, None, bandwidth, SHORT_CONTEXT);
            if dtype == DType::BF16 {
                print_floor(&name, dir.path(), dtype, None, bandwidth, LONG_CONTEXT);
            }
            bench_model(c, &name, dir.path());
            if dtype == DType::BF16 {
                for format in [QuantFormat::Fp8, QuantFormat::Int8, QuantFormat::Int4] {
                    let name = format!("{name}-{format:?}").to_lowercase();
                    print_floor(
                        &name,
                        dir.path(),
                        dtype,
                        Some(format),
                        bandwidth,
                        SHORT_CONTEXT,
                    );
                }
            }
        }
        set_active_kernel(fastest).expect("available kernel");
    }
}

criterion_group!(benches, cpu_benches);
criterion_main!(benches);
