//! The sharded CUDA engine (feature `nccl`) against the unsharded CUDA engine, on the trained
//! model (`models/mini-mixtral`: 2 KV heads, 8 experts, so TP 2 and EP 2 divide it).
//!
//! The same ranks joined as processes do (`mixtral-run --dist-init`: the rendezvous, the NCCL
//! world joined through rank 0's unique id, rank 0 leading the others in lockstep), each rank in a
//! thread here.
//!
//! Only a machine with no CUDA driver or device skips (`tests/common/gpu.rs`); on a machine with
//! one GPU the two-GPU test says it is not applicable (`scripts/gpu-check` runs the world of one,
//! `scripts/multi-gpu-check` both); a missing NCCL on a machine with a GPU fails. Without a GPU,
//! `scripts/emulated-gpu --features nccl --test gpu_multi` runs every test on the CPU (CI does):
//! four emulated GPUs and an emulated NCCL (`csrc/emulator/nccl.cpp`: the same collectives, summed
//! in rank order), so the sharded engine's plan, uploads, collectives inside the decode graphs and
//! rendezvous run there, but not NCCL's own transport or timing.
//!
//! Bounds, fixed before any run:
//! - NCCL world of one rank, on one GPU: the rank runs the unsharded kernels on the same bf16
//!   weights at the same sizes (all its heads, rows, experts and token ids); an all-reduce over
//!   one rank and an all-gather from one rank copy their input, so the logits must be
//!   bit-identical to the unsharded engine's at every step, decode steps replaying graphs that
//!   hold the NCCL calls;
//! - TP 2 and EP 2 against TP 1: the ranks compute the same per-head attention and per-row
//!   SwiGLU values; only the f32 sums change order (each o_proj and expert output summed from two
//!   partial sums, 2^-24 relative each), far below the trained model's greedy margins (at least
//!   0.15 logits, checked on the CPU by `tests/gpu_engine.rs`): the greedy ids must be equal for
//!   [`STEPS`] steps, and every step's logits within [`SHARDED_REL_L2`] of TP 1's.
#![cfg(all(feature = "cuda", feature = "nccl"))]

mod common;

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use common::gpu::small_options;
use common::numeric::{argmax, rel_l2};
use common::repo::root;
use common::run::{mixtral_run_events, token_ids};
use mixtral::cuda::{CudaEngine, MultiGpuError, ShardedCudaEngine, ShardedCudaOptions};
use mixtral::shard::Layout;
use mixtral::{Engine, LoadOptions, LogitsFor, Model, SeqStep};

/// Greedy steps compared.
const STEPS: usize = 32;

/// Relative L2 distance allowed between a sharded engine's logits and the unsharded engine's, at
/// every step. Derivation: the only arithmetic that changes is the order of f32 sums (o_proj and
/// the expert down projection summed from per-rank partial sums; each reordering is within
/// 2^-24 relative, and 8 such per layer over 4 layers add up to about 1e-6), then amplified by the
/// norms and softmaxes (a factor of a few): about 1e-5. The bound 1e-3 is 100 times that, still 30
/// times below the GPU-vs-CPU bound of `tests/gpu_engine.rs` (3e-2), so a wrong reduction (a
/// missing or doubled partial sum, about 1e-1 or more) fails it.
const SHARDED_REL_L2: f64 = 1e-3;

/// One test at a time on the devices.
static DEVICES: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    DEVICES.lock().unwrap_or_else(|p| p.into_inner())
}

fn model() -> Model {
    Model::load(&root().join("models/mini-mixtral"), &LoadOptions::default()).expect("mini-mixtral")
}

/// The sharded engine; `None` after printing why the test skips: no driver or device, or fewer
/// GPUs than the layout needs. Any other failure (NCCL missing, an engine that does not build)
/// fails the test.
fn sharded(model: &Model, layout: Layout, test: &str) -> Option<ShardedCudaEngine> {
    let opts = ShardedCudaOptions {
        layout,
        cuda: small_options(),
        timeout: Duration::from_secs(120),
    };
    match ShardedCudaEngine::new(&model.weights, &opts, None) {
        Ok(e) => Some(e),
        Err(MultiGpuError::TooFewGpus { needed, count, .. }) => {
            eprintln!("not applicable {test}: needs {needed} GPUs, the driver reports {count}");
            None
        }
        Err(e) => match e.cuda() {
            Some(c) if common::gpu::no_gpu(c) => {
                common::gpu::print_skip(test, c);
                None
            }
            _ => common::gpu::fail(test, "building the sharded CUDA engine", &e),
        },
    }
}

