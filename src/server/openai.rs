//! The OpenAI API's JSON shapes that this server reads and writes: completion and chat-completion
//! requests (every field optional at this level; [`super::validate`] checks them), their replies,
//! streamed chunks, usage and `/v1/models`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A text prompt, several, or token ids.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// One text.
    Text(String),
    /// Several texts (one choice set each).
    Texts(Vec<String>),
    /// One prompt as token ids.
    Ids(Vec<i64>),
    /// Several prompts as token ids.
    IdLists(Vec<Vec<i64>>),
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk carrying `usage`.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// The sampling and limit fields both endpoints share.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct CommonFields {
    /// The model asked for (must be the served one when given).
    #[serde(default)]
    pub model: Option<String>,
    /// Most tokens to generate.
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// Sampling temperature in [0, 2]; 0 = greedy.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass in (0, 1].
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Keep only the k most likely tokens; 0 or -1 = off.
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Seed of the sampler.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Stop strings (at most 4).
    #[serde(default)]
    pub stop: Option<StopInput>,
    /// Choices per prompt.
    #[serde(default)]
    pub n: Option<i64>,
    /// Token id (as a string) -> bias in [-100, 100].
    #[serde(default)]
    pub logit_bias: Option<BTreeMap<String, f64>>,
    /// In [-2, 2].
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    /// In [-2, 2].
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    /// Stream server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Accepted and ignored.
    #[serde(default)]
    pub user: Option<String>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CompletionRequest {
    /// The prompt(s).
    pub prompt: PromptInput,
    /// Log-probabilities of the chosen token and this many alternatives (0..=20).
    #[serde(default)]
    pub logprobs: Option<i64>,
    /// Not supported: must be absent or false.
    #[serde(default)]
    pub echo: Option<bool>,
    /// Not supported: must be absent or empty.
    #[serde(default)]
    pub suffix: Option<String>,
    /// Not supported beyond `n`: must be absent or equal to `n`.
    #[serde(default)]
    pub best_of: Option<i64>,
    /// The shared fields.
    #[serde(flatten)]
    pub common: CommonFields,
}

/// A content part of a chat message (only `text` parts are accepted).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ContentPart {
    /// Must be `text`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text.
    #[serde(default)]
    pub text: Option<String>,
}

/// A chat message's content: a string or text parts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Parts, concatenated.
    Parts(Vec<ContentPart>),
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChatMessageInput {
    /// `system`, `user` or `assistant` (the template decides what it accepts).
    pub role: String,
    /// The text (null is taken as empty).
    #[serde(default)]
    pub content: Option<MessageContent>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<ChatMessageInput>,
    /// Report log-probabilities of the chosen tokens.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// Alternatives per token (0..=20; needs `logprobs`).
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    /// The newer name of `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    /// The shared fields.
    #[serde(flatten)]
    pub common: CommonFields,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

/// Token counts of a reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Usage {
    /// Prompt tokens (summed over prompts; each prompt counted once however many choices).
    pub prompt_tokens: usize,
    /// Generated tokens over all choices.
    pub completion_tokens: usize,
    /// The sum.
    pub total_tokens: usize,
    /// Cached prompt tokens.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// Completion log-probabilities, in the legacy completions format.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CompletionLogprobs {
    /// Each token's text.
    pub tokens: Vec<String>,
    /// Each token's log-probability.
    pub token_logprobs: Vec<f64>,
    /// Each token's alternatives: text -> log-probability.
    pub top_logprobs: Vec<BTreeMap<String, f64>>,
    /// Offset of each token's text in the choice's text (bytes).
    pub text_offset: Vec<usize>,
}

/// One choice of a completion reply or chunk.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompletionChoice {
    /// Which choice.
    pub index: usize,
    /// Its text (a chunk: the new piece).
    pub text: String,
    /// Log-probabilities when asked for.
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` or `length` at the end, else null.
    pub finish_reason: Option<&'static str>,
}

/// A completion reply (`object: text_completion`), whole or one streamed chunk.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompletionResponse {
    /// Request id.
    pub id: String,
    /// `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The served model id.
    pub model: String,
    /// The choices.
    pub choices: Vec<CompletionChoice>,
    /// Token counts (streamed: only in the last chunk, when asked for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One alternative of a chat token's log-probabilities.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f64,
    /// The text's UTF-8 bytes.
    pub bytes: Vec<u8>,
}

/// One generated token's log-probabilities (chat format).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatTokenLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f64,
    /// The text's UTF-8 bytes.
    pub bytes: Vec<u8>,
    /// The most likely alternatives.
    pub top_logprobs: Vec<TopLogprob>,
}

/// `choices[i].logprobs` of a chat reply.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ChatLogprobs {
    /// One entry per generated token.
    pub content: Vec<ChatTokenLogprob>,
}

/// The assistant's message (whole reply) or its new piece (chunk).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ChatMessageOutput {
    /// `assistant` (a chunk: only in the first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// The text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a chat reply or chunk.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatChoice {
    /// Which choice.
    pub index: usize,
    /// The whole message (reply).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<ChatMessageOutput>,
    /// The new piece (chunk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<ChatMessageOutput>,
    /// Log-probabilities when asked for.
    pub logprobs: Option<ChatLogprobs>,
    /// `stop` or `length` at the end, else null.
    pub finish_reason: Option<&'static str>,
}

/// A chat reply (`chat.completion`) or chunk (`chat.completion.chunk`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatResponse {
    /// Request id.
    pub id: String,
    /// `chat.completion` or `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The served model id.
    pub model: String,
    /// The choices.
    pub choices: Vec<ChatChoice>,
    /// Token counts (streamed: only in the last chunk, when asked for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One entry of `/v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelCard {
    /// The served model name.
    pub id: String,
    /// `model`.
    pub object: &'static str,
    /// Unix seconds when the server started.
    pub created: u64,
    /// `mixtral`.
    pub owned_by: &'static str,
    /// The longest sequence the server takes.
    pub max_model_len: usize,
}

/// `/v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelList {
    /// `list`.
    pub object: &'static str,
    /// The one served model.
    pub data: Vec<ModelCard>,
}
