//! Chat prompts: `tokenizer_config.json` (special tokens, `chat_template`), the template rendered with
//! minijinja the way transformers renders it with jinja2, and the built-in Mixtral `[INST]` format
//! used when a directory has no template.

use super::TokenizerError;
use minijinja::value::{Enumerator, Object, ObjectRepr};
use minijinja::{Environment, ErrorKind, Value};
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Name under which the template is compiled (appears in error messages).
const TEMPLATE_NAME: &str = "chat_template";

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `user`, `assistant` or `system`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
}

/// A message as templates see it: a map with keys `role` then `content` (the order of a Python dict
/// built the usual way, which `message.items()` reveals).
impl Object for ChatMessage {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(Value::from(self.role.as_str())),
            "content" => Some(Value::from(self.content.as_str())),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

/// The fields of `tokenizer_config.json` this crate uses.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct TokenizerConfig {
    /// `bos_token` (default `<s>`).
    pub bos_token: String,
    /// `eos_token` (default `</s>`).
    pub eos_token: String,
    /// `chat_template`, if any.
    pub chat_template: Option<String>,
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        Self {
            bos_token: "<s>".to_string(),
            eos_token: "</s>".to_string(),
            chat_template: None,
        }
    }
}

impl TokenizerConfig {
    /// Reads and checks `tokenizer_config.json`.
    pub fn read(path: &Path) -> Result<Self, TokenizerError> {
        let bytes = super::read(path)?;
        let bad = |message: String| TokenizerError::Config {
            path: path.to_path_buf(),
            message,
        };
        let json: Json =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let Json::Object(fields) = json else {
            return Err(bad("not a JSON object".to_string()));
        };
        let defaults = Self::default();
        let token = |name: &str, default: String| match fields.get(name) {
            None | Some(Json::Null) => Ok(default),
            Some(value) => token_text(value).ok_or_else(|| {
                bad(format!(
                    "`{name}` = {value} is neither a string nor {{\"content\": string}}"
                ))
            }),
        };
        Ok(Self {
            bos_token: token("bos_token", defaults.bos_token)?,
            eos_token: token("eos_token", defaults.eos_token)?,
            chat_template: match fields.get("chat_template") {
                None | Some(Json::Null) => None,
                Some(value) => Some(template_text(value).ok_or_else(|| {
                    bad("`chat_template` is neither a string nor a list of {name, template} with a \"default\" entry".to_string())
                })?),
            },
        })
    }
}

/// A special token as written in the config: `"<s>"` or `{"content": "<s>", ...}`.
fn token_text(value: &Json) -> Option<String> {
    match value {
        Json::String(text) => Some(text.clone()),
        Json::Object(fields) => fields.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The chat template as written in the config: a string, or a list of named templates of which the
/// one named `default` is used.
fn template_text(value: &Json) -> Option<String> {
    match value {
        Json::String(text) => Some(text.clone()),
        Json::Array(entries) => entries.iter().find_map(|entry| {
            (entry.get("name")?.as_str()? == "default")
                .then(|| entry.get("template")?.as_str().map(str::to_string))
                .flatten()
        }),
        _ => None,
    }
}

/// A compiled chat template.
/// Instructions one render may execute: far above what a real chat needs (the released Mixtral
/// template spends a few hundred per message), far below a runaway loop.
const TEMPLATE_FUEL: u64 = 20_000_000;

pub(super) struct ChatTemplate {
    env: Environment<'static>,
}

impl ChatTemplate {
    /// Compiles `source` (from `path`) with the settings transformers uses: `trim_blocks`,
    /// `lstrip_blocks`, a `raise_exception(message)` function that fails the render, and the Python
    /// string / dict methods templates call.
    pub fn compile(path: &Path, source: String) -> Result<Self, TokenizerError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| template_error(path, &e))?;
        env.set_syntax(syntax);
        env.add_function("raise_exception", raise_exception);
        env.set_unknown_method_callback(super::pymethods::call);
        // A template is a program: bound the work one render may do, so a hostile loop fails the
        // render instead of hanging the caller.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| template_error(path, &e))?;
        Ok(Self { env })
    }

    /// Renders `messages` with `bos_token`, `eos_token` and `add_generation_prompt = true`.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String, TokenizerError> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| Value::from_object(m.clone()))
            .collect();
        let context = BTreeMap::from([
            ("messages".to_string(), Value::from(messages)),
            ("bos_token".to_string(), Value::from(bos_token)),
            ("eos_token".to_string(), Value::from(eos_token)),
            ("add_generation_prompt".to_string(), Value::from(true)),
        ]);
        let render_error = |e: minijinja::Error| TokenizerError::Render {
            message: error_message(&e),
        };
        self.env
            .get_template(TEMPLATE_NAME)
            .and_then(|template| template.render(context))
            .map_err(render_error)
    }
}

/// `raise_exception(message)` as the Hub's templates call it: fails the render with `message`.
fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// A compile error of the template in `path`.
fn template_error(path: &Path, error: &minijinja::Error) -> TokenizerError {
    TokenizerError::Template {
        path: PathBuf::from(path),
        message: error_message(error),
    }
}

/// A minijinja error with its chain of causes on one line.
fn error_message(error: &minijinja::Error) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// The built-in Mixtral-Instruct format,
/// `<s>[INST] {user} [/INST]{answer}</s>[INST] {user} [/INST]...`.
///
/// An optional first `system` message is prepended to the first user message with a blank line;
/// after it, roles must alternate user / assistant starting with user.
pub(super) fn render_inst(
    messages: &[ChatMessage],
    bos_token: &str,
    eos_token: &str,
) -> Result<String, TokenizerError> {
    let (system, turns, offset) = match messages.split_first() {
        Some((first, rest)) if first.role == "system" => (Some(first.content.as_str()), rest, 1),
        _ => (None, messages, 0),
    };
    if system.is_some() && turns.is_empty() {
        return Err(TokenizerError::ChatOrder {
            index: 1,
            role: "(none)".to_string(),
            expected: "a user message after the system message",
        });
    }
    let mut out = String::from(bos_token);
    for (i, message) in turns.iter().enumerate() {
        let expected = if i % 2 == 0 { "user" } else { "assistant" };
        if message.role != expected {
            return Err(TokenizerError::ChatOrder {
                index: i + offset,
                role: message.role.clone(),
                expected,
            });
        }
        if expected == "user" {
            out.push_str("[INST] ");
            if let (0, Some(system)) = (i, system) {
                out.push_str(system);
                out.push_str("\n\n");
            }
            out.push_str(&message.content);
            out.push_str(" [/INST]");
        } else {
            out.push_str(&message.content);
            out.push_str(eos_token);
        }
    }
    Ok(out)
}
