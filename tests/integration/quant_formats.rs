//! Pre-quantized layouts as the tools write them, end to end: every attention and expert
//! projection of the `gqa-bf16-sharded-window` model is replaced by seeded codes, scales and zero
//! points packed here in the tool's layout (compressed-tensors `pack-quantized`, AutoAWQ GEMM,
//! bitsandbytes NF4 / FP4), written with the tool's `quantization_config`, loaded through
//! [`Model::load`], and each loaded matrix must equal, exactly, the values computed here from the
//! codes before packing.
//!
//! The packing below is written from each tool's documented layout, independently of the loader:
//! compressed-tensors `pack_to_int32` (value `i` of a word in bits `bits * i`, stored as the
//! signed value plus `2^(bits-1)`, weights packed along the input axis and zero points along the
//! output axis); AutoAWQ's `order_map = [0, 2, 4, 6, 1, 3, 5, 7]` (nibble `i` of a word holds
//! column `8c + order_map[i]`); bitsandbytes' high nibble first over the flattened matrix, one
//! absmax per block of 64, double quantization in blocks of 256 with an offset, and its built-in
//! NF4 / FP4 tables. Exact equality holds because both sides compute `scale * (q - zero)` (or
//! `table[q] * absmax`) with one f32 rounding from the same operands.

use crate::common;

use common::repo::root;
use common::safetensors::write_tensors;
use half::{bf16, f16};
use mixtral::checkpoint::Checkpoint;
use mixtral::quant::{PackedKind, QuantError, QuantFormat};
use mixtral::{LoadOptions, Model, ModelError};
use serde_json::{json, Value};
use std::path::Path;

/// One tensor as written: safetensors dtype name, shape, raw bytes.
struct Stored {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Stored {
    fn new(name: String, dtype: &'static str, shape: &[usize], bytes: Vec<u8>) -> Stored {
        Stored {
            name,
            dtype,
            shape: shape.to_vec(),
            bytes,
        }
    }
    fn i32s(name: String, shape: &[usize], v: &[u32]) -> Stored {
        Stored::new(
            name,
            "I32",
            shape,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    }
    fn f32s(name: String, shape: &[usize], v: &[f32]) -> Stored {
        Stored::new(
            name,
            "F32",
            shape,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    }
}

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    fn int(&mut self, lo: i32, hi: i32) -> i32 {
        lo + (self.next() % (hi - lo + 1) as u64) as i32
    }
    /// Uniform in `[lo, hi)`.
    fn float(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }
    fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            p.swap(i, (self.next() % (i as u64 + 1)) as usize);
        }
        p
    }
}

const BASE: &str = "tests/fixtures/gqa-bf16-sharded-window";

/// A quantizable projection of the base model: name without `.weight`, rows, cols.
struct Projection {
    base: String,
    rows: usize,
    cols: usize,
}

/// The base model's tensors (float, as stored) and its quantizable projections.
fn base_model() -> (Vec<Stored>, Vec<Projection>) {
    let c = Checkpoint::open(&root().join(BASE)).unwrap();
    let mut tensors = Vec::new();
    let mut projections = Vec::new();
    for name in c.names() {
        let t = c.raw_tensor(name).unwrap();
        let quantizable = name.ends_with("_proj.weight") || name.contains(".experts.");
        if quantizable {
            projections.push(Projection {
                base: name.strip_suffix(".weight").unwrap().into(),
                rows: t.shape()[0],
                cols: t.shape()[1],
            });
        } else {
            let dtype = match t.dtype().to_string().as_str() {
                "BF16" => "BF16",
                "F16" => "F16",
                _ => "F32",
            };
            tensors.push(Stored::new(
                name.into(),
                dtype,
                t.shape(),
                t.bytes().to_vec(),
            ));
        }
    }
    assert_eq!(projections.len(), 2 * (4 + 4 * 3));
    (tensors, projections)
}

fn dtype_size(dtype: &str) -> usize {
    match dtype {
        "I64" => 8,
        "I32" | "F32" => 4,
        "BF16" | "F16" | "I16" => 2,
        _ => 1,
    }
}

