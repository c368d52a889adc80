//! Quantized weights through the library: pre-quantized fixtures (FP8 per tensor / per channel,
//! INT8 per channel, GPTQ with and without act-order, written by `scripts/make-quant-fixtures.py`)
//! reproduce the logits transformers computes on their dequantized weights; quantize-on-load of
//! every format stays within a documented distance of the bf16 model; malformed quantized tensors
//! give typed errors naming the tensor; perplexity of every format on
//! `tests/fixtures/perplexity.txt`; the memory preflight on the real Mixtral-8x7B configuration.

use crate::common::safetensors::{padded, write_tensors};
use mixtral::checkpoint::{write_raw_safetensors, Checkpoint, OpenOptions};
use mixtral::cpu::{CpuEngine, CpuEngineOptions};
use mixtral::generate::perplexity;
use mixtral::quant::{
    declared_format, decode_weight_bytes, estimate_memory, loaded_format, QuantError, QuantFormat,
};
use mixtral::{Engine, LoadOptions, LogitsFor, Model, ModelConfig, ModelError, SeqStep};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Our dequantization + f32 CPU engine against transformers on the same dequantized weights.
const PREQUANTIZED_REL_L2: f64 = 1e-4;
/// Largest |log-prob difference| for the same comparison.
const PREQUANTIZED_LOGPROB: f64 = 1e-4;

/// Quantize-on-load against the bf16 model (transformers' last logits of gqa-bf16-sharded-window):
/// relative L2 distance of the last logits, per format. Measured
/// (`cargo test --test integration quant:: -- --nocapture`): fp8 0.086, int8 0.013, int4 0.21; the
/// bounds leave about 2x headroom. These are large because the fixture's random weights have gains
/// of 1-3 (peaked attention, routing and logits amplify every weight error); they bound this
/// fixture, not the quality of a trained model.
const ON_LOAD_REL_L2: [(QuantFormat, f64); 3] = [
    (QuantFormat::Fp8, 0.17),
    (QuantFormat::Int8, 0.03),
    (QuantFormat::Int4, 0.4),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/quant").join(name)
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value, key: &str) -> Vec<f64> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn ids(v: &Value, key: &str) -> Vec<u32> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|x| x.is_finite()), "non-finite logits");
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| (f64::from(*g) - w).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den).sqrt()
}

fn load(dir: &Path, quant: Option<QuantFormat>) -> Result<Model, ModelError> {
    Model::load(
        dir,
        &LoadOptions {
            quant,
            ..Default::default()
        },
    )
}

fn engine(model: &Model) -> CpuEngine {
    let options = CpuEngineOptions {
        max_context: Some(64),
        max_sequences: 1,
        ..CpuEngineOptions::default()
    };
    CpuEngine::new(model.weights.clone(), options).unwrap()
}

/// Logits at the last position of one forward over `ids`.
fn last_logits(model: &Model, ids: &[u32]) -> Vec<f32> {
    let mut engine = engine(model);
    let seq = engine.new_sequence().unwrap();
    let out = engine
        .step(&[SeqStep {
            seq,
            tokens: ids,
            start_pos: 0,
            logits: LogitsFor::Last,
        }])
        .unwrap();
    out.row(0).to_vec()
}

const PREQUANTIZED: [(&str, QuantFormat); 5] = [
    ("fp8-tensor", QuantFormat::Fp8),
    ("fp8-channel", QuantFormat::Fp8),
    ("int8-channel", QuantFormat::Int8),
    ("gptq", QuantFormat::Int4),
    ("gptq-actorder", QuantFormat::Int4),
];