/// The unsharded CUDA engine; `None` after printing why the test skips (no driver or device).
fn unsharded(model: &Model, test: &str) -> Option<CudaEngine> {
    let built = CudaEngine::new(&model.weights, small_options(), None);
    common::gpu::or_skip(test, "building the CUDA engine", built)
}

/// Prefills `prompt`, then decodes greedily one token at a time: the ids and each step's logits.
fn greedy(engine: &mut dyn Engine, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let seq = engine.new_sequence().expect("sequence");
    let (mut ids, mut rows) = (Vec::new(), Vec::new());
    let mut tokens = prompt.to_vec();
    let mut pos = 0;
    for _ in 0..n {
        let out = engine
            .step(&[SeqStep {
                seq,
                tokens: &tokens,
                start_pos: pos,
                logits: LogitsFor::Last,
            }])
            .expect("step");
        let row = out.row(0).to_vec();
        let next = argmax(&row);
        pos += tokens.len();
        tokens = vec![next];
        ids.push(next);
        rows.push(row);
    }
    engine.free_sequence(seq).expect("free");
    (ids, rows)
}

fn prompt(model: &Model) -> Vec<u32> {
    let tokenizer = model.tokenizer.as_ref().expect("tokenizer");
    tokenizer
        .encode("The following example shows", true)
        .expect("encode")
}

#[test]
fn nccl_world_of_one_runs_the_whole_sharded_path_in_the_graphs_and_matches_the_unsharded_engine() {
    let _lock = lock();
    let test = "nccl_world_of_one";
    let model = model();
    let Some(mut one) = sharded(&model, Layout::default(), test) else {
        return;
    };
    let buckets = one.rank_graph_buckets().expect("graph buckets");
    assert!(
        !buckets.is_empty(),
        "decode graphs captured with the collectives"
    );
    let Some(mut plain) = unsharded(&model, test) else {
        return;
    };
    let ids = prompt(&model);
    let (sharded_ids, sharded_rows) = greedy(&mut one, &ids, STEPS);
    let (plain_ids, plain_rows) = greedy(&mut plain, &ids, STEPS);
    assert_eq!(sharded_ids, plain_ids, "greedy ids");
    assert_bit_identical(&sharded_rows, &plain_rows);
}

/// Every step's logits bit for bit equal.
fn assert_bit_identical(got: &[Vec<f32>], want: &[Vec<f32>]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let same = g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "step {i}: logits differ (rel L2 {:e})", rel_l2(g, w));
    }
}

/// Every step's logits within [`SHARDED_REL_L2`] (`what`: the layout, and the model where it is
/// not the trained one).
fn assert_close(what: &str, got: &[Vec<f32>], want: &[Vec<f32>]) {
    assert_eq!(got.len(), want.len(), "{what}: steps");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = rel_l2(g, w);
        eprintln!("{what}: step {i}: logits rel L2 {err:.2e}");
        assert!(err <= SHARDED_REL_L2, "{what}: step {i}: rel L2 {err:e}");
    }
}

/// Prefills `prompt`, then feeds `continuation` one token at a time (whatever the logits say):
/// each step's last-position logits.
fn teacher_forced(engine: &mut dyn Engine, prompt: &[u32], continuation: &[u32]) -> Vec<Vec<f32>> {
    let seq = engine.new_sequence().expect("sequence");
    let mut rows = Vec::new();
    let mut pos = 0;
    for tokens in std::iter::once(prompt).chain(continuation.chunks(1)) {
        let out = engine
            .step(&[SeqStep {
                seq,
                tokens,
                start_pos: pos,
                logits: LogitsFor::Last,
            }])
            .expect("step");
        rows.push(out.row(0).to_vec());
        pos += tokens.len();
    }
    engine.free_sequence(seq).expect("free");
    rows
}

