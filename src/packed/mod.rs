//! Quantized matrices: the FP8 E4M3 ([`fp8`]), INT8 ([`int8`]), 4-bit RTN / GPTQ ([`int4`]),
//! compressed-tensors `pack-quantized` ([`pack_quantized`]), AutoAWQ GEMM ([`awq`]) and
//! bitsandbytes NF4 / FP4 ([`lut4`]) encodings, and the one packed layout of a quantized matrix `[rows, cols]` (`[out, in]`) that
//! every source format is held in, as the GPU kernels read it. Its [`PackedMatrix::dequantize`] is
//! what the CPU reference engine computes with, so both backends use exactly the same numbers.
//!
//! This module depends on no other module of the crate. The checkpoint layer holds a packed matrix
//! as a tensor ([`crate::checkpoint::TensorView::from_packed`]) and [`crate::quant`] builds them
//! from checkpoints: both depend on this module, never the reverse. In dependency order, each
//! module using only those before it: `dtype`, `packed`, `config`, `checkpoint`, `weights`,
//! `quant`.
//!
//! The layout:
//! - FP8 E4M3 and INT8: `codes` `[rows, cols]` bytes (E4M3 codes / two's complement `i8`);
//!   `params` `[rows]` f32 scales (a per-tensor scale is repeated per row);
//!   `w[r][c] = value(codes[r][c]) * params[r]`.
//! - INT4: `codes` `[rows, cols / 2]` bytes: stored column `j` of a row is in byte `j / 2`, the low
//!   nibble for even `j`; `params` `[rows, groups, 2]` f32 pairs `(scale, zero)`, stored column `j`
//!   in group `j / group_size` (the last group of a row may be shorter), `zero` an integer in
//!   `0..=16`; `w = scale * (q - zero)`. On the GPU ([`PackedMatrix::device_params`]) each pair is
//!   one 32-bit word, the f16 scale in the low half and the zero in the high half, where the
//!   scale is an f16 value (GPTQ's and AWQ's scales, and RTN's, always are).
//! - 4-bit table codes (LUT4, bitsandbytes NF4 / FP4): `codes` as for INT4 (low nibble for the
//!   even column); `params` `[rows, groups]` f32 scales (the block's absmax), stored column `j` in
//!   group `j / group_size`; `w = scale * table[q]` with the 16-entry table of [`lut4::Lut4`].
//! - `perm` (INT4 only, from a GPTQ or compressed-tensors act-order checkpoint): stored column `j` holds input column
//!   `perm[j]`; without it stored column `j` is input column `j`.
//!
//! [`PackedMatrix::gpu_layout_ok`] says whether the GPU kernels can read a matrix: every row a whole
//! number of 16-byte chunks (`cols` a multiple of 16 for 8-bit, 32 for 4-bit) and, for 4-bit (INT4
//! and LUT4), groups of a multiple of 32 columns, so that one lane's 16-byte chunk never spans two
//! groups. A matrix they cannot read is stored in bf16 from [`PackedMatrix::dequantize`] by the
//! CUDA engine.

pub mod awq;
pub mod fp8;
pub mod int4;
pub mod int8;
pub mod lut4;
pub mod pack_quantized;

use std::fmt;

/// The element format of a [`PackedMatrix`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PackedKind {
    /// FP8 E4M3 codes with a scale per row.
    Fp8,
    /// INT8 codes with a scale per row.
    Int8,
    /// 4-bit codes with a `(scale, zero)` pair per row and group of `group_size` stored columns.
    Int4 {
        /// Stored columns per group (the last group of a row may be shorter).
        group_size: usize,
    },
    /// 4-bit codes indexing a 16-value table, with a scale per row and group of `group_size`
    /// columns (bitsandbytes NF4 / FP4).
    Lut4 {
        /// The table.
        table: lut4::Lut4,
        /// Columns per group (the last group of a row may be shorter).
        group_size: usize,
    },
}

/// An 8-bit format with one scale per row: what the W8A8 tensor-core kernels quantize activations
/// to per row (token), as [`fp8::quantize_per_channel`] and [`int8::quantize_per_channel`] do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Q8 {
    /// FP8 E4M3 (scale = amax / 448).
    Fp8,
    /// INT8 (scale = amax / 127).
    Int8,
}

impl Q8 {
    /// The 8-bit format of `kind`, or `None` for the 4-bit kinds.
    pub fn of(kind: PackedKind) -> Option<Q8> {
        match kind {
            PackedKind::Fp8 => Some(Q8::Fp8),
            PackedKind::Int8 => Some(Q8::Int8),
            PackedKind::Int4 { .. } | PackedKind::Lut4 { .. } => None,
        }
    }

    /// The packed kind of this format.
    pub fn kind(self) -> PackedKind {
        match self {
            Q8::Fp8 => PackedKind::Fp8,
            Q8::Int8 => PackedKind::Int8,
        }
    }