#[test]
fn prequantized_fixtures_match_transformers_on_dequantized_weights() {
    for (name, format) in PREQUANTIZED {
        let dir = fixture(name);
        let expected = json(&dir.join("expected.json"));
        let model = load(&dir, None).unwrap();
        assert_eq!(model.quant, Some(format), "{name}");
        // Quantized projections are owned, dequantized f32; the rest stays mapped bf16.
        let layer = &model.weights.layers[0];
        assert!(layer.q_proj.tensor.is_owned() && layer.experts[1].w2.tensor.is_owned());
        assert!(!layer.router.as_ref().unwrap().tensor.is_owned());
        assert!(!model.weights.embed.tensor.is_owned());

        let sequence = ids(&expected, "ids");
        let rel = rel_l2(
            &last_logits(&model, &sequence),
            &floats(&expected, "last_logits"),
        );
        let scored = perplexity(&mut engine(&model), &sequence).unwrap();
        let want = floats(&expected, "token_logprobs");
        let worst = scored
            .token_logprobs
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .fold(0.0, f64::max);
        eprintln!("{name}: last-logits rel L2 {rel:.2e}, worst log-prob diff {worst:.2e}");
        assert!(rel <= PREQUANTIZED_REL_L2, "{name}: rel L2 {rel}");
        assert!(
            worst <= PREQUANTIZED_LOGPROB,
            "{name}: log-prob diff {worst}"
        );
        let ppl = expected["perplexity"].as_f64().unwrap();
        assert!((scored.perplexity - ppl).abs() <= 1e-4 * ppl, "{name}");
    }
}

#[test]
fn quantize_on_load_stays_near_the_bf16_model() {
    let dir = root().join("tests/fixtures/gqa-bf16-sharded-window");
    let golden = json(&dir.join("golden.json"));
    let mut sequence = ids(&golden, "prompt_ids");
    sequence.extend(ids(&golden, "greedy_ids"));
    let want = floats(&golden, "last_logits");
    let bf16 = load(&dir, Some(QuantFormat::Bf16)).unwrap();
    assert_eq!(bf16.quant, None);
    assert!(!bf16.weights.layers[0].q_proj.tensor.is_owned());
    let exact = rel_l2(&last_logits(&bf16, &sequence), &want);
    assert!(exact <= 1e-5, "bf16 {exact}");
    for (format, bound) in ON_LOAD_REL_L2 {
        let model = load(&dir, Some(format)).unwrap();
        assert_eq!(model.quant, Some(format));
        let layer = &model.weights.layers[1];
        assert!(layer.o_proj.tensor.is_owned() && layer.experts[3].w3.tensor.is_owned());
        assert!(!layer.router.as_ref().unwrap().tensor.is_owned());
        assert!(!layer.ffn_norm.tensor.is_owned() && !model.weights.lm_head.tensor.is_owned());
        let rel = rel_l2(&last_logits(&model, &sequence), &want);
        eprintln!("{format} on load: last-logits rel L2 {rel:.3e} from bf16 (bound {bound})");
        // Quantization changed something, and not too much.
        assert!(
            rel > 10.0 * exact,
            "{format}: no visible quantization error"
        );
        assert!(rel <= bound, "{format}: rel L2 {rel} > {bound}");
    }
}

#[test]
fn fp8_and_int8_on_load_equal_the_per_channel_checkpoints() {
    // The script's per-channel FP8 (amax / 448 per row, torch's round-to-nearest-even cast) and
    // INT8 (amax / 127 per row, round half to even) are the quantizers used on load, so both ways
    // give the same weights and logits.
    let base = root().join("tests/fixtures/gqa-bf16-sharded-window");
    for (name, format) in [
        ("fp8-channel", QuantFormat::Fp8),
        ("int8-channel", QuantFormat::Int8),
    ] {
        let expected = json(&fixture(name).join("expected.json"));
        let model = load(&base, Some(format)).unwrap();
        let rel = rel_l2(
            &last_logits(&model, &ids(&expected, "ids")),
            &floats(&expected, "last_logits"),
        );
        assert!(rel <= PREQUANTIZED_REL_L2, "{name}: {rel}");
        let published = load(&fixture(name), None).unwrap();
        for (a, b) in model.weights.all().iter().zip(published.weights.all()) {
            assert_eq!(
                a.data().to_f32_vec(),
                b.data().to_f32_vec(),
                "{name}: {}",
                a.tensor.name()
            );
        }
    }
}

