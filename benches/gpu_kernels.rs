//! Per-kernel GPU benchmarks on Mixtral-8x7B shapes (one layer's worth of each op), with seeded
//! random bf16 data made on the device. Criterion throughput is bytes for the bandwidth-bound decode
//! kernels (weights or KV read once: read the rate as GB/s) and FLOPs for the tensor-core prefill
//! kernels (read elements/s as FLOP/s). Without a CUDA driver or device it prints why and exits
//! successfully; any other failure to open the device or load the kernels panics.
//!
//! `cargo bench --features cuda,testing --bench gpu_kernels`. Each sample ends with a stream synchronise.

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use cudarc::driver::CudaStream;
use half::bf16;
use mixtral::cuda::args::{
    AttentionDecodeArgs, AttentionPrefillArgs, LinearArgs, LinearScalars, MoeArgs, MoeScalars,
    QMoeArgs, RouterArgs, RouterScalars, SampleArgs, SampleScalars,
};
use mixtral::cuda::engine::matrix::table_values;
use mixtral::cuda::memory::{DeviceArena, DeviceBuffer};
use mixtral::cuda::ops::{
    self, attention_splits, AttentionDecodeShape, AttentionPrefillShape, FillValues, PackedKernel,
    PackedView, PagedCacheShape,
};
use mixtral::cuda::{CudaDevice, CudaError, Kernels};
use mixtral::packed::lut4::Lut4;
use mixtral::quant::{PackedKind, Q8};

const HIDDEN: usize = 4096;
const INTER: usize = 14336;
const EXPERTS: usize = 8;
const TOP_K: usize = 2;
const HEADS: usize = 32;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const VOCAB: usize = 32000;
const BLOCK: usize = 16;

struct Bench {
    device: CudaDevice,
    kernels: Kernels,
    arena: DeviceArena,
    seed: u32,
}

impl Bench {
    fn stream(&self) -> Arc<CudaStream> {
        Arc::clone(self.device.stream())
    }

    /// `len` random bf16 values of half-width `scale`.
    fn random(&mut self, len: usize, scale: f32) -> DeviceBuffer<bf16> {
        let mut r = self.arena.zeroed::<bf16>(len, "bench data").expect("alloc");
        self.seed += 1;
        ops::fill_random(
            &self.kernels,
            self.device.stream(),
            &FillValues {
                seed: self.seed,
                scale,
                shift: 0.0,
            },
            r.view_mut(),
        )
        .expect("fill");
        r
    }

    fn zeros<T>(&mut self, len: usize) -> DeviceBuffer<T> {
        self.arena.zeroed::<T>(len, "bench output").expect("alloc")
    }

    fn upload<T: cudarc::driver::DeviceRepr>(&mut self, host: &[T]) -> DeviceBuffer<T> {
        self.arena.upload(host, "bench input").expect("upload")
    }
}

fn sync(stream: &CudaStream) {
    stream.synchronize().expect("synchronise");
}

/// A launcher over [`MoeArgs`] (`ops::moe_experts`, `ops::moe_mma`).
type MoeOp = fn(&Kernels, &CudaStream, &MoeScalars, MoeArgs<'_>) -> Result<(), CudaError>;

/// One launch of a dense projection over its arguments (the shape and kernels captured).
type Launch<'a> = dyn FnMut(LinearArgs<'_>) -> Result<(), CudaError> + 'a;

