//! GPU decode latency and prefill time of the CUDA engine on Mixtral-8x7B shapes (hidden 4096, 32/8
//! heads of 128, 8 experts top-2, intermediate 14336, vocab 32000) with seeded random bf16 weights
//! made on the device, `MIXTRAL_BENCH_LAYERS` layers (default: 32 when the card holds them, else 16).
//!
//! `cargo bench --features cuda,testing --bench gpu_decode` runs criterion groups (decode at batch 1 / 8 / 32,
//! long-context decode, prefill). `gpu_decode --protocol OUT.jsonl` runs the fixed protocol that
//! `scripts/gpu-check` uses: every measurement once, median of repeated steps after a warm-up, one
//! JSON object per line. `gpu_decode --protocol-quant OUT.jsonl` measures the packed formats (FP8,
//! INT8, 4-bit, and bitsandbytes NF4 in blocks of 64 as `nf4`) at 32 layers the same way: decode at
//! batch 1, 8 and 32 (FP8, INT8 and 4-bit also on the tensor-core decode kernels), a 512-token
//! prefill. `gpu_decode --protocol-multi OUT.jsonl` (a build with feature
//! `nccl`, for `scripts/multi-gpu-check`) times batch-1 decode at TP=1 (one GPU) and TP=2 (two GPUs,
//! NCCL) on the same shapes through the [`mixtral::Engine`] trait and prints the speedup. Without a
//! CUDA driver or device each prints why and exits successfully; any other failure to build the
//! engine panics (the rule of `tests/common/gpu.rs`).
//!
//! Decode is measured at a fixed context: each step rewinds the sequences to the context and appends
//! one token, so every sample does the same work. Long contexts are made with
//! [`CudaEngine::extend_unfilled`] (the cost of attention does not depend on the cached values).
//! Every step ends with reading the sampled ids back, which waits for the device.

use std::io::Write;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use mixtral::config::ModelConfig;
use mixtral::cuda::engine::matrix::StackFormat;
use mixtral::cuda::engine::GroupedKernel;
use mixtral::cuda::ops::mma_reads;
use mixtral::cuda::{CudaDevice, CudaEngine, CudaEngineOptions, CudaError, WeightSource};
use mixtral::engine::EngineOptions;
use mixtral::packed::lut4::Lut4;
use mixtral::quant::{PackedKind, QuantFormat, Q8};
use mixtral::{LogitsFor, SeqId, SeqStep};

const WARMUP: usize = 5;
const REPEATS: usize = 30;

/// Mixtral-8x7B's shape with `layers` layers.
fn mixtral_config(layers: usize) -> ModelConfig {
    let json = format!(
        r#"{{"architectures": ["MixtralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": {layers}, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": null,
        "max_position_embeddings": 32768, "tie_word_embeddings": false,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}}"#
    );
    ModelConfig::from_json_str(&json, std::path::Path::new("config.json")).expect("config")
}

fn layers() -> usize {
    if let Some(n) = std::env::var("MIXTRAL_BENCH_LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return n;
    }
    // 32 layers of bf16 weights are 93 GB: only cards with more memory hold them.
    let total = CudaDevice::new(0)
        .ok()
        .and_then(|d| d.context().total_mem().ok())
        .unwrap_or(0);
    if total > 120 << 30 {
        32
    } else {
        16
    }
}

fn engine(layers: usize, graphs: bool) -> Result<CudaEngine, CudaError> {
    engine_in(layers, graphs, StackFormat::Bf16)
}

/// An engine with random weights whose projection stacks are stored in `format`.
fn engine_in(layers: usize, graphs: bool, format: StackFormat) -> Result<CudaEngine, CudaError> {
    engine_with(layers, graphs, format, GroupedKernel::Mma, false)
}

/// [`engine_in`], with the Hopper expert kernels `grouped` asked for (`Mma`: none), and the 4-bit
/// tensor-core decode kernels when `mma_decode`.
fn engine_with(
    layers: usize,
    graphs: bool,
    format: StackFormat,
    grouped: GroupedKernel,
    mma_decode: bool,
) -> Result<CudaEngine, CudaError> {
    let options = CudaEngineOptions {
        cuda_graphs: graphs,
        cutlass_experts: grouped == GroupedKernel::Cutlass,
        mma_decode,
        ..bench_options()
    };
    build(layers, format, options)
}

