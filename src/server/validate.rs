//! Request bodies to generation plans: parses the JSON of `/v1/completions` and
//! `/v1/chat/completions`, checks every field against its range and the model (vocabulary, context),
//! tokenizes the prompt (chat through the model's own template) and returns a [`Plan`]: one
//! [`GenerationRequest`] per choice. Every refusal is an [`ApiError`] naming the field; nothing here
//! panics on any input.

use super::backend::GenerationRequest;
use super::errors::ApiError;
use super::openai::{
    ChatRequest, CommonFields, CompletionRequest, MessageContent, PromptInput, StopInput,
};
use crate::sampling::SamplingParams;
use crate::tokenizer::{ChatMessage, Tokenizer};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Most choices (`n` times the prompts) one request may ask for.
pub const MAX_CHOICES: usize = 64;
/// Most alternatives per token (`logprobs`, `top_logprobs`).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Most stop strings.
pub const MAX_STOPS: usize = 4;
/// Most `logit_bias` entries.
pub const MAX_LOGIT_BIAS: usize = 1024;
/// `max_tokens` of a completion that gives none (OpenAI's default).
pub const DEFAULT_COMPLETION_TOKENS: usize = 16;

/// What the requests are checked against.
#[derive(Clone, Copy)]
pub struct ModelLimits<'a> {
    /// The served model name (`model` must equal it when given).
    pub id: &'a str,
    /// The model's tokenizer and chat template.
    pub tokenizer: &'a Tokenizer,
    /// Longest sequence (prompt plus generated tokens).
    pub max_context: usize,
    /// Number of token ids (logits per row).
    pub vocab: usize,
}

/// A validated request: the sequences to generate and how to reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// One per choice, choice `i` is `requests[i]` (prompt `i / n`, sample `i % n`).
    pub requests: Vec<GenerationRequest>,
    /// Choices per prompt.
    pub n: usize,
    /// Reply with server-sent events.
    pub stream: bool,
    /// Streamed: a last chunk with `usage`.
    pub include_usage: bool,
}

impl Plan {
    /// What every plan from [`completion`] or [`chat`] satisfies for `limits`: `None`, or the first
    /// broken rule (for the fuzz target and its corpus test).
    pub fn violation(&self, limits: &ModelLimits<'_>) -> Option<String> {
        let count = self.requests.len();
        if count == 0 || self.n == 0 || !count.is_multiple_of(self.n) || count > MAX_CHOICES {
            return Some(format!("{count} requests for n = {}", self.n));
        }
        for (i, r) in self.requests.iter().enumerate() {
            let broken = if r.prompt.is_empty() {
                "an empty prompt"
            } else if r.prompt.iter().any(|&id| id as usize >= limits.vocab) {
                "a prompt id outside the vocabulary"
            } else if r.max_tokens < 1 || r.prompt.len() + r.max_tokens > limits.max_context {
                "max_tokens below 1 or past the context"
            } else if r.sampling.validate().is_err() || r.sampling.temperature > 2.0 {
                "sampling parameters out of range"
            } else if r.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
                "too many top log-probabilities"
            } else if r.stop.len() > MAX_STOPS || r.stop.iter().any(String::is_empty) {
                "too many or empty stop strings"
            } else if r
                .logit_bias
                .iter()
                .any(|&(id, b)| id as usize >= limits.vocab || !(-100.0..=100.0).contains(&b))
            {
                "a logit bias out of range"
            } else if !(-2.0..=2.0).contains(&r.presence_penalty)
                || !(-2.0..=2.0).contains(&r.frequency_penalty)
            {
                "a penalty out of range"
            } else {
                continue;
            };
            return Some(format!("request {i}: {broken}: {r:?}"));
        }
        None
    }

    /// Prompt tokens, each prompt counted once.
    pub fn prompt_tokens(&self) -> usize {
        self.requests
            .iter()
            .step_by(self.n.max(1))
            .map(|r| r.prompt.len())
            .sum()
    }
}

/// Parses and validates a `/v1/completions` body.
pub fn completion(body: &[u8], limits: &ModelLimits<'_>) -> Result<Plan, ApiError> {
    let request: CompletionRequest = parse_json(body)?;
    if request.echo == Some(true) {
        return Err(ApiError::invalid(Some("echo"), "echo is not supported"));
    }
    if request.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid(Some("suffix"), "suffix is not supported"));
    }
    let prompts = completion_prompts(&request.prompt, limits)?;
    let logprobs = match request.logprobs {
        None => None,
        Some(k) => Some(bounded(k, 0, MAX_TOP_LOGPROBS, "logprobs")?),
    };
    let n = choices(&request.common, prompts.len())?;
    if let Some(best_of) = request.best_of {
        if usize::try_from(best_of).ok() != Some(n) {
            return Err(ApiError::invalid(
                Some("best_of"),
                format!("best_of = {best_of} is not supported (only best_of = n = {n})"),
            ));
        }
    }
    let max_tokens = request.common.max_tokens;
    plan(
        &request.common,
        prompts,
        n,
        max_tokens,
        Some(DEFAULT_COMPLETION_TOKENS),
        logprobs,
        "prompt",
        limits,
    )
}