#[test]
fn perplexity_of_every_format_on_the_text() {
    let dir = root().join("models/tiny-mixtral");
    let golden = json(&dir.join("golden.json"));
    let text = std::fs::read_to_string(root().join("tests/fixtures/perplexity.txt")).unwrap();
    let mut results = Vec::new();
    for format in [
        QuantFormat::Bf16,
        QuantFormat::Fp8,
        QuantFormat::Int8,
        QuantFormat::Int4,
    ] {
        let model = Model::load(
            &dir,
            &LoadOptions {
                quant: Some(format),
                require_tokenizer: true,
                ..Default::default()
            },
        )
        .unwrap();
        let tokens = model
            .tokenizer
            .as_ref()
            .unwrap()
            .encode(text.trim(), true)
            .unwrap();
        assert_eq!(tokens, ids(&golden, "perplexity_text_ids"));
        let options = CpuEngineOptions {
            max_context: Some(tokens.len()),
            max_sequences: 1,
            ..CpuEngineOptions::default()
        };
        let mut engine = CpuEngine::new(model.weights.clone(), options).unwrap();
        let ppl = perplexity(&mut engine, &tokens).unwrap().perplexity;
        eprintln!("{format}: perplexity {ppl:.6e}");
        assert!(ppl.is_finite() && ppl > 1.0, "{format}: {ppl}");
        results.push((format, ppl));
    }
    let bf16 = results[0].1;
    let reference = golden["perplexity_text_perplexity"].as_f64().unwrap();
    assert!(
        (bf16 - reference).abs() <= 1e-3 * reference,
        "bf16 {bf16} vs {reference}"
    );
    // Log-perplexity (mean negative log-likelihood per token) within a few percent of bf16.
    for (format, ppl) in &results[1..] {
        let drift = (ppl.ln() - bf16.ln()).abs() / bf16.ln();
        assert!(
            drift > 0.0 && drift <= 0.05,
            "{format}: log-perplexity drift {drift}"
        );
    }
}