    /// Each row of `x` (`[rows, cols]`) quantized to this format on its own scale and dequantized
    /// again: the values a kernel that quantizes its activations per row multiplies with.
    /// (Empty when `cols` is 0.)
    pub fn round_trip_rows(self, x: &[f32], cols: usize) -> Vec<f32> {
        let rows = x.len() / cols.max(1);
        let back = match self {
            Q8::Fp8 => {
                let (codes, scales) = fp8::quantize_per_channel(x, rows, cols);
                fp8::dequantize(&codes, &scales, cols)
            }
            Q8::Int8 => {
                let (codes, scales) = int8::quantize_per_channel(x, rows, cols);
                int8::dequantize(&codes, &scales, cols)
            }
        };
        back.unwrap_or_default()
    }
}

/// Why a matrix could not be packed; the caller names the tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutError(pub String);

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LayoutError {}

impl PackedKind {
    /// Bytes of one row's codes for `cols` columns (`cols / 2` for 4-bit).
    pub fn row_code_bytes(self, cols: usize) -> usize {
        match self {
            PackedKind::Int4 { .. } | PackedKind::Lut4 { .. } => cols / 2,
            PackedKind::Fp8 | PackedKind::Int8 => cols,
        }
    }

    /// 32-bit words of one row's parameters on the GPU ([`PackedMatrix::device_params`]): one
    /// per `(scale, zero)` pair for INT4, else [`PackedKind::row_params`].
    pub fn device_row_params(self, cols: usize) -> usize {
        match self {
            PackedKind::Int4 { group_size } => cols.div_ceil(group_size.max(1)),
            _ => self.row_params(cols),
        }
    }

    /// f32 parameters of one row of `cols` columns: a scale (8-bit), a `(scale, zero)` pair per
    /// group (INT4), or a scale per group (LUT4).
    pub fn row_params(self, cols: usize) -> usize {
        match self {
            PackedKind::Int4 { group_size } => 2 * cols.div_ceil(group_size.max(1)),
            PackedKind::Lut4 { group_size, .. } => cols.div_ceil(group_size.max(1)),
            PackedKind::Fp8 | PackedKind::Int8 => 1,
        }
    }
}

fn fail<T>(reason: impl Into<String>) -> Result<T, LayoutError> {
    Err(LayoutError(reason.into()))
}

/// One quantized matrix in the packed layout (see the module documentation).
#[derive(Debug, Clone, PartialEq)]
pub struct PackedMatrix {
    /// Element format.
    pub kind: PackedKind,
    /// Rows (output features).
    pub rows: usize,
    /// Columns (input features).
    pub cols: usize,
    /// Codes: `[rows, cols]` bytes (8-bit) or `[rows, cols / 2]` (4-bit).
    pub codes: Vec<u8>,
    /// `[rows]` scales (8-bit), `[rows, groups, 2]` `(scale, zero)` pairs (INT4) or
    /// `[rows, groups]` scales (LUT4).
    pub params: Vec<f32>,
    /// 4-bit act-order only: `[cols]`, the input column of each stored column (a permutation).
    pub perm: Option<Vec<u32>>,
}

/// The groups of a grouped integer matrix `[rows, cols]` (scales and zero points per row and
/// group): `w[r][k] = scales[r * groups + g] * (q[r][k] - zeros[r * groups + g])`, `g = g_idx[k]`.
#[derive(Debug, Clone, Copy)]
pub struct Grouped<'a> {
    /// Rows (outputs).
    pub rows: usize,
    /// Columns (inputs).
    pub cols: usize,
    /// Groups per row.
    pub groups: usize,
    /// `[rows, groups]` scales.
    pub scales: &'a [f32],
    /// `[rows, groups]` zero points, as unsigned codes.
    pub zeros: &'a [i32],
    /// `[cols]`: the group of each input column.
    pub g_idx: &'a [usize],
}

impl Grouped<'_> {
    /// `scale * (q - zero)` of every element of the unsigned codes `q` (`[rows, cols]`): the
    /// matrix in f32. `None` when a length or a group index disagrees with the shape.
    pub fn dequantize(&self, q: &[u8]) -> Option<Vec<f32>> {
        let per_row = self.rows.checked_mul(self.groups)?;
        let ok = q.len() == self.rows.checked_mul(self.cols)?
            && self.scales.len() == per_row
            && self.zeros.len() == per_row
            && self.g_idx.len() == self.cols
            && self.g_idx.iter().all(|&g| g < self.groups);
        if !ok {
            return None;
        }
        let mut out = Vec::with_capacity(q.len());
        for r in 0..self.rows {
            for (k, &g) in self.g_idx.iter().enumerate() {
                let at = r * self.groups + g;
                let diff = i32::from(q[r * self.cols + k]) - self.zeros[at];
                out.push(self.scales[at] * diff as f32);
            }
        }
        Some(out)
    }
}

/// An INT4 group's `(scale, zero)` as the GPU holds it: the f16 bits of the scale in the low half,
/// the zero in the high half; `None` unless the scale is an f16 value exactly and the zero an
/// integer in `0..=16`.
pub fn int4_device_word(scale: f32, zero: f32) -> Option<u32> {
    let h = half::f16::from_f32(scale);
    let exact = h.is_finite() && h.to_f32() == scale;
    let integer = (0.0..=16.0).contains(&zero) && zero.fract() == 0.0;
    (exact && integer).then(|| u32::from(h.to_bits()) | (zero as u32) << 16)
}

