//! `mixtral-serve`'s command line end to end: `--help` prints the usage; a mistake on the command
//! line is one `error:` line and exit status 2; a model that cannot be loaded or a device this
//! build cannot run is one `error:` line and exit status 1, before anything listens.

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mixtral-serve"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap()
}

fn one_error_line(out: &Output) -> String {
    let stderr = String::from_utf8(out.stderr.clone()).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    lines[0].to_string()
}

#[test]
fn help_prints_the_usage() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--model",
        "--host",
        "--port",
        "--device",
        "--quantize",
        "--served-model-name",
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--tensor-parallel",
        "--expert-parallel",
    ] {
        assert!(stdout.contains(flag), "{flag} missing from\n{stdout}");
    }
}

#[test]
fn usage_mistakes_exit_2() {
    for (args, needle) in [
        (&["--model", "m", "--port", "http"][..], "--port"),
        (&["--model", "m", "--bogus", "1"][..], "--bogus"),
        (&["--port", "1"][..], "--model"),
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(one_error_line(&out).contains(needle), "{args:?}");
    }
}

#[test]
fn load_failures_exit_1() {
    let out = run(&["--model", "no/such/dir", "--port", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(one_error_line(&out).contains("no/such/dir"));
    if !cfg!(feature = "cuda") {
        let out = run(&[
            "--model",
            "models/tiny-mixtral",
            "--device",
            "cuda",
            "--port",
            "0",
        ]);
        assert_eq!(out.status.code(), Some(1));
        assert!(one_error_line(&out).contains("cuda"));
    }
}

/// A split the model's sizes do not divide is refused from config.json, before the weights are
/// read or anything listens: tiny-mixtral has 2 KV heads and 8 experts.
#[test]
fn a_split_the_model_does_not_divide_exits_1_naming_the_size() {
    for (flag, parts, needle) in [
        ("--tensor-parallel", "4", "num_key_value_heads = 2"),
        ("--expert-parallel", "3", "num_local_experts = 8"),
    ] {
        let out = run(&["--model", "models/tiny-mixtral", flag, parts, "--port", "0"]);
        assert_eq!(out.status.code(), Some(1), "{flag} {parts}");
        let line = one_error_line(&out);
        assert!(line.contains(needle), "{flag} {parts}: {line}");
    }
}