/// TP 2 and EP 2 on two GPUs, and TP 2 x EP 2 on four (its TP groups' own communicators), against
/// one GPU: the greedy ids equal and every step within [`SHARDED_REL_L2`].
#[test]
fn tensor_and_expert_parallel_match_one_gpu() {
    let _lock = lock();
    let model = model();
    let ids = prompt(&model);
    let mut reference = None;
    // TP 2 x EP 2 last: on fewer than 4 GPUs it is not applicable, which ends the test.
    for layout in [
        Layout { tp: 2, ep: 1 },
        Layout { tp: 1, ep: 2 },
        Layout { tp: 2, ep: 2 },
    ] {
        let test = format!("sharded {layout}");
        let Some(mut engine) = sharded(&model, layout, &test) else {
            return;
        };
        let (want_ids, want_rows) = match &reference {
            Some(r) => r,
            None => {
                let mut one = CudaEngine::new(&model.weights, small_options(), None)
                    .unwrap_or_else(|e| common::gpu::fail(&test, "building the CUDA engine", &e));
                reference.insert(greedy(&mut one, &ids, STEPS))
            }
        };
        let (got_ids, got_rows) = greedy(&mut engine, &ids, STEPS);
        assert_close(&layout.to_string(), &got_rows, want_rows);
        assert_eq!(&got_ids, want_ids, "{layout}: greedy ids");
    }
}

/// This process's part of a world of processes (`mixtral-run --dist-init`), each rank in a thread
/// of its own here: rank 0 leads on `cuda:0` and returns its engine; rank `r > 0` follows on
/// `cuda:r` in a thread until rank 0's engine is dropped. The NCCL world is joined through the
/// unique id rank 0 hands out in the rendezvous, as across processes.
fn process_ranks(
    model: &Model,
    layout: Layout,
    test: &str,
) -> (Box<dyn Engine>, Vec<std::thread::JoinHandle<()>>) {
    use mixtral::engine::Device;
    use mixtral::shard::world::{self, DistInit};
    let world = layout.world();
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        l.local_addr().expect("its address").to_string()
    };
    let dist = |rank| DistInit {
        addr: addr.clone(),
        rank,
        world,
        timeout: Duration::from_secs(120),
    };
    let weights = std::sync::Arc::clone(&model.weights);
    let followers = (1..world)
        .map(|r| {
            let (dist, weights, test) =
                (dist(r), std::sync::Arc::clone(&weights), test.to_string());
            std::thread::spawn(move || {
                let joined = world::join(&dist, Device::Cuda(r)).unwrap_or_else(|e| {
                    common::gpu::fail(&test, &format!("joining as rank {r}"), &e)
                });
                joined
                    .follow(&weights, None)
                    .unwrap_or_else(|e| common::gpu::fail(&test, "following rank 0", &e));
            })
        })
        .collect();
    let joined = world::join(&dist(0), Device::Cuda(0))
        .unwrap_or_else(|e| common::gpu::fail(test, "joining as rank 0", &e));
    let options = mixtral::engine::EngineOptions {
        parallel: layout,
        ..small_options().engine
    };
    let engine = joined
        .lead(&weights, &options, None)
        .unwrap_or_else(|e| common::gpu::fail(test, "leading", &e));
    (engine, followers)
}

/// Bounds as above: a world of one process is bit-identical to the unsharded engine; two
/// processes (TP 2, EP 2) within [`SHARDED_REL_L2`] of it with equal greedy ids.
#[test]
fn ranks_joined_as_processes_match_the_unsharded_engine() {
    let _lock = lock();
    let test = "process_ranks";
    let model = model();
    let Some(mut plain) = unsharded(&model, test) else {
        return;
    };
    let ids = prompt(&model);
    let (want_ids, want_rows) = greedy(&mut plain, &ids, STEPS);
    drop(plain);
    let gpus = cudarc::driver::CudaContext::device_count().unwrap_or(0) as usize;
    for layout in [
        Layout::default(),
        Layout { tp: 2, ep: 1 },
        Layout { tp: 1, ep: 2 },
        Layout { tp: 2, ep: 2 },
    ] {
        if layout.world() > gpus {
            eprintln!(
                "not applicable {test} {layout}: needs {} GPUs, the driver reports {gpus}",
                layout.world()
            );
            continue;
        }
        let (mut engine, followers) = process_ranks(&model, layout, test);
        let (got_ids, got_rows) = greedy(engine.as_mut(), &ids, STEPS);
        drop(engine);
        for f in followers {
            f.join().expect("a follower panicked");
        }
        if layout.is_sharded() {
            assert_close(&layout.to_string(), &got_rows, &want_rows);
        } else {
            assert_bit_identical(&got_rows, &want_rows);
        }
        assert_eq!(got_ids, want_ids, "{layout}: greedy ids");
    }
}