/// [`int4_device_word`] of one stored `(scale, zero)` pair, or why the GPU cannot hold it.
fn int4_pair_word(pair: &[f32]) -> Result<u32, LayoutError> {
    int4_device_word(pair[0], pair[1]).ok_or_else(|| {
        LayoutError(format!(
            "a 4-bit group's (scale, zero) = ({}, {}) is not an f16 scale and an integer zero in \
             0..=16, which the GPU holds in one 32-bit word",
            pair[0], pair[1]
        ))
    })
}

/// `scales` as one per row: a single scale repeated, or `rows` scales as they are.
fn per_row(scales: &[f32], rows: usize) -> Result<Vec<f32>, LayoutError> {
    match scales.len() {
        1 => Ok(vec![scales[0]; rows]),
        n if n == rows => Ok(scales.to_vec()),
        n => fail(format!("{n} scales for {rows} rows (expected 1 or {rows})")),
    }
}

fn check_len(what: &str, len: usize, expected: Option<usize>) -> Result<(), LayoutError> {
    match expected {
        Some(e) if e == len => Ok(()),
        Some(e) => fail(format!("{what} has {len} elements, expected {e}")),
        None => fail(format!("{what}: the shape overflows")),
    }
}

/// Packs 4-bit codes `q` (`[rows, cols]`, values 0..=15, `cols` even) two per byte, the low nibble
/// for the even column.
pub fn pack_nibbles(q: &[u8]) -> Vec<u8> {
    q.chunks(2)
        .map(|p| (p[0] & 0x0F) | (p.get(1).copied().unwrap_or(0) & 0x0F) << 4)
        .collect()
}

/// The E4M3 value of `code` computed the way the GPU kernels compute it: the sign, exponent and
/// mantissa bits moved into an f32 (`sign << 31 | (code & 0x7f) << 20`), then multiplied by 2^120
/// (the exponent-bias difference 127 - 7). Exact for every code except the two NaN codes.
pub fn fp8_decode_by_bits(code: u8) -> f32 {
    let bits = (u32::from(code & 0x80) << 24) | (u32::from(code & 0x7F) << 20);
    f32::from_bits(bits) * f32::from_bits((127 + 120) << 23)
}

/// An 8-bit integer `v` (0..=255) computed the way the GPU kernels compute it: the bits placed in
/// the mantissa of 2^23 (`0x4B000000 | v`), then 2^23 subtracted. Exact.
pub fn magic_u8_to_f32(v: u8) -> f32 {
    f32::from_bits(0x4B00_0000 | u32::from(v)) - 8_388_608.0
}

/// The byte offsets `4 * q` of the 8 codes `q` of a little-endian 32-bit word of 4-bit codes (code
/// k in bits `4k..4k + 4`), computed the way the GPU kernels compute LUT4 table addresses: the
/// offsets of the even codes in the bytes of `(w << 2) & 0x3C3C3C3C`, those of the odd codes in the
/// bytes of `(w >> 2) & 0x3C3C3C3C`, byte i of each taken alone (a PRMT on the GPU). Exact.
pub fn lut4_offsets_by_bytes(w: u32) -> [u32; 8] {
    let even = (w << 2) & 0x3C3C_3C3C;
    let odd = (w >> 2) & 0x3C3C_3C3C;
    std::array::from_fn(|k| {
        let bytes = if k % 2 == 0 { even } else { odd };
        (bytes >> (8 * (k / 2))) & 0xFF
    })
}

