//! Text <-> token ids: `tokenizer.json` through the `tokenizers` crate, the chat template of
//! `tokenizer_config.json` rendered with minijinja, and streaming detokenization.
//!
//! Two encodings of text exist, and the difference matters for safety:
//! - [`Tokenizer::encode`] treats its input as plain text: `<s>` written in it is three characters,
//!   never the BOS id, so a prompt always has exactly the one BOS the caller asks for. This is what
//!   sentencepiece (and mistral-common) do.
//! - [`Tokenizer::encode_rendered`] (used by [`Tokenizer::encode_chat`]) reads special-token markup:
//!   `<s>` and `</s>` written by a chat template become their ids. Message contents go through the
//!   template as text, so special-token markup inside a message also becomes ids (as in transformers
//!   and TGI); callers that pass untrusted contents can reject such markup first
//!   ([`Tokenizer::find_special_markup`]).
//!
//! Every id handed in is checked against the vocabulary ([`TokenizerError::InvalidId`]); the
//! `tokenizers` crate itself would silently skip unknown ids.

mod chat;
mod pymethods;
mod stream;

pub use chat::ChatMessage;
pub use stream::Detokenizer;

use chat::ChatTemplate;
use std::path::{Path, PathBuf};

/// Largest vocabulary accepted (ids are indexes into a table of this many entries).
const MAX_VOCAB: usize = 1 << 22;

/// What went wrong loading a tokenizer or converting text.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file could not be read (a missing `tokenizer.json` is this, with `NotFound`).
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The `tokenizers` crate rejected `tokenizer.json` (invalid JSON, unknown model type, ...).
    #[error("{path}: {message}")]
    Load {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// `tokenizer_config.json` is not valid JSON, or a field has the wrong type.
    #[error("{path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// The vocabulary is empty or larger than any real tokenizer's.
    #[error("{path}: vocabulary of {size} ids is not acceptable (1..={max})", max = MAX_VOCAB)]
    VocabSize {
        /// The file.
        path: PathBuf,
        /// One more than the largest id in the file.
        size: usize,
    },
    /// A special token named by the config (or the default `<s>` / `</s>`) is not in the vocabulary.
    #[error("{path}: special token {token:?} ({field}) is not in the vocabulary")]
    MissingSpecialToken {
        /// The file that named it (or `tokenizer.json` for the defaults).
        path: PathBuf,
        /// `bos_token` or `eos_token`.
        field: &'static str,
        /// The token text.
        token: String,
    },
    /// The chat template does not compile.
    #[error("{path}: chat template does not compile: {message}")]
    Template {
        /// The file holding the template.
        path: PathBuf,
        /// The template engine's message (with line number).
        message: String,
    },
    /// Rendering the chat template failed (including `raise_exception` called by the template).
    #[error("chat template: {message}")]
    Render {
        /// The template engine's message; for `raise_exception`, the template's own message.
        message: String,
    },
    /// The built-in `[INST]` chat format was given messages in an order it cannot express.
    #[error("chat message {index} has role {role:?}, expected {expected}")]
    ChatOrder {
        /// Index of the offending message.
        index: usize,
        /// Its role.
        role: String,
        /// What the format needs at that place.
        expected: &'static str,
    },
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary (size {vocab_size})")]
    InvalidId {
        /// The id.
        id: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// The `tokenizers` crate failed to encode text.
    #[error("encoding failed: {message}")]
    Encode {
        /// Its message.
        message: String,
    },
    /// The `tokenizers` crate failed to decode ids.
    #[error("decoding failed: {message}")]
    Decode {
        /// Its message.
        message: String,
    },
}

/// What a token id is, as far as detokenization cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    /// No token has this id (holes in the id range).
    Missing,
    /// A special added token (`<unk>`, `<s>`, `</s>`): decoding skips it.
    Special,
    /// A byte-fallback token `<0xHH>`: one byte of a UTF-8 sequence.
    Byte,
    /// Any other piece of text.
    Text,
}