#[test]
fn mixtral_8x7b_fits_80_gb_in_fp8_and_int8_not_in_bf16() {
    // The published Mixtral-8x7B hyper-parameters.
    let config = ModelConfig::from_json_str(
        r#"{"architectures":["MixtralForCausalLM"],"hidden_size":4096,"intermediate_size":14336,
            "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"head_dim":128,
            "num_local_experts":8,"num_experts_per_tok":2,"vocab_size":32000,
            "max_position_embeddings":32768,"rms_norm_eps":1e-5,"rope_theta":1e6,
            "sliding_window":null,"tie_word_embeddings":false}"#,
        Path::new("mixtral-8x7b/config.json"),
    )
    .unwrap();
    let gpu: u64 = 80_000_000_000;
    let context = 32 * 1024;
    let bf16 = estimate_memory(&config, QuantFormat::Bf16, context, 1);
    let fp8 = estimate_memory(&config, QuantFormat::Fp8, context, 1);
    let int8 = estimate_memory(&config, QuantFormat::Int8, context, 1);
    let int4 = estimate_memory(&config, QuantFormat::Int4, context, 1);
    // 46.7 B parameters: ~93 GB in bf16; the KV cache is 128 KiB per token.
    assert!(
        (93.0e9..94.0e9).contains(&(bf16.weights_bytes as f64)),
        "{bf16:?}"
    );
    assert_eq!(bf16.kv_bytes, 128 * 1024 * context as u64);
    assert!(bf16.total > gpu, "{bf16:?}");
    assert!(fp8.total < gpu && int8.total < gpu, "{fp8:?} {int8:?}");
    // 4-bit codes are half of 8-bit ones; the (scale, zero) word of each group of 128 adds 1/32
    // byte per parameter (about 1.5 GB over the 46.5 B quantized ones).
    assert!(int4.weights_bytes < fp8.weights_bytes / 2 + 3_500_000_000);
    assert!(int4.weights_bytes > fp8.weights_bytes / 2);
    for m in [bf16, fp8, int8, int4] {
        assert_eq!(m.total, m.weights_bytes + m.kv_bytes + m.activations_bytes);
        assert!(m.activations_bytes > 0);
    }
    let batch4 = estimate_memory(&config, QuantFormat::Fp8, context, 4);
    assert_eq!(batch4.kv_bytes, 4 * fp8.kv_bytes);

    // A decode token reads about 12.9 B active parameters, less the embedding table but one row.
    let (vocab, hidden) = (32000u64, 4096u64);
    let active = decode_weight_bytes(&config, QuantFormat::Bf16) / 2 + vocab * hidden - hidden;
    assert!((12.85e9..12.95e9).contains(&(active as f64)), "{active}");
    // Choosing every expert reads every weight but the embedding rows of the other tokens.
    let mut all = config.clone();
    all.experts_per_token = all.num_experts;
    for format in [QuantFormat::Bf16, QuantFormat::Fp8, QuantFormat::Int4] {
        let whole = estimate_memory(&all, format, 1, 1).weights_bytes;
        let read = decode_weight_bytes(&all, format);
        assert_eq!(read, whole - 2 * (vocab * hidden - hidden), "{format:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Malformed quantized checkpoints

/// One tensor as stored: safetensors dtype name, shape, raw bytes.
struct Stored {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn read_stored(dir: &Path) -> Vec<Stored> {
    let c = Checkpoint::open_with_packed(dir, OpenOptions::default()).unwrap();
    let mut names: Vec<String> = c.names().into_iter().map(String::from).collect();
    names.extend(c.packed_names().into_iter().map(String::from));
    names
        .into_iter()
        .map(|name| {
            let t = c.raw_tensor(&name).unwrap();
            Stored {
                dtype: t.dtype().to_string(),
                shape: t.shape().to_vec(),
                bytes: t.bytes().to_vec(),
                name,
            }
        })
        .collect()
}

/// Writes `tensors` as `dir/model.safetensors` (4-byte types first, so all are aligned) beside a
/// copy of `from`'s config files.
fn write_dir(from: &Path, dir: &Path, mut tensors: Vec<Stored>) {
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(from.join(f), dir.join(f)).unwrap();
    }
    tensors.sort_by_key(|t| {
        std::cmp::Reverse(if t.dtype == "I32" || t.dtype == "F32" {
            4
        } else {
            t.bytes.len().min(2)
        })
    });
    let stored = tensors.iter().map(|t| {
        (
            t.name.as_str(),
            t.dtype.as_str(),
            &t.shape[..],
            &t.bytes[..],
        )
    });
    write_tensors(&dir.join("model.safetensors"), stored);
}

/// Loads `fixture` after `edit` changed its tensors.
fn load_edited(name: &str, edit: impl FnOnce(&mut Vec<Stored>)) -> ModelError {
    let from = fixture(name);
    let mut tensors = read_stored(&from);
    edit(&mut tensors);
    let dir = tempfile::tempdir().unwrap();
    write_dir(&from, dir.path(), tensors);
    match load(dir.path(), None) {
        Ok(_) => panic!("the edited checkpoint should be rejected"),
        Err(e) => e,
    }
}

fn find<'a>(tensors: &'a mut [Stored], name: &str) -> &'a mut Stored {
    tensors.iter_mut().find(|t| t.name == name).unwrap()
}

const EXPERT: &str = "model.layers.1.block_sparse_moe.experts.2.w2";

