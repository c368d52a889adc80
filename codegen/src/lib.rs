//! Generator for the CUDA kernel interfaces of the `mixtral` crate.
//!
//! [`spec`] is the one description of every kernel's parameter struct, shared constants and
//! template instantiations; [`emit`] writes from it the C header `csrc/generated/params.h`, the
//! X-macro list `csrc/generated/instantiations.cuh`, the Rust mirrors `src/cuda/params.rs` and
//! `src/cuda/params_ffi.rs`, the typed launch arguments `src/cuda/args.rs` ([`args`]), and the
//! declarations of the CUTLASS shim's host entry points, `csrc/generated/shims.h` and
//! `src/cuda/shims.rs` ([`shims`]); [`layout`] computes the C layout both sides assert.
//!
//! The outputs are checked in. `tests/cuda_codegen.rs` in the main crate includes this file (so the
//! modules refer to each other through `super::`, never `crate::`), writes the outputs to a
//! temporary directory with [`write_all`] and fails when the checked-in files differ.

#[path = "args.rs"]
pub mod args;
#[path = "emit.rs"]
pub mod emit;
#[path = "layout.rs"]
pub mod layout;
#[path = "shims.rs"]
pub mod shims;
#[path = "spec.rs"]
pub mod spec;

use std::path::Path;

/// Writes every generated file under `root` (the repository root, or a scratch directory).
pub fn write_all(root: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut written = Vec::new();
    for file in emit::generate() {
        let path = root.join(file.path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, file.contents)?;
        written.push(path);
    }
    Ok(written)
}
