//! Tokenizer tests on the shipped `models/tiny-mixtral` tokenizer (the real Mixtral-8x7B one):
//! encodings against sentencepiece goldens, chat rendering against jinja2 goldens
//! (`scripts/make-tokenizer-fixtures.py`), streaming detokenization properties, typed errors.

use mixtral::tokenizer::{ChatMessage, Tokenizer, TokenizerError};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-mixtral")
}

fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| Tokenizer::from_dir(&model_dir()).expect("shipped tokenizer loads"))
}

/// The same tokenizer.json with no tokenizer_config.json: the built-in `[INST]` format.
fn fallback_tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        Tokenizer::from_files(&model_dir().join("tokenizer.json"), None, None)
            .expect("tokenizer.json alone loads")
    })
}

fn golden() -> &'static Value {
    static GOLDEN: OnceLock<Value> = OnceLock::new();
    GOLDEN.get_or_init(|| {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/golden.json");
        serde_json::from_slice(&std::fs::read(path).expect("golden.json")).expect("valid JSON")
    })
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("id list")
        .iter()
        .map(|v| u32::try_from(v.as_u64().expect("id")).expect("u32 id"))
        .collect()
}

fn messages(value: &Value) -> Vec<ChatMessage> {
    value
        .as_array()
        .expect("message list")
        .iter()
        .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

/// Streams `ids` through `detok` one at a time, then flushes.
fn stream(mut detok: mixtral::tokenizer::Detokenizer<&Tokenizer>, ids: &[u32]) -> String {
    let mut out = String::new();
    for &id in ids {
        out.push_str(&detok.push(id).expect("valid id"));
    }
    out.push_str(&detok.finish().expect("flush"));
    out
}

#[test]
fn special_tokens_and_vocabulary() {
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 32000);
    assert_eq!((tok.bos_id(), tok.bos_token()), (1, "<s>"));
    assert_eq!((tok.eos_ids(), tok.eos_token()), (&[2u32][..], "</s>"));
    assert_eq!(tok.id_to_token(1).unwrap(), "<s>");
    assert_eq!(tok.id_to_token(13).unwrap(), "<0x0A>");
    assert_eq!(tok.token_to_id("</s>"), Some(2));
    assert!(tok.is_special(0).unwrap() && tok.is_special(2).unwrap());
    assert!(!tok.is_special(13).unwrap());
    assert!(tok.has_chat_template());
    assert!(!fallback_tokenizer().has_chat_template());
}

#[test]
fn encodings_match_sentencepiece() {
    let tok = tokenizer();
    let cases = golden()["encode"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let sentencepiece = ids(&case["ids"]);
        // Runs of spaces in front of a word: the Hub's tokenizer.json splits them differently
        // from sentencepiece (recorded by the fixture script); everything else matches exactly.
        let expected = match case.get("tokenizers_ids") {
            Some(other) => ids(other),
            None => sentencepiece.clone(),
        };
        let got = tok.encode(text, false).unwrap();
        assert_eq!(got, expected, "encode({text:?})");
        let mut with_bos = vec![1];
        with_bos.extend(&expected);
        assert_eq!(
            tok.encode(text, true).unwrap(),
            with_bos,
            "encode({text:?}, bos)"
        );
        // Both id sequences decode to sentencepiece's decoding (the text itself).
        let decoded = case["decoded"].as_str().unwrap();
        assert_eq!(
            tok.decode(&sentencepiece).unwrap(),
            decoded,
            "decode sp ids of {text:?}"
        );
        assert_eq!(tok.decode(&got).unwrap(), decoded, "decode ids of {text:?}");
        assert_eq!(tok.decode(&with_bos).unwrap(), decoded, "BOS is skipped");
    }
}