#[test]
fn rewritten_fixture_still_loads() {
    // The writer above is faithful: an unedited copy loads and gives the same weights.
    let from = fixture("gptq-actorder");
    let dir = tempfile::tempdir().unwrap();
    write_dir(&from, dir.path(), read_stored(&from));
    let a = load(dir.path(), None).unwrap();
    let b = load(&from, None).unwrap();
    let name = |m: &Model| m.weights.layers[1].experts[2].w2.data().to_f32_vec();
    assert_eq!(name(&a), name(&b));
}

#[test]
fn scalar_fp8_scales_load_like_one_element_scales() {
    // AutoFP8 checkpoints store per-tensor scales with shape [] rather than [1].
    let from = fixture("fp8-tensor");
    let mut tensors = read_stored(&from);
    for t in tensors.iter_mut().filter(|t| t.name.ends_with("_scale")) {
        t.shape = vec![];
    }
    let dir = tempfile::tempdir().unwrap();
    write_dir(&from, dir.path(), tensors);
    let a = load(dir.path(), None).unwrap();
    let b = load(&from, None).unwrap();
    for (x, y) in a.weights.all().iter().zip(b.weights.all()) {
        assert_eq!(x.data().to_f32_vec(), y.data().to_f32_vec());
    }
}

#[test]
fn gptq_v2_zeros_are_read_without_the_offset() {
    // The same weights with every stored zero raised by one and `checkpoint_format: gptq_v2`.
    let from = fixture("gptq");
    let mut tensors = read_stored(&from);
    for t in tensors.iter_mut().filter(|t| t.name.ends_with(".qzeros")) {
        for word in t.bytes.chunks_exact_mut(4) {
            let w = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
            // The fixture keeps zeros in 1..=15, so stored nibbles are 0..=14 and never carry.
            assert!((0..8).all(|j| (w >> (4 * j)) & 0xF <= 14));
            word.copy_from_slice(&w.wrapping_add(0x1111_1111).to_le_bytes());
        }
    }
    let dir = tempfile::tempdir().unwrap();
    write_dir(&from, dir.path(), tensors);
    let mut config = json(&from.join("config.json"));
    config["quantization_config"]["checkpoint_format"] = "gptq_v2".into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let v2 = load(dir.path(), None).unwrap();
    let v1 = load(&from, None).unwrap();
    for (a, b) in v2.weights.all().iter().zip(v1.weights.all()) {
        assert_eq!(
            a.data().to_f32_vec(),
            b.data().to_f32_vec(),
            "{}",
            a.tensor.name()
        );
    }
    // An unknown checkpoint_format is refused by name rather than guessed.
    config["quantization_config"]["checkpoint_format"] = "gptq_v9".into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let err = load(dir.path(), None).err().unwrap();
    assert!(
        matches!(&err, ModelError::Quant(QuantError::UnsupportedFormat { method, format, .. })
            if method == "gptq" && format == "gptq_v9"),
        "{err}"
    );
}

#[test]
fn declared_formats_of_the_fixtures() {
    for (name, format) in PREQUANTIZED {
        assert_eq!(
            declared_format(&fixture(name).join("config.json")),
            Some(format),
            "{name}"
        );
    }
    let plain = root().join("tests/fixtures/gqa-bf16-sharded-window/config.json");
    assert_eq!(declared_format(&plain), None);
}

/// The format the binaries' estimates assume: quantize-on-load's, else the declared one, else bf16.
#[test]
fn loaded_format_prefers_quantize_on_load_then_the_declared_format() {
    let (name, declared) = PREQUANTIZED[0];
    let config = fixture(name).join("config.json");
    assert_eq!(loaded_format(&config, None), declared);
    assert_eq!(
        loaded_format(&config, Some(QuantFormat::Int4)),
        QuantFormat::Int4
    );
    let plain = root().join("tests/fixtures/gqa-bf16-sharded-window/config.json");
    assert_eq!(loaded_format(&plain, None), QuantFormat::Bf16);
    assert_eq!(
        loaded_format(&plain, Some(QuantFormat::Fp8)),
        QuantFormat::Fp8
    );
}

