//! Where the repository's models and fixtures are.

use std::path::PathBuf;

/// The repository: `MIXTRAL_REPO` when set (a test binary carried to another machine, as
/// `scripts/gpu-check` does), else the directory the test was built in.
pub fn root() -> PathBuf {
    std::env::var_os("MIXTRAL_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}