/// Writes `tensors` as `dir/model.safetensors` (largest elements first, so every tensor is
/// aligned) beside the base config with `quantization_config`.
fn write_model(dir: &Path, mut tensors: Vec<Stored>, quantization_config: Value) {
    let mut config: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join(BASE).join("config.json")).unwrap(),
    )
    .unwrap();
    config["quantization_config"] = quantization_config;
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    tensors.sort_by_key(|t| std::cmp::Reverse(dtype_size(t.dtype)));
    let stored = tensors
        .iter()
        .map(|t| (t.name.as_str(), t.dtype, &t.shape[..], &t.bytes[..]));
    write_tensors(&dir.join("model.safetensors"), stored);
}

fn load(dir: &Path) -> Result<Model, ModelError> {
    Model::load(dir, &LoadOptions::default())
}

/// The loaded f32 values of the projection `base`.
fn loaded(model: &Model, base: &str) -> Vec<f32> {
    let w = model
        .weights
        .all()
        .into_iter()
        .find(|w| w.tensor.name() == format!("{base}.weight"))
        .unwrap_or_else(|| panic!("{base} not loaded"));
    w.data().to_f32_vec()
}

/// The packed kind of the loaded projection `base`, `None` when held as f32.
fn packed_kind(model: &Model, base: &str) -> Option<PackedKind> {
    let w = model
        .weights
        .all()
        .into_iter()
        .find(|w| w.tensor.name() == format!("{base}.weight"))
        .unwrap();
    w.tensor.packed().map(|p| p.kind)
}

/// One projection's tensors as a tool writes them, and the values they stand for `[rows, cols]`.
type Packed = (Vec<Stored>, Vec<f32>);

/// Writes the base model with every projection replaced by `pack`'s tensors, loads it and checks
/// each projection equals `pack`'s expected values; returns the model.
fn round_trip(config: Value, pack: &mut dyn FnMut(&Projection, &mut Rng) -> Packed) -> Model {
    let (mut tensors, projections) = base_model();
    let mut rng = Rng(7);
    let mut expected = Vec::new();
    for p in &projections {
        let (stored, want) = pack(p, &mut rng);
        assert_eq!(want.len(), p.rows * p.cols);
        tensors.extend(stored);
        expected.push(want);
    }
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), tensors, config);
    let model = load(dir.path()).unwrap();
    for (p, want) in projections.iter().zip(&expected) {
        let got = loaded(&model, &p.base);
        let bad = got
            .iter()
            .zip(want)
            .position(|(g, w)| g.to_bits() != w.to_bits());
        assert!(bad.is_none(), "{}: element {bad:?} differs", p.base);
    }
    model
}

// ---------------------------------------------------------------------------------------------
// compressed-tensors pack-quantized

/// One compressed-tensors weight layout.
#[derive(Clone, Copy)]
struct Ct {
    bits: u32,
    /// `Some(group_size)` for strategy `group`, `None` for `channel`.
    group: Option<usize>,
    symmetric: bool,
    /// A permuted `weight_g_idx` (act-order); `Some(false)`: a `weight_g_idx` of -1 (column order).
    act_order: Option<bool>,
}

fn ct_config(ct: Ct, format: &str) -> Value {
    json!({
        "quant_method": "compressed-tensors",
        "format": format,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "format": format,
            "targets": ["Linear"],
            "input_activations": null,
            "weights": {
                "num_bits": ct.bits, "type": "int", "symmetric": ct.symmetric,
                "strategy": if ct.group.is_some() { "group" } else { "channel" },
                "group_size": ct.group, "actorder": if ct.act_order == Some(true) { json!("group") } else { Value::Null },
                "dynamic": false, "observer": "minmax"
            }
        }},
        "ignore": ["lm_head", "re:.*block_sparse_moe.gate"],
        "kv_cache_scheme": null,
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.13.0"
    })
}