impl PackedMatrix {
    /// FP8 codes `[rows, cols]` with one scale, or one per row.
    pub fn fp8(
        codes: Vec<u8>,
        scales: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<Self, LayoutError> {
        check_len("codes", codes.len(), rows.checked_mul(cols))?;
        if let Some(i) = codes.iter().position(|&c| fp8::is_nan_code(c)) {
            return fail(format!("element {i} is an FP8 NaN code"));
        }
        Ok(PackedMatrix {
            kind: PackedKind::Fp8,
            rows,
            cols,
            codes,
            params: per_row(scales, rows)?,
            perm: None,
        })
    }

    /// INT8 codes `[rows, cols]` with one scale, or one per row.
    pub fn int8(
        codes: &[i8],
        scales: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<Self, LayoutError> {
        check_len("codes", codes.len(), rows.checked_mul(cols))?;
        Ok(PackedMatrix {
            kind: PackedKind::Int8,
            rows,
            cols,
            codes: codes.iter().map(|&c| c as u8).collect(),
            params: per_row(scales, rows)?,
            perm: None,
        })
    }

    /// An RTN 4-bit matrix ([`int4::quantize_rtn`]); `cols` must be even.
    pub fn from_rtn(r: &int4::Rtn) -> Result<Self, LayoutError> {
        if !r.cols.is_multiple_of(2) || r.group_size == 0 {
            return fail(format!(
                "4-bit packing needs an even column count ({}) and groups of at least 1 ({})",
                r.cols, r.group_size
            ));
        }
        let groups = r.groups();
        check_len("codes", r.q.len(), r.rows.checked_mul(r.cols))?;
        check_len("scales", r.scales.len(), r.rows.checked_mul(groups))?;
        check_len("zeros", r.zeros.len(), r.rows.checked_mul(groups))?;
        let params = r
            .scales
            .iter()
            .zip(&r.zeros)
            .flat_map(|(&s, &z)| [s, f32::from(z)])
            .collect();
        Ok(PackedMatrix {
            kind: PackedKind::Int4 {
                group_size: r.group_size,
            },
            rows: r.rows,
            cols: r.cols,
            codes: pack_nibbles(&r.q),
            params,
            perm: None,
        })
    }

    /// A GPTQ 4-bit layer (tensors as [`int4::dequantize_gptq`] takes them, already checked against
    /// `shape` by the caller's shape checks), through [`PackedMatrix::int4_grouped`].
    pub fn from_gptq(
        shape: int4::GptqShape,
        qweight: &[i32],
        qzeros: &[i32],
        scales: &[f32],
        g_idx: &[usize],
        zero_offset: i32,
    ) -> Result<Self, LayoutError> {
        let int4::GptqShape {
            inputs,
            outputs,
            groups,
        } = shape;
        if inputs == 0 || !inputs.is_multiple_of(8) || !outputs.is_multiple_of(8) || groups == 0 {
            return fail(
                "GPTQ needs inputs and outputs positive multiples of 8 and at least one group",
            );
        }
        check_len("qweight", qweight.len(), Some(inputs / 8 * outputs))?;
        check_len("qzeros", qzeros.len(), groups.checked_mul(outputs / 8))?;
        check_len("scales", scales.len(), groups.checked_mul(outputs))?;
        let mut q = vec![0u8; outputs * inputs];
        for k in 0..inputs {
            for n in 0..outputs {
                q[n * inputs + k] = int4::nibble(qweight[k / 8 * outputs + n], k % 8);
            }
        }
        let mut row_scales = Vec::with_capacity(outputs * groups);
        let mut zeros = Vec::with_capacity(outputs * groups);
        for n in 0..outputs {
            for g in 0..groups {
                let zero = int4::nibble(qzeros[g * (outputs / 8) + n / 8], n % 8);
                zeros.push(i32::from(zero) + zero_offset);
                row_scales.push(scales[g * outputs + n]);
            }
        }
        let grouped = Grouped {
            rows: outputs,
            cols: inputs,
            groups,
            scales: &row_scales,
            zeros: &zeros,
            g_idx,
        };
        PackedMatrix::int4_grouped(&q, grouped)
    }

    /// A 4-bit matrix from its codes `q` (`[rows, cols]`, 0..=15, in input-column order) and the
    /// groups of `grouped`. The groups of `g_idx`, taken in order of group, must be contiguous runs
    /// of one size (the last may be shorter), as GPTQ and compressed-tensors write them with and
    /// without act-order; a `g_idx` that is not sequential becomes `perm`.
    pub fn int4_grouped(q: &[u8], grouped: Grouped<'_>) -> Result<Self, LayoutError> {
        let Grouped {
            rows,
            cols,
            groups,
            scales,
            zeros,
            g_idx,
        } = grouped;
        if cols == 0 || !cols.is_multiple_of(2) || groups == 0 {
            return fail(format!(
                "4-bit packing needs an even, positive column count ({cols}) and at least one group"
            ));
        }
        check_len("codes", q.len(), rows.checked_mul(cols))?;
        check_len("scales", scales.len(), rows.checked_mul(groups))?;
        check_len("zeros", zeros.len(), rows.checked_mul(groups))?;
        check_len("g_idx", g_idx.len(), Some(cols))?;
        if let Some(&g) = g_idx.iter().find(|&&g| g >= groups) {
            return fail(format!("g_idx names group {g} of {groups}"));
        }
        if let Some(z) = zeros.iter().find(|z| !(0..=16).contains(*z)) {
            return fail(format!("zero point {z} is outside 0..=16"));
        }
        // Stored order: input columns sorted by group (stable, so a sequential g_idx stays as is).
        let mut order: Vec<usize> = (0..cols).collect();
        order.sort_by_key(|&k| g_idx[k]);
        let group_size = g_idx.iter().filter(|&&g| g == g_idx[order[0]]).count();
        for (j, &k) in order.iter().enumerate() {
            if g_idx[k] != j / group_size {
                return fail(format!(
                    "the groups of g_idx are not runs of {group_size} columns: stored column {j} \
                     (input {k}) is in group {}, expected {}",
                    g_idx[k],
                    j / group_size
                ));
            }
        }
        let stored_groups = cols.div_ceil(group_size);
        if stored_groups != groups {
            return fail(format!(
                "g_idx uses {stored_groups} groups of {group_size} columns, the tensors have {groups}"
            ));
        }
        let mut stored = vec![0u8; rows * cols];
        for (j, &k) in order.iter().enumerate() {
            for r in 0..rows {
                stored[r * cols + j] = q[r * cols + k] & 0x0F;
            }
        }
        let params = scales
            .iter()
            .zip(zeros)
            .flat_map(|(&s, &z)| [s, z as f32])
            .collect();
        let sequential = order.iter().enumerate().all(|(j, &k)| j == k);
        Ok(PackedMatrix {
            kind: PackedKind::Int4 { group_size },
            rows,
            cols,
            codes: pack_nibbles(&stored),
            params,
            perm: (!sequential).then(|| order.iter().map(|&k| k as u32).collect()),
        })
    }

    /// A 4-bit table matrix: codes `q` (`[rows, cols]`, 0..=15), `scales` `[rows, groups]` for
    /// groups of `group_size` columns (the last of a row may be shorter).
    pub fn lut4(
        table: lut4::Lut4,
        q: &[u8],
        scales: &[f32],
        (rows, cols): (usize, usize),
        group_size: usize,
    ) -> Result<Self, LayoutError> {
        if cols == 0 || !cols.is_multiple_of(2) || group_size == 0 {
            return fail(format!(
                "4-bit packing needs an even, positive column count ({cols}) and groups of at \
                 least 1 ({group_size})"
            ));
        }
        check_len("codes", q.len(), rows.checked_mul(cols))?;
        check_len(
            "scales",
            scales.len(),
            rows.checked_mul(cols.div_ceil(group_size)),
        )?;
        Ok(PackedMatrix {
            kind: PackedKind::Lut4 { table, group_size },
            rows,
            cols,
            codes: pack_nibbles(q),
            params: scales.to_vec(),
            perm: None,
        })
    }

    /// Groups per row (1 for the 8-bit formats).
    pub fn groups(&self) -> usize {
        match self.kind {
            PackedKind::Int4 { group_size } | PackedKind::Lut4 { group_size, .. } => {
                self.cols.div_ceil(group_size.max(1))
            }
            _ => 1,
        }
    }

    /// Bytes of one row's codes.
    pub fn row_code_bytes(&self) -> usize {
        self.kind.row_code_bytes(self.cols)
    }

    /// f32 parameters per row.
    pub fn row_params(&self) -> usize {
        self.kind.row_params(self.cols)
    }

    /// The parameters as the GPU kernels read them (`[rows, device row params]` 32-bit words, as
    /// f32 bits): INT4 pairs one [`int4_device_word`] each, the other kinds' scales as they are.
    /// Refused when an INT4 scale is not an f16 value ([`PackedMatrix::gpu_layout_ok`] says so
    /// first).
    pub fn device_params(&self) -> Result<Vec<f32>, LayoutError> {
        if !matches!(self.kind, PackedKind::Int4 { .. }) {
            return Ok(self.params.clone());
        }
        self.params
            .chunks_exact(2)
            .map(|pair| int4_pair_word(pair).map(f32::from_bits))
            .collect()
    }

    /// Bytes held: codes, parameters and permutation.
    pub fn stored_bytes(&self) -> usize {
        self.codes.len() + 4 * self.params.len() + 4 * self.perm.as_ref().map_or(0, Vec::len)
    }

    /// The code (0..=255, or 0..=15 for 4-bit) of stored column `j` of row `r`.
    fn code(&self, r: usize, j: usize) -> u8 {
        match self.kind {
            PackedKind::Int4 { .. } | PackedKind::Lut4 { .. } => {
                let byte = self.codes[r * self.cols / 2 + j / 2];
                if j.is_multiple_of(2) {
                    byte & 0x0F
                } else {
                    byte >> 4
                }
            }
            _ => self.codes[r * self.cols + j],
        }
    }

    /// The matrix as f32 `[rows, cols]` in input-column order: the values the GPU kernels multiply
    /// by and the CPU reference engine runs on.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.rows * self.cols];
        for r in 0..self.rows {
            let row = &mut out[r * self.cols..(r + 1) * self.cols];
            for j in 0..self.cols {
                let c = self.code(r, j);
                let v = match self.kind {
                    PackedKind::Fp8 => fp8::decode(c) * self.params[r],
                    PackedKind::Int8 => f32::from(c as i8) * self.params[r],
                    PackedKind::Int4 { group_size } => {
                        let at = (r * self.groups() + j / group_size) * 2;
                        self.params[at] * (f32::from(c) - self.params[at + 1])
                    }
                    PackedKind::Lut4 { table, group_size } => {
                        self.params[r * self.groups() + j / group_size] * table.value(c)
                    }
                };
                let k = self.perm.as_ref().map_or(j, |p| p[j] as usize);
                row[k] = v;
            }
        }
        out
    }

    /// `Ok` when the GPU kernels can read this matrix, else why not.
    pub fn gpu_layout_ok(&self) -> Result<(), LayoutError> {
        match self.kind {
            PackedKind::Fp8 | PackedKind::Int8 if !self.cols.is_multiple_of(16) => fail(format!(
                "8-bit rows on the GPU need a multiple of 16 columns, not {}",
                self.cols
            )),
            PackedKind::Int4 { group_size } | PackedKind::Lut4 { group_size, .. }
                if !self.cols.is_multiple_of(32) =>
            {
                fail(format!(
                    "4-bit rows on the GPU need a multiple of 32 columns, not {} (groups of \
                     {group_size})",
                    self.cols
                ))
            }
            PackedKind::Int4 { group_size } | PackedKind::Lut4 { group_size, .. }
                if !group_size.is_multiple_of(32) =>
            {
                fail(format!(
                    "4-bit groups on the GPU need a multiple of 32 columns, not {group_size}"
                ))
            }
            _ if self.rows == 0 || self.cols == 0 => fail("an empty matrix"),
            PackedKind::Int4 { .. } => self
                .params
                .chunks_exact(2)
                .try_for_each(|pair| int4_pair_word(pair).map(drop)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..rows * cols)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
            })
            .collect()
    }