/// The limits every bench engine takes (32k context, 32 sequences, 4096-token steps), the other
/// options at their defaults.
fn bench_options() -> CudaEngineOptions {
    CudaEngineOptions {
        engine: EngineOptions {
            max_context: Some(32768),
            max_sequences: Some(32),
            max_step_tokens: Some(4096),
            ..EngineOptions::default()
        },
        ..CudaEngineOptions::default()
    }
}

/// An engine with random weights (stacks in `format`) and `options`.
fn build(
    layers: usize,
    format: StackFormat,
    options: CudaEngineOptions,
) -> Result<CudaEngine, CudaError> {
    CudaEngine::build(
        WeightSource::Random {
            config: &mixtral_config(layers),
            seed: 1234,
            format,
        },
        options,
        None,
    )
}

/// The quantized protocol: decode at batch 1, 8 and 32 (context 16) and a 512-token prefill, all
/// 32 layers, for each packed format (weights made on the host and uploaded: about 20 s per
/// engine); FP8, INT8 and 4-bit integer decode again on the tensor-core decode kernels
/// (`"kernel": "mma_decode"`); FP8 and INT8 prefill 4096 tokens as well, and both lengths again on
/// CUTLASS's 8-bit expert kernels.
fn protocol_quant(out_path: &str) {
    let layers = 32;
    let mut out = std::fs::File::create(out_path).expect("protocol output");
    let nf4 = StackFormat::Packed {
        kind: PackedKind::Lut4 {
            table: Lut4::Nf4,
            group_size: 64,
        },
        perm: false,
    };
    let formats = [QuantFormat::Fp8, QuantFormat::Int8, QuantFormat::Int4]
        .map(|f| (f.as_str(), StackFormat::of_quant_format(f)));
    for (format, stack) in formats.into_iter().chain([("nf4", nf4)]) {
        let mut engine = match engine_in(layers, true, stack) {
            Ok(e) => e,
            Err(e) if skip(&e) => {
                gpu_rule::print_skip("gpu_decode", &e);
                return;
            }
            Err(e) => panic!("building the {format} engine: {e}"),
        };
        let card = engine.device_name().to_string();
        let mut record = |what: &str, kernel: &str, batch: usize, context: usize, ms: f64| {
            let line = format!(
                r#"{{"card": "{card}", "what": "{what}", "dtype": "{format}", "kernel": "{kernel}", "layers": {layers}, "batch": {batch}, "context": {context}, "graphs": true, "ours_ms": {ms:.4}}}"#
            );
            println!("{line}");
            writeln!(out, "{line}").expect("write protocol output");
        };
        for (batch, ms) in decode_batches(&mut engine) {
            record("decode", "mma", batch, 16, ms);
        }
        // 8-bit prefill also at 4096 tokens, and again below on CUTLASS's 8-bit grouped GEMM (where
        // its self-check passes).
        let q8 = stack.kind().and_then(Q8::of).is_some();
        let lengths: &[usize] = if q8 { &[512, 4096] } else { &[512] };
        for &tokens in lengths {
            let prompt = ids(tokens, 7);
            let ms = median_ms(|| prefill(&mut engine, &prompt), 5);
            record("prefill", "mma", 1, tokens, ms);
        }
        // One engine at a time from here: two 32-layer packed models do not fit one card.
        drop(engine);
        // Decode again on the tensor-core decode kernels where they read the format.
        if stack
            .kind()
            .is_some_and(|kind| mma_reads(kind, 4096, false))
        {
            match engine_with(layers, true, stack, GroupedKernel::Mma, true) {
                Ok(mut engine) => {
                    for (batch, ms) in decode_batches(&mut engine) {
                        record("decode", "mma_decode", batch, 16, ms);
                    }
                }
                Err(e) => eprintln!("gpu_decode: no {format} engine with mma_decode: {e}"),
            }
        }
        if !q8 {
            continue;
        }
        let mut engine = match engine_with(layers, true, stack, GroupedKernel::Cutlass, false) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("gpu_decode: no {format} engine with the CUTLASS expert kernels: {e}");
                continue;
            }
        };
        let (kernel, check) = engine.prefill_experts();
        eprintln!("gpu_decode: {format} CUTLASS expert kernels: {kernel:?}, self-check {check:?}");
        if kernel == GroupedKernel::Cutlass {
            for tokens in [512, 4096] {
                let prompt = ids(tokens, 7);
                let ms = median_ms(|| prefill(&mut engine, &prompt), 5);
                record("prefill", "cutlass", 1, tokens, ms);
            }
        }
    }
}

