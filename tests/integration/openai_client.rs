//! The official `openai` Python client against `mixtral-serve` on the shipped models
//! (`tests/openai/check.py`): streamed and whole completions and chat completions equal
//! `mixtral-run`'s greedy text, log-probabilities equal `mixtral-run --perplexity`'s within 1e-5.
//!
//! Needs a Python with the `openai` package: `MIXTRAL_OPENAI_PYTHON` names it (`.ci/run` makes a
//! venv and sets it). Without it the test says so and passes; with it set, any failure fails.

use std::path::Path;
use std::process::Command;

#[test]
fn openai_client_gets_mixtral_run_outputs() {
    let Some(python) = std::env::var_os("MIXTRAL_OPENAI_PYTHON") else {
        eprintln!(
            "skipped: MIXTRAL_OPENAI_PYTHON is not set (a python with `pip install openai`; .ci/run sets it)"
        );
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(python)
        .arg(root.join("tests/openai/check.py"))
        .args(["--serve", env!("CARGO_BIN_EXE_mixtral-serve")])
        .args(["--run", env!("CARGO_BIN_EXE_mixtral-run")])
        .args([
            "--model",
            "models/mini-mixtral",
            "--model",
            "models/tiny-mixtral",
        ])
        .current_dir(root)
        .output()
        .expect("cannot start the python named by MIXTRAL_OPENAI_PYTHON");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(out.status.success(), "check.py failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("openai client check passed"), "{stdout}");
}
