//! Checkpoints as other tools write them: a safetensors header without padding (every tensor at an
//! odd file offset) and the MoE naming forms of transformers 5 era tools (`mlp.experts.E.*_proj`,
//! `block_sparse_moe.experts.E.*_proj`, fused 3-D `mlp.experts.gate_up_proj` / `down_proj`). Each
//! is made here from a committed fixture by copying its tensors' bytes unchanged (renamed,
//! concatenated or re-laid out) with the crate's writer, and must give logits bit-identical to the
//! original on the CPU engine: the same bytes reach the same arithmetic. A checkpoint in no known
//! form, or in two, and quantized fused experts get typed errors.
//!
//! The tool-side names are spelled out here, independently of the crate's name table, so that a
//! wrong entry in the table fails these tests.

use mixtral::checkpoint::{
    write_tensor_bytes, Checkpoint, HeaderPadding, OpenOptions, RawTensor, TensorBytes,
};
use mixtral::cpu::{CpuEngine, CpuEngineOptions};
use mixtral::dtype::RawDType;
use mixtral::weights::WeightsError;
use mixtral::{Engine, LoadOptions, LogitsFor, Model, ModelError, SeqStep};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The bf16 MoE fixture (sharded, mixed with a sliding window) and two pre-quantized ones.
const BF16: &str = "gqa-bf16-sharded-window";
const GPTQ: &str = "quant/gptq";
const INT8: &str = "quant/int8-channel";

/// One tensor, owned: name, dtype, shape, bytes.
#[derive(Clone)]
struct Owned {
    name: String,
    dtype: RawDType,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Owned {
    fn from_raw(raw: &RawTensor) -> Owned {
        Owned {
            name: raw.name().to_string(),
            dtype: raw.dtype(),
            shape: raw.shape().to_vec(),
            bytes: raw.bytes().to_vec(),
        }
    }
}

/// Every tensor of the checkpoint in `dir`, packed types included, sorted by name.
fn tensors(dir: &Path) -> Vec<Owned> {
    let c = Checkpoint::open_with_packed(dir, OpenOptions::default()).unwrap();
    let mut names: Vec<String> = c.names().into_iter().map(String::from).collect();
    names.extend(c.packed_names().into_iter().map(String::from));
    names.sort();
    names
        .iter()
        .map(|n| Owned::from_raw(&c.raw_tensor(n).unwrap()))
        .collect()
}

/// A new model directory holding `config.json` of `src` and `tensors` as one `model.safetensors`
/// whose header is padded as `padding` says.
fn write_model(src: &Path, tensors: &[Owned], padding: HeaderPadding) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let list: Vec<TensorBytes<'_>> = tensors
        .iter()
        .map(|t| TensorBytes {
            name: &t.name,
            dtype: t.dtype,
            shape: &t.shape,
            bytes: &t.bytes,
        })
        .collect();
    write_tensor_bytes(&dir.path().join("model.safetensors"), &list, padding).unwrap();
    dir
}

/// `src`'s tensors renamed by `rename` (names it returns `None` for are kept).
fn renamed(src: &Path, rename: impl Fn(&str) -> Option<String>) -> tempfile::TempDir {
    let mut all = tensors(src);
    for t in &mut all {
        if let Some(name) = rename(&t.name) {
            t.name = name;
        }
    }
    write_model(src, &all, HeaderPadding::Aligned)
}

/// A classic expert name `model.layers.N.block_sparse_moe.experts.E.wK.<suffix>` (or the router,
/// `model.layers.N.block_sparse_moe.gate.weight`) in the tools' spelling: the MoE block called
/// `block`, w1/w2/w3 called gate_proj/down_proj/up_proj.
fn tool_name(name: &str, block: &str) -> Option<String> {
    let (head, rest) = name.split_once(".block_sparse_moe.")?;
    let rest = rest
        .replace(".w1.", ".gate_proj.")
        .replace(".w2.", ".down_proj.")
        .replace(".w3.", ".up_proj.");
    Some(format!("{head}.{block}.{rest}"))
}

