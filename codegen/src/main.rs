//! `cargo run --manifest-path codegen/Cargo.toml [OUTPUT_ROOT]`: regenerates the kernel parameter
//! structs and instantiation lists into the repository (or into OUTPUT_ROOT).

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let root = match std::env::args_os().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."),
    };
    match mixtral_codegen::write_all(&root) {
        Ok(paths) => {
            for path in paths {
                println!("wrote {}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!(
                "error: writing generated files under {}: {err}",
                root.display()
            );
            ExitCode::FAILURE
        }
    }
}
