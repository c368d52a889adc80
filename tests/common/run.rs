//! Running the crate's `mixtral-run` binary (the one [`binary`](super::repo::binary) finds).

use std::ffi::OsStr;

use serde_json::Value;

use super::repo::binary;

/// The JSON lines `mixtral-run ARGS --json` prints; fails the test (with its stderr) when it does
/// not exit successfully.
pub fn mixtral_run_events<S: AsRef<OsStr>>(args: &[S]) -> Vec<Value> {
    let out = std::process::Command::new(binary("mixtral-run", env!("CARGO_BIN_EXE_mixtral-run")))
        .args(args)
        .arg("--json")
        .output()
        .expect("running mixtral-run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "mixtral-run failed: {stderr}");
    json_lines(&out)
}

/// The ids of the `token` events among `events`.
pub fn token_ids(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .filter(|event| event["event"] == "token")
        .map(|event| event["id"].as_u64().expect("a token id"))
        .collect()
}

/// A finished command's stdout, which must be UTF-8.
pub fn stdout(out: &std::process::Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// A finished command's stderr, which must be UTF-8.
pub fn stderr(out: &std::process::Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

/// A finished command's stdout as JSON lines (a line that is not JSON fails the test).
pub fn json_lines(out: &std::process::Output) -> Vec<Value> {
    stdout(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}