/// Logits of every position of one forward over a fixed prompt on the CPU engine.
fn logits(dir: &Path) -> Vec<f32> {
    let model = Model::load(dir, &LoadOptions::default()).unwrap();
    let vocab = model.config.vocab_size as u32;
    let ids: Vec<u32> = (0..12u32).map(|i| (i * 37 + 5) % vocab).collect();
    let options = CpuEngineOptions {
        max_context: Some(32),
        max_sequences: 1,
        ..CpuEngineOptions::default()
    };
    let mut engine = CpuEngine::new(model.weights.clone(), options).unwrap();
    let seq = engine.new_sequence().unwrap();
    let out = engine
        .step(&[SeqStep {
            seq,
            tokens: &ids,
            start_pos: 0,
            logits: LogitsFor::All,
        }])
        .unwrap();
    let mut all = Vec::new();
    for row in 0..ids.len() {
        all.extend_from_slice(out.row(row));
    }
    assert!(all.iter().all(|x| x.is_finite()), "non-finite logits");
    assert!(
        all.iter().any(|x| *x != all[0]),
        "constant logits compare nothing"
    );
    all
}

/// The error loading `dir` gives.
fn load_err(dir: &Path) -> ModelError {
    match Model::load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("{} should not load", dir.display()),
        Err(e) => e,
    }
}

/// Bit-for-bit equality of two logit sets.
fn assert_bits_equal(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let differ = got
        .iter()
        .zip(want)
        .position(|(a, b)| a.to_bits() != b.to_bits());
    assert_eq!(differ, None, "{what}: logits differ");
}

#[test]
fn unpadded_header_loads_with_identical_logits() {
    for name in [BF16, GPTQ, INT8] {
        let src = fixture(name);
        let dir = write_model(&src, &tensors(&src), HeaderPadding::Odd);
        let c = Checkpoint::open_with_packed(dir.path(), OpenOptions::default()).unwrap();
        // The data section starts at an odd offset, so every tensor wider than a byte is
        // unaligned: the float ones are read through aligned copies, the packed ones as bytes.
        let header_len = u64::from_le_bytes(
            std::fs::read(dir.path().join("model.safetensors")).unwrap()[..8]
                .try_into()
                .unwrap(),
        );
        assert_eq!((8 + header_len) % 2, 1, "{name}");
        assert!(c.iter().all(|t| t.is_unaligned()), "{name}");
        assert_bits_equal(&logits(dir.path()), &logits(&src), name);
    }
}

#[test]
fn transformers5_module_names_give_identical_logits() {
    let src = fixture(BF16);
    let want = logits(&src);
    // GPTQModel 7.7 on transformers 5, and llm-compressor on transformers 5.
    for block in ["mlp", "block_sparse_moe"] {
        let dir = renamed(&src, |n| tool_name(n, block));
        let c = Checkpoint::open(dir.path()).unwrap();
        let router = format!("model.layers.1.{block}.gate.weight");
        let up = format!("model.layers.1.{block}.experts.3.up_proj.weight");
        assert!(c.tensor(&router).is_some() && c.tensor(&up).is_some());
        assert!(c.names().iter().all(|n| !n.contains(".w1.")));
        assert_bits_equal(&logits(dir.path()), &want, block);
    }
}

#[test]
fn quantized_fixtures_renamed_give_identical_logits() {
    // GPTQ (`qweight`, `qzeros`, `scales`, `g_idx` under each module) as GPTQModel 7.7 names
    // it; INT8 (`weight`, `weight_scale`) as llm-compressor on transformers 5 names it.
    for (name, block) in [(GPTQ, "mlp"), (INT8, "block_sparse_moe")] {
        let src = fixture(name);
        let dir = renamed(&src, |n| tool_name(n, block));
        let c = Checkpoint::open_with_packed(dir.path(), OpenOptions::default()).unwrap();
        let companion = match name {
            GPTQ => "qweight",
            _ => "weight_scale",
        };
        let module = format!("model.layers.0.{block}.experts.1.gate_proj.{companion}");
        assert!(c.raw_tensor(&module).is_some(), "{module}");
        assert_bits_equal(&logits(dir.path()), &logits(&src), name);
    }
}