/// The median decode step at batch 1, 8 and 32 (context 16), with the batch: `(batch, ms)`.
fn decode_batches(engine: &mut CudaEngine) -> Vec<(usize, f64)> {
    [1, 8, 32]
        .into_iter()
        .map(|batch| {
            let seqs = sequences(engine, batch, 16);
            let tokens: Vec<[u32; 1]> = ids(batch, 16).iter().map(|&t| [t]).collect();
            let ms = median_ms(|| decode_step(engine, &seqs, 16, &tokens), REPEATS);
            for seq in seqs {
                mixtral::Engine::free_sequence(engine, seq).expect("free");
            }
            (batch, ms)
        })
        .collect()
}

/// Pseudo-random token ids (never constant).
fn ids(len: usize, salt: u64) -> Vec<u32> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ salt;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            3 + (state % 31_000) as u32
        })
        .collect()
}

/// `batch` sequences holding `context` tokens (unfilled).
fn sequences(engine: &mut CudaEngine, batch: usize, context: usize) -> Vec<SeqId> {
    (0..batch)
        .map(|_| {
            let seq = mixtral::Engine::new_sequence(engine).expect("sequence");
            engine.extend_unfilled(seq, context).expect("context");
            seq
        })
        .collect()
}

/// One decode step of every sequence at position `context` (rewinding to it first).
fn decode_step(engine: &mut CudaEngine, seqs: &[SeqId], context: usize, tokens: &[[u32; 1]]) {
    let batch: Vec<SeqStep> = seqs
        .iter()
        .zip(tokens)
        .map(|(&seq, t)| SeqStep {
            seq,
            tokens: t,
            start_pos: context,
            logits: LogitsFor::Last,
        })
        .collect();
    let out = engine.step_greedy(&batch).expect("decode step");
    assert_eq!(out.len(), seqs.len());
}

/// A prefill of `tokens` tokens into a fresh sequence (time to first token).
fn prefill(engine: &mut CudaEngine, prompt: &[u32]) {
    let seq = mixtral::Engine::new_sequence(engine).expect("sequence");
    let out = engine
        .step_greedy(&[SeqStep {
            seq,
            tokens: prompt,
            start_pos: 0,
            logits: LogitsFor::Last,
        }])
        .expect("prefill");
    assert_eq!(out.len(), 1);
    mixtral::Engine::free_sequence(engine, seq).expect("free");
}

