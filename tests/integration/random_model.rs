//! Random checkpoints: written files open, validate against their config, read back the values
//! that were written (checked also with the independent `safetensors` reader), and sharded files
//! hold exactly what a single file holds; the checkpoints transformers wrote for the golden tests
//! load too.

use mixtral::checkpoint::{write_safetensors, Checkpoint, LoadProgress, TensorSource};
use mixtral::dtype::{DType, WeightSlice};
use mixtral::random_model::{write_random_model, RandomModelSpec};
use mixtral::weights::{names, ModelLayout, ModelWeights};
use std::cell::RefCell;
use std::path::Path;

fn write(dir: &Path, spec: &RandomModelSpec) -> (Checkpoint, ModelWeights) {
    write_random_model(dir, spec).unwrap();
    let checkpoint = Checkpoint::open(dir).unwrap();
    let config = spec.model_config().unwrap();
    let weights = ModelWeights::from_checkpoint(&checkpoint, &config).unwrap();
    (checkpoint, weights)
}

/// What `spec` generated for `name`, rounded to the storage type as the file holds it.
fn expected_values(spec: &RandomModelSpec, name: &str) -> Vec<f32> {
    let config = spec.model_config().unwrap();
    let layout = ModelLayout::new(&config);
    let tensor = layout
        .tensors()
        .into_iter()
        .find(|t| t.name == name)
        .unwrap()
        .clone();
    let mut out = vec![0.0; tensor.shape.iter().product()];
    spec.fill(&tensor, 0, &mut out);
    match spec.dtype {
        DType::F32 => out,
        DType::F16 => out
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f32())
            .collect(),
        DType::BF16 => out
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect(),
    }
}

#[test]
fn tiny_model_opens_and_matches_its_config() {
    let dir = tempfile::tempdir().unwrap();
    let spec = RandomModelSpec::tiny(7);
    let (checkpoint, weights) = write(dir.path(), &spec);
    let config = spec.model_config().unwrap();
    assert_eq!(weights.layers.len(), 2);
    assert_eq!((weights.embed.rows, weights.embed.cols), (256, 64));
    assert_eq!((weights.lm_head.rows, weights.lm_head.cols), (256, 64));
    assert_eq!((weights.final_norm.rows, weights.final_norm.cols), (1, 64));
    for layer in &weights.layers {
        assert_eq!((layer.q_proj.rows, layer.q_proj.cols), (64, 64));
        assert_eq!((layer.k_proj.rows, layer.k_proj.cols), (32, 64));
        assert_eq!((layer.v_proj.rows, layer.v_proj.cols), (32, 64));
        assert_eq!((layer.o_proj.rows, layer.o_proj.cols), (64, 64));
        let router = layer.router.as_ref().unwrap();
        assert_eq!((router.rows, router.cols), (4, 64));
        assert_eq!(layer.experts.len(), 4);
        for e in &layer.experts {
            assert_eq!((e.w1.rows, e.w1.cols), (96, 64));
            assert_eq!((e.w2.rows, e.w2.cols), (64, 96));
            assert_eq!((e.w3.rows, e.w3.cols), (96, 64));
        }
    }
    // Every checkpoint tensor is a weight of the layout, and vice versa.
    let layout = ModelLayout::new(&config);
    let mut expected: Vec<&str> = layout.tensors().iter().map(|t| t.name.as_str()).collect();
    expected.sort();
    assert_eq!(checkpoint.names(), expected);
    assert_eq!(checkpoint.total_bytes(), weights.total_bytes());
    assert!(dir.path().join("generation_config.json").is_file());
    // The files reload through the config parser the loader uses.
    let reread = mixtral::ModelConfig::from_file(&dir.path().join("config.json")).unwrap();
    assert_eq!(reread, config);
}

