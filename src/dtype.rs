//! Element types of checkpoint tensors and borrowed, typed views of weight data.
//!
//! A [`WeightSlice`] is what every CPU op reads: a row-major matrix `[rows, cols]` (or a vector) in
//! the checkpoint's own precision, converted to f32 element by element as it is used.

use half::{bf16, f16};

/// Storage type of a weight tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// bfloat16 (the released Mixtral checkpoints).
    BF16,
    /// IEEE half precision.
    F16,
    /// IEEE single precision.
    F32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }

    /// From a safetensors header dtype string (`BF16`, `F16`, `F32`).
    pub fn from_safetensors_name(name: &str) -> Option<Self> {
        match name {
            "BF16" => Some(DType::BF16),
            "F16" => Some(DType::F16),
            "F32" => Some(DType::F32),
            _ => None,
        }
    }

    /// From a torch dtype name as written in config.json (`bfloat16`, `float16`, `float32`, ...).
    pub fn from_torch_name(name: &str) -> Option<Self> {
        match name {
            "bfloat16" => Some(DType::BF16),
            "float16" | "half" => Some(DType::F16),
            "float32" | "float" => Some(DType::F32),
            _ => None,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::F32 => "F32",
        })
    }
}

/// Borrowed weight data in its storage precision.
#[derive(Debug, Clone, Copy)]
pub enum WeightSlice<'a> {
    /// bfloat16 elements.
    BF16(&'a [bf16]),
    /// half-precision elements.
    F16(&'a [f16]),
    /// single-precision elements.
    F32(&'a [f32]),
}

impl<'a> WeightSlice<'a> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            WeightSlice::BF16(s) => s.len(),
            WeightSlice::F16(s) => s.len(),
            WeightSlice::F32(s) => s.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Storage type.
    pub fn dtype(&self) -> DType {
        match self {
            WeightSlice::BF16(_) => DType::BF16,
            WeightSlice::F16(_) => DType::F16,
            WeightSlice::F32(_) => DType::F32,
        }
    }

    /// Elements `range` as a slice of the same type.
    pub fn slice(&self, range: std::ops::Range<usize>) -> WeightSlice<'a> {
        match self {
            WeightSlice::BF16(s) => WeightSlice::BF16(&s[range]),
            WeightSlice::F16(s) => WeightSlice::F16(&s[range]),
            WeightSlice::F32(s) => WeightSlice::F32(&s[range]),
        }
    }

    /// Element `i` as f32.
    pub fn get(&self, i: usize) -> f32 {
        match self {
            WeightSlice::BF16(s) => s[i].to_f32(),
            WeightSlice::F16(s) => s[i].to_f32(),
            WeightSlice::F32(s) => s[i],
        }
    }

    /// Converts elements into `out` (which must have the same length) as f32.
    pub fn to_f32_into(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.len(), "to_f32_into: length mismatch");
        match self {
            WeightSlice::BF16(s) => {
                for (o, x) in out.iter_mut().zip(s.iter()) {
                    *o = f32::from_bits((x.to_bits() as u32) << 16);
                }
            }
            WeightSlice::F16(s) => {
                for (o, x) in out.iter_mut().zip(s.iter()) {
                    *o = x.to_f32();
                }
            }
            WeightSlice::F32(s) => out.copy_from_slice(s),
        }
    }

    /// All elements as a new f32 vector.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        self.to_f32_into(&mut out);
        out
    }
}

/// Storage type of any tensor a checkpoint may hold: the float weight types of [`DType`] plus the
/// packed types of pre-quantized checkpoints (FP8 E4M3 weights, GPTQ's int32 words, int8/uint8,
/// and int64 side tensors such as compressed-tensors' `weight_shape`).
///
/// Only [`DType`] tensors are weights the engine reads directly; the others are read through
/// [`crate::checkpoint::RawTensor`] and dequantized by [`crate::quant`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RawDType {
    /// A float weight type.
    Float(DType),
    /// OCP FP8 E4M3 (`F8_E4M3`): 1 sign, 4 exponent (bias 7), 3 mantissa bits, no infinities.
    F8E4M3,
    /// Little-endian signed 32-bit integers (`I32`).
    I32,
    /// Little-endian signed 64-bit integers (`I64`).
    I64,
    /// Signed bytes (`I8`).
    I8,
    /// Unsigned bytes (`U8`).
    U8,
}

impl RawDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            RawDType::Float(d) => d.size(),
            RawDType::F8E4M3 | RawDType::I8 | RawDType::U8 => 1,
            RawDType::I32 => 4,
            RawDType::I64 => 8,
        }
    }

    /// From a safetensors header dtype string (`BF16`, `F16`, `F32`, `F8_E4M3`, `I32`, `I64`,
    /// `I8`, `U8`).
    pub fn from_safetensors_name(name: &str) -> Option<Self> {
        if let Some(d) = DType::from_safetensors_name(name) {
            return Some(RawDType::Float(d));
        }
        match name {
            "F8_E4M3" => Some(RawDType::F8E4M3),
            "I32" => Some(RawDType::I32),
            "I64" => Some(RawDType::I64),
            "I8" => Some(RawDType::I8),
            "U8" => Some(RawDType::U8),
            _ => None,
        }
    }

    /// The float weight type, when this is one.
    pub fn float(self) -> Option<DType> {
        match self {
            RawDType::Float(d) => Some(d),
            _ => None,
        }
    }
}

impl std::fmt::Display for RawDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RawDType::Float(d) => d.fmt(f),
            RawDType::F8E4M3 => f.write_str("F8_E4M3"),
            RawDType::I32 => f.write_str("I32"),
            RawDType::I64 => f.write_str("I64"),
            RawDType::I8 => f.write_str("I8"),
            RawDType::U8 => f.write_str("U8"),
        }
    }
}