/// `pack_to_int32` of signed `values` `[rows, cols]` along `dim` (1: each row; 0: down the rows).
fn pack_to_int32(values: &[i32], rows: usize, cols: usize, bits: u32, dim: usize) -> Vec<u32> {
    let per = (32 / bits) as usize;
    let offset = 1i32 << (bits - 1);
    let mask = (1u32 << bits) - 1;
    if dim == 1 {
        let words = cols.div_ceil(per);
        let mut out = vec![0u32; rows * words];
        for r in 0..rows {
            for k in 0..cols {
                let u = (values[r * cols + k] + offset) as u32 & mask;
                out[r * words + k / per] |= u << (bits as usize * (k % per));
            }
        }
        out
    } else {
        let mut out = vec![0u32; rows.div_ceil(per) * cols];
        for r in 0..rows {
            for c in 0..cols {
                let u = (values[r * cols + c] + offset) as u32 & mask;
                out[(r / per) * cols + c] |= u << (bits as usize * (r % per));
            }
        }
        out
    }
}

fn ct_pack(ct: Ct, p: &Projection, rng: &mut Rng) -> Packed {
    let (rows, cols) = (p.rows, p.cols);
    let group_size = ct.group.unwrap_or(cols);
    let groups = cols / group_size;
    let (lo, hi) = (-(1 << (ct.bits - 1)), (1 << (ct.bits - 1)) - 1);
    let q: Vec<i32> = (0..rows * cols).map(|_| rng.int(lo, hi)).collect();
    let zero: Vec<i32> = (0..rows * groups)
        .map(|_| if ct.symmetric { 0 } else { rng.int(lo, hi) })
        .collect();
    let scale: Vec<bf16> = (0..rows * groups)
        .map(|_| bf16::from_f32(rng.float(1e-3, 5e-2)))
        .collect();
    let mut g_idx: Vec<usize> = (0..cols).map(|k| k / group_size).collect();
    if ct.act_order == Some(true) {
        for (j, &k) in rng.permutation(cols).iter().enumerate() {
            g_idx[k] = j / group_size;
        }
    }
    let mut want = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for (k, &g) in g_idx.iter().enumerate() {
            let s = scale[r * groups + g].to_f32();
            want.push(s * (q[r * cols + k] - zero[r * groups + g]) as f32);
        }
    }
    let b = &p.base;
    let mut out = vec![
        Stored::i32s(
            format!("{b}.weight_packed"),
            &[rows, cols.div_ceil((32 / ct.bits) as usize)],
            &pack_to_int32(&q, rows, cols, ct.bits, 1),
        ),
        Stored::new(
            format!("{b}.weight_shape"),
            "I64",
            &[2],
            [rows as i64, cols as i64]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        Stored::new(
            format!("{b}.weight_scale"),
            "BF16",
            &[rows, groups],
            scale.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
    ];
    if !ct.symmetric {
        out.push(Stored::i32s(
            format!("{b}.weight_zero_point"),
            &[rows.div_ceil((32 / ct.bits) as usize), groups],
            &pack_to_int32(&zero, rows, groups, ct.bits, 0),
        ));
    }
    if let Some(permuted) = ct.act_order {
        let stored: Vec<u32> = match permuted {
            true => g_idx.iter().map(|&g| g as u32).collect(),
            false => vec![u32::MAX; cols],
        };
        out.push(Stored::i32s(format!("{b}.weight_g_idx"), &[cols], &stored));
    }
    (out, want)
}

#[test]
fn pack_quantized_word_layout_by_hand() {
    // Signed 4-bit values -8, -1, 0, 7 stored as 0, 7, 8, 15 from the lowest bits up.
    let words = pack_to_int32(&[-8, -1, 0, 7], 1, 4, 4, 1);
    assert_eq!(words, vec![0xF870]);
    // 8-bit: -128, 127, 1 stored as 0x00, 0xFF, 0x81.
    assert_eq!(pack_to_int32(&[-128, 127, 1], 1, 3, 8, 1), vec![0x81FF00]);
    // Zero points down the rows: rows 0..9 of one column, rows 8 and 9 in the second word.
    let z: Vec<i32> = (0..10).map(|r| r - 8).collect();
    assert_eq!(pack_to_int32(&z, 10, 1, 4, 0), vec![0x7654_3210, 0x98]);
}

#[test]
fn compressed_tensors_pack_quantized_loads_the_packed_values() {
    let w4 = |group, symmetric, act_order| Ct {
        bits: 4,
        group,
        symmetric,
        act_order,
    };
    // (layout, the kind q_proj lands in, whether q_proj carries a permutation)
    let cases = [
        (
            w4(Some(32), true, None),
            Some(PackedKind::Int4 { group_size: 32 }),
            false,
        ),
        (
            w4(Some(32), false, Some(true)),
            Some(PackedKind::Int4 { group_size: 32 }),
            true,
        ),
        (
            w4(Some(32), true, Some(false)),
            Some(PackedKind::Int4 { group_size: 32 }),
            false,
        ),
        (
            w4(None, false, None),
            Some(PackedKind::Int4 { group_size: 64 }),
            false,
        ),
        (
            Ct {
                bits: 8,
                group: None,
                symmetric: true,
                act_order: None,
            },
            Some(PackedKind::Int8),
            false,
        ),
        (
            Ct {
                bits: 8,
                group: Some(32),
                symmetric: false,
                act_order: Some(true),
            },
            None,
            false,
        ),
    ];
    for (ct, kind, permuted) in cases {
        let model = round_trip(ct_config(ct, "pack-quantized"), &mut |p, rng| {
            ct_pack(ct, p, rng)
        });
        let format = if ct.bits == 4 {
            QuantFormat::Int4
        } else {
            QuantFormat::Int8
        };
        assert_eq!(model.quant, Some(format));
        let q_proj = "model.layers.0.self_attn.q_proj";
        assert_eq!(packed_kind(&model, q_proj), kind, "{}-bit", ct.bits);
        let q = &model.weights.layers[0].q_proj;
        assert_eq!(
            q.tensor.packed().is_some_and(|p| p.perm.is_some()),
            permuted
        );
        assert!(!model.weights.layers[0]
            .router
            .as_ref()
            .unwrap()
            .tensor
            .is_owned());
    }
}

// ---------------------------------------------------------------------------------------------
// AutoAWQ GEMM

const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// AutoAWQ's packing of `values` `[k, n]` (0..=15) into `[k, n / 8]` words.
fn awq_pack_words(values: &[u32], k: usize, n: usize) -> Vec<u32> {
    let mut out = vec![0u32; k * n / 8];
    for row in 0..k {
        for col in 0..n / 8 {
            for (i, &o) in AWQ_ORDER.iter().enumerate() {
                out[row * n / 8 + col] |= values[row * n + col * 8 + o] << (4 * i);
            }
        }
    }
    out
}

#[test]
fn awq_word_layout_by_hand() {
    // Columns 0..8 holding 0..8: nibbles hold columns 0, 2, 4, 6, 1, 3, 5, 7.
    let words = awq_pack_words(&[0, 1, 2, 3, 4, 5, 6, 7], 1, 8);
    assert_eq!(words, vec![0x7531_6420]);
}

fn awq_pack(p: &Projection, group: usize, rng: &mut Rng) -> Packed {
    let (n, k) = (p.rows, p.cols);
    let groups = k / group;
    let q: Vec<u32> = (0..k * n).map(|_| rng.int(0, 15) as u32).collect();
    let z: Vec<u32> = (0..groups * n).map(|_| rng.int(0, 15) as u32).collect();
    let s: Vec<f16> = (0..groups * n)
        .map(|_| f16::from_f32(rng.float(1e-3, 5e-2)))
        .collect();
    let mut want = vec![0.0f32; n * k];
    for out in 0..n {
        for input in 0..k {
            let g = input / group;
            let diff = q[input * n + out] as i32 - z[g * n + out] as i32;
            want[out * k + input] = s[g * n + out].to_f32() * diff as f32;
        }
    }
    let b = &p.base;
    let stored = vec![
        Stored::i32s(
            format!("{b}.qweight"),
            &[k, n / 8],
            &awq_pack_words(&q, k, n),
        ),
        Stored::i32s(
            format!("{b}.qzeros"),
            &[groups, n / 8],
            &awq_pack_words(&z, groups, n),
        ),
        Stored::new(
            format!("{b}.scales"),
            "F16",
            &[groups, n],
            s.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
    ];
    (stored, want)
}

fn awq_config(group: i64) -> Value {
    json!({"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": true,
           "version": "gemm", "modules_to_not_convert": null})
}

#[test]
fn awq_gemm_loads_the_packed_values() {
    let model = round_trip(awq_config(32), &mut |p, rng| awq_pack(p, 32, rng));
    assert_eq!(model.quant, Some(QuantFormat::Int4));
    let kind = packed_kind(&model, "model.layers.1.block_sparse_moe.experts.3.w2");
    assert_eq!(kind, Some(PackedKind::Int4 { group_size: 32 }));
}

// ---------------------------------------------------------------------------------------------
// bitsandbytes 4-bit

/// bitsandbytes' NF4 table (`get_4bit_type("nf4")`), as its source lists it.
const NF4: [f64; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// bitsandbytes' FP4 table: its source lists `[0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0,
/// -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]` (`-0` a Python integer, so +0.0 in the f32
/// tensor) and divides it by its largest magnitude (12) in f32.
fn fp4_table() -> [f32; 16] {
    let listed = [
        0.0f32, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0,
        -3.0,
    ];
    listed.map(|v| v / 12.0)
}

fn bnb_table(quant_type: &str) -> [f32; 16] {
    match quant_type {
        "nf4" => NF4.map(|v| v as f32),
        _ => fp4_table(),
    }
}

/// The tensors transformers saves for one `Linear4bit` weight `name` `[rows, cols]`.
fn bnb_pack(
    name: &str,
    (rows, cols): (usize, usize),
    quant_type: &str,
    nested: bool,
    rng: &mut Rng,
) -> Packed {
    const BLOCK: usize = 64;
    const NESTED_BLOCK: usize = 256;
    let n = rows * cols;
    let blocks = n.div_ceil(BLOCK);
    let q: Vec<u8> = (0..n).map(|_| rng.int(0, 15) as u8).collect();
    let packed: Vec<u8> = q
        .chunks(2)
        .map(|p| (p[0] << 4) | p.get(1).copied().unwrap_or(0))
        .collect();
    let mut stored = vec![Stored::new(name.into(), "U8", &[n.div_ceil(2), 1], packed)];
    let table = bnb_table(quant_type);
    stored.push(Stored::f32s(format!("{name}.quant_map"), &[16], &table));
    let mut state = json!({"quant_type": quant_type, "blocksize": BLOCK, "dtype": "bfloat16",
                           "shape": [rows, cols]});
    let absmax: Vec<f32> = if nested {
        let qabs: Vec<u8> = (0..blocks).map(|_| rng.int(0, 255) as u8).collect();
        let code: Vec<f32> = (0..256).map(|_| rng.float(-1.0, 1.0)).collect();
        let scales: Vec<f32> = (0..blocks.div_ceil(NESTED_BLOCK))
            .map(|_| rng.float(1e-3, 1e-2))
            .collect();
        let offset = rng.float(0.02, 0.04);
        state["nested_blocksize"] = json!(NESTED_BLOCK);
        state["nested_dtype"] = json!("float32");
        state["nested_offset"] = json!(offset as f64);
        stored.push(Stored::new(
            format!("{name}.absmax"),
            "U8",
            &[blocks],
            qabs.clone(),
        ));
        stored.push(Stored::f32s(
            format!("{name}.nested_absmax"),
            &[scales.len()],
            &scales,
        ));
        stored.push(Stored::f32s(
            format!("{name}.nested_quant_map"),
            &[256],
            &code,
        ));
        qabs.iter()
            .enumerate()
            .map(|(i, &a)| code[a as usize] * scales[i / NESTED_BLOCK] + offset)
            .collect()
    } else {
        let absmax: Vec<f32> = (0..blocks).map(|_| rng.float(1e-2, 5e-2)).collect();
        stored.push(Stored::f32s(format!("{name}.absmax"), &[blocks], &absmax));
        absmax
    };
    let blob = state.to_string().into_bytes();
    stored.push(Stored::new(
        format!("{name}.quant_state.bitsandbytes__{quant_type}"),
        "U8",
        &[blob.len()],
        blob,
    ));
    let want = q
        .iter()
        .enumerate()
        .map(|(i, &c)| table[c as usize] * absmax[i / BLOCK])
        .collect();
    (stored, want)
}

fn bnb_config(quant_type: &str, nested: bool) -> Value {
    json!({"quant_method": "bitsandbytes", "load_in_4bit": true, "load_in_8bit": false,
           "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": nested,
           "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8",
           "llm_int8_skip_modules": null, "llm_int8_threshold": 6.0})
}

#[test]
fn bnb_word_layout_by_hand() {
    // The first two codes share a byte, the first in the high nibble.
    let mut rng = Rng(1);
    let (stored, _) = bnb_pack("w", (1, 2), "nf4", false, &mut rng);
    let q = (stored[0].bytes[0] >> 4, stored[0].bytes[0] & 0x0F);
    let mut again = Rng(1);
    let codes = (again.int(0, 15) as u8, again.int(0, 15) as u8);
    assert_eq!(q, codes);
    assert_eq!(fp4_table()[2], 8.0 / 12.0);
    assert_eq!(fp4_table()[11], -1.0);
}

#[test]
fn bitsandbytes_nf4_and_fp4_load_the_packed_values() {
    for (quant_type, nested) in [("nf4", true), ("fp4", false)] {
        let router = "model.layers.1.block_sparse_moe.gate.weight";
        let (mut tensors, projections) = base_model();
        let mut rng = Rng(11);
        let mut expected = Vec::new();
        for p in &projections {
            let name = format!("{}.weight", p.base);
            let (stored, want) = bnb_pack(&name, (p.rows, p.cols), quant_type, nested, &mut rng);
            tensors.extend(stored);
            expected.push((p.base.clone(), want));
        }
        // transformers 4 quantizes the router too (a Linear): it is dequantized to f32.
        let at = tensors.iter().position(|t| t.name == router).unwrap();
        let shape = tensors.remove(at).shape;
        let (stored, router_want) =
            bnb_pack(router, (shape[0], shape[1]), quant_type, nested, &mut rng);
        tensors.extend(stored);
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), tensors, bnb_config(quant_type, nested));
        let model = load(dir.path()).unwrap();
        assert_eq!(model.quant, Some(QuantFormat::Int4));
        for (base, want) in &expected {
            let got = loaded(&model, base);
            let bad = got
                .iter()
                .zip(want)
                .position(|(g, w)| g.to_bits() != w.to_bits());
            assert!(
                bad.is_none(),
                "{quant_type} {base}: element {bad:?} differs"
            );
        }
        let r = model.weights.layers[1].router.as_ref().unwrap();
        assert!(r.tensor.is_owned());
        assert_eq!(r.data().to_f32_vec(), router_want, "{quant_type} router");
        // Rows of 64 inputs are whole blocks: packed with a table; rows of 96 (w2) are not.
        let table = mixtral::packed::lut4::Lut4::from_name(quant_type).unwrap();
        assert_eq!(
            packed_kind(&model, "model.layers.0.self_attn.o_proj"),
            Some(PackedKind::Lut4 {
                table,
                group_size: 64
            })
        );
        assert_eq!(
            packed_kind(&model, "model.layers.0.block_sparse_moe.experts.1.w2"),
            None
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Refusals

/// The base model with one CT W4 layout, `edit`ed, then loaded: the error.
fn ct_error(config: Value, edit: impl FnOnce(&mut Vec<Stored>)) -> ModelError {
    let ct = Ct {
        bits: 4,
        group: Some(32),
        symmetric: false,
        act_order: None,
    };
    let (mut tensors, projections) = base_model();
    let mut rng = Rng(3);
    for p in &projections {
        tensors.extend(ct_pack(ct, p, &mut rng).0);
    }
    edit(&mut tensors);
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), tensors, config);
    load(dir.path())
        .err()
        .expect("the checkpoint should be refused")
}

fn w4_config() -> Value {
    let ct = Ct {
        bits: 4,
        group: Some(32),
        symmetric: false,
        act_order: None,
    };
    ct_config(ct, "pack-quantized")
}

const Q0: &str = "model.layers.0.self_attn.q_proj";

#[test]
fn an_unknown_format_is_refused_by_method_and_format_before_its_tensors() {
    let mut config = w4_config();
    config["format"] = json!("marlin-24");
    config["config_groups"]["group_0"]["format"] = json!("marlin-24");
    // A side tensor of a type the reader does not know: the config is refused first.
    let err = ct_error(config, |t| {
        t.push(Stored::new(format!("{Q0}.meta"), "I16", &[2], vec![0; 4]));
    });
    assert!(
        matches!(&err, ModelError::Quant(QuantError::UnsupportedFormat { method, format, .. })
            if method == "compressed-tensors" && format == "marlin-24"),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("quant_method `compressed-tensors` format `marlin-24` is not supported")
            && text.contains("; supported: compressed-tensors"),
        "{text}"
    );
    let err = ct_error(json!({"quant_method": "hqq"}), |_| {});
    assert!(err.to_string().contains("quant_method `hqq`"), "{err}");
}

#[test]
fn malformed_pack_quantized_tensors_are_typed_errors() {
    let target = format!("{Q0}.weight_shape");
    let err = ct_error(w4_config(), |t| {
        let s = t.iter_mut().find(|s| s.name == target).unwrap();
        s.bytes[..8].copy_from_slice(&65i64.to_le_bytes());
    });
    assert!(
        matches!(&err, ModelError::Quant(QuantError::Unsupported { tensor, .. }) if *tensor == target),
        "{err}"
    );
    let target = format!("{Q0}.weight_packed");
    let err = ct_error(w4_config(), |t| {
        let s = t.iter_mut().find(|s| s.name == target).unwrap();
        s.shape = vec![s.shape[0] / 2, s.shape[1] * 2];
    });
    assert!(
        matches!(&err, ModelError::Quant(QuantError::Shape { tensor, .. }) if *tensor == target),
        "{err}"
    );
    let target = format!("{Q0}.weight_zero_point");
    let err = ct_error(w4_config(), |t| {
        t.retain(|s| s.name != format!("{Q0}.weight_scale"))
    });
    assert!(
        matches!(&err, ModelError::Quant(QuantError::Missing { tensor, .. }) if *tensor == format!("{Q0}.weight_scale")),
        "{err}"
    );
    let err = ct_error(w4_config(), |t| {
        t.iter_mut().find(|s| s.name == target).unwrap().dtype = "F32";
    });
    assert!(
        matches!(&err, ModelError::Quant(QuantError::DType { tensor, .. }) if *tensor == target),
        "{err}"
    );
}

#[test]
fn a_bnb_table_other_than_the_builtin_one_is_refused() {
    let (mut tensors, projections) = base_model();
    let mut rng = Rng(5);
    for p in &projections {
        let name = format!("{}.weight", p.base);
        tensors.extend(bnb_pack(&name, (p.rows, p.cols), "nf4", false, &mut rng).0);
    }
    let target = format!("{Q0}.weight.quant_map");
    let map = tensors.iter_mut().find(|t| t.name == target).unwrap();
    map.bytes[..4].copy_from_slice(&(-0.9f32).to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), tensors, bnb_config("nf4", false));
    let err = load(dir.path()).err().unwrap();
    assert!(
        matches!(&err, ModelError::Quant(QuantError::Unsupported { tensor, .. }) if *tensor == target),
        "{err}"
    );
}

#[test]
fn awq_scales_disagreeing_with_the_declared_group_size_are_refused() {
    let (mut tensors, projections) = base_model();
    let mut rng = Rng(9);
    for p in &projections {
        tensors.extend(awq_pack(p, 32, &mut rng).0);
    }
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), tensors, awq_config(16));
    let err = load(dir.path()).err().unwrap();
    assert!(
        matches!(&err, ModelError::Quant(QuantError::Shape { tensor, .. }) if tensor.ends_with(".scales")),
        "{err}"
    );
}