/// `src`'s experts fused as transformers 5 holds them: per layer `mlp.experts.gate_up_proj`
/// `[E, 2I, H]` (each expert's w1 rows, then its w3 rows) and `mlp.experts.down_proj`
/// `[E, H, I]`, the router as `mlp.gate.weight`.
fn fused(src: &Path) -> tempfile::TempDir {
    let all = tensors(src);
    let find = |name: &str| all.iter().find(|t| t.name == name);
    let mut out: Vec<Owned> = Vec::new();
    for t in &all {
        if !t.name.contains(".block_sparse_moe.") {
            out.push(t.clone());
        }
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let layers = config["num_hidden_layers"].as_u64().unwrap() as usize;
    let experts = config["num_local_experts"].as_u64().unwrap() as usize;
    for i in 0..layers {
        let moe = format!("model.layers.{i}.block_sparse_moe");
        let router = find(&format!("{moe}.gate.weight")).unwrap();
        let mut r = router.clone();
        r.name = format!("model.layers.{i}.mlp.gate.weight");
        out.push(r);
        let expert = |e: usize, k: u8| find(&format!("{moe}.experts.{e}.w{k}.weight")).unwrap();
        let [inter, hidden] = expert(0, 1).shape[..] else {
            panic!("w1 is not a matrix")
        };
        let mut gate_up = Vec::new();
        let mut down = Vec::new();
        for e in 0..experts {
            gate_up.extend_from_slice(&expert(e, 1).bytes);
            gate_up.extend_from_slice(&expert(e, 3).bytes);
            down.extend_from_slice(&expert(e, 2).bytes);
        }
        let dtype = expert(0, 1).dtype;
        out.push(Owned {
            name: format!("model.layers.{i}.mlp.experts.gate_up_proj"),
            dtype,
            shape: vec![experts, 2 * inter, hidden],
            bytes: gate_up,
        });
        out.push(Owned {
            name: format!("model.layers.{i}.mlp.experts.down_proj"),
            dtype,
            shape: vec![experts, hidden, inter],
            bytes: down,
        });
    }
    write_model(src, &out, HeaderPadding::Aligned)
}

#[test]
fn fused_3d_experts_give_identical_logits() {
    let src = fixture(BF16);
    let dir = fused(&src);
    let c = Checkpoint::open(dir.path()).unwrap();
    assert!(c.names().iter().all(|n| !n.contains("block_sparse_moe")));
    assert_bits_equal(&logits(dir.path()), &logits(&src), "fused");
    // The experts are views into the 3-D tensors, not copies.
    let model = Model::load(dir.path(), &LoadOptions::default()).unwrap();
    let e = &model.weights.layers[0].experts[1];
    assert!(!e.w1.tensor.is_owned() && !e.w3.tensor.is_owned() && !e.w2.tensor.is_owned());
    let fused = c.tensor("model.layers.0.mlp.experts.gate_up_proj").unwrap();
    let row_bytes = fused.shape()[2] * fused.dtype().size();
    let expert_bytes = fused.shape()[1] * row_bytes;
    let w3_start = e.w3.tensor.file_offset() - fused.file_offset();
    assert_eq!(w3_start, expert_bytes + e.w1.rows * row_bytes);
}

#[test]
fn fused_experts_on_load_quantization_matches_classic() {
    // Quantize-on-load reads the fused views like any float matrix.
    let src = fixture(BF16);
    let dir = fused(&src);
    let load = |d: &Path| {
        let options = LoadOptions {
            quant: Some(mixtral::quant::QuantFormat::Int8),
            ..LoadOptions::default()
        };
        Model::load(d, &options).unwrap()
    };
    let (a, b) = (load(&src), load(dir.path()));
    for (la, lb) in a.weights.layers.iter().zip(&b.weights.layers) {
        for (ea, eb) in la.experts.iter().zip(&lb.experts) {
            for (wa, wb) in [(&ea.w1, &eb.w1), (&ea.w2, &eb.w2), (&ea.w3, &eb.w3)] {
                let (pa, pb) = (wa.tensor.packed().unwrap(), wb.tensor.packed().unwrap());
                assert_eq!(pa.dequantize(), pb.dequantize());
            }
        }
    }
}

#[test]
fn quantized_fused_experts_are_refused() {
    // The INT8 fixture's experts fused as they would be if a tool fused quantized ones.
    let src = fixture(INT8);
    let mut all = tensors(&src);
    let gate_up = "model.layers.0.mlp.experts.gate_up_proj";
    let w1 = all
        .iter()
        .position(|t| t.name == "model.layers.0.block_sparse_moe.experts.0.w1.weight")
        .unwrap();
    assert_eq!(all[w1].dtype, RawDType::I8);
    // One expert's w1 and w3 codes as a [1, 2I, H] tensor is enough to be detected and refused.
    let w3 = all
        .iter()
        .find(|t| t.name == "model.layers.0.block_sparse_moe.experts.0.w3.weight")
        .unwrap();
    let mut bytes = all[w1].bytes.clone();
    bytes.extend_from_slice(&w3.bytes);
    let [inter, hidden] = all[w1].shape[..] else {
        panic!("w1 is not a matrix")
    };
    all.retain(|t| !t.name.contains(".block_sparse_moe.experts."));
    all.push(Owned {
        name: gate_up.into(),
        dtype: RawDType::I8,
        shape: vec![1, 2 * inter, hidden],
        bytes,
    });
    let dir = write_model(&src, &all, HeaderPadding::Aligned);
    let err = load_err(dir.path());
    let message = err.to_string();
    let refused = match &err {
        ModelError::Quant(mixtral::quant::QuantError::Weights(e)) | ModelError::Weights(e) => {
            matches!(e, WeightsError::QuantizedFused { tensor, dtype: RawDType::I8, .. } if tensor == gate_up)
        }
        _ => false,
    };
    assert!(refused, "{message}");
    assert!(
        message.contains(gate_up) && message.contains("I8"),
        "{message}"
    );
}

#[test]
fn unknown_and_mixed_forms_are_typed_errors() {
    let src = fixture(BF16);
    // An unknown spelling of the experts: `moe.experts.E.fc1/fc2/fc3`.
    let dir = renamed(&src, |n| {
        n.contains(".block_sparse_moe.").then(|| {
            n.replace(".block_sparse_moe.", ".moe.")
                .replace(".w1.", ".fc1.")
                .replace(".w2.", ".fc2.")
                .replace(".w3.", ".fc3.")
        })
    });
    let err = load_err(dir.path());
    let message = err.to_string();
    assert!(
        matches!(err, ModelError::Weights(WeightsError::UnknownForm { .. })),
        "{message}"
    );
    // It names what it found in the first layer and every form it knows.
    assert!(
        message.contains("`model.layers.0.moe.experts.0.fc1.weight`"),
        "{message}"
    );
    assert!(!message.contains("self_attn"), "{message}");
    for known in [
        "block_sparse_moe.experts.E.w1/w2/w3",
        "mlp.experts.E.gate_proj/up_proj/down_proj",
        "block_sparse_moe.experts.E.gate_proj/up_proj/down_proj",
        "mlp.experts.gate_up_proj",
    ] {
        assert!(message.contains(known), "{known} not in {message}");
    }

    // Tensors of two forms at once: the classic checkpoint plus one `mlp.experts.0.gate_proj`.
    let mut all = tensors(&src);
    let w1 = all
        .iter()
        .find(|t| t.name == "model.layers.0.block_sparse_moe.experts.0.w1.weight")
        .unwrap();
    let mut extra = w1.clone();
    extra.name = "model.layers.0.mlp.experts.0.gate_proj.weight".into();
    all.push(extra);
    let dir = write_model(&src, &all, HeaderPadding::Aligned);
    let err = load_err(dir.path());
    assert!(
        matches!(err, ModelError::Weights(WeightsError::AmbiguousForm { ref forms }) if forms.len() == 2),
        "{err}"
    );
}
