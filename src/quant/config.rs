//! The `quantization_config` object of `config.json`: which tool and layout wrote a pre-quantized
//! checkpoint ([`QuantMethod`]). It is read before any tensor, so that a method or format this
//! crate does not read is refused by name ([`QuantError::UnsupportedFormat`]) rather than through
//! a complaint about one of its tensors.
//!
//! Read (keys as the tools write them):
//! - `quant_method: "compressed-tensors"`: `format` (top level, or per entry of `config_groups`)
//!   `float-quantized` / `int-quantized` (8-bit weights, strategy `tensor` or `channel`,
//!   symmetric) or `pack-quantized` (`type: int`, `num_bits` 4 or 8, strategy `group` or
//!   `channel`, symmetric or not, any `actorder`); each entry's `weights` holds `num_bits`,
//!   `type`, `symmetric`, `strategy`, `group_size`. A non-empty `sparsity_config` or
//!   `transform_config` is refused;
//! - `quant_method: "gptq"`: `bits` 4, `checkpoint_format` (or `format`) `gptq` (the default) or
//!   `gptq_v2`;
//! - `quant_method: "awq"`: `version` `gemm`, `bits` (or `w_bit`) 4, `zero_point: true`,
//!   `group_size` (or `q_group_size`; -1 for the whole row);
//! - `quant_method: "bitsandbytes"`: `load_in_4bit: true`, `bnb_4bit_quant_type` `nf4` or `fp4`,
//!   `bnb_4bit_quant_storage` `uint8` when present (double quantization and the compute dtype are
//!   read from each tensor's own quant state);
//! - `quant_method: "fp8"`.

use super::{GptqZeros, QuantError, QuantFormat};
use crate::packed::lut4::Lut4;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// What the loader accepts, for the error message.
pub const SUPPORTED: &str = "compressed-tensors float-quantized / int-quantized (8-bit, per \
     tensor or channel, symmetric), compressed-tensors pack-quantized (int 4 or 8-bit, group or \
     channel, symmetric or asymmetric, act-order), gptq / gptq_v2 (4-bit), awq gemm (4-bit with \
     zero points), bitsandbytes load_in_4bit (nf4, fp4, with or without double quantization), fp8";

/// The method (and its parameters) a checkpoint's `quantization_config` declares.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum QuantMethod {
    /// No `quantization_config`: the tensors decide (FP8 / INT8 weights with `weight_scale`, GPTQ
    /// `qweight`).
    #[default]
    None,
    /// GPTQ, with its zero-point convention.
    Gptq(GptqZeros),
    /// `quant_method: fp8` (FP8 weights with `weight_scale`).
    Fp8,
    /// compressed-tensors, with the `num_bits` of its `pack-quantized` groups.
    CompressedTensors {
        /// `num_bits` of every `pack-quantized` group (empty when there is none).
        pack_bits: Vec<u32>,
        /// The declared format of its first quantized group.
        format: Option<QuantFormat>,
    },
    /// AutoAWQ GEMM, 4-bit with zero points.
    Awq {
        /// Inputs per group, when declared (`None` for -1 or absent: taken from the tensors).
        group_size: Option<usize>,
    },
    /// bitsandbytes 4-bit.
    Bitsandbytes {
        /// The declared table (each tensor's quant state has the last word).
        table: Lut4,
    },
}

impl QuantMethod {
    /// Reads `quantization_config` from the `config.json` at `path` (no file, no object: `None`).
    pub fn from_config_file(path: &Path) -> Result<QuantMethod, QuantError> {
        let Ok(text) = std::fs::read_to_string(path) else {
            return Ok(QuantMethod::None);
        };
        let value: Value = serde_json::from_str(&text).map_err(|e| QuantError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        match value.get("quantization_config") {
            None | Some(Value::Null) => Ok(QuantMethod::None),
            Some(q) => QuantMethod::from_value(q, path),
        }
    }

    /// Reads a `quantization_config` object (`path` names the file in errors).
    pub fn from_value(q: &Value, path: &Path) -> Result<QuantMethod, QuantError> {
        let r = Reader { q, path };
        let Some(method) = q.get("quant_method").and_then(Value::as_str) else {
            return Err(r.config("quantization_config has no string `quant_method`"));
        };
        match method {
            "gptq" => r.gptq(),
            "fp8" => Ok(QuantMethod::Fp8),
            "compressed-tensors" => r.compressed_tensors(),
            "awq" => r.awq(),
            "bitsandbytes" => r.bitsandbytes(),
            other => {
                let format = ["format", "checkpoint_format", "version"]
                    .iter()
                    .find_map(|k| q.get(*k).and_then(Value::as_str))
                    .unwrap_or("-");
                Err(r.unsupported(other, format, String::new()))
            }
        }
    }

    /// The format of the quantized projections the method declares, when it declares one.
    pub fn format(&self) -> Option<QuantFormat> {
        match self {
            QuantMethod::None => None,
            QuantMethod::Gptq(_) | QuantMethod::Awq { .. } | QuantMethod::Bitsandbytes { .. } => {
                Some(QuantFormat::Int4)
            }
            QuantMethod::Fp8 => Some(QuantFormat::Fp8),
            QuantMethod::CompressedTensors { format, .. } => *format,
        }
    }

    /// The GPTQ zero-point convention (the original one unless `gptq_v2` is declared).
    pub fn gptq_zeros(&self) -> GptqZeros {
        match self {
            QuantMethod::Gptq(z) => *z,
            _ => GptqZeros::MinusOne,
        }
    }
}

/// A `quantization_config` being read.
struct Reader<'a> {
    q: &'a Value,
    path: &'a Path,
}