#[test]
fn values_read_back_equal_what_was_written() {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let dir = tempfile::tempdir().unwrap();
        let spec = RandomModelSpec::tiny(11).with_dtype(dtype);
        let (checkpoint, weights) = write(dir.path(), &spec);
        let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        let independent = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(independent.len(), checkpoint.len());
        for name in checkpoint.names() {
            let view = checkpoint.tensor(name).unwrap();
            assert_eq!(view.dtype(), dtype);
            assert_eq!(
                view.data().to_f32_vec(),
                expected_values(&spec, name),
                "{name}"
            );
            let other = independent.tensor(name).unwrap();
            assert_eq!(other.shape(), view.shape(), "{name}");
            assert_eq!(other.data(), view.bytes(), "{name}");
        }
        let w1 = &weights.layers[1].experts[3].w1;
        assert_eq!(w1.tensor.name(), names::expert(1, 3, 1));
        assert_eq!(
            w1.data().to_f32_vec(),
            expected_values(&spec, &names::expert(1, 3, 1))
        );
    }
}

#[test]
fn sharded_equals_single_file() {
    let single = tempfile::tempdir().unwrap();
    let sharded = tempfile::tempdir().unwrap();
    let spec = RandomModelSpec::tiny(3).with_dtype(DType::BF16);
    let (one, _) = write(single.path(), &spec);
    let (many, weights) = write(sharded.path(), &spec.clone().with_shards(3));
    assert!(sharded
        .path()
        .join("model.safetensors.index.json")
        .is_file());
    assert!(!sharded.path().join("model.safetensors").exists());
    assert_eq!(many.files().len(), 3);
    assert_eq!(one.names(), many.names());
    for name in one.names() {
        let (a, b) = (one.tensor(name).unwrap(), many.tensor(name).unwrap());
        assert_eq!(a.shape(), b.shape());
        assert_eq!(a.bytes(), b.bytes(), "{name}");
    }
    let shard_files: std::collections::BTreeSet<_> = weights
        .all()
        .iter()
        .map(|w| w.tensor.path().to_path_buf())
        .collect();
    assert_eq!(shard_files.len(), 3);
}

#[test]
fn rewriting_as_single_file_replaces_the_index() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &RandomModelSpec::tiny(1).with_shards(2));
    let (checkpoint, _) = write(dir.path(), &RandomModelSpec::tiny(2));
    assert!(!dir.path().join("model.safetensors.index.json").exists());
    assert_eq!(checkpoint.files().len(), 1);
}

#[test]
fn values_have_the_intended_distribution() {
    let dir = tempfile::tempdir().unwrap();
    let spec = RandomModelSpec::tiny(5);
    let (_, weights) = write(dir.path(), &spec);
    let stats = |v: &[f32]| {
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32;
        (mean, var.sqrt())
    };
    for layer in &weights.layers {
        let norm = layer.attn_norm.data().to_f32_vec();
        assert!(norm.iter().all(|&x| (0.8..=1.2).contains(&x)));
        let (_, spread) = stats(&norm);
        assert!(spread > 0.05, "norm weights are not constant");
        let w1 = layer.experts[0].w1.data().to_f32_vec();
        let (mean, std) = stats(&w1);
        let want = 1.0 / (64f32).sqrt();
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((std / want - 1.0).abs() < 0.05, "{std} vs {want}");
        assert!(w1.iter().all(|&x| x != 0.0));
    }
    // Tensors with equal shapes hold different values.
    assert_ne!(
        weights.layers[0].experts[0].w1.data().to_f32_vec(),
        weights.layers[0].experts[1].w1.data().to_f32_vec()
    );
    // Another seed gives other values.
    let other = tempfile::tempdir().unwrap();
    let (_, reseeded) = write(other.path(), &RandomModelSpec::tiny(6));
    assert_ne!(
        weights.embed.data().to_f32_vec(),
        reseeded.embed.data().to_f32_vec()
    );
}