#[test]
fn chats_match_jinja2_and_mistral_common() {
    let tok = tokenizer();
    let cases = golden()["chat"].as_array().unwrap();
    let mut rendered_cases = 0;
    let mut error_cases = 0;
    for case in cases {
        let msgs = messages(&case["messages"]);
        if let Some(error) = case.get("error") {
            error_cases += 1;
            let error = error.as_str().unwrap();
            match tok.render_chat(&msgs) {
                Err(TokenizerError::Render { message }) => {
                    assert!(message.contains(error), "{message:?} lacks {error:?}")
                }
                other => panic!("{msgs:?}: expected a render error, got {other:?}"),
            }
            assert!(matches!(
                tok.encode_chat(&msgs),
                Err(TokenizerError::Render { .. })
            ));
            continue;
        }
        rendered_cases += 1;
        let rendered = case["rendered"].as_str().unwrap();
        assert_eq!(tok.render_chat(&msgs).unwrap(), rendered);
        let got = tok.encode_chat(&msgs).unwrap();
        assert_eq!(got, ids(&case["ids"]), "encode_chat({msgs:?})");
        assert_eq!(got.iter().filter(|&&id| id == 1).count(), 1, "one BOS");
        if case["same_as_mistral_common"].as_bool() == Some(true) {
            assert_eq!(got, ids(&case["mistral_common_ids"]));
        }
    }
    assert!(rendered_cases >= 3 && error_cases >= 3);
}

#[test]
fn template_features_render_as_jinja2_does() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        model_dir().join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let config = dir.path().join("tokenizer_config.json");
    let templates = golden()["templates"].as_array().unwrap();
    assert!(templates.len() >= 4);
    for entry in templates {
        let template = entry["template"].as_str().unwrap();
        let json = serde_json::json!({ "chat_template": template, "bos_token": "<s>" });
        std::fs::write(&config, json.to_string()).unwrap();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        for case in entry["cases"].as_array().unwrap() {
            let msgs = messages(&case["messages"]);
            match (
                tok.render_chat(&msgs),
                case.get("rendered"),
                case.get("error"),
            ) {
                (Ok(got), Some(want), _) => assert_eq!(got, want.as_str().unwrap(), "{template}"),
                (Err(TokenizerError::Render { message }), _, Some(want)) => {
                    assert!(message.contains(want.as_str().unwrap()), "{message}")
                }
                (got, want, error) => panic!("{template}: {got:?} vs {want:?} / {error:?}"),
            }
        }
    }
}

#[test]
fn chat_template_file_overrides_the_config() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model_dir().join(name), dir.path().join(name)).unwrap();
    }
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}",
    )
    .unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let chat = [ChatMessage::user("hi"), ChatMessage::assistant("yo")];
    assert_eq!(tok.render_chat(&chat).unwrap(), "<s><user>hi<assistant>yo");
}

#[test]
fn fallback_format_equals_the_released_template() {
    // Without a system message the built-in format must produce what the template produces.
    let fallback = fallback_tokenizer();
    for case in golden()["chat"].as_array().unwrap() {
        let msgs = messages(&case["messages"]);
        if let Some(rendered) = case.get("rendered") {
            assert_eq!(
                fallback.render_chat(&msgs).unwrap(),
                rendered.as_str().unwrap()
            );
            assert_eq!(fallback.encode_chat(&msgs).unwrap(), ids(&case["ids"]));
        }
    }
}

