//! Writes the declarations of the CUTLASS shim's host entry points ([`SHIMS`]): the C header
//! `csrc/generated/shims.h`, which the definitions in `csrc/cutlass/` include (so nvcc rejects a
//! definition that differs), and the Rust mirror `src/cuda/shims.rs`, with stand-ins for a build
//! without the shim.

use std::fmt::Write as _;

use super::spec::{Shim, ShimArg, ShimReturn, SHIMS, STRUCTS};

/// Refuses a spec whose entry points repeat a name, lack the `mx_` prefix, or take a parameter
/// struct the spec does not declare.
pub fn check() -> Result<(), String> {
    let mut names = std::collections::BTreeSet::new();
    for shim in SHIMS {
        if !names.insert(shim.name) || !shim.name.starts_with("mx_") {
            return Err(format!(
                "shim {} is repeated or lacks the mx_ prefix",
                shim.name
            ));
        }
        for arg in shim.args {
            if let ShimArg::Params(ty) = arg {
                if !STRUCTS.iter().any(|s| s.name == *ty) {
                    return Err(format!("shim {} takes unknown struct {ty}", shim.name));
                }
            }
        }
    }
    Ok(())
}

/// The argument's name and its C and Rust types.
fn arg_parts(arg: ShimArg) -> (&'static str, String, String) {
    match arg {
        ShimArg::U32(name) => (name, "uint32_t".into(), "u32".into()),
        ShimArg::Params(ty) => ("params", format!("const {ty}*"), format!("*const {ty}")),
        ShimArg::Stream => ("stream", "void*".into(), "*mut c_void".into()),
    }
}

/// `shim`'s arguments, each written by `write` from [`arg_parts`], separated by commas.
fn arg_list(shim: &Shim, write: impl Fn((&str, String, String)) -> String) -> String {
    let args: Vec<String> = shim.args.iter().map(|&a| write(arg_parts(a))).collect();
    args.join(", ")
}

/// The C and Rust return types, and what a build without the shim returns.
fn return_parts(returns: ShimReturn) -> (&'static str, &'static str, &'static str) {
    match returns {
        ShimReturn::Bytes => ("size_t", "usize", "0"),
        ShimReturn::Status => ("int", "i32", "-1"),
    }
}

/// What the return value means, for the docs.
fn return_doc(returns: ShimReturn) -> &'static str {
    match returns {
        ShimReturn::Bytes => "Returns bytes.",
        ShimReturn::Status => {
            "Returns 0, a `cudaError_t`, or `MOE_CUTLASS_STATUS_BASE` + a `cutlass::Status`."
        }
    }
}

/// `csrc/generated/shims.h`.
pub fn shims_h() -> String {
    let mut o = String::new();
    o.push_str(super::emit::C_BANNER);
    o.push_str(
        "//\n// The host entry points of the CUTLASS shim (csrc/cutlass/), declared once: the definitions there\n\
         // include this header, so one that differs from it does not compile, and src/cuda/shims.rs declares\n\
         // the same to Rust. Valid C11 and C++17.\n\
         #pragma once\n\n#include <stddef.h>\n#include <stdint.h>\n\n#include \"params.h\"\n\n\
         #ifdef __cplusplus\nextern \"C\" {\n#endif\n",
    );
    for shim in SHIMS {
        let (c_return, _, _) = return_parts(shim.returns);
        let args = arg_list(shim, |(name, c_type, _)| format!("{c_type} {name}"));
        let _ = writeln!(
            o,
            "\n// {} {}\n{c_return} {}({args});",
            shim.doc,
            return_doc(shim.returns),
            shim.name
        );
    }
    o.push_str("\n#ifdef __cplusplus\n}\n#endif\n");
    o
}

/// The Rust signature of `shim`, `name(args) -> ret`, with `_`-prefixed argument names when
/// `unused`.
fn rust_signature(shim: &Shim, unused: bool) -> String {
    let prefix = if unused { "_" } else { "" };
    let args = arg_list(shim, |(name, _, rust_type)| {
        format!("{prefix}{name}: {rust_type}")
    });
    let (_, rust_return, _) = return_parts(shim.returns);
    format!("{}({args}) -> {rust_return}", shim.name)
}

/// `src/cuda/shims.rs`.
pub fn shims_rs() -> String {
    const BUILT: &str = "#[cfg(not(any(mixtral_no_kernels, mixtral_no_cutlass)))]";
    const NOT_BUILT: &str = "#[cfg(any(mixtral_no_kernels, mixtral_no_cutlass))]";
    let mut structs: Vec<&str> = SHIMS
        .iter()
        .flat_map(|s| s.args)
        .filter_map(|a| match a {
            ShimArg::Params(ty) => Some(*ty),
            _ => None,
        })
        .collect();
    structs.sort_unstable();
    structs.dedup();
    let mut o = String::new();
    o.push_str(super::emit::RUST_BANNER);
    let _ = writeln!(
        o,
        "//! The host entry points of the CUTLASS shim (`csrc/cutlass/`), as `csrc/generated/shims.h`\n\
         //! declares them. In a build without the shim (no CUTLASS headers, or no kernels at all) each is\n\
         //! a stand-in returning 0 bytes or status -1; the launchers refuse such a build before calling one.\n\
         //!\n\
         //! # Safety (every entry)\n\
         //! `params` points to an initialized struct whose device buffers hold what the struct's checks\n\
         //! (`src/cuda/args.rs`) require, `stream` is a live stream of the current context.\n\n\
         use std::ffi::c_void;\n\nuse super::params::{{{}}};\n\n{BUILT}\nextern \"C\" {{",
        structs.join(", ")
    );
    for shim in SHIMS {
        let _ = writeln!(
            o,
            "    /// {} {}\n    pub fn {};",
            shim.doc,
            return_doc(shim.returns),
            rust_signature(shim, false)
        );
    }
    o.push_str("}\n");
    for shim in SHIMS {
        let (_, _, fallback) = return_parts(shim.returns);
        let _ = writeln!(
            o,
            "\n/// Stand-in for a build without the CUTLASS shim: returns {fallback}.\n///\n\
             /// # Safety\n/// None needed; `unsafe` as the real entry is.\n\
             {NOT_BUILT}\npub unsafe extern \"C\" fn {} {{\n    {fallback}\n}}",
            rust_signature(shim, true)
        );
    }
    o
}