/// The dense projections at Mixtral shapes (decode batches also on `linear_mma_decode`; prefill
/// chunks also on `linear_cutlass`, CUTLASS's Hopper GEMM, where its self-check passes).
fn linear_benches(c: &mut Criterion, b: &mut Bench) {
    let stream = b.stream();
    let check = ops::linear_cutlass_self_check(&b.kernels, &stream).expect("CUTLASS self-check");
    println!(
        "linear: linear_cutlass_self_check on {}: {check:?}",
        b.device.name()
    );
    let shapes = [("qkv", 6144), ("o", 4096), ("lm_head", VOCAB)];
    let mut cutlass = check.passed().then(|| {
        let features = shapes.map(|(_, out)| (HIDDEN as u32, out as u32));
        ops::LinearCutlassScratch::new(&mut b.arena, &stream, &features, 512).expect("scratch")
    });
    let mut group = c.benchmark_group("linear");
    // A short warm-up: up to 24 rows share gpu-check's time for the kernel benches.
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    for (name, out_features) in shapes {
        let w = b.random(out_features * HIDDEN, 0.02);
        for tokens in [1usize, 8, 32, 512] {
            let x = b.random(tokens * HIDDEN, 1.0);
            let mut y = b.zeros::<bf16>(tokens * out_features);
            if tokens <= 8 {
                group.throughput(Throughput::Bytes((out_features * HIDDEN * 2) as u64));
            } else {
                group.throughput(Throughput::Elements(
                    (2 * tokens * out_features * HIDDEN) as u64,
                ));
            }
            let s = LinearScalars {
                tokens: tokens as u32,
                in_features: HIDDEN as u32,
                out_features: out_features as u32,
            };
            // Decode batches also on the tensor-core decode kernel, prefill chunks on CUTLASS's.
            let mut launchers: Vec<(&str, Box<Launch>)> = vec![(
                "",
                Box::new(|args| ops::linear(&b.kernels, &stream, &s, args)),
            )];
            if tokens <= 8 {
                let decode =
                    |args: LinearArgs<'_>| ops::linear_mma_decode(&b.kernels, &stream, &s, args);
                launchers.push(("_mma_decode", Box::new(decode)));
            } else if let Some(scratch) = cutlass.as_mut() {
                let run = |args: LinearArgs<'_>| ops::linear_cutlass(&stream, &s, args, scratch);
                launchers.push(("_cutlass", Box::new(run)));
            }
            for (suffix, mut launch) in launchers {
                let id = BenchmarkId::new(format!("{name}{suffix}"), tokens);
                group.bench_function(id, |bench| {
                    bench.iter(|| {
                        let args = LinearArgs {
                            x: x.view(),
                            w: w.view(),
                            out: y.view_mut().into(),
                        };
                        launch(args).expect(name);
                        sync(&stream);
                    })
                });
            }
        }
    }
    group.finish();
}

/// The inputs and outputs of the expert kernels for `tokens` random rows routed by the device router.
struct Routed {
    x: DeviceBuffer<bf16>,
    topk_weights: DeviceBuffer<f32>,
    offsets: DeviceBuffer<i32>,
    sorted: DeviceBuffer<i32>,
    act: DeviceBuffer<bf16>,
    out: DeviceBuffer<f32>,
}

/// Random hidden states for `tokens` tokens, routed through `gate` by the device router.
fn route(
    b: &mut Bench,
    stream: &Arc<CudaStream>,
    gate: &DeviceBuffer<bf16>,
    tokens: usize,
) -> Routed {
    let x = b.random(tokens * HIDDEN, 1.0);
    let slots = tokens * TOP_K;
    let mut logits = b.zeros::<f32>(tokens * EXPERTS);
    let mut topk_ids = b.zeros::<i32>(slots);
    let mut topk_weights = b.zeros::<f32>(slots);
    let mut counts = b.zeros::<i32>(EXPERTS);
    let mut offsets = b.zeros::<i32>(EXPERTS + 1);
    let mut sorted = b.zeros::<i32>(slots);
    let mut done = b.zeros::<u32>(1);
    ops::router(
        &b.kernels,
        stream,
        &RouterScalars {
            tokens: tokens as u32,
            hidden: HIDDEN as u32,
            experts: EXPERTS as u32,
            top_k: TOP_K as u32,
        },
        RouterArgs {
            x: x.view(),
            gate: gate.view(),
            logits: logits.view_mut(),
            topk_ids: topk_ids.view_mut(),
            topk_weights: topk_weights.view_mut(),
            expert_counts: counts.view_mut(),
            expert_offsets: offsets.view_mut(),
            sorted_slots: sorted.view_mut(),
            done: done.view_mut(),
        },
    )
    .expect("router");
    sync(stream);
    Routed {
        x,
        topk_weights,
        offsets,
        sorted,
        act: b.zeros::<bf16>(slots * INTER),
        out: b.zeros::<f32>(slots * HIDDEN),
    }
}

