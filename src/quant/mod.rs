//! Quantized weights: the format choice ([`QuantFormat`]), loading them ([`load`]) and the memory
//! they need ([`memory`]).
//!
//! Two ways in, one result: a bf16/f16/f32 checkpoint quantized as it is loaded
//! ([`crate::LoadOptions::quant`], `mixtral-run --quantize`), or a checkpoint published already
//! quantized, recognised by its tensors once `config.json`'s `quantization_config` has been
//! checked ([`config`]): FP8 / INT8 (`compressed-tensors` float- / int-quantized, `fp8`), GPTQ
//! 4-bit, compressed-tensors `pack-quantized` 4 / 8-bit, AutoAWQ GEMM 4-bit, bitsandbytes NF4 /
//! FP4. Only the attention projections (q, k, v, o) and the expert matrices (w1, w2, w3) are
//! quantized; the norms, the embedding and the LM head always stay in their stored precision, and
//! so does the router unless a tool quantized it (bitsandbytes, `pack-quantized`), when it is
//! dequantized to f32.
//!
//! Quantized matrices are held in one packed layout, defined with the encodings in
//! [`crate::packed`] (re-exported here: [`fp8`], [`int4`], [`int8`], [`PackedMatrix`],
//! [`PackedKind`]). The GPU engine uploads it as it is and its kernels dequantize in registers; the
//! CPU reference path dequantizes each matrix to f32 on first use ([`PackedMatrix::dequantize`],
//! the one definition of the values both backends use) and the f32 CPU engine runs unchanged.
//!
//! Dependencies run one way: this module reads checkpoints ([`crate::checkpoint`]) into
//! [`crate::weights`] and uses [`crate::packed`]; none of those uses this module.

pub mod awq;
pub mod bnb;
pub mod compressed;
pub mod config;
pub mod load;
pub mod memory;
pub mod packed;

use crate::dtype::RawDType;
use crate::weights::WeightsError;
use std::path::PathBuf;

pub use crate::packed::{fp8, int4, int8, PackedKind, PackedMatrix, Q8};
pub use config::QuantMethod;
pub use load::{declared_format, load_weights, loaded_format, GptqZeros, QuantizedWeights};
pub use memory::{decode_weight_bytes, estimate_memory, MemoryEstimate};

/// A weight format of the quantizable projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// Not quantized: bf16 (the released checkpoints; also stands for f16/f32 storage).
    Bf16,
    /// FP8 E4M3 with a scale per output channel (on load) or as published (per tensor/channel).
    Fp8,
    /// INT8 with a symmetric scale per output channel (also compressed-tensors 8-bit
    /// `pack-quantized` as published).
    Int8,
    /// 4-bit: RTN groups of 128 on load (asymmetric), or as published: GPTQ, compressed-tensors
    /// 4-bit `pack-quantized`, AutoAWQ, bitsandbytes NF4 / FP4.
    Int4,
}

impl QuantFormat {
    /// The name used on the command line (`bf16`, `fp8`, `int8`, `int4`).
    pub fn as_str(self) -> &'static str {
        match self {
            QuantFormat::Bf16 => "bf16",
            QuantFormat::Fp8 => "fp8",
            QuantFormat::Int8 => "int8",
            QuantFormat::Int4 => "int4",
        }
    }
}

impl std::fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for QuantFormat {
    type Err = QuantError;
    /// `bf16` (also `none`), `fp8`, `int8`, `int4` (case-insensitive).
    fn from_str(s: &str) -> Result<Self, QuantError> {
        match s.to_ascii_lowercase().as_str() {
            "bf16" | "none" => Ok(QuantFormat::Bf16),
            "fp8" => Ok(QuantFormat::Fp8),
            "int8" => Ok(QuantFormat::Int8),
            "int4" => Ok(QuantFormat::Int4),
            _ => Err(QuantError::UnknownFormat { name: s.into() }),
        }
    }
}

/// Why quantized weights could not be loaded or produced; every variant names the tensor.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// A format name that is none of `bf16`, `fp8`, `int8`, `int4`.
    #[error("unknown quantization format `{name}` (expected bf16, fp8, int8 or int4)")]
    UnknownFormat {
        /// The name given.
        name: String,
    },
    /// A high-precision tensor missing or of the wrong shape.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// A tensor a quantized projection needs is absent (e.g. its scales).
    #[error("tensor `{tensor}` is missing: the quantized projection `{projection}` needs it")]
    Missing {
        /// The absent tensor.
        tensor: String,
        /// The projection it belongs to.
        projection: String,
    },
    /// A quantized tensor's shape disagrees with the configuration.
    #[error("{path}: tensor `{tensor}` has shape {found:?}, expected {expected}")]
    Shape {
        /// The file holding it.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What was expected, in words (e.g. `[8, 96] (in / 8, out)`).
        expected: String,
        /// Its shape.
        found: Vec<usize>,
    },
    /// A quantized tensor's element type is not the one its role needs.
    #[error("{path}: tensor `{tensor}` has dtype {found}, expected {expected}")]
    DType {
        /// The file holding it.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The accepted types, in words.
        expected: &'static str,
        /// Its type.
        found: RawDType,
    },
    /// A GPTQ `g_idx` entry names a group that does not exist.
    #[error("{path}: tensor `{tensor}`: entry {index} is {value}, outside 0..{groups}")]
    GroupIndex {
        /// The file holding it.
        path: PathBuf,
        /// The `g_idx` tensor.
        tensor: String,
        /// Position of the bad entry.
        index: usize,
        /// The value.
        value: i64,
        /// Number of groups.
        groups: usize,
    },
    /// A scale that is negative, zero, NaN or infinite.
    #[error("{path}: tensor `{tensor}`: scale {index} is {value}, not a positive finite number")]
    BadScale {
        /// The file holding it.
        path: PathBuf,
        /// The scale tensor.
        tensor: String,
        /// Position of the bad scale.
        index: usize,
        /// The value.
        value: f32,
    },
    /// A tensor that must stay in high precision (router, norm, embedding, LM head) is stored in a
    /// packed type, or a layout this loader does not read (e.g. GPTQ with other than 4 bits).
    #[error("{path}: tensor `{tensor}`: {reason}")]
    Unsupported {
        /// The file holding it.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Why.
        reason: String,
    },
    /// Quantizing on load was asked for a checkpoint already published in another format.
    #[error(
        "tensor `{tensor}` is already stored as {found}; quantizing it to {requested} on load is \
         not supported (load the directory without a quantization option)"
    )]
    Conflict {
        /// A pre-quantized tensor.
        tensor: String,
        /// The format asked for.
        requested: QuantFormat,
        /// The format it is stored in.
        found: QuantFormat,
    },
    /// `config.json`'s `quantization_config` declares a method or format this crate does not
    /// read.
    #[error(
        "{path}: quant_method `{method}` format `{format}` is not supported{detail}; supported: {}",
        config::SUPPORTED
    )]
    UnsupportedFormat {
        /// The `config.json`.
        path: PathBuf,
        /// `quant_method`.
        method: String,
        /// The method's format (`format`, `checkpoint_format`, `version`, ...), `-` when none.
        format: String,
        /// More about what was declared (e.g. ` (weights: int 4-bit, strategy tensor)`), or empty.
        detail: String,
    },
    /// `config.json` could not be read for its `quantization_config`.
    #[error("{path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
}
