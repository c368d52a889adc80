//! Parses and validates the header of one safetensors file held in memory: the 8-byte
//! little-endian header length, the JSON header, and every tensor's dtype, shape and byte range.
//!
//! Layout: `[u64 header_len][header_len bytes of JSON][data section]`; each tensor's
//! `data_offsets` `[begin, end)` are relative to the start of the data section. Neither the data
//! section nor a tensor need be aligned to anything (writers that do not pad the header leave every
//! tensor at an odd offset); bounds, sizes and overlaps are what is checked.

use super::error::CheckpointError;
use super::json::Pairs;
use crate::dtype::RawDType;
use serde::Deserialize;
use std::path::Path;

/// Largest header accepted (the format's own limit).
pub(crate) const MAX_HEADER_LEN: u64 = 100_000_000;

/// One validated tensor of a file.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Tensor name.
    pub name: String,
    /// Storage type (a float [`crate::dtype::DType`] unless the caller accepts packed types).
    pub dtype: RawDType,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// First byte, absolute within the file.
    pub start: usize,
    /// Length in bytes (`elements * dtype.size()`).
    pub len: usize,
}

/// A tensor's header entry as written.
#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// Validates the file `bytes` (the whole file, as mapped) and lists its tensors in header order.
/// Tensors of the packed types of pre-quantized checkpoints (`F8_E4M3`, `I32`, `I8`, `U8`) are
/// accepted only with `accept_packed`.
pub(crate) fn parse(
    path: &Path,
    bytes: &[u8],
    accept_packed: bool,
) -> Result<Vec<Entry>, CheckpointError> {
    let file_len = bytes.len() as u64;
    let Some((len_bytes, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(CheckpointError::TooShort {
            path: path.to_path_buf(),
            file_len,
        });
    };
    let header_len = u64::from_le_bytes(*len_bytes);
    let length_error = |reason| CheckpointError::HeaderLength {
        path: path.to_path_buf(),
        header_len,
        file_len,
        reason,
    };
    if header_len > MAX_HEADER_LEN {
        return Err(length_error("larger than the 100 MB limit"));
    }
    let Some((header, data)) = usize::try_from(header_len)
        .ok()
        .and_then(|n| rest.split_at_checked(n))
    else {
        return Err(length_error("extends past the end of the file"));
    };
    let pairs: Pairs<serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| CheckpointError::HeaderJson {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    // Where the data section starts in the file. It need not be aligned (the format does not pad
    // the header); typed reads of unaligned data go through an aligned copy (`TensorView::data`).
    let data_start = 8 + header.len();

    let mut entries: Vec<Entry> = Vec::with_capacity(pairs.0.len());
    let mut seen = std::collections::HashSet::with_capacity(pairs.0.len());
    for (name, value) in pairs.0 {
        if name == "__metadata__" {
            continue;
        }
        if !seen.insert(name.clone()) {
            return Err(CheckpointError::DuplicateTensor {
                path: path.to_path_buf(),
                tensor: name,
                first: path.to_path_buf(),
            });
        }
        let entry = validate_entry(path, name, value, (data.len(), data_start), accept_packed)?;
        entries.push(entry);
    }
    check_overlaps(path, &entries)?;
    Ok(entries)
}

/// Checks one header entry against the data section (`data_len` bytes at file offset
/// `data_start`): dtype, shape, offsets within bounds and spanning exactly the shape's bytes. Any
/// offset is accepted, aligned to the element size or not.
fn validate_entry(
    path: &Path,
    name: String,
    value: serde_json::Value,
    (data_len, data_start): (usize, usize),
    accept_packed: bool,
) -> Result<Entry, CheckpointError> {
    let raw: RawEntry = match serde_json::from_value(value) {
        Ok(raw) => raw,
        Err(e) => {
            return Err(CheckpointError::HeaderEntry {
                path: path.to_path_buf(),
                tensor: name,
                message: e.to_string(),
            })
        }
    };
    let parsed = RawDType::from_safetensors_name(&raw.dtype)
        .filter(|d| accept_packed || d.float().is_some());
    let Some(dtype) = parsed else {
        return Err(CheckpointError::UnsupportedDType {
            path: path.to_path_buf(),
            tensor: name,
            dtype: raw.dtype,
        });
    };
    let shape: Option<Vec<usize>> = raw.shape.iter().map(|&d| usize::try_from(d).ok()).collect();
    let expected = shape.as_ref().and_then(|dims| {
        dims.iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.size()))
    });
    let (Some(shape), Some(expected)) = (shape, expected) else {
        return Err(CheckpointError::ShapeOverflow {
            path: path.to_path_buf(),
            tensor: name,
            shape: raw.shape,
        });
    };
    let (begin, end) = raw.data_offsets;
    if begin > end {
        return Err(CheckpointError::ReversedOffsets {
            path: path.to_path_buf(),
            tensor: name,
            begin,
            end,
        });
    }
    if end > data_len as u64 {
        return Err(CheckpointError::Truncated {
            path: path.to_path_buf(),
            tensor: name,
            end,
            data_len: data_len as u64,
        });
    }
    // Both fit in usize now: end <= data_len.
    let (begin, end) = (begin as usize, end as usize);
    if end - begin != expected {
        return Err(CheckpointError::SizeMismatch {
            path: path.to_path_buf(),
            tensor: name,
            dtype,
            shape,
            expected: expected as u64,
            found: (end - begin) as u64,
        });
    }
    Ok(Entry {
        name,
        dtype,
        shape,
        start: data_start + begin,
        len: expected,
    })
}

/// Rejects two non-empty tensors sharing any byte.
fn check_overlaps(path: &Path, entries: &[Entry]) -> Result<(), CheckpointError> {
    let mut ranges: Vec<&Entry> = entries.iter().filter(|e| e.len > 0).collect();
    ranges.sort_by_key(|e| e.start);
    for pair in ranges.windows(2) {
        if let [a, b] = pair {
            if b.start < a.start + a.len {
                return Err(CheckpointError::Overlap {
                    path: path.to_path_buf(),
                    tensor: b.name.clone(),
                    other: a.name.clone(),
                });
            }
        }
    }
    Ok(())
}