fn moe_benches(c: &mut Criterion, b: &mut Bench) {
    let stream = b.stream();
    let gate = b.random(EXPERTS * HIDDEN, 0.02);
    let w1 = b.random(EXPERTS * INTER * HIDDEN, 0.02);
    let w3 = b.random(EXPERTS * INTER * HIDDEN, 0.02);
    let w2 = b.random(EXPERTS * HIDDEN * INTER, 0.01);
    let mut group = c.benchmark_group("moe");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3));
    for tokens in [1usize, 8, 512, 4096] {
        let slots = tokens * TOP_K;
        let Routed {
            x,
            topk_weights,
            offsets,
            sorted,
            mut act,
            mut out,
        } = route(b, &stream, &gate, tokens);
        let weight_bytes = 3 * INTER * HIDDEN * 2;
        if tokens <= 8 {
            // Distinct experts touched bound the bytes; at batch 1 that is exactly 2.
            group.throughput(Throughput::Bytes(
                (weight_bytes * slots.min(EXPERTS)) as u64,
            ));
        } else {
            group.throughput(Throughput::Elements(
                (2 * slots * 3 * INTER * HIDDEN) as u64,
            ));
        }
        let shape = moe_scalars(tokens);
        // Decode batches also on the tensor-core decode kernels.
        let ops: &[(&str, MoeOp)] = if tokens <= 8 {
            &[
                ("experts", ops::moe_experts),
                ("experts_mma_decode", ops::moe_mma),
            ]
        } else {
            &[("experts", ops::moe_experts)]
        };
        for &(name, op) in ops {
            group.bench_function(BenchmarkId::new(name, tokens), |bench| {
                bench.iter(|| {
                    let args = MoeArgs {
                        x: x.view(),
                        w1: w1.view(),
                        w3: w3.view(),
                        w2: w2.view(),
                        topk_weights: topk_weights.view(),
                        expert_offsets: offsets.view(),
                        sorted_slots: sorted.view(),
                        act: act.view_mut(),
                        out: out.view_mut(),
                    };
                    op(&b.kernels, &stream, &shape, args).expect("moe");
                    sync(&stream);
                })
            });
        }
    }
    group.finish();
}