#[test]
fn dense_and_tied_variants_load() {
    let dir = tempfile::tempdir().unwrap();
    let spec = RandomModelSpec::tiny(9)
        .with("architectures", serde_json::json!(["MistralForCausalLM"]))
        .with("model_type", "mistral")
        .with("tie_word_embeddings", true)
        .without("num_local_experts")
        .without("num_experts_per_tok");
    let (checkpoint, weights) = write(dir.path(), &spec);
    assert!(checkpoint.tensor(names::LM_HEAD).is_none());
    assert!(checkpoint
        .tensor("model.layers.0.mlp.gate_proj.weight")
        .is_some());
    assert_eq!(
        weights.lm_head.data().to_f32_vec(),
        weights.embed.data().to_f32_vec()
    );
    for (i, layer) in weights.layers.iter().enumerate() {
        assert!(layer.router.is_none());
        assert_eq!(layer.experts.len(), 1);
        let e = &layer.experts[0];
        assert_eq!(
            e.w1.tensor.name(),
            format!("model.layers.{i}.mlp.gate_proj.weight")
        );
        assert_eq!(
            e.w2.tensor.name(),
            format!("model.layers.{i}.mlp.down_proj.weight")
        );
        assert_eq!(
            e.w3.tensor.name(),
            format!("model.layers.{i}.mlp.up_proj.weight")
        );
        assert_eq!((e.w2.rows, e.w2.cols), (64, 96));
    }
}

#[test]
fn prefetch_reports_progress_to_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let (_, weights) = write(dir.path(), &RandomModelSpec::tiny(4).with_shards(2));
    let seen = RefCell::new(Vec::<LoadProgress>::new());
    weights.prefetch(&|p| seen.borrow_mut().push(p));
    let seen = seen.into_inner();
    let last = seen.last().unwrap();
    assert_eq!(last.done_bytes, last.total_bytes);
    assert_eq!(last.total_bytes, weights.total_bytes());
    assert!(seen.windows(2).all(|w| w[0].done_bytes <= w[1].done_bytes));
}

#[test]
fn writer_round_trips_mixed_dtypes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let ramp = |scale: f32| {
        move |start: usize, out: &mut [f32]| {
            for (i, o) in out.iter_mut().enumerate() {
                *o = ((start + i) as f32 * 0.37).sin() * scale;
            }
        }
    };
    let tensors = vec![
        TensorSource {
            name: "a".into(),
            dtype: DType::F32,
            shape: vec![3, 5],
            fill: Box::new(ramp(1.0)),
        },
        TensorSource {
            name: "b".into(),
            dtype: DType::BF16,
            shape: vec![7],
            fill: Box::new(ramp(2.0)),
        },
        TensorSource {
            name: "c".into(),
            dtype: DType::F16,
            shape: vec![2, 3, 3],
            fill: Box::new(ramp(3.0)),
        },
        TensorSource {
            name: "empty".into(),
            dtype: DType::F32,
            shape: vec![0, 4],
            fill: Box::new(ramp(1.0)),
        },
    ];
    write_safetensors(&path, &tensors).unwrap();
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    for t in &tensors {
        let view = checkpoint.tensor(&t.name).unwrap();
        assert_eq!(view.dtype(), t.dtype);
        assert_eq!(view.shape(), t.shape.as_slice());
        let mut want = vec![0.0; t.shape.iter().product()];
        (t.fill)(0, &mut want);
        let got = view.data();
        match got {
            WeightSlice::F32(s) => assert_eq!(s, want.as_slice()),
            WeightSlice::BF16(s) => {
                let w: Vec<_> = want.iter().map(|&v| half::bf16::from_f32(v)).collect();
                assert_eq!(s, w.as_slice());
            }
            WeightSlice::F16(s) => {
                let w: Vec<_> = want.iter().map(|&v| half::f16::from_f32(v)).collect();
                assert_eq!(s, w.as_slice());
            }
        }
    }
    assert_eq!(checkpoint.total_bytes(), 15 * 4 + 7 * 2 + 18 * 2);
}

