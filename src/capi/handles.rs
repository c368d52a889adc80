//! The C ABI's handles and calls: [`MixtralModel`] (a loaded model directory),
//! [`MixtralEngine`] (an engine on a device, with the model's tokenizer and EOS ids),
//! [`MixtralRequest`] (prompt ids, token limit, sampling, stop strings, then what was generated),
//! and [`mixtral_generate`], which streams each token to a [`MixtralTokenCallback`].

use super::error::{fail, guard, MixtralStatus};
use crate::engine::{open, EngineOptions};
use crate::generate::{generate, GenerateError, GenerateOptions};
use crate::sampling::SamplingParams;
use crate::shard::Layout;
use crate::tokenizer::Tokenizer;
use crate::{Engine, LoadOptions, Model};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;

/// A loaded model directory (opaque).
pub struct MixtralModel {
    model: Model,
    tokenizer: Arc<Tokenizer>,
}

/// An engine with its own KV cache, and the tokenizer and EOS ids generation needs (opaque).
pub struct MixtralEngine {
    engine: Box<dyn Engine>,
    tokenizer: Arc<Tokenizer>,
    eos: Vec<u32>,
}

/// One generation: its prompt, limits and sampling, then its generated ids (opaque).
pub struct MixtralRequest {
    prompt: Vec<u32>,
    options: GenerateOptions,
    generated: Vec<u32>,
}

/// Called once per generated token with the caller's `user_data`, the token id, and the text that
/// became final with it (`text_len` bytes of UTF-8, not NUL-terminated, possibly empty; valid only
/// during the call). Returning non-zero stops generation after this token.
pub type MixtralTokenCallback = Option<
    extern "C" fn(
        user_data: *mut c_void,
        token: u32,
        text: *const c_char,
        text_len: usize,
    ) -> c_int,
>;

/// `ptr` as UTF-8 text, or an `InvalidArgument` failure naming `what`.
///
/// # Safety
/// `ptr` is NULL or a NUL-terminated string.
unsafe fn text<'a>(ptr: *const c_char, what: &str) -> Result<&'a str, MixtralStatus> {
    if ptr.is_null() {
        return Err(fail(
            MixtralStatus::InvalidArgument,
            format!("{what} is NULL"),
        ));
    }
    // SAFETY: non-null and NUL-terminated by the caller's contract.
    unsafe { CStr::from_ptr(ptr) }.to_str().map_err(|e| {
        fail(
            MixtralStatus::InvalidArgument,
            format!("{what} is not UTF-8: {e}"),
        )
    })
}

/// Stores `value` behind `out`, or fails when `out` is NULL.
///
/// # Safety
/// `out` is NULL or points to writable storage for a pointer.
unsafe fn give<T>(out: *mut *mut T, value: T) -> MixtralStatus {
    if out.is_null() {
        return fail(MixtralStatus::InvalidArgument, "the output pointer is NULL");
    }
    // SAFETY: non-null and writable by the caller's contract.
    unsafe { *out = Box::into_raw(Box::new(value)) };
    MixtralStatus::Ok
}

/// Loads the model directory `dir` (config.json, safetensors, tokenizer.json) into `*out`.
///
/// # Safety
/// `dir` is a NUL-terminated string; `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn mixtral_model_load(
    dir: *const c_char,
    out: *mut *mut MixtralModel,
) -> MixtralStatus {
    guard(AssertUnwindSafe(|| {
        // SAFETY: the caller's contract.
        let dir = match unsafe { text(dir, "dir") } {
            Ok(dir) => dir,
            Err(status) => return status,
        };
        let options = LoadOptions {
            require_tokenizer: true,
            ..LoadOptions::default()
        };
        let mut model = match Model::load(Path::new(dir), &options) {
            Ok(model) => model,
            Err(e) => return fail(MixtralStatus::Load, e.to_string()),
        };
        let Some(tokenizer) = model.tokenizer.take() else {
            return fail(MixtralStatus::Load, format!("{dir}: no tokenizer.json"));
        };
        let tokenizer = Arc::new(tokenizer);
        // SAFETY: the caller's contract.
        unsafe { give(out, MixtralModel { model, tokenizer }) }
    }))
}

/// Frees a model (NULL is ignored).
///
/// # Safety
/// `model` is NULL or a handle from `mixtral_model_load` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn mixtral_model_free(model: *mut MixtralModel) {
    let _ = guard(AssertUnwindSafe(|| {
        if !model.is_null() {
            // SAFETY: a live handle from `give`, freed once.
            drop(unsafe { Box::from_raw(model) });
        }
        MixtralStatus::Ok
    }));
}

