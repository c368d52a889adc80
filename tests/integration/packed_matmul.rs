//! Products with packed quantized matrices (`cpu::packed_matmul`) against their definition: the
//! f64 product with the values `PackedMatrix::dequantize` gives, for every packed kind (FP8, INT8,
//! INT4 with and without an act-order permutation, NF4 and FP4 tables), odd and SIMD-sized shapes,
//! one or many tokens, and every CPU kernel; and the same rows whatever the number of tokens.

use crate::common;

use common::numeric::{product_definition, random_values};
use mixtral::cpu::matmul::Kernel;
use mixtral::cpu::packed_matmul::{packed_matmul_with, Matrix};
use mixtral::packed::lut4::Lut4;
use mixtral::quant::{PackedKind, PackedMatrix};
use proptest::prelude::*;

/// A random matrix of `kind`: random codes (FP8's NaN codes left out), positive scales, INT4 zeros
/// anywhere in 0..15 (not only integers), and a random permutation when `act_order`.
fn random_matrix(
    kind: PackedKind,
    rows: usize,
    cols: usize,
    act_order: bool,
    seed: u64,
) -> PackedMatrix {
    let mut bits = random_values(seed, rows * cols + cols, 1.0)
        .into_iter()
        .map(|v| (v.to_bits() >> 3) as u8 ^ (v.to_bits() >> 13) as u8);
    let nibbles = matches!(kind, PackedKind::Int4 { .. } | PackedKind::Lut4 { .. });
    let code_bytes = if nibbles {
        rows * cols / 2
    } else {
        rows * cols
    };
    let codes: Vec<u8> = (0..code_bytes)
        .map(|_| {
            let c = bits.next().unwrap();
            match kind {
                PackedKind::Fp8 if c & 0x7F == 0x7F => c ^ 1,
                _ => c,
            }
        })
        .collect();
    let m = PackedMatrix {
        kind,
        rows,
        cols,
        codes,
        params: Vec::new(),
        perm: None,
    };
    let groups = m.groups();
    let scales = random_values(seed ^ 1, rows * groups, 1.0)
        .into_iter()
        .map(|v| 0.01 + v.abs());
    let params = match kind {
        PackedKind::Int4 { .. } => {
            let zeros = random_values(seed ^ 2, rows * groups, 7.5)
                .into_iter()
                .map(|z| z + 7.5);
            scales.zip(zeros).flat_map(|(s, z)| [s, z]).collect()
        }
        _ => scales.collect(),
    };
    let perm = act_order.then(|| {
        let mut p: Vec<u32> = (0..cols as u32).collect();
        let swaps = random_values(seed ^ 3, cols, 1.0);
        for (i, v) in swaps.iter().enumerate().rev() {
            let j = ((v.abs() * (i + 1) as f32) as usize).min(i);
            p.swap(i, j);
        }
        p
    });
    PackedMatrix { params, perm, ..m }
}

/// `(y, magnitude)`: the f64 product with the dequantized values and `sum |x| |w|` per element.
fn definition(x: &[f32], w: &PackedMatrix) -> (Vec<f64>, Vec<f64>) {
    let values = w.dequantize();
    product_definition(x, |i| values[i] as f64, w.rows, w.cols)
}

