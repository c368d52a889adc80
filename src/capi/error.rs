//! Status codes of the C ABI and the per-thread message of the last failure: [`MixtralStatus`],
//! [`mixtral_last_error`], [`mixtral_status_name`], and [`guard`], which runs an entry point's body
//! with panics caught.

use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, UnwindSafe};

/// What a C ABI call returns.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MixtralStatus {
    /// Success.
    Ok = 0,
    /// A NULL pointer, text that is not UTF-8, or a value out of range.
    InvalidArgument = 1,
    /// The model directory could not be loaded.
    Load = 2,
    /// The engine could not be built, or refused or failed a step.
    Engine = 3,
    /// Tokenizing or detokenizing failed.
    Tokenizer = 4,
    /// Generation was refused (context overflow, bad sampling parameters) or failed.
    Generate = 5,
    /// A Rust panic was caught at the boundary (a bug); the handle involved should be freed.
    Panic = 6,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Records `message` as this thread's last error and returns `status`.
pub(crate) fn fail(status: MixtralStatus, message: impl Into<String>) -> MixtralStatus {
    let text: Vec<u8> = message
        .into()
        .into_bytes()
        .into_iter()
        .filter(|&b| b != 0)
        .collect();
    let text = CString::new(text).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|last| *last.borrow_mut() = text);
    status
}

/// Runs `body`, turning a panic into [`MixtralStatus::Panic`] with its message.
pub(crate) fn guard(body: impl FnOnce() -> MixtralStatus + UnwindSafe) -> MixtralStatus {
    match catch_unwind(body) {
        Ok(status) => status,
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            fail(
                MixtralStatus::Panic,
                format!("internal error (panic): {message}"),
            )
        }
    }
}

/// The message of the last call on this thread that did not return `MIXTRAL_STATUS_OK`
/// (empty if none failed). The pointer stays valid until the next failing call on this thread.
#[no_mangle]
pub extern "C" fn mixtral_last_error() -> *const c_char {
    LAST_ERROR
        .try_with(|last| last.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

/// A static name for the status code `status` (`"ok"`, `"invalid argument"`, ...; `"unknown
/// status"` for a value that is no `MixtralStatus`).
#[no_mangle]
pub extern "C" fn mixtral_status_name(status: i32) -> *const c_char {
    match status {
        0 => c"ok",
        1 => c"invalid argument",
        2 => c"load failed",
        3 => c"engine error",
        4 => c"tokenizer error",
        5 => c"generation failed",
        6 => c"internal error",
        _ => c"unknown status",
    }
    .as_ptr()
}