impl Reader<'_> {
    fn config(&self, message: impl Into<String>) -> QuantError {
        QuantError::Config {
            path: self.path.to_path_buf(),
            message: message.into(),
        }
    }

    fn unsupported(&self, method: &str, format: &str, detail: String) -> QuantError {
        QuantError::UnsupportedFormat {
            path: PathBuf::from(self.path),
            method: method.into(),
            format: format.into(),
            detail,
        }
    }

    fn str_of<'v>(v: &'v Value, key: &str) -> Option<&'v str> {
        v.get(key).and_then(Value::as_str)
    }

    fn int_of(v: &Value, keys: &[&str]) -> Option<i64> {
        keys.iter().find_map(|k| v.get(*k).and_then(Value::as_i64))
    }

    fn gptq(&self) -> Result<QuantMethod, QuantError> {
        let format = Self::str_of(self.q, "checkpoint_format")
            .or_else(|| Self::str_of(self.q, "format"))
            .unwrap_or("gptq");
        let zeros = match format {
            "gptq" => GptqZeros::MinusOne,
            "gptq_v2" => GptqZeros::Exact,
            other => return Err(self.unsupported("gptq", other, String::new())),
        };
        match Self::int_of(self.q, &["bits"]).unwrap_or(4) {
            4 => Ok(QuantMethod::Gptq(zeros)),
            bits => Err(self.unsupported("gptq", format, format!(" ({bits}-bit)"))),
        }
    }

    fn awq(&self) -> Result<QuantMethod, QuantError> {
        let version = Self::str_of(self.q, "version").unwrap_or("gemm");
        if !version.eq_ignore_ascii_case("gemm") {
            return Err(self.unsupported("awq", version, String::new()));
        }
        let bits = Self::int_of(self.q, &["bits", "w_bit"]).unwrap_or(4);
        let zero_point = self.q.get("zero_point").and_then(Value::as_bool);
        if bits != 4 || zero_point == Some(false) {
            let detail = format!(" ({bits}-bit, zero_point {})", zero_point.unwrap_or(true));
            return Err(self.unsupported("awq", version, detail));
        }
        let group_size = match Self::int_of(self.q, &["group_size", "q_group_size"]) {
            Some(g) if g > 0 => Some(g as usize),
            Some(-1) | None => None,
            Some(g) => return Err(self.config(format!("awq group_size {g} is not positive"))),
        };
        Ok(QuantMethod::Awq { group_size })
    }

    fn bitsandbytes(&self) -> Result<QuantMethod, QuantError> {
        let flag = |k: &str| self.q.get(k).and_then(Value::as_bool).unwrap_or(false);
        if !flag("load_in_4bit") {
            let format = if flag("load_in_8bit") {
                "load_in_8bit"
            } else {
                "-"
            };
            return Err(self.unsupported("bitsandbytes", format, String::new()));
        }
        let quant_type = Self::str_of(self.q, "bnb_4bit_quant_type").unwrap_or("fp4");
        let storage = Self::str_of(self.q, "bnb_4bit_quant_storage").unwrap_or("uint8");
        match Lut4::from_name(quant_type) {
            Some(table) if storage == "uint8" => Ok(QuantMethod::Bitsandbytes { table }),
            _ => Err(self.unsupported(
                "bitsandbytes",
                &format!("load_in_4bit {quant_type}"),
                format!(" (storage {storage})"),
            )),
        }
    }

    fn compressed_tensors(&self) -> Result<QuantMethod, QuantError> {
        const METHOD: &str = "compressed-tensors";
        let top = Self::str_of(self.q, "format").unwrap_or("-");
        for key in ["sparsity_config", "transform_config"] {
            let Some(v) = self.q.get(key) else { continue };
            let empty = v.is_null() || v.as_object().is_some_and(|o| o.is_empty());
            let sparsity_dense = Self::str_of(v, "format") == Some("dense");
            if !empty && !sparsity_dense {
                let name = Self::str_of(v, "format").unwrap_or(key);
                return Err(self.unsupported(METHOD, name, format!(" ({key} is not empty)")));
            }
        }
        let Some(groups) = self.q.get("config_groups").and_then(Value::as_object) else {
            return Err(self.config("compressed-tensors quantization_config has no config_groups"));
        };
        let mut pack_bits = Vec::new();
        let mut declared = None;
        for group in groups.values() {
            let format = Self::str_of(group, "format").unwrap_or(top);
            let Some(w) = group.get("weights").filter(|w| !w.is_null()) else {
                continue;
            };
            let kind = Self::str_of(w, "type").unwrap_or("int");
            let bits = Self::int_of(w, &["num_bits"]).unwrap_or(8);
            let strategy = Self::str_of(w, "strategy").unwrap_or("tensor");
            let symmetric = w.get("symmetric").and_then(Value::as_bool).unwrap_or(true);
            let detail = format!(
                " (weights: {kind} {bits}-bit, strategy {strategy}, {})",
                if symmetric { "symmetric" } else { "asymmetric" }
            );
            let per_row = matches!(strategy, "tensor" | "channel");
            let f = match (format, kind, bits) {
                ("float-quantized", "float", 8) if per_row && symmetric => QuantFormat::Fp8,
                ("int-quantized", "int", 8) if per_row && symmetric => QuantFormat::Int8,
                ("pack-quantized", "int", 4 | 8) if matches!(strategy, "group" | "channel") => {
                    pack_bits.push(bits as u32);
                    if bits == 4 {
                        QuantFormat::Int4
                    } else {
                        QuantFormat::Int8
                    }
                }
                _ => return Err(self.unsupported(METHOD, format, detail)),
            };
            declared.get_or_insert(f);
        }
        Ok(QuantMethod::CompressedTensors {
            pack_bits,
            format: declared,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(q: Value) -> Result<QuantMethod, QuantError> {
        QuantMethod::from_value(&q, Path::new("config.json"))
    }

    fn refusal(q: Value) -> String {
        match read(q) {
            Err(e @ QuantError::UnsupportedFormat { .. }) => e.to_string(),
            other => panic!("expected an unsupported-format error, got {other:?}"),
        }
    }

    fn ct(format: &str, weights: Value) -> Value {
        json!({"quant_method": "compressed-tensors", "format": format,
               "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
               "ignore": ["lm_head"], "sparsity_config": {}, "transform_config": {}})
    }

    #[test]
    fn supported_methods_are_read() {
        let w4 = json!({"num_bits": 4, "type": "int", "symmetric": false, "strategy": "group",
                        "group_size": 128, "actorder": "group"});
        assert_eq!(
            read(ct("pack-quantized", w4)).unwrap(),
            QuantMethod::CompressedTensors {
                pack_bits: vec![4],
                format: Some(QuantFormat::Int4)
            }
        );
        let w8 = json!({"num_bits": 8, "type": "int", "symmetric": true, "strategy": "channel"});
        assert_eq!(
            read(ct("pack-quantized", w8)).unwrap().format(),
            Some(QuantFormat::Int8)
        );
        let awq = json!({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": true,
                         "version": "gemm", "modules_to_not_convert": null});
        assert_eq!(
            read(awq).unwrap(),
            QuantMethod::Awq {
                group_size: Some(128)
            }
        );
        let bnb = json!({"quant_method": "bitsandbytes", "load_in_4bit": true,
                         "load_in_8bit": false, "bnb_4bit_quant_type": "nf4",
                         "bnb_4bit_use_double_quant": true, "bnb_4bit_compute_dtype": "bfloat16",
                         "bnb_4bit_quant_storage": "uint8"});
        assert_eq!(
            read(bnb).unwrap(),
            QuantMethod::Bitsandbytes { table: Lut4::Nf4 }
        );
        let gptq = json!({"quant_method": "gptq", "bits": 4, "checkpoint_format": "gptq_v2"});
        assert_eq!(read(gptq).unwrap(), QuantMethod::Gptq(GptqZeros::Exact));
    }

    #[test]
    fn unknown_methods_and_formats_are_named() {
        let e = refusal(ct(
            "marlin-24",
            json!({"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}),
        ));
        assert!(
            e.contains("quant_method `compressed-tensors` format `marlin-24` is not supported"),
            "{e}"
        );
        assert!(e.contains("supported: "), "{e}");
        let e = refusal(ct(
            "float-quantized",
            json!({"num_bits": 8, "type": "float", "strategy": "block"}),
        ));
        assert!(
            e.contains("`float-quantized`") && e.contains("strategy block"),
            "{e}"
        );
        let mut sparse = ct(
            "pack-quantized",
            json!({"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}),
        );
        sparse["sparsity_config"] = json!({"format": "sparse-24-bitmask"});
        assert!(refusal(sparse).contains("`sparse-24-bitmask`"));
        let e = refusal(json!({"quant_method": "hqq", "nbits": 4}));
        assert!(e.contains("quant_method `hqq` format `-`"), "{e}");
        let e = refusal(json!({"quant_method": "awq", "version": "gemv_fast", "bits": 4}));
        assert!(e.contains("quant_method `awq` format `gemv_fast`"), "{e}");
        let e = refusal(json!({"quant_method": "bitsandbytes", "load_in_8bit": true}));
        assert!(e.contains("format `load_in_8bit`"), "{e}");
        let e = refusal(json!({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}));
        assert!(e.contains("quant_method `gptq` format `marlin`"), "{e}");
        assert!(refusal(json!({"quant_method": "gptq", "bits": 8})).contains("8-bit"));
        assert!(matches!(
            read(json!({"bits": 4})),
            Err(QuantError::Config { .. })
        ));
    }
}