/// Every kind, with group sizes that allow the SIMD loop (multiples of 16) and some that do not.
fn kinds(cols: usize) -> Vec<(PackedKind, bool)> {
    let mut kinds = vec![(PackedKind::Fp8, false), (PackedKind::Int8, false)];
    if cols.is_multiple_of(2) {
        for group_size in [16, 32, cols.max(2), 10] {
            kinds.push((PackedKind::Int4 { group_size }, false));
            kinds.push((PackedKind::Int4 { group_size }, true));
            for table in [Lut4::Nf4, Lut4::Fp4] {
                kinds.push((PackedKind::Lut4 { table, group_size }, false));
            }
        }
    }
    kinds
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn packed_products_equal_the_dequantized_definition(
        tokens in 1usize..7, rows in 1usize..24, cols16 in 1usize..12, odd in 0usize..2,
        seed in any::<u64>()
    ) {
        // Multiples of 16 columns (SIMD blocks), or 2 more (scalar loop).
        let cols = cols16 * 16 + 2 * odd;
        let x = random_values(seed ^ 7, tokens * cols, 1.0);
        for (kind, act_order) in kinds(cols) {
            let w = random_matrix(kind, rows, cols, act_order, seed);
            let (reference, magnitude) = definition(&x, &w);
            for kernel in Kernel::available() {
                let mut y = vec![f32::NAN; tokens * rows];
                packed_matmul_with(kernel, &x, &w, &mut y);
                for (i, (&got, &want)) in y.iter().zip(&reference).enumerate() {
                    // f32 sums of exact products over at most `cols` terms, then the scales: an
                    // error of a few units in the last place of the magnitude times sqrt(cols),
                    // as for the dense products (tests/integration/cpu_ops.rs).
                    let bound = 1e-6 * magnitude[i] * (cols as f64).sqrt() + 1e-30;
                    prop_assert!(
                        got.is_finite() && (got as f64 - want).abs() <= bound,
                        "{kernel:?} {kind:?} act-order {act_order} element {i}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn packed_rows_do_not_depend_on_the_batch(
        tokens in 2usize..10, rows in 1usize..20, cols16 in 1usize..6, seed in any::<u64>()
    ) {
        let cols = cols16 * 16;
        let x = random_values(seed, tokens * cols, 1.0);
        for (kind, act_order) in kinds(cols) {
            let w = random_matrix(kind, rows, cols, act_order, seed);
            for kernel in Kernel::available() {
                let mut all = vec![0.0f32; tokens * rows];
                packed_matmul_with(kernel, &x, &w, &mut all);
                for t in 0..tokens {
                    let mut one = vec![0.0f32; rows];
                    packed_matmul_with(kernel, &x[t * cols..(t + 1) * cols], &w, &mut one);
                    prop_assert_eq!(&all[t * rows..(t + 1) * rows], &one[..], "{:?} {:?}", kernel, kind);
                }
            }
        }
    }
}

#[test]
fn packed_products_are_identical_for_any_thread_count() {
    let (tokens, rows, cols) = (5, 1031, 256);
    let x = random_values(3, tokens * cols, 1.0);
    for (kind, act_order) in kinds(cols) {
        let w = random_matrix(kind, rows, cols, act_order, 11);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut y = vec![0.0f32; tokens * rows];
            pool.install(|| Matrix::Packed(&w).product(&x, rows, cols, &mut y));
            y
        };
        let one = run(1);
        assert_eq!(one, run(2), "{kind:?}");
        assert_eq!(one, run(5), "{kind:?}");
    }
}

/// A NaN code makes its row's products NaN (the dequantized value is NaN), on every kernel, for
/// every token, wherever it sits in the row; the other rows are unaffected.
#[test]
fn fp8_nan_codes_give_nan_rows() {
    let (rows, cols) = (9, 96);
    let mut w = random_matrix(PackedKind::Fp8, rows, cols, false, 21);
    // Rows 1, 4 and 8 hold a NaN code (both signs), in different blocks and lanes.
    for (r, c, code) in [(1, 0, 0x7F), (4, 45, 0xFF), (8, 95, 0x7F)] {
        w.codes[r * cols + c] = code;
    }
    // One token (tiles of four rows) and several (tiles of one row).
    for tokens in [1, 3] {
        let x = random_values(5, tokens * cols, 1.0);
        let (reference, magnitude) = definition(&x, &w);
        for kernel in Kernel::available() {
            let mut y = vec![0.0f32; tokens * rows];
            packed_matmul_with(kernel, &x, &w, &mut y);
            for (i, (&got, &want)) in y.iter().zip(&reference).enumerate() {
                if [1, 4, 8].contains(&(i % rows)) {
                    assert!(
                        got.is_nan(),
                        "{kernel:?} {tokens} tokens, element {i}: {got}"
                    );
                } else {
                    // As in the property test above.
                    let bound = 1e-6 * magnitude[i] * (cols as f64).sqrt() + 1e-30;
                    assert!((got as f64 - want).abs() <= bound, "{kernel:?} element {i}");
                }
            }
        }
    }
}
