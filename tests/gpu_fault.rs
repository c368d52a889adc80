//! A sticky device fault (built with `--features cuda`; skips only without a CUDA driver or device,
//! `tests/common/gpu.rs`). Its own test binary:
//! the fault poisons the process's CUDA context for good.
//!
//! Also run on the emulated device (`scripts/emulated-gpu --test gpu_fault`), whose guard pages
//! must turn a kernel's write past the end of a buffer into that fault.
//!
//! After an illegal-address fault in the shared primary context, the CUDA engine's next step fails
//! with a dead backend error holding the failure, and every later call fails fast with a dead error
//! holding `CudaError::Dead` instead of touching the device again.
#![cfg(feature = "cuda")]

mod common;

use half::bf16;
use mixtral::cuda::memory::{DeviceArena, ViewMut};
use mixtral::cuda::ops::{fill_random, FillValues};
use mixtral::cuda::{CudaDevice, CudaEngine, CudaEngineOptions, CudaError, Kernels};
use mixtral::engine::EngineOptions;
use mixtral::{Engine, EngineError, LoadOptions, LogitsFor, Model, SeqStep};

use common::repo::root;

#[test]
fn a_sticky_device_fault_makes_the_engine_refuse_further_work() {
    let model = Model::load(&root().join("models/tiny-mixtral"), &LoadOptions::default())
        .expect("tiny model");
    let options = CudaEngineOptions {
        engine: EngineOptions {
            max_context: Some(64),
            max_sequences: Some(2),
            max_step_tokens: Some(16),
            ..EngineOptions::default()
        },
        ..CudaEngineOptions::default()
    };
    let Some(mut engine) = common::gpu::or_skip(
        "a_sticky_device_fault_makes_the_engine_refuse_further_work",
        "building the CUDA engine",
        CudaEngine::new(&model.weights, options, None),
    ) else {
        return;
    };
    let seq = engine.new_sequence().expect("sequence");
    let step = |engine: &mut CudaEngine, start_pos: usize| {
        engine.step(&[SeqStep {
            seq,
            tokens: &[1, 415],
            start_pos,
            logits: LogitsFor::Last,
        }])
    };
    step(&mut engine, 0).expect("a healthy step");

    // A write outside any buffer, in the same (primary) context. On a GPU through address 0x1000,
    // where nothing is mapped (past the end of a buffer a GPU's allocator may have rounded up, and
    // such a write can go unseen). On the emulated device (csrc/emulator/driver.cpp) from the start
    // of an 8 KiB buffer on for 16 KiB: the inaccessible page after each buffer must stop it.
    let device = CudaDevice::new(0).expect("device");
    let kernels = Kernels::load(&device).expect("kernels");
    let mut arena = DeviceArena::new(std::sync::Arc::clone(device.stream()));
    let buffer = arena
        .zeroed::<bf16>(4096, "the overrun buffer")
        .expect("buffer");
    let emulated = device.name().starts_with("emulated CUDA device");
    let (address, len) = match emulated {
        true => (buffer.view().address(), 8192),
        false => (0x1000, 1 << 20),
    };
    // SAFETY: deliberately invalid: the point is the device fault. Nothing owns or frees the view.
    let bogus = unsafe { ViewMut::<bf16>::from_raw(address, len) };
    let values = FillValues {
        seed: 1,
        scale: 1.0,
        shift: 0.0,
    };
    let _ = fill_random(&kernels, device.stream(), &values, bogus);
    let fault = device.stream().synchronize();
    assert!(
        fault.is_err(),
        "the write through {address:#x} did not fault"
    );

    match step(&mut engine, 0) {
        Err(e @ EngineError::Backend { .. }) => {
            eprintln!("first failure: {e}");
            assert!(
                e.is_dead(),
                "the first failure must mark the engine dead: {e}"
            );
        }
        other => panic!("expected a backend error, got {other:?}"),
    }
    for _ in 0..2 {
        match step(&mut engine, 0) {
            Err(e @ EngineError::Backend { .. }) => {
                assert!(e.is_dead(), "{e}");
                let EngineError::Backend { source, .. } = &e else {
                    unreachable!()
                };
                assert!(
                    matches!(source.downcast_ref::<CudaError>(), Some(CudaError::Dead(_))),
                    "{e}"
                );
            }
            other => panic!("expected the engine to refuse, got {other:?}"),
        }
    }
    let refused = engine.new_sequence();
    assert!(matches!(&refused, Err(e) if e.is_dead()), "{refused:?}");
}