/// Builds an engine for `model` on `device` (`"cpu"`, `"cuda"` or `"cuda:N"`) holding one
/// sequence of at most `max_context` tokens (0: the model's `max_position_embeddings`).
///
/// # Safety
/// `model` is a live model handle; `device` a NUL-terminated string; `out` points to writable
/// storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn mixtral_engine_new(
    model: *const MixtralModel,
    device: *const c_char,
    max_context: usize,
    out: *mut *mut MixtralEngine,
) -> MixtralStatus {
    // SAFETY: the caller's contract, passed on unchanged.
    unsafe { mixtral_engine_new_split(model, device, max_context, 1, 1, out) }
}

/// As `mixtral_engine_new`, split over `tensor_parallel * expert_parallel` ranks as
/// `mixtral-run --tensor-parallel / --expert-parallel` split it: on `"cuda:F"`, GPUs F and up of
/// this process (a library built with the `nccl` feature); on `"cpu"`, simulated ranks. A size of
/// 0 is `MIXTRAL_STATUS_INVALID_ARGUMENT`; a split the model does not divide, or a CUDA split
/// without `nccl`, `MIXTRAL_STATUS_ENGINE` with the reason.
///
/// # Safety
/// As `mixtral_engine_new`.
#[no_mangle]
pub unsafe extern "C" fn mixtral_engine_new_split(
    model: *const MixtralModel,
    device: *const c_char,
    max_context: usize,
    tensor_parallel: usize,
    expert_parallel: usize,
    out: *mut *mut MixtralEngine,
) -> MixtralStatus {
    guard(AssertUnwindSafe(|| {
        // SAFETY: NULL or a live handle, by the caller's contract.
        let Some(model) = (unsafe { model.as_ref() }) else {
            return fail(MixtralStatus::InvalidArgument, "model is NULL");
        };
        // SAFETY: the caller's contract.
        let device = match unsafe { text(device, "device") } {
            Ok(device) => device,
            Err(status) => return status,
        };
        if tensor_parallel == 0 || expert_parallel == 0 {
            return fail(
                MixtralStatus::InvalidArgument,
                format!(
                    "tensor_parallel ({tensor_parallel}) and expert_parallel \
                     ({expert_parallel}) must be at least 1"
                ),
            );
        }
        let options = EngineOptions {
            max_context: (max_context > 0).then_some(max_context),
            max_sequences: Some(1),
            parallel: Layout {
                tp: tensor_parallel,
                ep: expert_parallel,
            },
            ..EngineOptions::default()
        };
        let engine = match open(device, &model.model.weights, &options, None) {
            Ok(engine) => engine,
            Err(e) => return fail(MixtralStatus::Engine, e.to_string()),
        };
        let mut eos = model.model.config.eos_token_ids.clone();
        eos.extend(
            model
                .tokenizer
                .eos_ids()
                .iter()
                .filter(|id| !eos.contains(id))
                .collect::<Vec<_>>(),
        );
        let handle = MixtralEngine {
            engine,
            tokenizer: Arc::clone(&model.tokenizer),
            eos,
        };
        // SAFETY: the caller's contract.
        unsafe { give(out, handle) }
    }))
}

/// Frees an engine (NULL is ignored).
///
/// # Safety
/// `engine` is NULL or a handle from `mixtral_engine_new` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn mixtral_engine_free(engine: *mut MixtralEngine) {
    let _ = guard(AssertUnwindSafe(|| {
        if !engine.is_null() {
            // SAFETY: a live handle from `give`, freed once.
            drop(unsafe { Box::from_raw(engine) });
        }
        MixtralStatus::Ok
    }));
}

/// A request to continue `prompt` (UTF-8; a BOS token is added) by at most `max_tokens` tokens,
/// greedy until `mixtral_request_set_sampling` says otherwise.
///
/// # Safety
/// `model` is a live model handle; `prompt` a NUL-terminated string; `out` points to writable
/// storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn mixtral_request_new(
    model: *const MixtralModel,
    prompt: *const c_char,
    max_tokens: usize,
    out: *mut *mut MixtralRequest,
) -> MixtralStatus {
    guard(AssertUnwindSafe(|| {
        // SAFETY: NULL or a live handle, by the caller's contract.
        let Some(model) = (unsafe { model.as_ref() }) else {
            return fail(MixtralStatus::InvalidArgument, "model is NULL");
        };
        // SAFETY: the caller's contract.
        let prompt = match unsafe { text(prompt, "prompt") } {
            Ok(prompt) => prompt,
            Err(status) => return status,
        };
        let ids = match model.tokenizer.encode(prompt, true) {
            Ok(ids) => ids,
            Err(e) => return fail(MixtralStatus::Tokenizer, e.to_string()),
        };
        let request = MixtralRequest {
            prompt: ids,
            options: GenerateOptions::greedy(max_tokens),
            generated: Vec::new(),
        };
        // SAFETY: the caller's contract.
        unsafe { give(out, request) }
    }))
}

