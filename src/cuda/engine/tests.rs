//! Host-side sizing of the CUDA engine, tested without a device.

use super::plan::plan_bytes;
use super::*;
use crate::config::{Architecture, ModelConfig};
use crate::engine::EngineOptions;

/// Mixtral-8x7B's published shape.
fn mixtral_8x7b() -> ModelConfig {
    let json = r#"{
        "architectures": ["MixtralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": null,
        "max_position_embeddings": 32768, "tie_word_embeddings": false,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"
    }"#;
    let config = ModelConfig::from_json_str(json, std::path::Path::new("config.json"))
        .expect("the published config parses");
    assert_eq!(config.architecture, Architecture::Mixtral);
    config
}

#[test]
fn kv_cache_fills_the_memory_left_and_no_more() {
    let config = mixtral_8x7b();
    let mut options = CudaEngineOptions::default();
    options.engine.max_context = Some(32768);
    options.engine.max_sequences = Some(4);
    // 20 GiB after the weights: less than 4 full contexts of 4 GiB each plus activations? No: 4 x 4
    // GiB = 16 GiB fits, so the pool holds exactly four contexts.
    let sizes = plan_sizes(&config, &options, 20 << 30).unwrap();
    assert_eq!(sizes.max_blocks_per_seq, 32768 / 16);
    assert_eq!(sizes.num_blocks, 4 * 2048);
    // 8 GiB: fewer blocks, and everything allocated stays within the room minus the reserve.
    let sizes = plan_sizes(&config, &options, 8 << 30).unwrap();
    assert!(sizes.num_blocks < 4 * 2048 && sizes.num_blocks > 2048);
    assert!(plan_bytes(&config, &sizes) + options.reserve_bytes <= 8 << 30);
    // One more block would not have fitted.
    let more = PlanSizes {
        num_blocks: sizes.num_blocks + 1,
        ..sizes
    };
    assert!(plan_bytes(&config, &more) + options.reserve_bytes > 8 << 30);
}

#[test]
fn kv_cache_bytes_match_the_published_figure() {
    // 128 KiB per token in bf16 (32 layers x 2 x 8 heads x 128 x 2 bytes).
    let config = mixtral_8x7b();
    // (From one block to two: an empty cache buffer still takes the allocation's minimum.)
    let base = PlanSizes {
        max_tokens: 512,
        max_decode_tokens: 16,
        max_sequences: 16,
        num_blocks: 1,
        block_size: 16,
        max_blocks_per_seq: 2048,
    };
    let two_blocks = PlanSizes {
        num_blocks: 2,
        ..base
    };
    assert_eq!(
        plan_bytes(&config, &two_blocks) - plan_bytes(&config, &base),
        16 * 128 * 1024
    );
}

#[test]
fn explicit_kv_blocks_are_kept_and_bad_options_refused() {
    let config = mixtral_8x7b();
    let mut options = CudaEngineOptions::default();
    options.engine.kv_blocks = Some(123);
    assert_eq!(plan_sizes(&config, &options, 0).unwrap().num_blocks, 123);
    for bad in [
        EngineOptions {
            block_size: Some(0),
            ..EngineOptions::default()
        },
        EngineOptions {
            max_sequences: Some(0),
            ..EngineOptions::default()
        },
        EngineOptions {
            kv_blocks: Some(0),
            ..EngineOptions::default()
        },
        EngineOptions {
            max_context: Some(usize::MAX),
            ..EngineOptions::default()
        },
    ] {
        assert!(matches!(
            plan_sizes(
                &config,
                &CudaEngineOptions {
                    engine: bad,
                    ..CudaEngineOptions::default()
                },
                1 << 40
            ),
            Err(CudaError::UnsupportedModel(_))
        ));
    }
}

#[test]
fn no_room_still_plans_one_block_for_the_memory_check_to_refuse() {
    let config = mixtral_8x7b();
    let sizes = plan_sizes(&config, &CudaEngineOptions::default(), 0).unwrap();
    assert_eq!(sizes.num_blocks, 1);
}

#[test]
fn mixtral_8x7b_fits_an_80_gb_gpu_packed_in_8_bits_with_a_32k_context_but_not_in_bf16() {
    use super::matrix::StackFormat;
    use super::upload::{device_weight_bytes, LayerFormats};
    use crate::quant::PackedKind;
    let config = mixtral_8x7b();
    // An H100 80GB reports about 79.1 GiB free with nothing else running.
    let free: usize = 79 << 30;
    let mut options = CudaEngineOptions::default();
    options.engine.max_context = Some(32768);
    options.engine.max_sequences = Some(1);
    let layers = |f| vec![LayerFormats::all(f); config.num_layers];
    let bf16 = device_weight_bytes(&config, false, &layers(StackFormat::Bf16), 512);
    assert!(bf16 > free, "bf16 Mixtral-8x7B: {bf16} bytes");
    for kind in [
        PackedKind::Fp8,
        PackedKind::Int8,
        PackedKind::Int4 { group_size: 128 },
    ] {
        let formats = layers(StackFormat::Packed { kind, perm: false });
        let weights = device_weight_bytes(&config, false, &formats, options.max_step_tokens());
        let sizes = plan_sizes(&config, &options, free - weights).unwrap();
        assert_eq!(sizes.num_blocks, 2048, "{kind:?}: one full 32k context");
        let needed = weights + plan_bytes(&config, &sizes) + options.reserve_bytes;
        eprintln!(
            "{kind:?}: weights and dequantization scratch {:.1} GB, with a 32k KV cache, \
             activations and the reserve {:.1} GB",
            weights as f64 / 1e9,
            needed as f64 / 1e9
        );
        assert!(needed <= free, "{kind:?}: {needed} bytes");
        // The 8-bit weights are about half of bf16 (plus the expert dequantization scratch).
        assert!(weights < bf16 / 2 + (3 << 30), "{kind:?}: {weights} bytes");
    }
}