/// The ~1.6 GB model streams to disk in seconds (run with `--ignored`; needs the disk space).
#[test]
#[ignore]
fn mid_size_model_writes_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let spec = RandomModelSpec::mid_size(1).with_shards(4);
    let start = std::time::Instant::now();
    write_random_model(dir.path(), &spec).unwrap();
    let elapsed = start.elapsed();
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let weights =
        ModelWeights::from_checkpoint(&checkpoint, &spec.model_config().unwrap()).unwrap();
    assert!(checkpoint.total_bytes() > 1_500_000_000);
    assert_eq!(weights.layers.len(), 8);
    assert_eq!(weights.layers[0].experts.len(), 8);
    eprintln!("wrote {} bytes in {elapsed:?}", checkpoint.total_bytes());
    assert!(elapsed.as_secs() < 30, "{elapsed:?}");
}

#[test]
fn weights_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ModelWeights>();
    assert_send_sync::<Checkpoint>();
}

#[test]
fn logits_are_peaked_but_not_one_hot() {
    let dir = tempfile::tempdir().unwrap();
    let (_, weights) = write(dir.path(), &RandomModelSpec::tiny(8));
    let head = weights.lm_head.data().to_f32_vec();
    let norm = weights.final_norm.data().to_f32_vec();
    let hidden = weights.lm_head.cols;
    let mut state = 0x1234_5678_u64;
    let mut top_probs = Vec::new();
    for _ in 0..32 {
        // A random hidden state, RMS-normalised and scaled by the final norm as the model does.
        let x: Vec<f32> = (0..hidden)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        let rms = (x.iter().map(|v| v * v).sum::<f32>() / hidden as f32).sqrt();
        let h: Vec<f32> = x.iter().zip(&norm).map(|(v, w)| v / rms * w).collect();
        let logits: Vec<f32> = head
            .chunks(hidden)
            .map(|row| row.iter().zip(&h).map(|(a, b)| a * b).sum())
            .collect();
        let max = logits.iter().cloned().fold(f32::MIN, f32::max);
        let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
        top_probs.push(1.0 / sum);
    }
    let mean = top_probs.iter().sum::<f32>() / top_probs.len() as f32;
    eprintln!("mean top probability {mean}");
    // Far above uniform (1/256), yet not a certainty.
    assert!((0.1..0.95).contains(&mean), "mean top probability {mean}");
}

/// The checkpoints transformers wrote for the golden tests (single file, shards, bf16, f16, tied,
/// dense) open and load, and every tensor's bytes equal what the `safetensors` crate reads.
#[test]
fn fixtures_written_by_transformers_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut dirs = vec![root.join("models/tiny-mixtral")];
    for entry in std::fs::read_dir(root.join("tests/fixtures")).unwrap() {
        let path = entry.unwrap().path();
        if path.join("config.json").is_file() {
            dirs.push(path);
        }
    }
    assert!(dirs.len() >= 5, "{dirs:?}");
    for dir in dirs {
        let checkpoint = Checkpoint::open(&dir).unwrap();
        let mut config = mixtral::ModelConfig::from_file(&dir.join("config.json")).unwrap();
        config
            .merge_generation_config(&dir.join("generation_config.json"))
            .unwrap();
        let weights = ModelWeights::from_checkpoint(&checkpoint, &config).unwrap();
        assert_eq!(weights.layers.len(), config.num_layers, "{dir:?}");
        let mut seen = 0;
        for file in checkpoint.files() {
            let bytes = std::fs::read(file).unwrap();
            let independent = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for (name, other) in independent.tensors() {
                let view = checkpoint.tensor(&name).unwrap();
                assert_eq!(view.path(), file.as_path());
                assert_eq!(view.shape(), other.shape(), "{name}");
                assert_eq!(view.bytes(), other.data(), "{name}");
                seen += 1;
            }
        }
        assert_eq!(seen, checkpoint.len(), "{dir:?}");
        if config.tie_word_embeddings {
            assert!(weights.lm_head.tensor.name() == names::EMBED);
        }
    }
}