#[test]
fn fallback_system_message_and_role_order() {
    let fallback = fallback_tokenizer();
    let chat = [
        ChatMessage::system("Be brief."),
        ChatMessage::user("Hi"),
        ChatMessage::assistant("Hello"),
        ChatMessage::user("Bye"),
    ];
    assert_eq!(
        fallback.render_chat(&chat).unwrap(),
        "<s>[INST] Be brief.\n\nHi [/INST]Hello</s>[INST] Bye [/INST]"
    );
    let bad: [&[ChatMessage]; 4] = [
        &[ChatMessage::assistant("first")],
        &[ChatMessage::user("a"), ChatMessage::user("b")],
        &[ChatMessage::user("a"), ChatMessage::system("late")],
        &[ChatMessage::system("alone")],
    ];
    for chat in bad {
        assert!(
            matches!(
                fallback.render_chat(chat),
                Err(TokenizerError::ChatOrder { .. })
            ),
            "{chat:?}"
        );
    }
    match fallback.render_chat(&[ChatMessage::user("a"), ChatMessage::user("b")]) {
        Err(TokenizerError::ChatOrder {
            index: 1,
            role,
            expected: "assistant",
        }) => assert_eq!(role, "user"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn special_token_markup_is_text_in_encode_and_tokens_in_rendered_chats() {
    let tok = tokenizer();
    let plain = tok.encode("<s>hi</s>", true).unwrap();
    assert_eq!(plain.iter().filter(|&&id| id == 1).count(), 1);
    assert!(!plain.contains(&2));
    assert_eq!(tok.decode(&plain).unwrap(), "<s>hi</s>");
    let rendered = tok.encode_rendered("<s>[INST] hi [/INST]ok</s>").unwrap();
    assert_eq!(rendered.first(), Some(&1));
    assert_eq!(rendered.last(), Some(&2));
    assert_eq!(rendered.iter().filter(|&&id| id <= 2).count(), 2);
    assert_eq!(tok.find_special_markup("a </s> then <s>"), Some("</s>"));
    assert_eq!(tok.find_special_markup("x<unk>"), Some("<unk>"));
    assert_eq!(tok.find_special_markup("< s > [INST]"), None);
}

#[test]
fn byte_fallback_characters_are_held_until_complete() {
    let tok = tokenizer();
    // "🤗" is four byte-fallback tokens after a "▁".
    let ids = tok.encode("a 🤗 b", false).unwrap();
    let bytes: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|&id| (3..=258).contains(&id))
        .collect();
    assert_eq!(bytes.len(), 4, "{ids:?}");
    let mut detok = tok.detokenizer();
    let mut pieces = Vec::new();
    for &id in &ids {
        pieces.push(detok.push(id).unwrap());
    }
    pieces.push(detok.finish().unwrap());
    for piece in &pieces {
        assert!(!piece.contains('\u{FFFD}'), "{pieces:?}");
    }
    assert_eq!(pieces.concat(), "a 🤗 b");
    // Cut the stream inside the character: finish flushes what decode writes.
    let cut = &ids[..ids.len() - 2];
    assert_eq!(stream(tok.detokenizer(), cut), tok.decode(cut).unwrap());
}

#[test]
fn spaces_survive_streaming_after_a_prompt() {
    let tok = tokenizer();
    let prompt = tok.encode_chat(&[ChatMessage::user("Say hello")]).unwrap();
    let answer = tok.encode("Hello there, friend", false).unwrap();
    // The answer's first token carries the space that follows `[/INST]`.
    let detok = tok.detokenizer_after(&prompt).unwrap();
    assert_eq!(stream(detok, &answer), " Hello there, friend");
    // Without context the text starts at its first character, as decode does.
    assert_eq!(stream(tok.detokenizer(), &answer), "Hello there, friend");
}

#[test]
fn a_character_split_between_prompt_and_answer_comes_out_whole() {
    let tok = tokenizer();
    let ids = tok.encode("a 🤗 b", false).unwrap();
    let (context, generated) = ids.split_at(ids.len() - 3); // two bytes of 🤗, then "▁b"
    let detok = tok.detokenizer_after(context).unwrap();
    assert_eq!(stream(detok, generated), "🤗 b");
}

#[test]
fn config_forms_and_field_types() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        model_dir().join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let config = dir.path().join("tokenizer_config.json");
    // Object-form special tokens and a list of named templates.
    let json = serde_json::json!({
        "bos_token": {"content": "<s>", "special": true},
        "eos_token": {"content": "<unk>", "special": true},
        "chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "{{ bos_token }}{{ messages | length }}{{ eos_token }}"}
        ]
    });
    std::fs::write(&config, json.to_string()).unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.eos_ids(), &[0]);
    assert_eq!(
        tok.render_chat(&[ChatMessage::user("x")]).unwrap(),
        "<s>1<unk>"
    );
    for bad in [
        r#"{"bos_token": 5}"#,
        r#"{"chat_template": 7}"#,
        r#"{"chat_template": [{"name": "other", "template": "x"}]}"#,
        r#"["not", "an", "object"]"#,
    ] {
        std::fs::write(&config, bad).unwrap();
        assert!(
            matches!(
                Tokenizer::from_dir(dir.path()),
                Err(TokenizerError::Config { .. })
            ),
            "{bad}"
        );
    }
}

#[test]
fn tokenizer_is_shareable_between_threads() {
    fn shareable<T: Send + Sync>(_: &T) {}
    shareable(tokenizer());
}

#[test]
fn window_stays_small_on_long_streams() {
    let tok = tokenizer();
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(200);
    let ids = tok.encode(&text, false).unwrap();
    assert!(ids.len() > 1500);
    let mut detok = tok.detokenizer();
    let mut out = String::new();
    let mut widest = 0;
    for &id in &ids {
        out.push_str(&detok.push(id).unwrap());
        widest = widest.max(detok.window_len());
    }
    out.push_str(&detok.finish().unwrap());
    assert_eq!(out, tok.decode(&ids).unwrap());
    assert!(widest <= 4, "window grew to {widest}");
}