#[test]
fn wrong_qweight_shape_is_a_typed_error() {
    let target = format!("{EXPERT}.qweight");
    let err = load_edited("gptq", |t| {
        let q = find(t, &target);
        // Same bytes, other shape ([in/8, out] = [12, 64] -> [24, 32]).
        q.shape = vec![q.shape[0] * 2, q.shape[1] / 2];
    });
    assert!(
        matches!(&err, ModelError::Quant(QuantError::Shape { tensor, .. }) if *tensor == target),
        "{err}"
    );
    assert!(err.to_string().contains(&target));
}

#[test]
fn missing_scales_are_a_typed_error() {
    let target = format!("{EXPERT}.scales");
    let err = load_edited("gptq", |t| t.retain(|s| s.name != target));
    assert!(
        matches!(&err, ModelError::Quant(QuantError::Missing { tensor, .. }) if *tensor == target),
        "{err}"
    );
    let target = "model.layers.0.self_attn.k_proj.weight_scale";
    let err = load_edited("fp8-channel", |t| t.retain(|s| s.name != target));
    assert!(
        matches!(&err, ModelError::Quant(QuantError::Missing { tensor, .. }) if tensor == target),
        "{err}"
    );
}

#[test]
fn g_idx_out_of_range_is_a_typed_error() {
    let target = format!("{EXPERT}.g_idx");
    let err = load_edited("gptq-actorder", |t| {
        let g = find(t, &target);
        // w2 has 96 inputs in groups of 32: 3 groups, so 3 is out of range.
        g.bytes[4 * 5..4 * 6].copy_from_slice(&3i32.to_le_bytes());
    });
    assert!(
        matches!(&err, ModelError::Quant(QuantError::GroupIndex { tensor, index: 5, value: 3, groups: 3, .. }) if *tensor == target),
        "{err}"
    );
    let err = load_edited("gptq", |t| {
        find(t, &target).bytes[..4].copy_from_slice(&(-1i32).to_le_bytes());
    });
    assert!(
        matches!(
            &err,
            ModelError::Quant(QuantError::GroupIndex { value: -1, .. })
        ),
        "{err}"
    );
}

#[test]
fn bad_fp8_scales_and_codes_are_typed_errors() {
    let target = "model.layers.1.self_attn.o_proj.weight_scale";
    for bad in [0.0f32, -1.0, f32::NAN, f32::INFINITY] {
        let err = load_edited("fp8-tensor", |t| {
            find(t, target).bytes.copy_from_slice(&bad.to_le_bytes());
        });
        assert!(
            matches!(&err, ModelError::Quant(QuantError::BadScale { tensor, index: 0, .. }) if tensor == target),
            "{err}"
        );
    }
    let err = load_edited("fp8-channel", |t| {
        find(t, target).shape = vec![32, 2];
    });
    assert!(
        matches!(&err, ModelError::Quant(QuantError::Shape { tensor, .. }) if tensor == target),
        "{err}"
    );
    let weight = "model.layers.1.self_attn.o_proj.weight";
    let err = load_edited("fp8-channel", |t| find(t, weight).bytes[7] = 0xFF);
    assert!(
        matches!(&err, ModelError::Quant(QuantError::Unsupported { tensor, .. }) if tensor == weight),
        "{err}"
    );
}

#[test]
fn qweight_of_another_dtype_is_a_typed_error() {
    let target = format!("{EXPERT}.qzeros");
    let err = load_edited("gptq", |t| find(t, &target).dtype = "F32".into());
    assert!(
        matches!(&err, ModelError::Quant(QuantError::DType { tensor, .. }) if *tensor == target),
        "{err}"
    );
}

