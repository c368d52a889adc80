//! Inputs found by the fuzz targets in `fuzz/` (see `fuzz/README.md`), each once a crash, hang or
//! out-of-memory, now a typed error.

use mixtral::config::{ConfigError, ModelConfig};
use std::path::Path;

/// `config.json` of `models/tiny-mixtral` with `edits` applied.
fn tiny_config_with(edits: &[(&str, serde_json::Value)]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-mixtral/config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for (key, value) in edits {
        json[*key] = value.clone();
    }
    json.to_string()
}

/// Found by `config` (a timeout on the seed `fuzz/corpus/config/limits.json`): 4096 layers of
/// 4096 experts each passed every per-field limit, and the weight layout built from it listed 50
/// million tensors before any checkpoint was read. The product is now bounded.
#[test]
fn too_many_expert_mlps_in_all_is_refused() {
    let text = tiny_config_with(&[
        ("num_hidden_layers", 4096.into()),
        ("num_local_experts", 4096.into()),
    ]);
    let err = ModelConfig::from_json_str(&text, Path::new("config.json")).unwrap_err();
    assert!(
        matches!(
            err,
            ConfigError::Invalid {
                field: "num_local_experts",
                ..
            }
        ),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains("config.json") && message.contains("4096"),
        "{message}"
    );

    // The largest released shapes stay accepted: 56 layers of 8 experts (Mixtral-8x22B), and
    // the bound itself.
    for (layers, experts) in [(56, 8), (4096, 16), (16, 4096)] {
        let text = tiny_config_with(&[
            ("num_hidden_layers", layers.into()),
            ("num_local_experts", experts.into()),
        ]);
        let config = ModelConfig::from_json_str(&text, Path::new("config.json")).unwrap();
        assert_eq!((config.num_layers, config.num_experts), (layers, experts));
    }
    let text = tiny_config_with(&[
        ("num_hidden_layers", 4096.into()),
        ("num_local_experts", 17.into()),
    ]);
    assert!(ModelConfig::from_json_str(&text, Path::new("config.json")).is_err());
}

/// Found by hand beside the `chat_template` target (`fuzz/README.md`): nested loops of 10^10
/// iterations hung the render. Each render now has a bounded instruction budget, so the template
/// fails with a typed error instead.
#[test]
fn a_runaway_chat_template_fails_instead_of_hanging() {
    use mixtral::tokenizer::{ChatMessage, Tokenizer};
    let dir = tempfile::tempdir().unwrap();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-mixtral");
    std::fs::copy(
        tiny.join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let template =
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}\
                    {{ messages[0].content }}";
    let config = serde_json::json!({
        "bos_token": "<s>",
        "eos_token": "</s>",
        "chat_template": template,
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let tokenizer = Tokenizer::from_dir(dir.path()).expect("the template compiles");
    let err = tokenizer
        .render_chat(&[ChatMessage::user("hello".to_string())])
        .unwrap_err();
    eprintln!("{err}");
    assert!(err.to_string().contains("fuel"), "{err}");
    // An ordinary template still renders under the budget.
    let ok = Tokenizer::from_dir(&tiny).unwrap();
    let text = ok
        .render_chat(&[ChatMessage::user("hello".to_string())])
        .unwrap();
    assert!(text.contains("hello"));
}