#[test]
fn typed_errors() {
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();

    match Tokenizer::from_dir(dir.path()) {
        Err(TokenizerError::Io { path, source }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            assert!(path.ends_with("tokenizer.json"));
        }
        other => panic!("missing tokenizer.json: {other:?}"),
    }

    std::fs::write(dir.path().join("tokenizer.json"), b"{ not json").unwrap();
    assert!(matches!(
        Tokenizer::from_dir(dir.path()),
        Err(TokenizerError::Load { .. })
    ));

    std::fs::copy(
        model_dir().join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let config = dir.path().join("tokenizer_config.json");
    std::fs::write(&config, b"[1, 2").unwrap();
    assert!(matches!(
        Tokenizer::from_dir(dir.path()),
        Err(TokenizerError::Config { .. })
    ));

    std::fs::write(
        &config,
        br#"{"chat_template": "{% if messages %}unclosed"}"#,
    )
    .unwrap();
    match Tokenizer::from_dir(dir.path()) {
        Err(TokenizerError::Template { path, message }) => {
            assert_eq!(path, config);
            assert!(message.contains("syntax error"), "{message}");
        }
        other => panic!("bad template: {other:?}"),
    }

    std::fs::write(&config, br#"{"bos_token": "<bos>"}"#).unwrap();
    match Tokenizer::from_dir(dir.path()) {
        Err(TokenizerError::MissingSpecialToken { field, token, .. }) => {
            assert_eq!((field, token.as_str()), ("bos_token", "<bos>"))
        }
        other => panic!("unknown bos: {other:?}"),
    }

    std::fs::write(
        &config,
        br#"{"chat_template": "{{ messages[0].content | nosuchfilter }}"}"#,
    )
    .unwrap();
    let odd = Tokenizer::from_dir(dir.path());
    assert!(
        matches!(
            odd.as_ref()
                .map(|t| t.render_chat(&[ChatMessage::user("x")])),
            Err(TokenizerError::Template { .. }) | Ok(Err(TokenizerError::Render { .. }))
        ),
        "{odd:?}"
    );

    for id in [32000, u32::MAX] {
        assert!(matches!(
            tok.decode(&[1, 2, id]),
            Err(TokenizerError::InvalidId { id: bad, vocab_size: 32000 }) if bad == id
        ));
        assert!(matches!(
            tok.detokenizer().push(id),
            Err(TokenizerError::InvalidId { .. })
        ));
        assert!(matches!(
            tok.detokenizer_after(&[id]),
            Err(TokenizerError::InvalidId { .. })
        ));
        assert!(matches!(
            tok.id_to_token(id),
            Err(TokenizerError::InvalidId { .. })
        ));
    }
}

/// Ids that exercise the detokenizer: any id, byte-fallback ids, ids of pieces holding multi-byte
/// characters, special ids, and the lone "▁".
fn interesting_ids(tok: &Tokenizer) -> impl Strategy<Value = u32> + Clone {
    let mut multibyte: Vec<u32> = tok
        .encode("é ü ß 日本語 中文 русский Ελληνικά ça déjà señor", false)
        .unwrap();
    multibyte.retain(|&id| tok.decode(&[id]).unwrap().chars().any(|c| c.len_utf8() > 1));
    assert!(multibyte.len() >= 8, "{multibyte:?}");
    let vocab = u32::try_from(tok.vocab_size()).unwrap();
    prop_oneof![
        3 => 0..vocab,
        4 => 3u32..=258,
        2 => proptest::sample::select(multibyte),
        1 => 0u32..=2,
        1 => Just(28705u32),
    ]
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

#[test]
fn streaming_equals_full_decode() {
    let tok = tokenizer();
    let strategy = proptest::collection::vec(interesting_ids(tok), 0..40);
    runner(512)
        .run(&strategy, |ids| {
            prop_assert_eq!(stream(tok.detokenizer(), &ids), tok.decode(&ids).unwrap());
            Ok(())
        })
        .unwrap();
}

#[test]
fn streaming_encoded_text_equals_full_decode() {
    let tok = tokenizer();
    runner(256)
        .run(&"\\PC{0,40}", |text| {
            let ids = tok.encode(&text, false).unwrap();
            prop_assert_eq!(stream(tok.detokenizer(), &ids), tok.decode(&ids).unwrap());
            Ok(())
        })
        .unwrap();
}

#[test]
fn streaming_after_context_continues_the_full_decode() {
    let tok = tokenizer();
    let ids = interesting_ids(tok);
    // A context ending in an ordinary token (a prompt ends in "]" for Mixtral).
    let text_id = prop_oneof![
        Just(28793u32),
        Just(22557u32),
        Just(28705u32),
        259u32..28000
    ];
    let strategy = (
        proptest::collection::vec(ids.clone(), 0..12),
        text_id,
        proptest::collection::vec(ids, 0..30),
    );
    runner(512)
        .run(&strategy, |(mut context, last, generated)| {
            context.push(last);
            let before = tok.decode(&context).unwrap();
            let mut all = context.clone();
            all.extend(&generated);
            let full = tok.decode(&all).unwrap();
            let expected = full
                .strip_prefix(before.as_str())
                .ok_or_else(|| TestCaseError::fail(format!("{full:?} / {before:?}")))?;
            let detok = tok.detokenizer_after(&context).unwrap();
            prop_assert_eq!(stream(detok, &generated), expected);
            Ok(())
        })
        .unwrap();
}

/// Message text without special-token markup (which a rendered chat turns into ids).
fn content() -> impl Strategy<Value = String> {
    "(\\PC|<|>|/|s| ){0,24}".prop_filter("no special-token markup", |s| {
        !["<s>", "</s>", "<unk>"].iter().any(|t| s.contains(t))
    })
}

#[test]
fn chats_have_exactly_one_bos() {
    let strategy = (proptest::collection::vec(content(), 1..6), any::<bool>());
    for tok in [tokenizer(), fallback_tokenizer()] {
        runner(128)
            .run(&strategy, |(turns, end_with_user)| {
                let mut chat: Vec<ChatMessage> = turns
                    .iter()
                    .enumerate()
                    .map(|(i, text)| {
                        let role = if i % 2 == 0 { "user" } else { "assistant" };
                        ChatMessage::new(role, text.as_str())
                    })
                    .collect();
                if end_with_user && chat.len().is_multiple_of(2) {
                    chat.push(ChatMessage::user("next"));
                }
                let ids = tok.encode_chat(&chat).unwrap();
                prop_assert_eq!(ids.first(), Some(&1));
                prop_assert_eq!(ids.iter().filter(|&&id| id == 1).count(), 1);
                let answers = chat.iter().filter(|m| m.role == "assistant").count();
                prop_assert_eq!(ids.iter().filter(|&&id| id == 2).count(), answers);
                Ok(())
            })
            .unwrap();
    }
}

#[test]
fn encode_adds_exactly_one_bos() {
    let tok = tokenizer();
    runner(256)
        .run(&"(\\PC|<s>|</s>|<unk>| ){0,24}", |text| {
            let with = tok.encode(&text, true).unwrap();
            let without = tok.encode(&text, false).unwrap();
            prop_assert_eq!(with.first(), Some(&1));
            prop_assert_eq!(with.iter().filter(|&&id| id == 1).count(), 1);
            prop_assert_eq!(&with[1..], &without[..]);
            prop_assert!(!without.iter().any(|&id| id <= 2));
            Ok(())
        })
        .unwrap();
}

/// A replaced template renders in place of the directory's; one that does not compile is a typed
/// error naming its origin and leaves the previous template in use.
#[test]
fn set_chat_template_replaces_the_template_or_keeps_it() {
    let mut tok = Tokenizer::from_dir(&model_dir()).expect("tokenizer");
    let chat = [ChatMessage::user("hi there")];
    let released = tok.render_chat(&chat).expect("released template");
    tok.set_chat_template(
        "{{ bos_token }}<<{{ messages[0].content | upper }}>>".to_string(),
        Path::new("custom.jinja"),
    )
    .expect("compiles");
    let custom = tok.render_chat(&chat).expect("custom template");
    assert_eq!(custom, "<s><<HI THERE>>");
    assert_ne!(custom, released);
    let err = tok
        .set_chat_template("{% for %}".to_string(), Path::new("broken.jinja"))
        .unwrap_err();
    assert!(matches!(err, TokenizerError::Template { .. }), "{err}");
    assert!(err.to_string().contains("broken.jinja"), "{err}");
    assert_eq!(tok.render_chat(&chat).expect("still custom"), custom);
}
