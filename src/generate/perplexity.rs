//! Teacher-forced scoring of a token sequence: `log p(ids[i] | ids[..i])` for every `i >= 1` from
//! `LogitsFor::All` steps of one engine sequence (chunked, the sequence continuing), and the
//! perplexity `exp(-mean)`.

use super::sequences::Sequences;
use super::GenerateError;
use crate::engine::{Engine, EngineError, LogitsFor, SeqStep};
use crate::sampling::log_softmax;

/// Tokens per step of [`perplexity`].
pub const PERPLEXITY_CHUNK: usize = 512;

/// Per-token log-probabilities of a sequence and its perplexity.
#[derive(Debug, Clone, PartialEq)]
pub struct Perplexity {
    /// `token_logprobs[i - 1] = ln p(ids[i] | ids[..i])` for `i` in `1..ids.len()`.
    pub token_logprobs: Vec<f64>,
    /// `exp(-mean(token_logprobs))`.
    pub perplexity: f64,
}

/// Scores `ids` (usually BOS first) in steps of [`PERPLEXITY_CHUNK`] tokens.
pub fn perplexity(engine: &mut dyn Engine, ids: &[u32]) -> Result<Perplexity, GenerateError> {
    perplexity_chunked(engine, ids, PERPLEXITY_CHUNK)
}

/// Scores `ids` in steps of at most `chunk` tokens (`0` is taken as 1) of one new sequence,
/// freed before returning. The last id is only scored, never fed, so `ids.len() - 1` tokens must
/// fit the engine's context.
pub fn perplexity_chunked(
    engine: &mut dyn Engine,
    ids: &[u32],
    chunk: usize,
) -> Result<Perplexity, GenerateError> {
    if ids.len() < 2 {
        return Err(GenerateError::TooFewTokens { len: ids.len() });
    }
    let fed = &ids[..ids.len() - 1];
    let max_context = engine.max_context();
    if fed.len() > max_context {
        return Err(GenerateError::ContextOverflow {
            prompt_tokens: fed.len(),
            new_tokens: 0,
            max_context,
        });
    }
    let mut sequences = Sequences::new(engine, 1)?;
    let seq = sequences
        .id(0)
        .ok_or_else(|| GenerateError::EngineOutput("no sequence".into()))?;
    let mut token_logprobs = Vec::with_capacity(fed.len());
    for (c, tokens) in fed.chunks(chunk.max(1)).enumerate() {
        let start = c * chunk.max(1);
        let out = sequences.step(&[SeqStep {
            seq,
            tokens,
            start_pos: start,
            logits: LogitsFor::All,
        }])?;
        let expected: Vec<(usize, usize)> = (start..start + tokens.len()).map(|p| (0, p)).collect();
        if out.rows != expected || out.vocab == 0 || out.logits.len() != tokens.len() * out.vocab {
            return Err(GenerateError::EngineOutput(format!(
                "asked for every position of {start}..{}, got rows {:?} and {} logits of vocab {}",
                start + tokens.len(),
                out.rows,
                out.logits.len(),
                out.vocab
            )));
        }
        for (row, position) in out.logits.chunks_exact(out.vocab).zip(start..) {
            if let Some(index) = row.iter().position(|x| !x.is_finite()) {
                return Err(GenerateError::NonFiniteLogits { position, index });
            }
            // `position + 1 <= fed.len() < ids.len()`.
            let target = ids[position + 1];
            let logprobs = log_softmax(row);
            let logprob = usize::try_from(target)
                .ok()
                .and_then(|t| logprobs.get(t))
                .ok_or(EngineError::TokenOutOfRange {
                    token: target,
                    vocab: out.vocab,
                })?;
            token_logprobs.push(*logprob);
        }
    }
    sequences.free_all()?;
    let mean = token_logprobs.iter().sum::<f64>() / token_logprobs.len() as f64;
    Ok(Perplexity {
        token_logprobs,
        perplexity: (-mean).exp(),
    })
}