    /// Each row on its own scale, within half a step of itself (FP8: 2^-4 of the value, or half
    /// the subnormal step 2^-10 * scale; INT8: half the scale); a row's largest magnitude survives,
    /// a zero row stays zero, and changing one row leaves the others alone.
    #[test]
    fn q8_round_trip_quantizes_each_row_on_its_own_scale() {
        let x = [
            0.3f32, -1.7, 0.01, 2.5, 0.0, 0.0, 0.0, 0.0, -1e-3, 4e3, 7.0, -2e3,
        ];
        for format in [Q8::Fp8, Q8::Int8] {
            let y = format.round_trip_rows(&x, 4);
            assert_eq!(&y[4..8], &[0.0; 4]);
            let qmax = match format {
                Q8::Fp8 => fp8::MAX,
                Q8::Int8 => int8::QMAX,
            };
            for (row_x, row_y) in x.chunks(4).zip(y.chunks(4)) {
                let amax = row_x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let scale = if amax > 0.0 { amax / qmax } else { 1.0 };
                for (&a, &b) in row_x.iter().zip(row_y) {
                    let half_step = match format {
                        Q8::Fp8 => a.abs() / 16.0 + scale / 1024.0,
                        Q8::Int8 => scale * 0.5001,
                    };
                    assert!((a - b).abs() <= half_step, "{format:?}: {a} -> {b}");
                }
            }
            assert!(
                (y[3] - 2.5).abs() <= 2.5 * 1e-6,
                "{format:?}: the row maximum {}",
                y[3]
            );
            let mut changed = x;
            changed[9] = 1.0;
            assert_eq!(format.round_trip_rows(&changed, 4)[..8], y[..8]);
            assert_eq!(Q8::of(format.kind()), Some(format));
        }
        assert_eq!(Q8::of(PackedKind::Int4 { group_size: 32 }), None);
    }