/// The prefill expert GEMMs side by side at Mixtral prefill shapes: `moe_grouped_gemm` (mma.sync)
/// and, on compute capability 9.0 after their passing self-checks, `moe_cutlass_gemm` (CUTLASS's
/// grouped GEMM, its gather, SwiGLU and scatter included) and
/// `moe_cutlass_q8_gemm` (the same over FP8 and INT8 stacks, 8-bit x 8-bit, the quantizing
/// kernels included).
/// Throughput in FLOPs (`2 * slots * 3 * inter * hidden`), routing from the device router on random
/// data.
fn moe_prefill_benches(c: &mut Criterion, b: &mut Bench) {
    let stream = b.stream();
    let cutlass_check =
        ops::moe_cutlass_self_check(&b.kernels, &stream).expect("CUTLASS self-check");
    eprintln!(
        "moe_prefill: moe_cutlass_self_check on {}: {cutlass_check:?}",
        b.device.name()
    );
    // 8-bit stacks for the 8-bit kernels whose self-check passes (pseudo-random codes, scales
    // 0.01), one format at a time on the device.
    let mut q8_formats = Vec::new();
    for format in [Q8::Fp8, Q8::Int8] {
        let check = ops::moe_cutlass_q8_self_check(&stream, format).expect("CUTLASS 8-bit check");
        eprintln!(
            "moe_prefill: moe_cutlass_q8_self_check({format:?}) on {}: {check:?}",
            b.device.name()
        );
        if check.passed() {
            q8_formats.push(format);
        }
    }
    let gate = b.random(EXPERTS * HIDDEN, 0.02);
    let w1 = b.random(EXPERTS * INTER * HIDDEN, 0.02);
    let w3 = b.random(EXPERTS * INTER * HIDDEN, 0.02);
    let w2 = b.random(EXPERTS * HIDDEN * INTER, 0.01);
    let mut group = c.benchmark_group("moe_prefill");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3));
    for tokens in [512usize, 4096] {
        let slots = tokens * TOP_K;
        let Routed {
            x,
            topk_weights,
            offsets,
            sorted,
            mut act,
            mut out,
        } = route(b, &stream, &gate, tokens);
        group.throughput(Throughput::Elements(
            (2 * slots * 3 * INTER * HIDDEN) as u64,
        ));
        let shape = moe_scalars(tokens);
        let mut scratch = cutlass_check
            .passed()
            .then(|| {
                let mut arena = DeviceArena::new(Arc::clone(&stream));
                ops::MoeCutlassScratch::new(&mut arena, &stream, &shape)
            })
            .transpose()
            .expect("CUTLASS scratch");
        let mut ops_to_run: Vec<(&str, Box<MoeOpMut<'_>>)> =
            vec![("grouped", Box::new(ops::moe_grouped_gemm))];
        if let Some(scratch) = scratch.as_mut() {
            ops_to_run.push((
                "cutlass",
                Box::new(
                    move |_: &Kernels, stream: &CudaStream, s: &MoeScalars, a: MoeArgs<'_>| {
                        ops::moe_cutlass_gemm(stream, s, a, scratch)
                    },
                ),
            ));
        }
        for &format in &q8_formats {
            let kind = format.kind();
            let [(c1, p1, _), (c3, p3, _), (c2, p2, _)] = [
                packed_stack(b, kind, EXPERTS, INTER, HIDDEN),
                packed_stack(b, kind, EXPERTS, INTER, HIDDEN),
                packed_stack(b, kind, EXPERTS, HIDDEN, INTER),
            ];
            let mut arena = DeviceArena::new(Arc::clone(&stream));
            let mut scratch = ops::MoeCutlassQ8Scratch::new(&mut arena, &stream, &shape, format)
                .expect("CUTLASS 8-bit scratch");
            let name = format!("cutlass_{}", format!("{format:?}").to_lowercase());
            group.bench_function(BenchmarkId::new(&name, tokens), |bench| {
                bench.iter(|| {
                    let args = QMoeArgs {
                        x: x.view(),
                        w1_codes: c1.view(),
                        w1_params: p1.view(),
                        w3_codes: c3.view(),
                        w3_params: p3.view(),
                        w13_perm: None,
                        w2_codes: c2.view(),
                        w2_params: p2.view(),
                        w2_perm: None,
                        table: None,
                        topk_weights: topk_weights.view(),
                        expert_offsets: offsets.view(),
                        sorted_slots: sorted.view(),
                        act: act.view_mut(),
                        out: out.view_mut(),
                    };
                    ops::moe_cutlass_q8_gemm(&stream, &shape, [kind; 3], args, &mut scratch)
                        .expect("cutlass 8-bit");
                    sync(&stream);
                })
            });
        }
        for (name, mut op) in ops_to_run {
            group.bench_function(BenchmarkId::new(name, tokens), |bench| {
                bench.iter(|| {
                    op(
                        &b.kernels,
                        &stream,
                        &shape,
                        MoeArgs {
                            x: x.view(),
                            w1: w1.view(),
                            w3: w3.view(),
                            w2: w2.view(),
                            topk_weights: topk_weights.view(),
                            expert_offsets: offsets.view(),
                            sorted_slots: sorted.view(),
                            act: act.view_mut(),
                            out: out.view_mut(),
                        },
                    )
                    .expect(name);
                    sync(&stream);
                })
            });
        }
    }
    group.finish();
}

/// An expert-MLP op with `moe_grouped_gemm`'s signature (a closure may hold its scratch).
type MoeOpMut<'o> = dyn FnMut(&Kernels, &CudaStream, &MoeScalars, MoeArgs<'_>) -> Result<(), mixtral::cuda::CudaError>
    + 'o;

/// Mixtral's expert shapes for `tokens` tokens.
fn moe_scalars(tokens: usize) -> MoeScalars {
    MoeScalars {
        tokens: tokens as u32,
        hidden: HIDDEN as u32,
        inter: INTER as u32,
        experts: EXPERTS as u32,
        top_k: TOP_K as u32,
    }
}

/// A packed stack of `count` `[rows, cols]` matrices with pseudo-random codes (no FP8 NaN code),
/// scales around 0.01 and INT4 zeros of 8 (LUT4: one scale per group); returns (codes, params,
/// bytes the kernels read).
fn packed_stack(
    b: &mut Bench,
    kind: PackedKind,
    count: usize,
    rows: usize,
    cols: usize,
) -> (DeviceBuffer<u8>, DeviceBuffer<f32>, usize) {
    let (row_bytes, row_params) = (kind.row_code_bytes(cols), kind.row_params(cols));
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ (count * rows * cols) as u64;
    let codes: Vec<u8> = (0..count * rows * row_bytes)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8 & 0x77
        })
        .collect();
    let params: Vec<f32> = (0..count * rows * row_params)
        .map(|i| {
            if matches!(kind, PackedKind::Int4 { .. }) && i % 2 == 1 {
                8.0
            } else {
                0.01
            }
        })
        .collect();
    let bytes = codes.len() + 4 * params.len();
    (b.upload(&codes), b.upload(&params), bytes)
}