#[test]
fn expert_stacks_packed_in_two_kinds_get_the_dequantization_scratch() {
    use super::matrix::StackFormat;
    use super::upload::{device_weight_bytes, LayerFormats};
    use crate::packed::lut4::Lut4;
    use crate::quant::PackedKind;
    let config = mixtral_8x7b();
    let nf4 = |group_size| StackFormat::Packed {
        kind: PackedKind::Lut4 {
            table: Lut4::Nf4,
            group_size,
        },
        perm: false,
    };
    let layers = |w13, w2| {
        let f = LayerFormats {
            w13,
            w2,
            ..LayerFormats::all(nf4(64))
        };
        vec![f; config.num_layers]
    };
    // One token per step: the packed expert kernels would run, so one kind needs no scratch; w1 /
    // w3 and w2 in different groups cannot share those kernels and are expanded (3 bf16 stacks).
    let same = device_weight_bytes(&config, false, &layers(nf4(64), nf4(64)), 1);
    let mixed = device_weight_bytes(&config, false, &layers(nf4(64), nf4(128)), 1);
    // w2 `[8 experts, 4096, 14336]`: one f32 scale per row and group of 64 or 128 columns.
    let w2_smaller = 8 * 4096 * 4 * (14336 / 64 - 14336 / 128);
    let scratch = 3 * 2 * config.num_experts * config.intermediate_size * config.hidden_size;
    assert!(
        mixed + w2_smaller * config.num_layers >= same + scratch,
        "{mixed} vs {same}"
    );
}

#[test]
fn every_quantized_fixture_is_stored_packed_act_order_and_table_codes_included() {
    use super::matrix::StackFormat;
    use crate::quant::PackedKind;
    use crate::{LoadOptions, Model};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quant");
    for (dir, kind, perm) in [
        ("fp8-tensor", PackedKind::Fp8, false),
        ("fp8-channel", PackedKind::Fp8, false),
        ("int8-channel", PackedKind::Int8, false),
        ("gptq", PackedKind::Int4 { group_size: 32 }, false),
        ("gptq-actorder", PackedKind::Int4 { group_size: 32 }, true),
    ] {
        let model = Model::load(&root.join(dir), &LoadOptions::default()).expect(dir);
        let formats = weight_formats(model.weights.as_ref());
        assert_eq!(formats.len(), model.config.num_layers);
        for f in formats {
            assert_eq!(
                f,
                LayerFormats::all(StackFormat::Packed { kind, perm }),
                "{dir}"
            );
        }
    }
    // bitsandbytes 4-bit checkpoints (attention projections quantized in blocks of 64, the experts
    // bf16): the attention stacks packed as table codes, read by the LUT4 kernels.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real-quant");
    for (dir, table) in [
        ("bnb-nf4", crate::packed::lut4::Lut4::Nf4),
        ("bnb-fp4", crate::packed::lut4::Lut4::Fp4),
    ] {
        let model = Model::load(&root.join(dir), &LoadOptions::default()).expect(dir);
        let packed = StackFormat::Packed {
            kind: PackedKind::Lut4 {
                table,
                group_size: 64,
            },
            perm: false,
        };
        for f in weight_formats(model.weights.as_ref()) {
            assert_eq!((f.qkv, f.o), (packed, packed), "{dir}");
            assert_eq!(
                (f.w13, f.w2),
                (StackFormat::Bf16, StackFormat::Bf16),
                "{dir}"
            );
        }
    }
    // A bf16 model stays bf16.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-mixtral");
    let model = Model::load(&dir, &LoadOptions::default()).expect("tiny");
    assert!(weight_formats(model.weights.as_ref())
        .iter()
        .all(|f| *f == LayerFormats::all(StackFormat::Bf16)));
}

#[test]
fn cutlass_runs_the_projections_only_where_every_feature_count_is_a_whole_16_byte_row() {
    let mut config = mixtral_8x7b();
    let dims = Dims::of(&config);
    // q/k/v: 4096 -> 6144, o: 4096 -> 4096, the LM head 4096 -> 32000 (or a rank's part).
    let features = projection_features(&dims, dims.vocab);
    assert_eq!(
        features,
        Some(vec![(4096, 6144), (4096, 4096), (4096, 32000)])
    );
    assert_eq!(projection_features(&dims, 16000).unwrap()[2], (4096, 16000));
    // One more vocabulary row and the LM head's output rows are no longer whole 16-byte rows.
    config.vocab_size = 32001;
    let odd = Dims::of(&config);
    assert_eq!(projection_features(&odd, odd.vocab), None);
}
