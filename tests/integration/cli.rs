//! `mixtral-run` end to end on `models/tiny-mixtral`: its greedy continuation and perplexity match
//! the transformers outputs in `golden.json`; every failure is one `error:` line on stderr with a
//! non-zero status and no panic.

use crate::common::run::{json_lines, stderr, stdout};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn model_dir() -> PathBuf {
    root().join("models/tiny-mixtral")
}

fn golden() -> Value {
    let text = std::fs::read_to_string(model_dir().join("golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn run(args: &[&str]) -> Output {
    run_with_env(args, &[])
}

fn run_with_env<S: AsRef<std::ffi::OsStr>>(args: &[S], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mixtral-run"))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(root())
        .output()
        .unwrap()
}

/// The arguments of a greedy JSON run over the golden prompt, and the ids it must generate.
fn golden_greedy_run(g: &Value) -> (Vec<String>, Vec<u64>) {
    let want = ids(&g["greedy_ids"]);
    let prompt = g["prompt_text"].as_str().unwrap();
    let (m, n) = (model(), want.len().to_string());
    let args = [
        "--model",
        &m,
        "--prompt",
        prompt,
        "--json",
        "--temperature",
        "0",
        "-n",
        &n,
    ];
    (args.map(String::from).to_vec(), want)
}

fn model() -> String {
    model_dir().to_str().unwrap().to_string()
}

#[test]
fn greedy_json_reproduces_the_golden_continuation() {
    let g = golden();
    let (args, want) = golden_greedy_run(&g);
    let out = run_with_env(&args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = json_lines(&out);
    let (done, tokens) = lines.split_last().unwrap();
    assert!(tokens.iter().all(|t| t["event"] == "token"));
    let streamed: Vec<u64> = tokens.iter().map(|t| t["id"].as_u64().unwrap()).collect();
    assert_eq!(streamed, want);
    assert_eq!(done["event"], "done");
    assert_eq!(ids(&done["generated_ids"]), want);
    assert_eq!(ids(&done["prompt_ids"]), ids(&g["prompt_ids"]));
    let eos_at = want.iter().position(|&id| id == 2);
    let reason = if eos_at.is_some() { "eos" } else { "length" };
    assert_eq!(done["finish_reason"], reason);
    assert!(done["prefill_ms"].as_f64().unwrap() > 0.0);
    assert!(done["decode_ms_per_token"].as_f64().unwrap() > 0.0);
    let text: String = tokens.iter().map(|t| t["text"].as_str().unwrap()).collect();
    assert_eq!(
        text.trim_start(),
        g["greedy_text"].as_str().unwrap().trim_start()
    );
    let err = stderr(&out);
    assert!(err.contains("prefill") && err.contains("ms/token"), "{err}");
}

#[test]
fn plain_output_streams_the_text() {
    let g = golden();
    let n = ids(&g["greedy_ids"]).len().to_string();
    let prompt = g["prompt_text"].as_str().unwrap();
    let out = run(&["--model", &model(), "--prompt", prompt, "-n", &n]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        g["greedy_text"].as_str().unwrap().trim()
    );
}

#[test]
fn stop_string_ends_the_output_before_it() {
    let g = golden();
    let greedy_text = g["greedy_text"].as_str().unwrap();
    // A word from the middle of the golden continuation.
    let stop = greedy_text.split_whitespace().nth(1).unwrap();
    let before = &greedy_text[..greedy_text.find(stop).unwrap()];
    let prompt = g["prompt_text"].as_str().unwrap();
    let out = run(&[
        "--model",
        &model(),
        "--prompt",
        prompt,
        "--json",
        "-n",
        "16",
        "--stop",
        stop,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = json_lines(&out);
    let done = lines.last().unwrap();
    assert_eq!(done["finish_reason"], "stop");
    let text: String = lines[..lines.len() - 1]
        .iter()
        .map(|t| t["text"].as_str().unwrap())
        .collect();
    assert!(!text.contains(stop));
    assert_eq!(text.trim_start(), before.trim_start());
}

#[test]
fn perplexity_json_reproduces_the_golden_score() {
    let g = golden();
    let out = run(&[
        "--model",
        &model(),
        "--perplexity",
        "tests/fixtures/perplexity.txt",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1);
    let v = &lines[0];
    assert_eq!(v["event"], "perplexity");
    assert_eq!(ids(&v["ids"]), ids(&g["perplexity_text_ids"]));
    let got: Vec<f64> = v["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let want: Vec<f64> = g["perplexity_text_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(got.len(), want.len());
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-4, "{a} vs {b}");
    }
    let ppl = v["perplexity"].as_f64().unwrap();
    let golden_ppl = g["perplexity_text_perplexity"].as_f64().unwrap();
    assert!(
        ((ppl - golden_ppl) / golden_ppl).abs() <= 1e-4,
        "{ppl} vs {golden_ppl}"
    );
    // The plain form is one human line with the same number.
    let out = run(&[
        "--model",
        &model(),
        "--perplexity",
        "tests/fixtures/perplexity.txt",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1);
    assert!(text.starts_with("perplexity "), "{text}");
}

#[test]
fn help_and_version_succeed() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("--perplexity FILE"));
    let out = run(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        stdout(&out).trim(),
        format!("mixtral-run {}", env!("CARGO_PKG_VERSION"))
    );
}

/// Runs a command that must fail: status `code`, exactly one `error:` line mentioning `needle`,
/// nothing on stdout, no panic.
fn assert_fails(args: &[&str], code: i32, needle: &str) {
    let out = run(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: {err:?}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(needle), "{args:?}: {err}");
    assert!(out.stdout.is_empty(), "{args:?}: stdout {:?}", stdout(&out));
}

#[test]
fn every_cpu_kernel_named_by_the_environment_reproduces_the_golden_continuation() {
    let (args, want) = golden_greedy_run(&golden());
    let with_kernel =
        |value: &str| run_with_env(&args, &[(mixtral::cpu::matmul::KERNEL_VAR, value)]);
    for kernel in mixtral::cpu::matmul::Kernel::available() {
        let out = with_kernel(kernel.name());
        assert!(out.status.success(), "{}: {}", kernel.name(), stderr(&out));
        let done = json_lines(&out).pop().unwrap();
        assert_eq!(ids(&done["generated_ids"]), want, "{}", kernel.name());
    }
    let out = with_kernel("sse9");
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.starts_with("error: ") && err.contains("\"sse9\""),
        "{err}"
    );
}

#[test]
fn command_line_mistakes_exit_2() {
    let m = model();
    assert_fails(&["--model", &m, "--prompt", "x", "--bogus"], 2, "--bogus");
    assert_fails(&["--model", &m, "--prompt", "x", "-n", "lots"], 2, "lots");
    assert_fails(
        &["--model", &m, "--prompt", "x", "--temperature", "-2"],
        2,
        "--temperature",
    );
    assert_fails(
        &["--model", &m, "--prompt", "x", "--device", "tpu"],
        2,
        "tpu",
    );
    assert_fails(&["--prompt", "x"], 2, "--model");
    assert_fails(&["--model", &m], 2, "--prompt");
}

#[test]
fn runtime_failures_exit_1() {
    let m = model();
    assert_fails(
        &["--model", "does/not/exist", "--prompt", "x"],
        1,
        "does/not/exist",
    );
    assert_fails(
        &["--model", &m, "--prompt-file", "does/not/exist.txt"],
        1,
        "does/not/exist.txt",
    );
    assert_fails(
        &[
            "--model",
            &m,
            "--prompt",
            "The capital of France is",
            "--max-context",
            "8",
            "-n",
            "8",
        ],
        1,
        "context",
    );
    let empty = tempfile::NamedTempFile::new().unwrap();
    assert_fails(
        &[
            "--model",
            &m,
            "--perplexity",
            empty.path().to_str().unwrap(),
        ],
        1,
        "at least 2 tokens",
    );
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_device_without_cuda_support_is_a_clear_error() {
    assert_fails(
        &["--model", &model(), "--prompt", "x", "--device", "cuda"],
        1,
        "no CUDA support",
    );
}

#[test]
fn prompt_longer_than_the_model_context_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("long.txt");
    // Far more tokens than max_position_embeddings (4096).
    std::fs::write(&file, "the river runs past the mill. ".repeat(1500)).unwrap();
    assert_fails(
        &["--model", &model(), "--prompt-file", file.to_str().unwrap()],
        1,
        "exceeds the context of 4096 tokens",
    );
}

#[test]
fn broken_model_directories_are_errors() {
    let src = model_dir();
    // A truncated checkpoint.
    let dir = tempfile::tempdir().unwrap();
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(name), dir.path().join(name)).unwrap();
    }
    let weights = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        &weights[..weights.len() / 2],
    )
    .unwrap();
    let path = dir.path().to_str().unwrap();
    assert_fails(&["--model", path, "--prompt", "x"], 1, "model.safetensors");
    // No tokenizer.
    let dir = tempfile::tempdir().unwrap();
    for name in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(name), dir.path().join(name)).unwrap();
    }
    let path = dir.path().to_str().unwrap();
    assert_fails(&["--model", path, "--prompt", "x"], 1, "tokenizer.json");
}

/// `--explain` prints the kernel-selection table in a CUDA build, and one error line without one.
#[test]
fn explain_prints_the_kernel_selection_table_or_says_why_not() {
    let out = run(&["--explain"]);
    if cfg!(feature = "cuda") {
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        assert!(text.starts_with("op "), "{text}");
        assert!(
            text.contains("linear_gemv") && text.contains("qmoe_up"),
            "{text}"
        );
    } else {
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains("feature `cuda`"), "{}", stderr(&out));
    }
}