fn median_ms(mut run: impl FnMut(), repeats: usize) -> f64 {
    for _ in 0..WARMUP {
        run();
    }
    let mut times: Vec<f64> = (0..repeats)
        .map(|_| {
            let started = Instant::now();
            run();
            started.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// The skip rule of the GPU tests: only a missing CUDA driver or device skips.
#[path = "../tests/common/gpu.rs"]
#[allow(dead_code)]
mod gpu_rule;

fn skip(e: &CudaError) -> bool {
    gpu_rule::no_gpu(e)
}

/// The fixed protocol: one JSON line per measurement into `out`.
/// The median time of one decode step of `batch` sequences at `context` cached tokens (the
/// sequences made for it and freed after).
fn time_decode(engine: &mut CudaEngine, batch: usize, context: usize) -> f64 {
    let seqs = sequences(engine, batch, context);
    let tokens: Vec<[u32; 1]> = ids(batch, context as u64).iter().map(|&t| [t]).collect();
    let ms = median_ms(|| decode_step(engine, &seqs, context, &tokens), REPEATS);
    for seq in seqs {
        mixtral::Engine::free_sequence(engine, seq).expect("free");
    }
    ms
}

fn protocol(out_path: &str) {
    let layers = layers();
    let mut out = std::fs::File::create(out_path).expect("protocol output");
    // `kernel`: "mma" for the default kernels (what scripts/gpu-results.py assumes when absent).
    let mut record = |what: &str,
                      kernel: &str,
                      (batch, context): (usize, usize),
                      graphs: bool,
                      ms: f64,
                      card: &str| {
        let line = format!(
            r#"{{"card": "{card}", "what": "{what}", "dtype": "bf16", "kernel": "{kernel}", "layers": {layers}, "batch": {batch}, "context": {context}, "graphs": {graphs}, "ours_ms": {ms:.4}}}"#
        );
        println!("{line}");
        writeln!(out, "{line}").expect("write protocol output");
    };
    for graphs in [true, false] {
        let mut engine = match engine(layers, graphs) {
            Ok(e) => e,
            Err(e) if skip(&e) => {
                gpu_rule::print_skip("gpu_decode", &e);
                return;
            }
            Err(e) => panic!("building the engine: {e}"),
        };
        let card = engine.device_name().to_string();
        let contexts: &[usize] = if graphs {
            &[16, 4096, 16384, 32000]
        } else {
            &[16]
        };
        for &context in contexts {
            let batches: &[usize] = if graphs && context == 16 {
                &[1, 8, 32]
            } else {
                &[1]
            };
            for &batch in batches {
                let ms = time_decode(&mut engine, batch, context);
                record("decode", "mma", (batch, context), graphs, ms, &card);
            }
        }
        if graphs {
            for tokens in [512, 4096] {
                let prompt = ids(tokens, 7);
                let ms = median_ms(|| prefill(&mut engine, &prompt), 5);
                record("prefill", "mma", (1, tokens), graphs, ms, &card);
            }
        }
    }
    // Decode and prefill again with programmatic dependent launches (compute capability 9.0+), the
    // default kernels otherwise: `"kernel": "pdl"` beside the `"mma"` rows above.
    let pdl = CudaEngineOptions {
        dependent_launches: true,
        ..bench_options()
    };
    match build(layers, StackFormat::Bf16, pdl) {
        Ok(mut engine) if engine.dependent_launches() => {
            let card = engine.device_name().to_string();
            for (batch, context) in [(1, 16), (8, 16), (32, 16), (1, 4096)] {
                let ms = time_decode(&mut engine, batch, context);
                record("decode", "pdl", (batch, context), true, ms, &card);
            }
            let prompt = ids(512, 7);
            let ms = median_ms(|| prefill(&mut engine, &prompt), 5);
            record("prefill", "pdl", (1, 512), true, ms, &card);
        }
        Ok(_) => eprintln!("gpu_decode: no dependent launches before compute capability 9.0"),
        Err(e) => eprintln!("gpu_decode: no engine with dependent launches: {e}"),
    }
    // Prefill again with CUTLASS's Hopper expert kernels, where their self-check passes.
    for asked in [GroupedKernel::Cutlass] {
        let mut engine = match engine_with(layers, true, StackFormat::Bf16, asked, false) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("gpu_decode: no engine with the {asked:?} expert kernels: {e}");
                continue;
            }
        };
        let (kernel, check) = engine.prefill_experts();
        eprintln!("gpu_decode: {asked:?} expert kernels: {kernel:?}, self-check {check:?}");
        if kernel != asked {
            continue;
        }
        let card = engine.device_name().to_string();
        let name = format!("{kernel:?}").to_lowercase();
        for tokens in [512, 4096] {
            let prompt = ids(tokens, 7);
            let ms = median_ms(|| prefill(&mut engine, &prompt), 5);
            record("prefill", &name, (1, tokens), true, ms, &card);
        }
    }
    // Decode again on the tensor-core decode kernels (context 16, batch 1, 8 and 32).
    match engine_with(layers, true, StackFormat::Bf16, GroupedKernel::Mma, true) {
        Ok(mut engine) => {
            let card = engine.device_name().to_string();
            for (batch, ms) in decode_batches(&mut engine) {
                record("decode", "mma_decode", (batch, 16), true, ms, &card);
            }
        }
        Err(e) => eprintln!("gpu_decode: no engine with mma_decode: {e}"),
    }
}

fn benches(c: &mut Criterion) {
    let layers = layers();
    let mut engine = match engine(layers, true) {
        Ok(e) => e,
        Err(e) if skip(&e) => {
            gpu_rule::print_skip("gpu_decode", &e);
            return;
        }
        Err(e) => panic!("building the engine: {e}"),
    };
    let mut group = c.benchmark_group(format!("gpu_decode_{layers}_layers"));
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    for (batch, context) in [(1, 16), (8, 16), (32, 16), (1, 4096), (1, 32000)] {
        let seqs = sequences(&mut engine, batch, context);
        let tokens: Vec<[u32; 1]> = ids(batch, 3).iter().map(|&t| [t]).collect();
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::new(format!("batch{batch}"), context), |b| {
            b.iter(|| decode_step(&mut engine, &seqs, context, &tokens))
        });
        for seq in seqs {
            mixtral::Engine::free_sequence(&mut engine, seq).expect("free");
        }
    }
    group.finish();
    let mut group = c.benchmark_group(format!("gpu_prefill_{layers}_layers"));
    group.sample_size(10);
    for tokens in [512, 4096] {
        let prompt = ids(tokens, 11);
        group.throughput(Throughput::Elements(tokens as u64));
        group.bench_function(BenchmarkId::from_parameter(tokens), |b| {
            b.iter(|| prefill(&mut engine, &prompt))
        });
    }
    group.finish();
}