/// The quantized decode kernels at Mixtral shapes: qlinear (QKV, O) and qmoe (routed experts),
/// GB/s of packed weights read; 4-bit integer also on the tensor-core kernels (`mma_decode`:
/// qlinear_mma, qmoe_mma).
fn quant_benches(c: &mut Criterion, b: &mut Bench) {
    let stream = b.stream();
    let mut group = c.benchmark_group("quant");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(2));
    let (gemv, mma) = (PackedKernel::Gemv, PackedKernel::Mma);
    let int4 = PackedKind::Int4 { group_size: 128 };
    let kinds = [
        ("fp8", PackedKind::Fp8, gemv),
        ("int8", PackedKind::Int8, gemv),
        ("int4", int4, gemv),
        ("mma_decode", int4, mma),
        // bitsandbytes NF4 in its blocks of 64.
        (
            "nf4",
            PackedKind::Lut4 {
                table: Lut4::Nf4,
                group_size: 64,
            },
            gemv,
        ),
    ];
    let gate = b.random(EXPERTS * HIDDEN, 0.02);
    for (label, kind, kernel) in kinds {
        // LUT4's 16 values, read once per block (not counted in the bytes).
        let table = table_values(kind).map(|t| b.upload(&t));
        for (name, out_features) in [("qkv", 6144), ("o", 4096)] {
            let (codes, params, bytes) = packed_stack(b, kind, 1, out_features, HIDDEN);
            for tokens in [1usize, 8] {
                let x = b.random(tokens * HIDDEN, 1.0);
                let mut y = b.zeros::<bf16>(tokens * out_features);
                group.throughput(Throughput::Bytes(bytes as u64));
                group.bench_function(
                    BenchmarkId::new(format!("qlinear_{label}_{name}"), tokens),
                    |bench| {
                        bench.iter(|| {
                            let w = PackedView {
                                kind,
                                codes: codes.view(),
                                params: params.view(),
                                perm: None,
                                table: table.as_ref().map(DeviceBuffer::view),
                            };
                            ops::qlinear(
                                &b.kernels,
                                &stream,
                                &LinearScalars {
                                    tokens: tokens as u32,
                                    in_features: HIDDEN as u32,
                                    out_features: out_features as u32,
                                },
                                (x.view(), w),
                                y.view_mut().into(),
                                kernel,
                            )
                            .expect(label);
                            sync(&stream);
                        })
                    },
                );
            }
        }
        let (w1_codes, w1_params, w13_bytes) = packed_stack(b, kind, EXPERTS, INTER, HIDDEN);
        let (w3_codes, w3_params, _) = packed_stack(b, kind, EXPERTS, INTER, HIDDEN);
        let (w2_codes, w2_params, w2_bytes) = packed_stack(b, kind, EXPERTS, HIDDEN, INTER);
        let per_expert = (2 * w13_bytes + w2_bytes) / EXPERTS;
        for tokens in [1usize, 8] {
            let slots = tokens * TOP_K;
            let Routed {
                x,
                topk_weights,
                offsets,
                sorted,
                mut act,
                mut out,
            } = route(b, &stream, &gate, tokens);
            // Distinct experts touched bound the bytes; at batch 1 that is exactly 2.
            group.throughput(Throughput::Bytes((per_expert * slots.min(EXPERTS)) as u64));
            let shape = MoeScalars {
                tokens: tokens as u32,
                hidden: HIDDEN as u32,
                inter: INTER as u32,
                experts: EXPERTS as u32,
                top_k: TOP_K as u32,
            };
            group.bench_function(BenchmarkId::new(format!("qmoe_{label}"), tokens), |bench| {
                bench.iter(|| {
                    let args = QMoeArgs {
                        x: x.view(),
                        w1_codes: w1_codes.view(),
                        w1_params: w1_params.view(),
                        w3_codes: w3_codes.view(),
                        w3_params: w3_params.view(),
                        w13_perm: None,
                        w2_codes: w2_codes.view(),
                        w2_params: w2_params.view(),
                        w2_perm: None,
                        table: table.as_ref().map(DeviceBuffer::view),
                        topk_weights: topk_weights.view(),
                        expert_offsets: offsets.view(),
                        sorted_slots: sorted.view(),
                        act: act.view_mut(),
                        out: out.view_mut(),
                    };
                    ops::qmoe(&b.kernels, &stream, &shape, ([kind; 3], args), kernel).expect(label);
                    sync(&stream);
                })
            });
        }
    }
    group.finish();
}