/// A loaded tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    /// Treats special-token markup in its input as plain text.
    plain: tokenizers::Tokenizer,
    /// Turns special-token markup (`<s>`, `</s>`) in its input into ids.
    markup: tokenizers::Tokenizer,
    /// The kind of every id below the vocabulary size.
    kinds: Vec<TokenKind>,
    /// The texts of the special tokens.
    special_tokens: Vec<String>,
    bos_token: String,
    bos_id: u32,
    eos_token: String,
    eos_ids: Vec<u32>,
    /// The chat template, when the directory has one.
    template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.kinds.len())
            .field("bos", &(&self.bos_token, self.bos_id))
            .field("eos", &(&self.eos_token, &self.eos_ids))
            .field("chat_template", &self.template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and, if present, `dir/tokenizer_config.json` (special tokens and
    /// chat template) and `dir/chat_template.jinja` (a chat template that overrides the config's).
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let config = dir.join("tokenizer_config.json");
        let jinja = dir.join("chat_template.jinja");
        Self::from_files(
            &dir.join("tokenizer.json"),
            config.is_file().then_some(config.as_path()),
            jinja.is_file().then_some(jinja.as_path()),
        )
    }

    /// Replaces the chat template with `source` (compiled with the same settings as a loaded one);
    /// `origin` names where it came from in errors. On error the tokenizer keeps its template.
    pub fn set_chat_template(
        &mut self,
        source: String,
        origin: &Path,
    ) -> Result<(), TokenizerError> {
        self.template = Some(ChatTemplate::compile(origin, source)?);
        Ok(())
    }

    /// Loads a `tokenizer.json`, an optional `tokenizer_config.json` and an optional chat template
    /// file (whose text overrides the config's `chat_template`). Without a config the special tokens
    /// are `<s>` / `</s>` and chats use the built-in Mixtral `[INST]` format.
    pub fn from_files(
        tokenizer_json: &Path,
        tokenizer_config: Option<&Path>,
        chat_template: Option<&Path>,
    ) -> Result<Self, TokenizerError> {
        let bytes = read(tokenizer_json)?;
        let load = |bytes: &[u8]| {
            tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| TokenizerError::Load {
                path: tokenizer_json.to_path_buf(),
                message: e.to_string(),
            })
        };
        let markup = load(&bytes)?;
        drop(bytes);
        // The same tokenizer, but reading special-token text as plain text: a copy, not a second
        // parse of the file (the parse is most of a load).
        let mut plain = markup.clone();
        plain.set_encode_special_tokens(true);
        let kinds = token_kinds(&plain, tokenizer_json)?;
        let special_tokens: Vec<String> = kinds
            .iter()
            .enumerate()
            .filter(|&(_, &kind)| kind == TokenKind::Special)
            .filter_map(|(i, _)| plain.id_to_token(u32::try_from(i).ok()?))
            .filter(|token| !token.is_empty())
            .collect();

        let config = match tokenizer_config {
            Some(path) => chat::TokenizerConfig::read(path)?,
            None => chat::TokenizerConfig::default(),
        };
        let config_path = tokenizer_config.unwrap_or(tokenizer_json);
        let lookup = |field: &'static str, token: &str| {
            plain
                .token_to_id(token)
                .ok_or_else(|| TokenizerError::MissingSpecialToken {
                    path: config_path.to_path_buf(),
                    field,
                    token: token.to_string(),
                })
        };
        let bos_id = lookup("bos_token", &config.bos_token)?;
        let eos_id = lookup("eos_token", &config.eos_token)?;

        let template_source = match chat_template {
            Some(path) => Some((
                path.to_path_buf(),
                String::from_utf8(read(path)?).map_err(|e| TokenizerError::Template {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?,
            )),
            None => config
                .chat_template
                .map(|text| (config_path.to_path_buf(), text)),
        };
        let template = template_source
            .map(|(path, source)| ChatTemplate::compile(&path, source))
            .transpose()?;

        Ok(Self {
            plain,
            markup,
            kinds,
            special_tokens,
            bos_token: config.bos_token,
            bos_id,
            eos_token: config.eos_token,
            eos_ids: vec![eos_id],
            template,
        })
    }

    /// Number of ids: one more than the largest token id (added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.kinds.len()
    }

    /// The beginning-of-sequence id (`<s>` = 1 for Mixtral).
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// The beginning-of-sequence token text (`<s>`).
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The end-of-sequence ids this tokenizer knows (its `eos_token`, `</s>` = 2 for Mixtral).
    /// Generation should also stop on the ids of `config.json` / `generation_config.json`.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The end-of-sequence token text (`</s>`).
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// Whether chats are rendered by the directory's template (else by the built-in `[INST]` format).
    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// The token text of `id` (`"▁Hello"`, `"<0x0A>"`, `"<s>"`).
    pub fn id_to_token(&self, id: u32) -> Result<String, TokenizerError> {
        self.check(id)?;
        self.plain.id_to_token(id).ok_or(TokenizerError::InvalidId {
            id,
            vocab_size: self.vocab_size(),
        })
    }

    /// The id of a token text, if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.plain.token_to_id(token)
    }

    /// The first special token (`<s>`, `</s>`, `<unk>`) written in `text`, if any: text that
    /// [`Tokenizer::encode_rendered`] would turn into a special id.
    pub fn find_special_markup<'a>(&'a self, text: &str) -> Option<&'a str> {
        self.special_tokens
            .iter()
            .map(String::as_str)
            .filter_map(|token| text.find(token).map(|at| (at, token)))
            .min_by_key(|&(at, token)| (at, std::cmp::Reverse(token.len())))
            .map(|(_, token)| token)
    }

    /// Whether `id` is a special token (skipped by [`Tokenizer::decode`]).
    pub fn is_special(&self, id: u32) -> Result<bool, TokenizerError> {
        Ok(self.kind(id)? == TokenKind::Special)
    }

    /// Encodes plain text; `add_bos` prepends the BOS token (exactly one). Special-token markup in
    /// `text` (`<s>`) is encoded as ordinary characters.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .plain
            .encode(text, add_bos)
            .map_err(|e| TokenizerError::Encode {
                message: e.to_string(),
            })?;
        let mut ids = encoding.get_ids().to_vec();
        // The Hub's file adds BOS through its post-processor; other conversions do not.
        if add_bos && ids.first() != Some(&self.bos_id) {
            ids.insert(0, self.bos_id);
        }
        Ok(ids)
    }

    /// Encodes text that contains special-token markup (a rendered chat): `<s>` / `</s>` become their
    /// ids, and nothing is added.
    pub fn encode_rendered(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .markup
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode {
                message: e.to_string(),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids to text, skipping special tokens. Every id must be in the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        for &id in ids {
            self.check(id)?;
        }
        self.decode_checked(ids)
    }

    /// Renders `messages` with the chat template (or the Mixtral `[INST]` fallback), with
    /// `add_generation_prompt` set.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, TokenizerError> {
        match &self.template {
            Some(template) => template.render(messages, &self.bos_token, &self.eos_token),
            None => chat::render_inst(messages, &self.bos_token, &self.eos_token),
        }
    }

    /// Renders and encodes a chat without adding special tokens again (one BOS, written by the
    /// template).
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, TokenizerError> {
        self.encode_rendered(&self.render_chat(messages)?)
    }

    /// A streaming decoder for a generated sequence, starting at the beginning of the text (the
    /// leading space of the first token is dropped, as [`Tokenizer::decode`] drops it).
    pub fn detokenizer(&self) -> Detokenizer<&Tokenizer> {
        Detokenizer::new(self)
    }

    /// A streaming decoder for tokens generated after `context` (the prompt's ids, or its last few):
    /// the pieces are the text that `decode(context ++ generated)` has after `decode(context)`, so the
    /// first generated token keeps its leading space.
    pub fn detokenizer_after(
        &self,
        context: &[u32],
    ) -> Result<Detokenizer<&Tokenizer>, TokenizerError> {
        Detokenizer::after(self, context)
    }

    /// The kind of `id`, or `InvalidId`.
    fn kind(&self, id: u32) -> Result<TokenKind, TokenizerError> {
        match usize::try_from(id).ok().and_then(|i| self.kinds.get(i)) {
            Some(TokenKind::Missing) | None => Err(TokenizerError::InvalidId {
                id,
                vocab_size: self.vocab_size(),
            }),
            Some(&kind) => Ok(kind),
        }
    }

    /// `InvalidId` unless `id` names a token.
    fn check(&self, id: u32) -> Result<(), TokenizerError> {
        self.kind(id).map(|_| ())
    }

    /// Decodes ids already checked against the vocabulary.
    fn decode_checked(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.plain
            .decode(ids, true)
            .map_err(|e| TokenizerError::Decode {
                message: e.to_string(),
            })
    }
}