    #[test]
    fn the_kernels_fp8_formula_is_exact_for_every_code() {
        for code in 0..=255u8 {
            if fp8::is_nan_code(code) {
                continue;
            }
            assert_eq!(
                fp8_decode_by_bits(code).to_bits(),
                fp8::decode(code).to_bits(),
                "code {code:#04x}"
            );
        }
    }

    #[test]
    fn the_kernels_integer_formula_is_exact() {
        for v in 0..=255u8 {
            assert_eq!(magic_u8_to_f32(v), f32::from(v));
            // INT8 codes: the kernels flip the sign bit and subtract 128 more.
            let signed = magic_u8_to_f32(v ^ 0x80) - 128.0;
            assert_eq!(signed, f32::from(v as i8));
        }
    }

    #[test]
    fn the_kernels_table_offsets_follow_the_stored_columns() {
        // A row of 64 codes packed as the matrices hold them, read back as the kernels read it: each
        // little-endian word of the codes holds stored columns 8j .. 8j + 8.
        let q: Vec<u8> = (0..64u32).map(|i| ((i * 7 + i / 16) % 16) as u8).collect();
        let packed = pack_nibbles(&q);
        for (j, word) in packed.chunks_exact(4).enumerate() {
            let w = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
            let offsets = lut4_offsets_by_bytes(w);
            for (k, &offset) in offsets.iter().enumerate() {
                assert_eq!(offset, 4 * u32::from(q[8 * j + k]), "column {}", 8 * j + k);
            }
        }
        for w in [0u32, u32::MAX, 0x0123_4567, 0xFEDC_BA98, 0x8F1E_2D3C] {
            let offsets = lut4_offsets_by_bytes(w);
            for (k, &offset) in offsets.iter().enumerate() {
                assert_eq!(offset, 4 * ((w >> (4 * k)) & 0xF), "{w:#x} nibble {k}");
            }
        }
    }

    #[test]
    fn nibbles_pack_low_first() {
        assert_eq!(pack_nibbles(&[1, 2, 15, 0, 7, 9]), vec![0x21, 0x0F, 0x97]);
    }

