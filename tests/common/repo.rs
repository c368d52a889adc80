//! Where the repository's models and fixtures are.

use std::path::PathBuf;

/// The repository: `MIXTRAL_REPO` when set (a test binary carried to another machine, as
/// `scripts/gpu-check` does), else the directory the test was built in.
pub fn root() -> PathBuf {
    std::env::var_os("MIXTRAL_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The crate's binary `name` for a test to run: `$MIXTRAL_BIN_DIR/name` when that is set (test
/// binaries carried to another machine with the crate's binaries beside them, as
/// `scripts/gpu-check` does), else `built`, where cargo built it (`env!("CARGO_BIN_EXE_<name>")`).
pub fn binary(name: &str, built: &str) -> PathBuf {
    std::env::var_os("MIXTRAL_BIN_DIR")
        .map(|dir| PathBuf::from(dir).join(name))
        .unwrap_or_else(|| PathBuf::from(built))
}

/// `models/tiny-mixtral` (the random-weight model the golden tests use) with its tokenizer, loaded
/// once per test binary.
pub fn tiny_mixtral() -> &'static mixtral::Model {
    static MODEL: std::sync::OnceLock<mixtral::Model> = std::sync::OnceLock::new();
    MODEL.get_or_init(|| {
        let options = mixtral::LoadOptions {
            require_tokenizer: true,
            ..Default::default()
        };
        mixtral::Model::load(&root().join("models/tiny-mixtral"), &options)
            .expect("models/tiny-mixtral")
    })
}
