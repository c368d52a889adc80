//! `mixtral-serve --dist-init`: a split served by ranks in separate processes, as
//! `mixtral-run --dist-init` runs one (`tests/integration/cli_shard.rs`). Two CPU ranks of
//! `models/tiny-mixtral` at `--tensor-parallel 2` on 127.0.0.1: rank 0 serves HTTP, rank 1 follows
//! it; a greedy completion equals the unsharded server's (the TCP ranks sum in the in-process
//! ranks' order, whose TP 2 output `tests/integration/server_http.rs` compares with one rank's);
//! when rank 0 is stopped (SIGTERM), rank 1 ends too, with status 0; when rank 1 dies, rank 0
//! answers errors naming it (and `/health` 503) instead of hanging.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to load the tiny model and listen, and a follower to end.
const WAIT: Duration = Duration::from_secs(60);

fn server(extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_mixtral-serve"))
        .args([
            "--model",
            "models/tiny-mixtral",
            "--max-context",
            "64",
            "--max-num-seqs",
            "2",
            "--port",
            "0",
        ])
        .args(extra)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mixtral-serve starts")
}

/// The `HOST:PORT` a server prints once it listens, and the rest of its stderr.
fn listening(child: &mut Child) -> (String, BufReader<ChildStderr>) {
    let mut lines = BufReader::new(child.stderr.take().expect("piped stderr"));
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let n = lines.read_line(&mut line).expect("stderr readable");
        assert!(n > 0, "the server ended before listening:\n{seen}");
        if let Some((_, addr)) = line.trim().split_once("listening on http://") {
            return (addr.to_string(), lines);
        }
        seen.push_str(&line);
    }
}

/// The status and body of one HTTP/1.1 request to the server at `addr` (`body` JSON, if any).
fn request(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("the server accepts");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("{reply}"));
    (status, body.to_string())
}

fn completion_request(prompt: &str) -> String {
    serde_json::json!({"prompt": prompt, "max_tokens": 12, "temperature": 0}).to_string()
}

/// The text of a greedy completion of `prompt` from the server at `addr`.
fn complete(addr: &str, prompt: &str) -> String {
    let (status, json) = request(addr, "POST", "/v1/completions", &completion_request(prompt));
    assert_eq!(status, 200, "{json}");
    let value: Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json:?}: {e}"));
    value["choices"][0]["text"]
        .as_str()
        .expect("a completion")
        .to_string()
}

fn terminate(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits for `child` to end, at most [`WAIT`].
fn ended(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > WAIT {
            let _ = child.kill();
            panic!("{what} still runs {WAIT:?} later");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The rest of a stopped server's stderr says it shut down, and nothing panicked.
fn assert_clean_end(stderr: &mut BufReader<ChildStderr>, what: &str) {
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert!(
        rest.contains("mixtral-serve: shutting down"),
        "{what}: {rest}"
    );
    assert!(!rest.contains("panicked"), "{what}: {rest}");
}

/// Rank 0 and rank 1 of a TP 2 world on 127.0.0.1, each waiting `timeout` seconds for the other.
fn two_ranks(timeout: &str) -> (Child, Child) {
    let dist = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let rank = |r: &str| {
        server(&[
            "--tensor-parallel",
            "2",
            "--dist-init",
            &dist,
            "--rank",
            r,
            "--world",
            "2",
            "--dist-timeout",
            timeout,
        ])
    };
    let follower = rank("1");
    (rank("0"), follower)
}

#[test]
fn ranks_in_separate_processes_serve_the_unsharded_completion_and_stop_together() {
    let prompts = ["The capital of France is", "Once upon a time"];
    let mut plain = server(&[]);
    let (addr, mut plain_err) = listening(&mut plain);
    let want: Vec<String> = prompts.iter().map(|p| complete(&addr, p)).collect();
    terminate(&plain);
    assert!(ended(&mut plain, "the unsharded server").success());
    assert_clean_end(&mut plain_err, "the unsharded server");

    let (mut leader, mut follower) = two_ranks("30");
    let (addr, mut leader_err) = listening(&mut leader);
    let got: Vec<String> = prompts.iter().map(|p| complete(&addr, p)).collect();
    assert_eq!(got, want);

    terminate(&leader);
    assert!(ended(&mut leader, "rank 0").success());
    assert_clean_end(&mut leader_err, "rank 0");
    let status = ended(&mut follower, "rank 1 after rank 0 stopped");
    let mut said = String::new();
    follower
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut said)
        .unwrap();
    assert!(status.success(), "rank 1: {status}\n{said}");
    assert!(said.contains("rank 1: rank 0 stopped"), "{said}");
    assert!(!said.contains("panicked"), "{said}");
}

/// A follower that dies (SIGKILL) makes rank 0's engine dead: the next completion is a 500 with an
/// OpenAI error body naming rank 1, `/health` answers 503, and rank 0 still shuts down cleanly. The
/// connection's close is seen at once; the bound is the 30 s `--dist-timeout`, which a request
/// never waits out (asserted by the test's own time limit, far above the close's few milliseconds).
#[test]
fn a_follower_that_dies_makes_rank_0_answer_errors_not_hang() {
    let (mut leader, mut follower) = two_ranks("30");
    let (addr, mut leader_err) = listening(&mut leader);
    complete(&addr, "The capital of France is");
    follower.kill().unwrap();
    follower.wait().unwrap();
    let start = Instant::now();
    let (status, body) = request(
        &addr,
        "POST",
        "/v1/completions",
        &completion_request("Once upon a time"),
    );
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "the request waited out the timeout: {:?}",
        start.elapsed()
    );
    assert_eq!(status, 500, "{body}");
    let error: Value = serde_json::from_str(&body).unwrap();
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("rank 1"), "{body}");
    let (status, body) = request(&addr, "GET", "/health", "");
    assert_eq!(status, 503, "{body}");
    terminate(&leader);
    assert!(ended(&mut leader, "rank 0").success());
    assert_clean_end(&mut leader_err, "rank 0");
}