#[test]
fn router_must_stay_high_precision() {
    let target = "model.layers.0.block_sparse_moe.gate.weight";
    let err = load_edited("fp8-tensor", |t| {
        let r = find(t, target);
        r.dtype = "F8_E4M3".into();
        r.bytes.truncate(r.bytes.len() / 2);
    });
    assert!(
        matches!(&err, ModelError::Quant(QuantError::Unsupported { tensor, .. }) if tensor == target),
        "{err}"
    );
}

#[test]
fn quantizing_a_prequantized_checkpoint_to_another_format_is_refused() {
    let err = load(&fixture("gptq"), Some(QuantFormat::Fp8))
        .err()
        .unwrap();
    assert!(
        matches!(
            &err,
            ModelError::Quant(QuantError::Conflict {
                requested: QuantFormat::Fp8,
                found: QuantFormat::Int4,
                ..
            })
        ),
        "{err}"
    );
    // Asking for the format it already has is fine.
    assert_eq!(
        load(&fixture("gptq"), Some(QuantFormat::Int4))
            .unwrap()
            .quant,
        Some(QuantFormat::Int4)
    );
}

#[test]
fn packed_dtypes_open_only_when_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let header = padded(
        r#"{"w":{"dtype":"I32","shape":[2],"data_offsets":[0,8]},"f":{"dtype":"F8_E4M3","shape":[2,2],"data_offsets":[8,12]},"i":{"dtype":"I8","shape":[2],"data_offsets":[12,14]},"u":{"dtype":"U8","shape":[1],"data_offsets":[14,15]},"s":{"dtype":"F32","shape":[],"data_offsets":[16,20]}}"#,
    );
    let mut data = Vec::new();
    data.extend_from_slice(&(-7i32).to_le_bytes());
    data.extend_from_slice(&0x1234_5678i32.to_le_bytes());
    data.extend_from_slice(&[0x38, 0xB8, 0x7E, 0x01, 0xFF, 0x05, 0xAA, 0]);
    data.extend_from_slice(&2.5f32.to_le_bytes());
    write_raw_safetensors(&dir.path().join("model.safetensors"), &header, &data).unwrap();
    // The default open keeps refusing them.
    assert!(Checkpoint::open(dir.path()).is_err());
    let c = Checkpoint::open_with_packed(dir.path(), OpenOptions::default()).unwrap();
    assert!(c.has_packed());
    assert_eq!(c.packed_names(), vec!["f", "i", "u", "w"]);
    assert_eq!(c.names(), vec!["s"]);
    assert!(c.tensor("w").is_none() && c.tensor("s").is_some());
    let w = c.raw_tensor("w").unwrap();
    assert_eq!(w.dtype().to_string(), "I32");
    assert_eq!(&w.bytes()[..4], &(-7i32).to_le_bytes());
    let f = c.raw_tensor("f").unwrap();
    assert_eq!(
        (f.shape(), f.bytes()),
        (&[2usize, 2][..], &[0x38u8, 0xB8, 0x7E, 0x01][..])
    );
    assert!(f.as_float().is_none());
    assert_eq!(c.raw_tensor("i").unwrap().bytes(), &[0xFF, 0x05]);
    assert_eq!(
        c.raw_tensor("s").unwrap().as_float().unwrap().data().get(0),
        2.5
    );
    assert_eq!(c.total_bytes(), 19);
}

#[test]
fn format_names_parse() {
    for (s, f) in [
        ("fp8", QuantFormat::Fp8),
        ("INT8", QuantFormat::Int8),
        ("int4", QuantFormat::Int4),
        ("bf16", QuantFormat::Bf16),
    ] {
        assert_eq!(s.parse::<QuantFormat>().unwrap(), f);
        assert_eq!(f.to_string().parse::<QuantFormat>().unwrap(), f);
    }
    let err = "int3".parse::<QuantFormat>().unwrap_err();
    assert!(matches!(&err, QuantError::UnknownFormat { name } if name == "int3"));
}