/// The pre-quantized fixtures (`tests/fixtures/quant`: random weights, 2 layers, 4 experts), sharded
/// as loaded, each teacher-forced against one GPU on the same ids: TP 2 and EP 2 for the 8-bit ones
/// (their rows are whole and o_proj's and w2's columns split in multiples of 16, so the ranks'
/// parts stay packed: `src/cuda/engine/rank.rs` checks fp8-channel's), EP 2 for the GPTQ ones (whole experts; TP 2 would cut w2's 32-column groups
/// in two, which the ranks would then hold in bf16).
///
/// Bound: [`SHARDED_REL_L2`], derived as for the trained model: the ranks run the same packed
/// kernels on the same codes, and only the f32 sums of o_proj and of the experts change order
/// (under EP alone not even that: each slot's output comes whole from one rank, plus zeros). These
/// models have no greedy margins to rely on, so no argmax feeds back. Under TP the router sees
/// inputs about 1e-6 relative apart, which would flip a top-2 choice only where two router logits
/// are that close: such a flip would show as a failure far above the bound, never as a pass.
#[test]
fn quantized_fixtures_sharded_match_one_gpu() {
    let _lock = lock();
    let (tp2, ep2) = (Layout { tp: 2, ep: 1 }, Layout { tp: 1, ep: 2 });
    let fixtures: [(&str, &[Layout]); 5] = [
        ("fp8-tensor", &[tp2, ep2]),
        ("fp8-channel", &[tp2, ep2]),
        ("int8-channel", &[tp2, ep2]),
        ("gptq", &[ep2]),
        ("gptq-actorder", &[ep2]),
    ];
    // Ids below the fixtures' vocabulary of 512.
    let prompt: Vec<u32> = (0..12u32).map(|i| (i * 37 + 11) % 512).collect();
    let continuation: Vec<u32> = (0..16u32).map(|i| (i * 53 + 5) % 512).collect();
    for (name, layouts) in fixtures {
        let dir = root().join("tests/fixtures/quant").join(name);
        let model = Model::load(&dir, &LoadOptions::default()).expect(name);
        assert_eq!(model.weights.config.vocab_size, 512, "{name}");
        let test = format!("quantized_fixtures_sharded {name}");
        let Some(mut one) = unsharded(&model, &test) else {
            return;
        };
        let want = teacher_forced(&mut one, &prompt, &continuation);
        drop(one);
        for &layout in layouts {
            let Some(mut engine) = sharded(&model, layout, &test) else {
                return;
            };
            let got = teacher_forced(&mut engine, &prompt, &continuation);
            assert_close(&format!("{name} {layout}"), &got, &want);
        }
    }
}

/// `mixtral-run --device cuda --tensor-parallel 2` and `--expert-parallel 2` (the sharded engine
/// over two GPUs, behind the command line) print the greedy ids `mixtral-run --device cuda`
/// prints on one GPU: 16 tokens of the trained model, whose greedy margins (at least 0.15 logits,
/// `tests/gpu_engine.rs`) are far above the sharded engine's reordered sums ([`SHARDED_REL_L2`]).
#[test]
fn mixtral_run_tensor_and_expert_parallel_print_the_one_gpu_ids() {
    let _lock = lock();
    let test = "mixtral_run_sharded";
    let model = model();
    if unsharded(&model, test).is_none() {
        return;
    }
    let gpus = cudarc::driver::CudaContext::device_count().unwrap_or(0);
    if gpus < 2 {
        eprintln!("not applicable {test}: needs 2 GPUs, the driver reports {gpus}");
        return;
    }
    let dir = root().join("models/mini-mixtral");
    let ids = |parallel: &[&str]| -> Vec<u64> {
        let mut args = vec!["--model", dir.to_str().expect("a UTF-8 path")];
        args.extend(["--prompt", "The following example shows", "-n", "16"]);
        args.extend(["--device", "cuda"]);
        args.extend(parallel);
        token_ids(&mixtral_run_events(&args))
    };
    let one = ids(&[]);
    assert_eq!(one.len(), 16, "16 greedy ids on one GPU");
    for parallel in [["--tensor-parallel", "2"], ["--expert-parallel", "2"]] {
        assert_eq!(ids(&parallel), one, "mixtral-run {parallel:?}");
    }
}