/// Batch-1 decode at TP=1 and TP=2 (random bf16 weights, the same shapes; one sequence holding
/// 16 prompt tokens, each step rewinding to position 16 and drawing the greedy token on the
/// device), one JSON line each into `out_path` with the tensor-parallel size as `tp`; prints the
/// speedup TP=1 / TP=2.
#[cfg(feature = "nccl")]
fn protocol_multi(out_path: &str) {
    use mixtral::cuda::{MultiGpuError, ShardedCudaEngine, ShardedCudaOptions};
    use mixtral::sampling::{Sampler, SamplingParams};
    use mixtral::shard::Layout;
    use mixtral::{Engine, RowSampler};

    let layers = layers();
    let config = mixtral_config(layers);
    let card = match CudaDevice::new(0) {
        Ok(d) => d.name().to_string(),
        Err(e) if skip(&e) => {
            gpu_rule::print_skip("gpu_decode", &e);
            return;
        }
        Err(e) => panic!("opening device 0: {e}"),
    };
    let options = CudaEngineOptions {
        engine: EngineOptions {
            max_context: Some(4096),
            max_sequences: Some(4),
            max_step_tokens: Some(512),
            ..EngineOptions::default()
        },
        ..CudaEngineOptions::default()
    };
    let mut out = std::fs::File::create(out_path).expect("protocol output");
    let mut times = Vec::new();
    for tp in [1usize, 2] {
        let mut engine: Box<dyn Engine> = if tp == 1 {
            let source = WeightSource::Random {
                config: &config,
                seed: 1234,
                format: StackFormat::Bf16,
            };
            match CudaEngine::build(source, options.clone(), None) {
                Ok(e) => Box::new(e),
                Err(e) => panic!("building the TP=1 engine ({layers} layers): {e}"),
            }
        } else {
            let sharded = ShardedCudaOptions {
                layout: Layout { tp, ep: 1 },
                cuda: options.clone(),
                timeout: Duration::from_secs(600),
            };
            match ShardedCudaEngine::with_random_weights(&config, 1234, &sharded) {
                Ok(e) => Box::new(e),
                Err(e @ MultiGpuError::TooFewGpus { .. }) => {
                    eprintln!("gpu_decode: no TP={tp} figure: {e}");
                    std::process::exit(3);
                }
                Err(e) => panic!("building the TP={tp} engine ({layers} layers): {e}"),
            }
        };
        let prompt = ids(16, 5);
        let seq = engine.new_sequence().expect("sequence");
        let mut sampler = Sampler::new(SamplingParams::greedy()).expect("greedy sampler");
        let mut draw = |engine: &mut Box<dyn Engine>, tokens: &[u32], start_pos: usize| {
            let step = [SeqStep {
                seq,
                tokens,
                start_pos,
                logits: LogitsFor::Last,
            }];
            let mut rows = [RowSampler::new(&mut sampler, &prompt)];
            let drawn = engine.step_tokens(&step, &mut rows).expect("step");
            assert_eq!(drawn.len(), 1);
        };
        draw(&mut engine, &prompt, 0);
        let next = ids(1, 6);
        let ms = median_ms(|| draw(&mut engine, &next, 16), REPEATS * 3);
        let line = format!(
            r#"{{"card": "{card}", "what": "decode", "dtype": "bf16", "layers": {layers}, "batch": 1, "context": 16, "graphs": true, "tp": {tp}, "ours_ms": {ms:.4}}}"#
        );
        println!("{line}");
        writeln!(out, "{line}").expect("write protocol output");
        times.push(ms);
    }
    let speedup = times[0] / times[1];
    println!(
        "TP=2 vs TP=1 batch-1 decode, {layers} layers bf16, {card}: {:.3} vs {:.3} ms, speedup \
         {speedup:.2}x (target 1.6x)",
        times[1], times[0]
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--protocol-multi") {
        let out = args.get(i + 1).expect("--protocol-multi OUT.jsonl");
        #[cfg(feature = "nccl")]
        protocol_multi(out);
        #[cfg(not(feature = "nccl"))]
        {
            eprintln!("gpu_decode: --protocol-multi {out} needs a build with feature nccl");
            std::process::exit(2);
        }
        #[cfg(feature = "nccl")]
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--protocol-quant") {
        let out = args.get(i + 1).expect("--protocol-quant OUT.jsonl");
        protocol_quant(out);
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--protocol") {
        let out = args.get(i + 1).expect("--protocol OUT.jsonl");
        protocol(out);
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c);
    c.final_summary();
}