/// Reads a whole file.
fn read(path: &Path) -> Result<Vec<u8>, TokenizerError> {
    std::fs::read(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The kind of every id of `tokenizer`, indexed by id.
fn token_kinds(
    tokenizer: &tokenizers::Tokenizer,
    path: &Path,
) -> Result<Vec<TokenKind>, TokenizerError> {
    let vocab = tokenizer.get_vocab(true);
    let size = vocab
        .values()
        .map(|&id| usize::try_from(id).unwrap_or(usize::MAX).saturating_add(1))
        .max()
        .unwrap_or(0);
    if size == 0 || size > MAX_VOCAB {
        return Err(TokenizerError::VocabSize {
            path: path.to_path_buf(),
            size,
        });
    }
    let added = tokenizer.get_added_vocabulary();
    let mut kinds = vec![TokenKind::Missing; size];
    for (token, id) in vocab {
        if let Some(slot) = usize::try_from(id).ok().and_then(|i| kinds.get_mut(i)) {
            *slot = if added.is_special_token(&token) {
                TokenKind::Special
            } else if is_byte_token(&token) {
                TokenKind::Byte
            } else {
                TokenKind::Text
            };
        }
    }
    Ok(kinds)
}

/// Whether a token text is a byte-fallback token `<0xHH>` (the test the ByteFallback decoder uses).
fn is_byte_token(token: &str) -> bool {
    token.len() == 6
        && token.starts_with("<0x")
        && token.ends_with('>')
        && token
            .get(3..5)
            .is_some_and(|hex| u8::from_str_radix(hex, 16).is_ok())
}
