//! The one rule deciding when a GPU test or bench may skip (DESIGN.md, "Correctness rules for
//! tests"): only a machine with no CUDA driver ([`CudaError::NoDriver`]) or no CUDA device
//! ([`CudaError::NoDevice`] with a count of 0) skips, printing `skipped <test>: no GPU: <reason>`
//! and passing. Any other failure to open the device, load the kernels or build an engine is a
//! failure of the test, with the error. `scripts/gpu-check` counts a `skipped ` line on a GPU
//! machine as a failure.
//!
//! Also included by `benches/gpu_*.rs` (`#[path]`), so tests and benches share the rule.

use mixtral::cuda::{CudaEngineOptions, CudaError};
use mixtral::engine::EngineOptions;

/// Engine options small enough for the test models on any GPU: 256 tokens of context, 4 sequences,
/// 64 tokens a step.
pub fn small_options() -> CudaEngineOptions {
    CudaEngineOptions {
        engine: EngineOptions {
            max_context: Some(256),
            max_sequences: Some(4),
            max_step_tokens: Some(64),
            ..EngineOptions::default()
        },
        ..CudaEngineOptions::default()
    }
}

/// True when `e` says this machine has no GPU at all: no driver, or a driver reporting no device.
pub fn no_gpu(e: &CudaError) -> bool {
    matches!(
        e,
        CudaError::NoDriver | CudaError::NoDevice { count: 0, .. }
    )
}

/// Prints the line of a test that skips for want of a GPU (`reason`: the [`no_gpu`] error).
pub fn print_skip(test: &str, reason: &dyn std::fmt::Display) {
    eprintln!("skipped {test}: no GPU: {reason}");
}

/// Fails `test`: the GPU is there but `what` failed with `error`.
pub fn fail(test: &str, what: &str, error: &dyn std::fmt::Display) -> ! {
    panic!(
        "{test}: {what}: {error} (only a missing CUDA driver or device skips a GPU test; any \
         other failure fails it)"
    )
}

/// The value `opened` holds; or `None` after [`print_skip`] when its error says there is no GPU
/// ([`no_gpu`]).
///
/// # Panics
/// On any other error ([`fail`]; `what` names the step): a GPU that is present but cannot be
/// opened, an unsupported device, kernels that do not load, an engine that cannot be built.
pub fn or_skip<T>(test: &str, what: &str, opened: Result<T, CudaError>) -> Option<T> {
    match opened {
        Ok(value) => Some(value),
        Err(e) if no_gpu(&e) => {
            print_skip(test, &e);
            None
        }
        Err(e) => fail(test, what, &e),
    }
}
