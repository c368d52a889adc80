//! The C ABI called from Rust as C would call it: NULL and non-UTF-8 arguments, a missing model
//! directory and out-of-range sampling are status codes with a message, never a crash; greedy
//! generation through the handles gives `generate()`'s ids; a callback returning non-zero stops
//! generation; freeing NULL is a no-op; an engine split over CPU ranks
//! (`mixtral_engine_new_split`) generates the unsplit engine's ids.

use mixtral::capi::*;
use mixtral::engine::{open, EngineOptions};
use mixtral::generate::{generate, GenerateOptions};
use mixtral::{LoadOptions, Model};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;
use std::ptr;

fn model_dir() -> CString {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-mixtral");
    CString::new(dir.to_str().unwrap()).unwrap()
}

/// `models/tiny-mixtral` through `mixtral_model_load`, which must succeed; free it with
/// `mixtral_model_free`.
fn load_model() -> *mut MixtralModel {
    let mut model = ptr::null_mut();
    // SAFETY: a NUL-terminated path and a writable out-pointer.
    let status = unsafe { mixtral_model_load(model_dir().as_ptr(), &mut model) };
    assert_eq!(status, MixtralStatus::Ok, "{}", last_error());
    model
}

fn last_error() -> String {
    // SAFETY: the library returns a NUL-terminated string valid until the next failing call.
    unsafe { CStr::from_ptr(mixtral_last_error()) }
        .to_str()
        .unwrap()
        .to_string()
}

/// Collects ids; stops after `limit` of them when `limit` > 0.
struct Collector {
    ids: Vec<u32>,
    text: String,
    limit: usize,
}

extern "C" fn collect(user: *mut c_void, token: u32, text: *const c_char, len: usize) -> c_int {
    // SAFETY: `user` is the `Collector` passed to `mixtral_generate`; `text` has `len` bytes.
    let collector = unsafe { &mut *user.cast::<Collector>() };
    let bytes = unsafe { std::slice::from_raw_parts(text.cast::<u8>(), len) };
    collector.ids.push(token);
    collector.text.push_str(std::str::from_utf8(bytes).unwrap());
    c_int::from(collector.limit > 0 && collector.ids.len() >= collector.limit)
}

/// Runs `mixtral_generate(engine, request)` with [`collect`], stopping after `limit` tokens when
/// `limit` > 0; fails the test unless it returns `MIXTRAL_STATUS_OK`.
///
/// # Safety
/// `engine` and `request` are live handles.
unsafe fn generate_collected(
    engine: *mut MixtralEngine,
    request: *mut MixtralRequest,
    limit: usize,
) -> Collector {
    let mut collector = Collector {
        ids: Vec::new(),
        text: String::new(),
        limit,
    };
    // SAFETY: live handles (the caller's contract); `collector` outlives the call.
    let status = unsafe {
        mixtral_generate(
            engine,
            request,
            Some(collect),
            (&mut collector as *mut Collector).cast(),
        )
    };
    assert_eq!(status, MixtralStatus::Ok, "{}", last_error());
    collector
}

#[test]
fn bad_arguments_are_status_codes_with_messages() {
    let mut model: *mut MixtralModel = ptr::null_mut();
    unsafe {
        assert_eq!(
            mixtral_model_load(ptr::null(), &mut model),
            MixtralStatus::InvalidArgument
        );
        assert!(last_error().contains("dir is NULL"), "{}", last_error());
        let missing = CString::new("/no/such/model/dir").unwrap();
        assert_eq!(
            mixtral_model_load(missing.as_ptr(), &mut model),
            MixtralStatus::Load
        );
        assert!(
            last_error().contains("/no/such/model/dir"),
            "{}",
            last_error()
        );
        let not_utf8 = [0xffu8, 0xfe, 0];
        assert_eq!(
            mixtral_model_load(not_utf8.as_ptr().cast(), &mut model),
            MixtralStatus::InvalidArgument
        );
        assert!(model.is_null());
        assert_eq!(
            mixtral_model_load(model_dir().as_ptr(), ptr::null_mut()),
            MixtralStatus::InvalidArgument
        );

        assert_eq!(
            mixtral_model_load(model_dir().as_ptr(), &mut model),
            MixtralStatus::Ok
        );
        let mut engine: *mut MixtralEngine = ptr::null_mut();
        let tpu = CString::new("tpu").unwrap();
        assert_eq!(
            mixtral_engine_new(model, tpu.as_ptr(), 0, &mut engine),
            MixtralStatus::Engine
        );
        assert!(last_error().contains("tpu"), "{}", last_error());
        let cpu = CString::new("cpu").unwrap();
        assert_eq!(
            mixtral_engine_new(ptr::null(), cpu.as_ptr(), 0, &mut engine),
            MixtralStatus::InvalidArgument
        );
        assert_eq!(
            mixtral_engine_new(model, cpu.as_ptr(), 16, &mut engine),
            MixtralStatus::Ok
        );

        let mut request: *mut MixtralRequest = ptr::null_mut();
        let prompt = CString::new("Hello").unwrap();
        assert_eq!(
            mixtral_request_new(model, prompt.as_ptr(), 100, &mut request),
            MixtralStatus::Ok
        );
        for (t, k, p) in [
            (-1.0, 0, 1.0),
            (f32::NAN, 0, 1.0),
            (1.0, 0, 0.0),
            (1.0, 0, 1.5),
        ] {
            assert_eq!(
                mixtral_request_set_sampling(request, t, k, p, 0),
                MixtralStatus::InvalidArgument
            );
        }
        let empty = CString::new("").unwrap();
        assert_eq!(
            mixtral_request_add_stop(request, empty.as_ptr()),
            MixtralStatus::InvalidArgument
        );
        // 100 new tokens do not fit the 16-token context: refused, nothing generated.
        assert_eq!(
            mixtral_generate(engine, request, None, ptr::null_mut()),
            MixtralStatus::Generate
        );
        assert!(last_error().contains("context"), "{}", last_error());
        assert_eq!(
            mixtral_generate(ptr::null_mut(), request, None, ptr::null_mut()),
            MixtralStatus::InvalidArgument
        );
        let mut len = 99;
        assert!(mixtral_request_generated(ptr::null(), &mut len).is_null());
        assert_eq!(len, 99);

        mixtral_request_free(request);
        mixtral_engine_free(engine);
        mixtral_model_free(model);
        mixtral_request_free(ptr::null_mut());
        mixtral_engine_free(ptr::null_mut());
        mixtral_model_free(ptr::null_mut());
        assert_eq!(
            CStr::from_ptr(mixtral_status_name(MixtralStatus::Load as i32)).to_str(),
            Ok("load failed")
        );
        assert_eq!(
            CStr::from_ptr(mixtral_status_name(77)).to_str(),
            Ok("unknown status")
        );
    }
}

