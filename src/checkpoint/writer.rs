//! Writes safetensors files: `[u64 header_len][JSON header, space-padded][data]`, streaming each
//! tensor's elements from a producer so no file is ever held in memory whole ([`write_safetensors`]),
//! or from given bytes of any dtype ([`write_tensor_bytes`]). The header is padded so the data
//! section starts at a multiple of 8 bytes, or ([`HeaderPadding::Odd`]) at an odd offset, as a
//! writer that does not pad leaves it half the time. Also writes raw files with a caller-chosen
//! header, for crafting invalid inputs.

use crate::dtype::{DType, RawDType};
use rayon::prelude::*;
use std::io::{self, Write};
use std::path::Path;

/// Produces elements `start..start + out.len()` (row-major) of a tensor, as f32.
pub type FillFn<'a> = dyn Fn(usize, &mut [f32]) + Sync + 'a;

/// One tensor to write: its header entry and the producer of its elements (converted to `dtype`
/// as they are written).
pub struct TensorSource<'a> {
    /// Tensor name.
    pub name: String,
    /// Storage type.
    pub dtype: DType,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// The elements.
    pub fill: Box<FillFn<'a>>,
}

/// Where the header's space padding makes the data section start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeaderPadding {
    /// At a multiple of 8 bytes (what the safetensors library writes): with larger elements
    /// first, every tensor is aligned to its element size.
    #[default]
    Aligned,
    /// At an odd byte offset, so that no tensor of elements wider than one byte is aligned: what a
    /// writer that does not pad the header (GPTQModel 5.x) produces when the JSON length is odd.
    /// The format allows it; readers must too.
    Odd,
}

/// One tensor given as its stored little-endian bytes, of any dtype the reader accepts.
#[derive(Debug, Clone, Copy)]
pub struct TensorBytes<'a> {
    /// Tensor name.
    pub name: &'a str,
    /// Storage type.
    pub dtype: RawDType,
    /// Shape, outermost first.
    pub shape: &'a [usize],
    /// The data: `elements * dtype.size()` bytes.
    pub bytes: &'a [u8],
}

/// Elements produced per task.
const CHUNK: usize = 1 << 18;

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// Elements of `shape`, or an error when the count overflows.
fn elements(name: &str, shape: &[usize]) -> io::Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| invalid(format!("tensor `{name}`: shape {shape:?} overflows")))
}

/// The header of a file holding `tensors` back to back in the given order, space-padded so that
/// the data section starts at a multiple of 8 bytes. Returns the header bytes and the data length.
/// (Every tensor is aligned to its element size when the order puts larger elements first, as
/// [`write_safetensors`] does.)
pub fn safetensors_header(tensors: &[(&str, DType, &[usize])]) -> io::Result<(Vec<u8>, u64)> {
    let tensors: Vec<(&str, RawDType, &[usize])> = tensors
        .iter()
        .map(|&(name, dtype, shape)| (name, RawDType::Float(dtype), shape))
        .collect();
    safetensors_header_with(&tensors, HeaderPadding::Aligned)
}

/// [`safetensors_header`] for tensors of any dtype, padded as `padding` says.
pub fn safetensors_header_with(
    tensors: &[(&str, RawDType, &[usize])],
    padding: HeaderPadding,
) -> io::Result<(Vec<u8>, u64)> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0u64;
    for &(name, dtype, shape) in tensors {
        let bytes = elements(name, shape)?
            .checked_mul(dtype.size())
            .ok_or_else(|| invalid(format!("tensor `{name}`: byte count overflows")))?;
        let end = offset + bytes as u64;
        let entry = serde_json::json!({
            "dtype": dtype.to_string(),
            "shape": shape,
            "data_offsets": [offset, end],
        });
        if map.insert(name.to_string(), entry).is_some() {
            return Err(invalid(format!("tensor `{name}` given twice")));
        }
        offset = end;
    }
    let mut header = serde_json::to_vec(&map).map_err(|e| invalid(e.to_string()))?;
    let done = |len: usize| match padding {
        HeaderPadding::Aligned => len.is_multiple_of(8),
        HeaderPadding::Odd => !len.is_multiple_of(2),
    };
    while !done(8 + header.len()) {
        header.push(b' ');
    }
    Ok((header, offset))
}

