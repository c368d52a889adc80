//! Request bodies of `mixtral-serve` (`mixtral_fuzz::request`): the first byte picks the endpoint
//! (even: `/v1/completions`, odd: `/v1/chat/completions`), the rest is the body. Validation must
//! refuse it with a 4xx `ApiError` whose JSON body serializes, or give a plan every request of which
//! is within the model's limits. The model: `models/tiny-mixtral`'s tokenizer and chat template, a
//! context of 64 tokens.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mixtral::tokenizer::Tokenizer;
use std::path::Path;
use std::sync::OnceLock;

static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let tokenizer = TOKENIZER.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-mixtral");
        Tokenizer::from_dir(&dir).expect("load models/tiny-mixtral's tokenizer")
    });
    mixtral_fuzz::request::check_request(data, tokenizer);
});