#[test]
fn greedy_generation_matches_generate_and_the_callback_can_stop_it() {
    const N: usize = 10;
    let prompt_text = "The capital of France is";
    // The reference: the library's own generate() on the same model.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-mixtral");
    let loaded = Model::load(&dir, &LoadOptions::default()).unwrap();
    let tokenizer = loaded.tokenizer.as_ref().unwrap();
    let mut reference_engine =
        open("cpu", &loaded.weights, &EngineOptions::default(), None).unwrap();
    let prompt_ids = tokenizer.encode(prompt_text, true).unwrap();
    let options = GenerateOptions::greedy(N)
        .with_eos(&loaded.config.eos_token_ids)
        .with_eos(tokenizer.eos_ids());
    let want = generate(
        reference_engine.as_mut(),
        tokenizer,
        &prompt_ids,
        &options,
        |_| std::ops::ControlFlow::Continue(()),
    )
    .unwrap();

    unsafe {
        let model = load_model();
        let mut engine = ptr::null_mut();
        let cpu = CString::new("cpu").unwrap();
        assert_eq!(
            mixtral_engine_new(model, cpu.as_ptr(), 0, &mut engine),
            MixtralStatus::Ok
        );
        let mut request = ptr::null_mut();
        let prompt = CString::new(prompt_text).unwrap();
        assert_eq!(
            mixtral_request_new(model, prompt.as_ptr(), N, &mut request),
            MixtralStatus::Ok
        );
        // The engine and request outlive the model handle.
        mixtral_model_free(model);

        let all = generate_collected(engine, request, 0);
        assert_eq!(all.ids, want.generated_ids);
        assert_eq!(all.text, want.text);
        let mut len = 0;
        let ids = mixtral_request_generated(request, &mut len);
        assert_eq!(
            std::slice::from_raw_parts(ids, len),
            &want.generated_ids[..]
        );

        // Stopping after 3 tokens; the engine is reusable for the same request.
        let three = generate_collected(engine, request, 3);
        assert_eq!(three.ids, want.generated_ids[..3]);
        let ids = mixtral_request_generated(request, &mut len);
        assert_eq!(
            std::slice::from_raw_parts(ids, len),
            &want.generated_ids[..3]
        );

        mixtral_request_free(request);
        mixtral_engine_free(engine);
    }
}

/// `mixtral_engine_new_split` over simulated CPU ranks generates what one rank generates: exactly
/// under EP 2 (each slot's expert output comes whole from one rank), and under TP 2 (only f32 sums
/// reordered, about 1e-6 relative: a greedy id could differ only at a near-tie). Sizes of 0 and a
/// split the model does not divide (8 experts over 3 ranks) are status codes with a message.
#[test]
fn an_engine_split_over_cpu_ranks_generates_the_unsplit_ids() {
    const N: usize = 10;
    let generate_with = |tp: usize, ep: usize| unsafe {
        let model = load_model();
        let cpu = CString::new("cpu").unwrap();
        let mut engine = ptr::null_mut();
        let status = mixtral_engine_new_split(model, cpu.as_ptr(), 0, tp, ep, &mut engine);
        assert_eq!(status, MixtralStatus::Ok, "{}", last_error());
        let mut request = ptr::null_mut();
        let prompt = CString::new("The capital of France is").unwrap();
        assert_eq!(
            mixtral_request_new(model, prompt.as_ptr(), N, &mut request),
            MixtralStatus::Ok
        );
        let all = generate_collected(engine, request, 0);
        mixtral_request_free(request);
        mixtral_engine_free(engine);
        mixtral_model_free(model);
        all.ids
    };
    let want = generate_with(1, 1);
    assert_eq!(want.len(), N);
    assert_eq!(generate_with(1, 2), want, "EP 2");
    assert_eq!(generate_with(2, 1), want, "TP 2");

    unsafe {
        let model = load_model();
        let cpu = CString::new("cpu").unwrap();
        let mut engine = ptr::null_mut();
        for (tp, ep, status, needle) in [
            (0, 1, MixtralStatus::InvalidArgument, "tensor_parallel (0)"),
            (1, 3, MixtralStatus::Engine, "num_local_experts = 8"),
        ] {
            assert_eq!(
                mixtral_engine_new_split(model, cpu.as_ptr(), 0, tp, ep, &mut engine),
                status,
                "tp {tp} ep {ep}"
            );
            assert!(last_error().contains(needle), "{}", last_error());
        }
        assert!(engine.is_null());
        mixtral_model_free(model);
    }
}