fn attention_benches(c: &mut Criterion, b: &mut Bench) {
    let stream = b.stream();
    let context = 32768;
    let blocks = context / BLOCK;
    let kv_width = KV_HEADS * HEAD_DIM;
    let k_cache = b.random(blocks * BLOCK * kv_width, 1.0);
    let v_cache = b.random(blocks * BLOCK * kv_width, 1.0);
    // One sequence owning the blocks in a shuffled order.
    let mut table: Vec<i32> = (0..blocks as i32).collect();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for i in (1..table.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        table.swap(i, (state % (i as u64 + 1)) as usize);
    }
    let tables = b.upload(&table);
    let cache = PagedCacheShape {
        num_blocks: blocks,
        block_size: BLOCK,
        num_seqs: 1,
        max_blocks_per_seq: blocks,
    };
    let mut group = c.benchmark_group("attention");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(2));
    let split_keys = 256;
    let max_splits = attention_splits(context, split_keys);
    let mut q = b.random(HEADS * HEAD_DIM, 1.0);
    let [q_rows] = q
        .view_mut()
        .column_groups([HEADS * HEAD_DIM])
        .expect("one row of q");
    let q_rows = q_rows.into();
    let token_seq = b.upload(&[0i32]);
    let mut out = b.zeros::<bf16>(HEADS * HEAD_DIM);
    let mut part_out = b.zeros::<f32>(HEADS * max_splits * HEAD_DIM);
    let mut part_lse = b.zeros::<f32>(HEADS * max_splits);
    let mut split_done = b.zeros::<u32>(KV_HEADS);
    // The scores on CUDA cores (`decode`) and on the tensor cores (`decode_mma`).
    for (cached, (name, tensor_cores)) in [4096usize, 16384, 32000]
        .into_iter()
        .flat_map(|n| [(n, ("decode", false)), (n, ("decode_mma", true))])
    {
        let positions = b.upload(&[cached as i32 - 1]);
        group.throughput(Throughput::Bytes((2 * cached * kv_width * 2) as u64));
        group.bench_function(BenchmarkId::new(name, cached), |bench| {
            bench.iter(|| {
                ops::attention_decode(
                    &b.kernels,
                    &stream,
                    &AttentionDecodeShape {
                        tokens: 1,
                        n_heads: HEADS,
                        n_kv_heads: KV_HEADS,
                        head_dim: HEAD_DIM,
                        cache,
                        window: None,
                        split_keys,
                        multiprocessors: b.device.multiprocessors(),
                        tensor_cores,
                    },
                    AttentionDecodeArgs {
                        q: q_rows,
                        k_cache: k_cache.view(),
                        v_cache: v_cache.view(),
                        block_tables: tables.view(),
                        token_seq: token_seq.view(),
                        positions: positions.view(),
                        out: out.view_mut(),
                        part_out: part_out.view_mut(),
                        part_lse: part_lse.view_mut(),
                        split_done: split_done.view_mut(),
                    },
                )
                .expect("attention decode");
                sync(&stream);
            })
        });
    }
    for tokens in [512usize, 4096] {
        let mut q = b.random(tokens * HEADS * HEAD_DIM, 1.0);
        let [q_rows] = q
            .view_mut()
            .column_groups([HEADS * HEAD_DIM])
            .expect("whole rows of q");
        let q_rows = q_rows.into();
        let mut out = b.zeros::<bf16>(tokens * HEADS * HEAD_DIM);
        // Causal: about half of the tokens x tokens scores, two matmuls of 2 FLOPs per MAC.
        group.throughput(Throughput::Elements(
            (2 * 2 * HEADS * HEAD_DIM * tokens * (tokens + 1) / 2) as u64,
        ));
        group.bench_function(BenchmarkId::new("prefill", tokens), |bench| {
            bench.iter(|| {
                ops::attention_prefill(
                    &b.kernels,
                    &stream,
                    &AttentionPrefillShape {
                        tokens,
                        start_pos: 0,
                        seq_row: 0,
                        n_heads: HEADS,
                        n_kv_heads: KV_HEADS,
                        head_dim: HEAD_DIM,
                        cache,
                        window: None,
                    },
                    AttentionPrefillArgs {
                        q: q_rows,
                        k_cache: k_cache.view(),
                        v_cache: v_cache.view(),
                        block_tables: tables.view(),
                        out: out.view_mut(),
                    },
                )
                .expect("attention prefill");
                sync(&stream);
            })
        });
    }
    group.finish();
}