/// Writes `header` verbatim (its length as 8 bytes little-endian first), then `data`.
pub fn write_raw_safetensors(path: &Path, header: &[u8], data: &[u8]) -> io::Result<()> {
    let mut file = io::BufWriter::new(std::fs::File::create(path)?);
    file.write_all(&(header.len() as u64).to_le_bytes())?;
    file.write_all(header)?;
    file.write_all(data)?;
    file.flush()
}

/// Writes a valid safetensors file holding `tensors` in order, producing the elements in parallel
/// chunks and streaming them to disk.
///
/// The data are laid out by element size, largest first (stable otherwise), so that every tensor
/// is aligned to its element size.
pub fn write_safetensors(path: &Path, tensors: &[TensorSource<'_>]) -> io::Result<()> {
    write_safetensors_with(path, tensors, HeaderPadding::Aligned)
}

/// Writes a valid safetensors file holding `tensors` with their given bytes, in the given order,
/// the header padded as `padding` says. Every tensor's byte count must match its dtype and shape.
pub fn write_tensor_bytes(
    path: &Path,
    tensors: &[TensorBytes<'_>],
    padding: HeaderPadding,
) -> io::Result<()> {
    let mut entries = Vec::with_capacity(tensors.len());
    for t in tensors {
        let expected = elements(t.name, t.shape)?.checked_mul(t.dtype.size());
        if expected != Some(t.bytes.len()) {
            return Err(invalid(format!(
                "tensor `{}`: {} shape {:?} needs {expected:?} bytes, given {}",
                t.name,
                t.dtype,
                t.shape,
                t.bytes.len()
            )));
        }
        entries.push((t.name, t.dtype, t.shape));
    }
    let (header, _) = safetensors_header_with(&entries, padding)?;
    let mut file = io::BufWriter::new(std::fs::File::create(path)?);
    file.write_all(&(header.len() as u64).to_le_bytes())?;
    file.write_all(&header)?;
    for t in tensors {
        file.write_all(t.bytes)?;
    }
    file.flush()
}

/// [`write_safetensors`] with the header padded as `padding` says ([`HeaderPadding::Odd`]: every
/// tensor of elements wider than a byte at an unaligned offset).
pub fn write_safetensors_with(
    path: &Path,
    tensors: &[TensorSource<'_>],
    padding: HeaderPadding,
) -> io::Result<()> {
    let mut tensors: Vec<&TensorSource<'_>> = tensors.iter().collect();
    tensors.sort_by_key(|t| std::cmp::Reverse(t.dtype.size()));
    let entries: Vec<(&str, RawDType, &[usize])> = tensors
        .iter()
        .map(|t| {
            (
                t.name.as_str(),
                RawDType::Float(t.dtype),
                t.shape.as_slice(),
            )
        })
        .collect();
    let (header, _) = safetensors_header_with(&entries, padding)?;
    let mut file = io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    file.write_all(&(header.len() as u64).to_le_bytes())?;
    file.write_all(&header)?;
    let group = CHUNK * 4 * rayon::current_num_threads().max(1);
    for t in tensors {
        let n = elements(&t.name, &t.shape)?;
        let mut start = 0;
        while start < n {
            let end = n.min(start + group);
            let chunks: Vec<Vec<u8>> = (start..end)
                .step_by(CHUNK)
                .collect::<Vec<_>>()
                .into_par_iter()
                .map(|s| encode(t, s, (s + CHUNK).min(end)))
                .collect();
            for c in &chunks {
                file.write_all(c)?;
            }
            start = end;
        }
    }
    file.flush()
}

/// Elements `start..end` of `t`, encoded little-endian in its dtype.
fn encode(t: &TensorSource<'_>, start: usize, end: usize) -> Vec<u8> {
    let mut values = vec![0f32; end - start];
    (t.fill)(start, &mut values);
    let size = t.dtype.size();
    let mut out = vec![0u8; values.len() * size];
    let pairs = out.chunks_exact_mut(size).zip(&values);
    match t.dtype {
        DType::F32 => pairs.for_each(|(o, v)| o.copy_from_slice(&v.to_le_bytes())),
        DType::F16 => {
            pairs.for_each(|(o, v)| o.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes()))
        }
        DType::BF16 => {
            pairs.for_each(|(o, v)| o.copy_from_slice(&half::bf16::from_f32(*v).to_le_bytes()))
        }
    }
    out
}
