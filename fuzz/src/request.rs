//! The `openai_request` target's check of one input, shared with the main crate's
//! `tests/integration/server_fuzz_corpus.rs` (which includes this file) so that the seed corpus
//! runs in CI.
//!
//! The first byte picks the endpoint (even: `/v1/completions`, odd: `/v1/chat/completions`), the
//! rest is the body; the model is `tokenizer` with a context of [`CONTEXT`] tokens.

use mixtral::server::validate::{chat, completion, ModelLimits};
use mixtral::tokenizer::Tokenizer;

/// The context the requests are checked against.
pub const CONTEXT: usize = 64;

/// Validates one input: a refusal must be a 4xx whose JSON body serializes, an acceptance a plan
/// within the limits (`Plan::violation`).
///
/// # Panics
/// On a finding.
pub fn check_request(data: &[u8], tokenizer: &Tokenizer) {
    let Some((&endpoint, body)) = data.split_first() else {
        return;
    };
    let limits = ModelLimits {
        id: "tiny-mixtral",
        tokenizer,
        max_context: CONTEXT,
        vocab: tokenizer.vocab_size(),
    };
    let result = if endpoint % 2 == 0 {
        completion(body, &limits)
    } else {
        chat(body, &limits)
    };
    match result {
        Ok(plan) => {
            if let Some(broken) = plan.violation(&limits) {
                panic!("accepted a request outside the limits: {broken}");
            }
        }
        Err(error) => {
            assert!(error.status.is_client_error(), "{error:?}");
            serde_json::to_string(&error.body()).expect("the error body serializes");
        }
    }
}