/// Device sampling of one 32000-logit row (batch 1), through the search path only (`search`) and
/// through the fast paths (`fast`): no filter, top-p 0.95 alone and top-k 40 with top-p 0.95, on a
/// peaked row (40 ids about 10 above a normal spread of 2: the nucleus lies within the 1024 highest
/// logits) and a flat one (the spread alone: top-p alone falls back to the search path). Each sample
/// issues 8 launches before synchronising; read elements/s as draws per second.
fn sampling_benches(c: &mut Criterion, b: &mut Bench) {
    const LAUNCHES: usize = 8;
    let stream = b.stream();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut normal = || {
        // Sum of four uniforms, centred and scaled to a spread of about 2.
        let mut sum = 0.0f32;
        for _ in 0..4 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            sum += (state >> 40) as f32 / (1u64 << 24) as f32;
        }
        (sum - 2.0) * 3.5
    };
    let flat: Vec<f32> = (0..VOCAB).map(|_| normal()).collect();
    let peaked: Vec<f32> = flat
        .iter()
        .enumerate()
        .map(|(i, &v)| if i % 800 == 3 { v + 10.0 } else { v })
        .collect();
    let temperature = b.upload(&[1.0f32]);
    let mut group = c.benchmark_group("sample");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(LAUNCHES as u64));
    for (look, row) in [("peaked", &peaked), ("flat", &flat)] {
        let logits = b.upload(row);
        for (filter, top_k, top_p) in [
            ("none", 0u32, 1.0f32),
            ("top_p", 0, 0.95),
            ("top_k_top_p", 40, 0.95),
        ] {
            let top_k = b.upload(&[top_k]);
            let top_p = b.upload(&[top_p]);
            let mut rng_state = b.upload(&ops::rng_state_for_seed(7));
            let mut ids = b.zeros::<u32>(1);
            for (mode, fast) in [("search", 0u32), ("fast", 1)] {
                let id = BenchmarkId::new(format!("{look}_{filter}"), mode);
                group.bench_function(id, |bench| {
                    bench.iter(|| {
                        for _ in 0..LAUNCHES {
                            ops::sample(
                                &b.kernels,
                                &stream,
                                &SampleScalars {
                                    rows: 1,
                                    vocab: VOCAB as u32,
                                    fast,
                                },
                                SampleArgs {
                                    logits: logits.view(),
                                    temperature: temperature.view(),
                                    top_k: top_k.view(),
                                    top_p: top_p.view(),
                                    rng_state: rng_state.view_mut(),
                                    out_ids: ids.view_mut(),
                                },
                            )
                            .expect("sample");
                        }
                        sync(&stream);
                    })
                });
            }
        }
    }
    group.finish();
}

/// The skip rule of the GPU tests: only a missing CUDA driver or device skips.
#[path = "../tests/common/gpu.rs"]
#[allow(dead_code)]
mod gpu_rule;

fn main() {
    let Some(device) = gpu_rule::or_skip("gpu_kernels", "opening device 0", CudaDevice::new(0))
    else {
        return;
    };
    let kernels = Kernels::load(&device).expect("kernels");
    let arena = DeviceArena::new(Arc::clone(device.stream()));
    let mut bench = Bench {
        device,
        kernels,
        arena,
        seed: 99,
    };
    let mut c = Criterion::default().configure_from_args();
    linear_benches(&mut c, &mut bench);
    moe_benches(&mut c, &mut bench);
    moe_prefill_benches(&mut c, &mut bench);
    attention_benches(&mut c, &mut bench);
    quant_benches(&mut c, &mut bench);
    sampling_benches(&mut c, &mut bench);
    c.final_summary();
}
