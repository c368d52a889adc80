//! Views of made-up addresses for the planners' GPU-free tests (never launched on), and the
//! assertions those tests share.

use crate::cuda::args::{LinearArgs, LinearScalars};
use crate::cuda::error::{CudaError, KernelError};
use crate::cuda::memory::{AnyViewMut, View, ViewMut};
use crate::cuda::ops::PagedCacheShape;
use crate::packed::lut4::Lut4;
use crate::packed::PackedKind;

/// A 256-byte aligned address no test dereferences.
pub const BASE: u64 = 0x7f00_0000_0000;

/// A read view of `len` elements at [`BASE`].
pub fn view<T>(len: usize) -> View<'static, T> {
    // SAFETY: planner tests only read the address and length; nothing is launched on it.
    unsafe { View::from_raw(BASE, len) }
}

/// A written view of `len` elements at [`BASE`].
pub fn view_mut<T>(len: usize) -> ViewMut<'static, T> {
    // SAFETY: planner tests only read the address and length; nothing is launched on it.
    unsafe { ViewMut::from_raw(BASE, len) }
}

/// A written view of `len` elements at [`BASE`], f32 when `f32` and bf16 otherwise (an output
/// whose type picks the kernel variant).
pub fn any_view_mut(len: usize, f32: bool) -> AnyViewMut<'static> {
    if f32 {
        AnyViewMut::F32(view_mut(len))
    } else {
        AnyViewMut::Bf16(view_mut(len))
    }
}

/// A paged cache of `num_blocks` blocks of 16 tokens and block tables of 3 rows of
/// `max_blocks_per_seq` columns.
pub fn paged_cache(num_blocks: usize, max_blocks_per_seq: usize) -> PagedCacheShape {
    PagedCacheShape {
        num_blocks,
        block_size: 16,
        num_seqs: 3,
        max_blocks_per_seq,
    }
}

/// The scalars of a dense projection of `tokens` rows.
pub fn linear_scalars(tokens: u32, in_features: u32, out_features: u32) -> LinearScalars {
    LinearScalars {
        tokens,
        in_features,
        out_features,
    }
}

/// Buffers of exactly the lengths a dense projection over `s` touches, the output f32 when
/// `out_f32`.
pub fn linear_args(s: &LinearScalars, out_f32: bool) -> LinearArgs<'static> {
    let (t, i, o) = (
        s.tokens as usize,
        s.in_features as usize,
        s.out_features as usize,
    );
    LinearArgs {
        x: view(t * i),
        w: view(o * i),
        out: any_view_mut(t * o, out_f32),
    }
}

/// Asserts `result` is `BufferTooSmall` naming `name`.
pub fn too_small(result: Result<impl std::fmt::Debug, CudaError>, name: &str) {
    match result {
        Err(CudaError::Kernel(KernelError::BufferTooSmall { buffer, .. })) => {
            assert_eq!(buffer, name)
        }
        other => panic!("expected BufferTooSmall({name}), got {other:?}"),
    }
}

/// Asserts `result` is `Misaligned` naming `name`; the op that refused it.
pub fn misaligned(result: Result<impl std::fmt::Debug, CudaError>, name: &str) -> &'static str {
    match result {
        Err(CudaError::Kernel(KernelError::Misaligned { op, buffer, .. })) if buffer == name => op,
        other => panic!("expected Misaligned({name}), got {other:?}"),
    }
}

/// Asserts `result` is `Unsupported` naming `name`.
pub fn unsupported(result: Result<impl std::fmt::Debug, CudaError>, name: &str) {
    match result {
        Err(CudaError::Kernel(KernelError::Unsupported { what, .. })) => assert_eq!(what, name),
        other => panic!("expected Unsupported({name}), got {other:?}"),
    }
}

/// The packed formats the quantized planners are tested with: both 8-bit kinds, 4-bit with one
/// group per 16-byte chunk and with Mixtral's groups of 128, and 4-bit table codes (NF4 in
/// bitsandbytes' blocks of 64, FP4 in groups of 32).
pub const KINDS: [PackedKind; 6] = [
    PackedKind::Fp8,
    PackedKind::Int8,
    PackedKind::Int4 { group_size: 32 },
    PackedKind::Int4 { group_size: 128 },
    PackedKind::Lut4 {
        table: Lut4::Nf4,
        group_size: 64,
    },
    PackedKind::Lut4 {
        table: Lut4::Fp4,
        group_size: 32,
    },
];

/// The name the kernel variants give `kind` (`fp8`, `int8`, `int4`, `lut4`).
pub fn kind_label(kind: PackedKind) -> &'static str {
    match kind {
        PackedKind::Fp8 => "fp8",
        PackedKind::Int8 => "int8",
        PackedKind::Int4 { .. } => "int4",
        PackedKind::Lut4 { .. } => "lut4",
    }
}

/// A table view (16 values) for LUT4 kinds, `None` for the others: what [`PackedView::table`]
/// holds.
///
/// [`PackedView::table`]: crate::cuda::ops::PackedView::table
pub fn table_for(kind: PackedKind) -> Option<View<'static, f32>> {
    matches!(kind, PackedKind::Lut4 { .. }).then(|| view(16))
}

/// Any packed format the quantized planners take: both 8-bit kinds, and 4-bit codes (integer or
/// `table`) in groups of 32 to 192.
pub fn any_kind(table: Lut4) -> impl proptest::strategy::Strategy<Value = PackedKind> {
    use proptest::prelude::*;
    prop_oneof![
        Just(PackedKind::Fp8),
        Just(PackedKind::Int8),
        (1usize..=6).prop_map(|g| PackedKind::Int4 { group_size: 32 * g }),
        (1usize..=6).prop_map(move |g| PackedKind::Lut4 {
            table,
            group_size: 32 * g
        }),
    ]
}