/// A rank whose peer stops taking part (a process that died or hangs, its communicator never
/// aborted) fails its step with a timeout instead of waiting forever: two ranks opened as
/// processes open them (`open_process_rank`, the NCCL world joined through a unique id), each in
/// a thread; rank 1 builds (the warm-up's collectives need it), then stops. Rank 0's first step
/// blocks in its first collective until its watchdog aborts its communicators after
/// [`STUCK_TIMEOUT`]; the answer is a dead engine error saying so, and the next call fails at
/// once. Without the watchdog the step never returns: the test then fails after [`HANG_GUARD`]
/// instead of hanging.
#[test]
fn a_rank_whose_peer_stops_fails_with_a_timeout_instead_of_hanging() {
    use mixtral::cuda::{nccl::NcclComm, open_process_rank, CudaError};
    use std::sync::mpsc;
    use std::time::Instant;
    /// Each rank's timeout, which also bounds the build's warm-up: both ranks built in 1.0 s on
    /// the emulated device (2-core VM), so 10 s leaves a slower machine room, and a GPU far more.
    const STUCK_TIMEOUT: Duration = Duration::from_secs(10);
    /// How long the test waits for rank 0's step before calling it hung (with the watchdog
    /// disabled, it fails here, as checked by hand).
    const HANG_GUARD: Duration = Duration::from_secs(120);
    let _lock = lock();
    let test = "stuck_peer";
    let model = model();
    // Only a machine without a driver or device skips (the unsharded engine says which).
    let Some(plain) = unsharded(&model, test) else {
        return;
    };
    drop(plain);
    let gpus = cudarc::driver::CudaContext::device_count()
        .unwrap_or_else(|e| common::gpu::fail(test, "counting the GPUs", &e));
    if gpus < 2 {
        eprintln!("not applicable {test}: needs 2 GPUs, the driver reports {gpus}");
        return;
    }
    let id = NcclComm::unique_id().unwrap_or_else(|e| common::gpu::fail(test, "a unique id", &e));
    fn open(
        weights: &mixtral::weights::ModelWeights,
        rank: usize,
        id: &[u8],
    ) -> Result<CudaEngine, MultiGpuError> {
        let options = mixtral::cuda::CudaEngineOptions {
            device: rank,
            ..small_options()
        };
        // Both ranks see the same free memory, so each one's own KV block count is the world's.
        let layout = Layout { tp: 2, ep: 1 };
        open_process_rank(weights, layout, rank, id, &options, STUCK_TIMEOUT, Ok, None)
    }
    let (built_tx, built_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let peer = {
        let (weights, id) = (std::sync::Arc::clone(&model.weights), id.clone());
        std::thread::spawn(move || {
            let engine = open(&weights, 1, &id);
            built_tx.send(engine.is_ok()).expect("the test waits");
            // Stopped: holds its engine (and communicators) without taking part until released.
            let _ = release_rx.recv();
            drop(engine);
        })
    };
    let mut engine = open(&model.weights, 0, &id)
        .unwrap_or_else(|e| common::gpu::fail(test, "opening rank 0", &e));
    assert!(built_rx.recv().expect("rank 1 reports"), "rank 1 built");
    let (done_tx, done_rx) = mpsc::channel();
    let prompt = prompt(&model);
    let start = Instant::now();
    let stepping = std::thread::spawn(move || {
        let seq = engine.new_sequence().expect("sequence");
        let step = [SeqStep {
            seq,
            tokens: &prompt,
            start_pos: 0,
            logits: LogitsFor::Last,
        }];
        let first = engine.step(&step).map(|_| ());
        let elapsed = start.elapsed();
        let again = engine.step(&step).map(|_| ());
        done_tx
            .send((first, elapsed, again))
            .expect("the test waits");
        engine
    });
    let Ok((first, elapsed, again)) = done_rx.recv_timeout(HANG_GUARD) else {
        panic!("rank 0's step still waits on its stopped peer after {HANG_GUARD:?}: a hang");
    };
    let error = first.expect_err("a step without its peer cannot succeed");
    assert!(error.is_dead(), "the rank is dead after the abort: {error}");
    let timed_out = match &error {
        mixtral::EngineError::Backend { source, .. } => source.downcast_ref::<CudaError>(),
        _ => None,
    };
    assert!(
        matches!(timed_out, Some(CudaError::CollectiveTimeout { timeout }) if *timeout == STUCK_TIMEOUT),
        "a collective timeout, not {error:?}"
    );
    assert!(
        elapsed >= STUCK_TIMEOUT,
        "the watchdog fired after {elapsed:?}, before the timeout"
    );
    let again = again.expect_err("a dead engine refuses the next step");
    assert!(again.is_dead(), "{again}");
    drop(stepping.join().expect("rank 0's thread"));
    release_tx.send(()).expect("rank 1 waits");
    peer.join().expect("rank 1's thread");
}