/// Parses and validates a `/v1/chat/completions` body.
pub fn chat(body: &[u8], limits: &ModelLimits<'_>) -> Result<Plan, ApiError> {
    let request: ChatRequest = parse_json(body)?;
    if request.messages.is_empty() {
        return Err(ApiError::invalid(Some("messages"), "messages is empty"));
    }
    let mut messages = Vec::with_capacity(request.messages.len());
    for (i, m) in request.messages.iter().enumerate() {
        let content = match &m.content {
            None => String::new(),
            Some(MessageContent::Text(text)) => text.clone(),
            Some(MessageContent::Parts(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(t)) => text.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::invalid(
                                Some("messages"),
                                format!(
                                    "message {i}: content part of type {kind:?} is not supported (only text)"
                                ),
                            ))
                        }
                    }
                }
                text
            }
        };
        messages.push(ChatMessage::new(m.role.clone(), content));
    }
    let prompt = limits
        .tokenizer
        .encode_chat(&messages)
        .map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
    let logprobs = match (request.logprobs, request.top_logprobs) {
        (Some(true), k) => Some(bounded(
            k.unwrap_or(0),
            0,
            MAX_TOP_LOGPROBS,
            "top_logprobs",
        )?),
        (_, Some(k)) if k != 0 => {
            return Err(ApiError::invalid(
                Some("top_logprobs"),
                "top_logprobs needs logprobs = true",
            ))
        }
        _ => None,
    };
    let n = choices(&request.common, 1)?;
    let max_tokens = request.max_completion_tokens.or(request.common.max_tokens);
    plan(
        &request.common,
        vec![prompt],
        n,
        max_tokens,
        None,
        logprobs,
        "messages",
        limits,
    )
}

/// Parses JSON into `T`, an invalid body being a 400 that quotes serde's message.
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, format!("invalid request body: {e}")))
}

/// `value` as a usize in `lo..=hi`, else a 400 naming `param`.
fn bounded(value: i64, lo: usize, hi: usize, param: &str) -> Result<usize, ApiError> {
    usize::try_from(value)
        .ok()
        .filter(|v| (lo..=hi).contains(v))
        .ok_or_else(|| {
            ApiError::invalid(
                Some(param),
                format!("{param} = {value} is out of range: expected an integer in {lo}..={hi}"),
            )
        })
}

/// `value` (when given) as an f32 in `[lo, hi]`, else a 400 naming `param`.
fn ranged(
    value: Option<f64>,
    default: f32,
    lo: f64,
    hi: f64,
    param: &str,
) -> Result<f32, ApiError> {
    let expected = format!("a number in [{lo}, {hi}]");
    within(value, default, |v| v >= lo && v <= hi, &expected, param)
}

/// `value` (when given) as an f32 for which `accept` holds, else a 400 naming `param` and what
/// was `expected`.
fn within(
    value: Option<f64>,
    default: f32,
    accept: impl Fn(f64) -> bool,
    expected: &str,
    param: &str,
) -> Result<f32, ApiError> {
    match value {
        None => Ok(default),
        Some(v) if v.is_finite() && accept(v) && (v as f32).is_finite() => Ok(v as f32),
        Some(v) => Err(ApiError::invalid(
            Some(param),
            format!("{param} = {v} is out of range: expected {expected}"),
        )),
    }
}

/// `n`: choices per prompt, with at most [`MAX_CHOICES`] in all.
fn choices(common: &CommonFields, prompts: usize) -> Result<usize, ApiError> {
    let n = bounded(common.n.unwrap_or(1), 1, MAX_CHOICES, "n")?;
    if n.saturating_mul(prompts) > MAX_CHOICES {
        return Err(ApiError::invalid(
            Some("n"),
            format!(
                "n = {n} for {prompts} prompts is {} choices; at most {MAX_CHOICES} per request",
                n.saturating_mul(prompts)
            ),
        ));
    }
    Ok(n)
}

/// The prompts of a completion request as token ids (texts get a BOS, as `mixtral-run` encodes).
fn completion_prompts(
    prompt: &PromptInput,
    limits: &ModelLimits<'_>,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let encode = |text: &str| {
        limits
            .tokenizer
            .encode(text, true)
            .map_err(|e| ApiError::invalid(Some("prompt"), e.to_string()))
    };
    let ids = |list: &[i64]| -> Result<Vec<u32>, ApiError> {
        if list.is_empty() {
            return Err(ApiError::invalid(Some("prompt"), "a prompt has no tokens"));
        }
        list.iter()
            .map(|&id| {
                u32::try_from(id)
                    .ok()
                    .filter(|&i| (i as usize) < limits.vocab)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            Some("prompt"),
                            format!(
                                "token id {id} is outside the vocabulary of {} ids",
                                limits.vocab
                            ),
                        )
                    })
            })
            .collect()
    };
    let prompts = match prompt {
        PromptInput::Text(text) => vec![encode(text)?],
        PromptInput::Texts(texts) => texts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?,
        PromptInput::Ids(list) => vec![ids(list)?],
        PromptInput::IdLists(lists) => lists.iter().map(|l| ids(l)).collect::<Result<_, _>>()?,
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid(Some("prompt"), "prompt is an empty list"));
    }
    if prompts.len() > MAX_CHOICES {
        return Err(ApiError::invalid(
            Some("prompt"),
            format!(
                "{} prompts; at most {MAX_CHOICES} per request",
                prompts.len()
            ),
        ));
    }
    Ok(prompts)
}

