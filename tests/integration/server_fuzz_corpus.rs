//! The seed corpus of the `openai_request` fuzz target (`fuzz/corpus/openai_request/`) through the
//! target's own check (`fuzz/src/request.rs`, included here): every body is refused with a 4xx or
//! planned within the limits, and nothing panics. Runs on stable Rust, without libFuzzer.

#[path = "../../fuzz/src/request.rs"]
mod request;

use mixtral::tokenizer::Tokenizer;
use std::path::Path;

#[test]
fn seed_corpus_is_refused_or_planned_within_limits() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tokenizer = Tokenizer::from_dir(&root.join("models/tiny-mixtral")).unwrap();
    let mut files: Vec<_> = std::fs::read_dir(root.join("fuzz/corpus/openai_request"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 20, "{} seeds", files.len());
    for path in &files {
        let data = std::fs::read(path).unwrap();
        // A panic fails the test; this line names the seed that caused it.
        eprintln!("{}", path.display());
        request::check_request(&data, &tokenizer);
    }
}
