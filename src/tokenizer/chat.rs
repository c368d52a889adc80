//! Chat prompts: `tokenizer_config.json` (special tokens, `chat_template`), the template rendered with
//! minijinja the way transformers renders it with jinja2, and the built-in Mixtral `[INST]` format
//! used when a directory has no template.

use super::TokenizerError;
use minijinja::value::{Enumerator, Object, ObjectRepr};
use minijinja::{Environment, ErrorKind, State, Value};
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

/// A message as a render sees it: the same map as [`ChatMessage`]'s, but its texts are made once
/// per render and shared by every lookup. minijinja charges nothing for an attribute lookup, so a
/// lookup that copied the content would let a template make a copy per instruction
/// (`(messages * 100000) | map(attribute="content") | list`) outside the render's budget.
#[derive(Debug)]
struct RenderedMessage {
    role: Value,
    content: Value,
}

impl Object for RenderedMessage {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(self.role.clone()),
            "content" => Some(self.content.clone()),
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

/// The budget of one render, in minijinja's fuel. minijinja charges one fuel per instruction and
/// one per [`BYTES_PER_FUEL`] bytes of data the template makes (strings and lists built by operators,
/// literals, filters and methods, captured and written output), and refuses an allocation whose
/// size it knows in advance when the rest of the budget cannot pay for it. So this bounds both a
/// render's time (a loop that spends it all runs about 60 ms on one desktop core) and the memory its
/// values take (about 64 MB: a string doubled in a loop stops below that). The released Mixtral
/// template spends about 40 per message plus 4 per 100 bytes of content, so 2,000 messages of
/// 1,000 bytes (far more than a 64k-token context holds) use about a sixth of it. Not bounded:
/// minijinja 3.1 concatenates lists lazily and copies a chain of more than 32 concatenations
/// without consulting the budget (a list doubled 33 times; `docs/robustness.md`).
const TEMPLATE_FUEL: u64 = 1_000_000;

/// How many bytes of data one fuel pays for (minijinja's documented rate).
const BYTES_PER_FUEL: u64 = 64;

/// Longest rendered chat, in bytes: 4 MiB, about a million tokens, far more than any Mixtral
/// context holds. The budget alone would allow 64 MB, whose encoding would take gigabytes for the
/// tokenizer's per-token bookkeeping, so a longer render fails instead.
const MAX_RENDERED_BYTES: usize = 4 << 20;

/// A compiled chat template.
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
        env.set_unknown_method_callback(|state, value, method, args| {
            charge_method_result(state, value, method, args)?;
            super::pymethods::call(state, value, method, args)
        });
        // A template is a program: bound the work and the memory one render may use, so a hostile
        // loop fails the render instead of hanging the caller or exhausting its memory.
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
            .map(|m| {
                Value::from_object(RenderedMessage {
                    role: Value::from(m.role.as_str()),
                    content: Value::from(m.content.as_str()),
                })
            })
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
        let mut out = BoundedOutput::default();
        self.env
            .get_template(TEMPLATE_NAME)
            .and_then(|template| template.render_captured_to(context, &mut out))
            .map_err(render_error)?;
        // minijinja writes whole `str` pieces, so the bytes are UTF-8; checked all the same.
        String::from_utf8(out.bytes).map_err(|e| TokenizerError::Render {
            message: format!("rendered text is not UTF-8: {e}"),
        })
    }
}

/// The rendered text, refusing to grow past [`MAX_RENDERED_BYTES`].
#[derive(Default)]
struct BoundedOutput {
    bytes: Vec<u8>,
}

impl std::io::Write for BoundedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() > MAX_RENDERED_BYTES - self.bytes.len() {
            return Err(std::io::Error::other(format!(
                "the rendered chat is longer than {MAX_RENDERED_BYTES} bytes"
            )));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Charges the size of what a Python string method is about to build, before it is built.
/// minijinja charges a custom method's result only once it exists, and two of them can build far
/// more than the template has paid for: `s.replace(a, b)` is up to `len(s) * len(b)` bytes, and
/// `s.split()` a list slot (a `Value`) per piece. Anything else the methods return is at most a
/// few times the string they were called on, which minijinja has already charged. Arguments of the
/// wrong shape are left for the method itself to refuse.
fn charge_method_result(
    state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<(), minijinja::Error> {
    let Some(text) = value.as_str() else {
        return Ok(());
    };
    let bytes = match (method, args) {
        ("replace", [old, new]) => match (old.as_str(), new.as_str()) {
            (Some(old), Some(new)) if !old.is_empty() => {
                let count = text.matches(old).count();
                (text.len() - count * old.len()).saturating_add(count.saturating_mul(new.len()))
            }
            _ => 0,
        },
        ("split", _) => {
            let pieces = match args.first().and_then(Value::as_str) {
                Some("") => 0,
                Some(separator) => text.matches(separator).count() + 1,
                None => text.split_whitespace().count(),
            };
            pieces.saturating_mul(size_of::<Value>())
        }
        _ => 0,
    };
    state.consume_fuel(u64::try_from(bytes).unwrap_or(u64::MAX) / BYTES_PER_FUEL)
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