/// A seed for a request that gives none: differs between requests and runs.
fn fresh_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The checks both endpoints share, and the requests: `n` per prompt, sample `j` seeded with
/// `seed + j`.
#[allow(clippy::too_many_arguments)]
fn plan(
    common: &CommonFields,
    prompts: Vec<Vec<u32>>,
    n: usize,
    max_tokens: Option<i64>,
    default_max_tokens: Option<usize>,
    logprobs: Option<usize>,
    prompt_param: &str,
    limits: &ModelLimits<'_>,
) -> Result<Plan, ApiError> {
    if let Some(asked) = &common.model {
        if asked != limits.id {
            return Err(ApiError::unknown_model(asked, limits.id));
        }
    }
    let temperature = ranged(common.temperature, 1.0, 0.0, 2.0, "temperature")?;
    let top_p = within(
        common.top_p,
        1.0,
        |p| p > 0.0 && p as f32 > 0.0 && p <= 1.0,
        "a number in (0, 1]",
        "top_p",
    )?;
    let top_k = match common.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) => bounded(k, 1, usize::MAX, "top_k")?,
    };
    let presence_penalty = ranged(common.presence_penalty, 0.0, -2.0, 2.0, "presence_penalty")?;
    let frequency_penalty = ranged(
        common.frequency_penalty,
        0.0,
        -2.0,
        2.0,
        "frequency_penalty",
    )?;
    let stop = match &common.stop {
        None => Vec::new(),
        Some(StopInput::One(s)) => vec![s.clone()],
        Some(StopInput::Many(list)) => list.clone(),
    };
    if stop.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            Some("stop"),
            format!("{} stop strings; at most {MAX_STOPS}", stop.len()),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(Some("stop"), "a stop string is empty"));
    }
    let logit_bias = logit_bias(common, limits.vocab)?;

    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if longest >= limits.max_context {
        return Err(ApiError::invalid_code(
            prompt_param,
            "context_length_exceeded",
            format!(
                "the prompt has {longest} tokens; the context is {} tokens, so at most {} prompt tokens leave room for one generated token",
                limits.max_context,
                limits.max_context.saturating_sub(1)
            ),
        ));
    }
    let room = limits.max_context - longest;
    let max_tokens = match max_tokens {
        None => default_max_tokens.unwrap_or(room).min(room),
        Some(m) if m < 1 => {
            return Err(ApiError::invalid(
                Some("max_tokens"),
                format!("max_tokens = {m} is out of range: expected at least 1"),
            ))
        }
        Some(m) => match usize::try_from(m) {
            Ok(m) if m <= room => m,
            _ => {
                return Err(ApiError::invalid_code(
                    "max_tokens",
                    "context_length_exceeded",
                    format!(
                        "max_tokens = {m} plus the prompt's {longest} tokens exceeds the context of {} tokens (at most {room} new tokens)",
                        limits.max_context
                    ),
                ))
            }
        },
    };

    let seed = common.seed.map(|s| s as u64).unwrap_or_else(fresh_seed);
    let mut requests = Vec::with_capacity(prompts.len() * n);
    for prompt in prompts {
        for j in 0..n {
            let sampling = SamplingParams {
                temperature,
                top_k,
                top_p,
                repetition_penalty: 1.0,
                seed: seed.wrapping_add(j as u64),
            };
            requests.push(GenerationRequest {
                prompt: prompt.clone(),
                max_tokens,
                sampling,
                stop: stop.clone(),
                logprobs,
                logit_bias: logit_bias.clone(),
                presence_penalty,
                frequency_penalty,
            });
        }
    }
    Ok(Plan {
        requests,
        n,
        stream: common.stream.unwrap_or(false),
        include_usage: common
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    })
}

/// `logit_bias`: token ids (decimal strings) in the vocabulary, biases in [-100, 100].
fn logit_bias(common: &CommonFields, vocab: usize) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(map) = &common.logit_bias else {
        return Ok(Vec::new());
    };
    if map.len() > MAX_LOGIT_BIAS {
        return Err(ApiError::invalid(
            Some("logit_bias"),
            format!("{} entries; at most {MAX_LOGIT_BIAS}", map.len()),
        ));
    }
    map.iter()
        .map(|(key, &bias)| {
            let id = key
                .parse::<u32>()
                .ok()
                .filter(|&id| (id as usize) < vocab)
                .ok_or_else(|| {
                    ApiError::invalid(
                        Some("logit_bias"),
                        format!("key {key:?} is not a token id below {vocab}"),
                    )
                })?;
            let bias = ranged(Some(bias), 0.0, -100.0, 100.0, "logit_bias")?;
            Ok((id, bias))
        })
        .collect()
}