/// Sets the request's sampling: `temperature` 0 is greedy; `top_k` 0 and `top_p` 1 are off;
/// `seed` seeds the draw. Out-of-range values are `MIXTRAL_STATUS_INVALID_ARGUMENT`.
///
/// # Safety
/// `request` is a live request handle.
#[no_mangle]
pub unsafe extern "C" fn mixtral_request_set_sampling(
    request: *mut MixtralRequest,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    seed: u64,
) -> MixtralStatus {
    guard(AssertUnwindSafe(|| {
        // SAFETY: NULL or a live handle, by the caller's contract.
        let Some(request) = (unsafe { request.as_mut() }) else {
            return fail(MixtralStatus::InvalidArgument, "request is NULL");
        };
        let sampling = SamplingParams {
            temperature,
            top_k,
            top_p,
            repetition_penalty: 1.0,
            seed,
        };
        if let Err(e) = sampling.validate() {
            return fail(MixtralStatus::InvalidArgument, e.to_string());
        }
        request.options.sampling = sampling;
        MixtralStatus::Ok
    }))
}

/// Adds a stop string (UTF-8, non-empty): generation ends when it appears, and it is not reported.
///
/// # Safety
/// `request` is a live request handle; `stop` a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn mixtral_request_add_stop(
    request: *mut MixtralRequest,
    stop: *const c_char,
) -> MixtralStatus {
    guard(AssertUnwindSafe(|| {
        // SAFETY: NULL or a live handle, by the caller's contract.
        let Some(request) = (unsafe { request.as_mut() }) else {
            return fail(MixtralStatus::InvalidArgument, "request is NULL");
        };
        // SAFETY: the caller's contract.
        let stop = match unsafe { text(stop, "stop") } {
            Ok(stop) => stop,
            Err(status) => return status,
        };
        if stop.is_empty() {
            return fail(MixtralStatus::InvalidArgument, "stop is empty");
        }
        request.options.stop_strings.push(stop.to_string());
        MixtralStatus::Ok
    }))
}

/// The ids the last `mixtral_generate` of `request` generated: writes their count to `*len` and
/// returns a pointer to them, valid until the request is generated again or freed (NULL when
/// `request` or `len` is NULL).
///
/// # Safety
/// `request` is a live request handle; `len` points to writable storage.
#[no_mangle]
pub unsafe extern "C" fn mixtral_request_generated(
    request: *const MixtralRequest,
    len: *mut usize,
) -> *const u32 {
    // SAFETY: NULL or live, by the caller's contract.
    match unsafe { (request.as_ref(), len.as_mut()) } {
        (Some(request), Some(len)) => {
            *len = request.generated.len();
            request.generated.as_ptr()
        }
        _ => std::ptr::null(),
    }
}

/// Frees a request (NULL is ignored).
///
/// # Safety
/// `request` is NULL or a handle from `mixtral_request_new` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn mixtral_request_free(request: *mut MixtralRequest) {
    let _ = guard(AssertUnwindSafe(|| {
        if !request.is_null() {
            // SAFETY: a live handle from `give`, freed once.
            drop(unsafe { Box::from_raw(request) });
        }
        MixtralStatus::Ok
    }));
}

/// Generates `request` on `engine`, calling `callback` (may be NULL) once per token. Ends at an
/// EOS id, a stop string, `max_tokens`, or when the callback returns non-zero; the ids are then
/// available from `mixtral_request_generated`.
///
/// # Safety
/// `engine` and `request` are live handles; `callback`, when not NULL, may be called with
/// `user_data` from this thread during the call.
#[no_mangle]
pub unsafe extern "C" fn mixtral_generate(
    engine: *mut MixtralEngine,
    request: *mut MixtralRequest,
    callback: MixtralTokenCallback,
    user_data: *mut c_void,
) -> MixtralStatus {
    guard(AssertUnwindSafe(|| {
        // SAFETY: NULL or live handles, by the caller's contract.
        let (Some(engine), Some(request)) =
            (unsafe { engine.as_mut() }, unsafe { request.as_mut() })
        else {
            return fail(MixtralStatus::InvalidArgument, "engine or request is NULL");
        };
        let mut options = request.options.clone();
        options.eos_token_ids.extend(engine.eos.iter().copied());
        request.generated.clear();
        let output = generate(
            engine.engine.as_mut(),
            &engine.tokenizer,
            &request.prompt,
            &options,
            |event| {
                let Some(callback) = callback else {
                    return ControlFlow::Continue(());
                };
                let text = event.text.as_bytes();
                let stop = callback(user_data, event.id, text.as_ptr().cast(), text.len());
                if stop == 0 {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(())
                }
            },
        );
        match output {
            Ok(output) => {
                request.generated = output.generated_ids;
                MixtralStatus::Ok
            }
            Err(e) => {
                let status = match &e {
                    GenerateError::Engine(_) => MixtralStatus::Engine,
                    GenerateError::Tokenizer(_) => MixtralStatus::Tokenizer,
                    _ => MixtralStatus::Generate,
                };
                fail(status, e.to_string())
            }
        }
    }))
}