    proptest! {
        #[test]
        fn eight_bit_packing_dequantizes_like_the_reference(
            rows in 1usize..9, cols in 1usize..40, seed in any::<u64>(), per_tensor in any::<bool>()
        ) {
            let w = matrix(rows, cols, seed);
            let (codes, mut scales) = fp8::quantize_per_channel(&w, rows, cols);
            if per_tensor {
                scales.truncate(1);
            }
            let p = PackedMatrix::fp8(codes.clone(), &scales, rows, cols).unwrap();
            prop_assert_eq!(p.dequantize(), fp8::dequantize(&codes, &scales, cols).unwrap());
            let (codes, scales) = int8::quantize_per_channel(&w, rows, cols);
            let p = PackedMatrix::int8(&codes, &scales, rows, cols).unwrap();
            prop_assert_eq!(p.dequantize(), int8::dequantize(&codes, &scales, cols).unwrap());
        }

        #[test]
        fn rtn_packing_dequantizes_like_the_reference(
            rows in 1usize..6, half_cols in 1usize..150, group in 1usize..70, seed in any::<u64>()
        ) {
            let cols = half_cols * 2;
            let r = int4::quantize_rtn(&matrix(rows, cols, seed), rows, cols, group);
            let p = PackedMatrix::from_rtn(&r).unwrap();
            prop_assert_eq!(p.dequantize(), int4::dequantize_rtn(&r).unwrap());
            prop_assert_eq!(p.codes.len(), rows * cols / 2);
            prop_assert_eq!(p.params.len(), rows * p.row_params());
        }

        #[test]
        fn gptq_packing_dequantizes_like_the_reference_with_and_without_act_order(
            out8 in 1usize..4, groups in 1usize..5, group8 in 1usize..5, act_order in any::<bool>(),
            seed in any::<u64>(), offset in 0i32..2,
        ) {
            let (outputs, group_size) = (out8 * 8, group8 * 8);
            let inputs = groups * group_size;
            let mut s = seed | 1;
            let mut next = || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; s };
            let qweight: Vec<i32> = (0..inputs / 8 * outputs).map(|_| next() as i32).collect();
            let qzeros: Vec<i32> = (0..groups * outputs / 8).map(|_| next() as i32).collect();
            let scales: Vec<f32> = (0..groups * outputs).map(|_| (next() % 1000 + 1) as f32 * 1e-4).collect();
            let mut g_idx = int4::sequential_g_idx(inputs, group_size);
            if act_order {
                // A random permutation of the group assignment (every group keeps its size).
                for i in (1..inputs).rev() {
                    g_idx.swap(i, (next() % (i as u64 + 1)) as usize);
                }
            }
            let shape = int4::GptqShape { inputs, outputs, groups };
            let p = PackedMatrix::from_gptq(shape, &qweight, &qzeros, &scales, &g_idx, offset).unwrap();
            let reference = int4::dequantize_gptq(shape, &qweight, &qzeros, &scales, &g_idx, offset).unwrap();
            prop_assert_eq!(p.dequantize(), reference);
            prop_assert_eq!(p.kind, PackedKind::Int4 { group_size });
            if let Some(perm) = &p.perm {
                let mut sorted = perm.clone();
                sorted.sort_unstable();
                prop_assert_eq!(sorted, (0..inputs as u32).collect::<Vec<_>>());
            }
        }
    }

    proptest! {
        #[test]
        fn grouped_packing_dequantizes_like_the_grouped_formula(
            rows in 1usize..6, groups in 1usize..4, group2 in 1usize..6, act_order in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let group_size = 2 * group2;
            let cols = groups * group_size;
            let mut s = seed | 1;
            let mut next = || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; s };
            let q: Vec<u8> = (0..rows * cols).map(|_| (next() % 16) as u8).collect();
            let zeros: Vec<i32> = (0..rows * groups).map(|_| (next() % 17) as i32).collect();
            let scales: Vec<f32> = (0..rows * groups).map(|_| (next() % 1000 + 1) as f32 * 1e-4).collect();
            let mut g_idx = int4::sequential_g_idx(cols, group_size);
            if act_order {
                for i in (1..cols).rev() {
                    g_idx.swap(i, (next() % (i as u64 + 1)) as usize);
                }
            }
            let grouped = Grouped { rows, cols, groups, scales: &scales, zeros: &zeros, g_idx: &g_idx };
            let p = PackedMatrix::int4_grouped(&q, grouped).unwrap();
            prop_assert_eq!(p.dequantize(), grouped.dequantize(&q).unwrap());
            prop_assert_eq!(p.kind, PackedKind::Int4 { group_size });
        }

        #[test]
        fn table_packing_dequantizes_like_the_flattened_blocks(
            rows in 1usize..6, half_cols in 1usize..40, per_block in 1usize..4, fp4 in any::<bool>(),
            rows_in_block in any::<bool>(), seed in any::<u64>(),
        ) {
            let table = if fp4 { lut4::Lut4::Fp4 } else { lut4::Lut4::Nf4 };
            let cols = 2 * half_cols;
            // Blocks of whole rows' parts (cols a multiple of the block) or of several rows.
            let (block, group) = if rows_in_block {
                (cols * per_block, cols)
            } else {
                let b = if cols % (2 * per_block) == 0 { cols / per_block } else { cols };
                (b, b)
            };
            let mut s = seed | 1;
            let mut next = || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; s };
            let q: Vec<u8> = (0..rows * cols).map(|_| (next() % 16) as u8).collect();
            let absmax: Vec<f32> = (0..(rows * cols).div_ceil(block)).map(|_| (next() % 1000) as f32 * 1e-3).collect();
            let want = lut4::dequantize(table, &q, &absmax, block).unwrap();
            let scales: Vec<f32> = (0..rows)
                .flat_map(|r| (0..cols / group).map(move |g| (r * cols + g * group) / block))
                .map(|b| absmax[b])
                .collect();
            let p = PackedMatrix::lut4(table, &q, &scales, (rows, cols), group).unwrap();
            prop_assert_eq!(p.dequantize(), want);
            prop_assert_eq!(p.params.len(), rows * p.row_params());
            let readable = cols % 32 == 0 && group % 32 == 0;
            prop_assert_eq!(p.gpu_layout_ok().is_ok(), readable);
        }
    }

    #[test]
    fn gptq_groups_of_unequal_size_are_refused() {
        let shape = int4::GptqShape {
            inputs: 16,
            outputs: 8,
            groups: 2,
        };
        let mut g_idx = vec![1usize; 16];
        g_idx[3] = 0; // a group of 1 before a group of 15
        let r = PackedMatrix::from_gptq(shape, &[0; 16], &[0; 2], &[1.0; 16], &g_idx, 1);
        assert!(r.is_err());
    }

    #[test]
    fn gpu_layout_rules() {
        let r = int4::quantize_rtn(&matrix(2, 64, 3), 2, 64, 32);
        assert!(PackedMatrix::from_rtn(&r).unwrap().gpu_layout_ok().is_ok());
        let r = int4::quantize_rtn(&matrix(2, 48, 3), 2, 48, 128);
        assert!(PackedMatrix::from_rtn(&r).unwrap().gpu_layout_ok().is_err());
        let r = int4::quantize_rtn(&matrix(2, 64, 3), 2, 64, 16);
        assert!(PackedMatrix::from_rtn(&r).unwrap().gpu_layout_ok().is_err());
        let (codes, scales) = int8::quantize_per_channel(&matrix(2, 24, 3), 2, 24);
        let p = PackedMatrix::int8(&codes, &scales, 2, 24).unwrap();
        assert!(p.gpu_layout_ok().is_err());
        // 4-bit table codes: the rules of INT4 (bitsandbytes' blocks of 64 are readable).
        for table in [lut4::Lut4::Nf4, lut4::Lut4::Fp4] {
            for (cols, group, ok) in [
                (128, 64, true),
                (64, 32, true),
                (48, 48, false),
                (64, 16, false),
            ] {
                let p = lut4::quantize(table, &matrix(2, cols, 5), (2, cols), group).unwrap();
                assert_eq!(
                    p.gpu_layout_ok().is_ok(),
                    ok,
                    "{table:?} [{cols}] groups of {group}"
                );
            }
        }
        // INT4 on the GPU: every scale an f16 value, every zero an integer in 0..=16.
        let mut p =
            PackedMatrix::from_rtn(&int4::quantize_rtn(&matrix(2, 64, 3), 2, 64, 32)).unwrap();
        p.params[2] = 0.1; // not an f16 value
        assert!(p.gpu_layout_ok().is_err() && p.device_params().is_err());
        p.params[2] = 0.099975586; // the f16 nearest 0.1, exactly
        p.params[3] = 16.5;
        assert!(p.gpu_layout_ok().is_err());
        p.params[3] = 16.0;
        assert!(p.gpu_layout_ok().is_ok());
    }

    #[test]
    fn int4_device_words_hold_the_f16_scale_low_and_the_zero_high() {
        assert_eq!(int4_device_word(1.0, 8.0), Some(0x3C00 | 8 << 16));
        assert_eq!(int4_device_word(-2.0, 0.0), Some(0xC000));
        // The smallest f16 subnormal, and the largest finite f16.
        assert_eq!(int4_device_word(2f32.powi(-24), 16.0), Some(1 | 16 << 16));
        assert_eq!(int4_device_word(65504.0, 3.0), Some(0x7BFF | 3 << 16));
        for (scale, zero) in [
            (65520.0, 1.0),
            (f32::INFINITY, 1.0),
            (f32::NAN, 1.0),
            (1.0, -1.0),
            (1.0, 17.0),
            (1.0, 2.5),
            (1.0 + 2f32.powi(-11), 0.0),
        ] {
            assert_eq!(int4_device_word(scale, zero), None, "({scale}, {zero})");
        }
    }

    proptest! {
        #[test]
        fn rtn_scales_are_f16_values_and_the_device_words_give_them_back(
            rows in 1usize..4,
            groups in 1usize..4,
            seed in any::<u64>(),
            gain in prop::sample::select(vec![1e-6f32, 1e-3, 1.0, 300.0]),
        ) {
            let cols = groups * 32;
            let w: Vec<f32> = matrix(rows, cols, seed).iter().map(|v| v * gain).collect();
            let p = PackedMatrix::from_rtn(&int4::quantize_rtn(&w, rows, cols, 32)).unwrap();
            let words = p.device_params().unwrap();
            prop_assert_eq!(words.len(), rows * p.kind.device_row_params(cols));
            for (word, pair) in words.iter().zip(p.params.chunks_exact(2)) {
                let bits = word.to_bits();
                prop_assert_eq!(half::f16::from_bits(bits as u16).to_f32(), pair[0]);
                prop_assert_eq!((bits >> 16) as f32, pair[1]);
            }
        }
    }
}
