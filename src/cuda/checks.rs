//! The checks every launch makes before it reaches the driver: the buffer checks the generated
//! [`args`](super::args) call (length, rows and width, 16-byte alignment) and [`Check`], the shape
//! rules the hand-written planners state (32-bit counts, grid limits, compiled variants).

use super::error::{CudaError, KernelError};
use super::params::{KernelFamily, KERNEL_VARIANTS};

/// Largest count (and product of counts) the kernels index with 32-bit integers.
pub const MAX_INDEX: usize = i32::MAX as usize;
/// Largest grid y / z dimension.
pub const MAX_GRID_YZ: usize = 65_535;
/// Static plus dynamic shared memory a block may use without opting in to more.
pub const DEFAULT_SHARED_BYTES: usize = 48 * 1024;

/// Saturating product of extent factors.
pub fn product(factors: &[u128]) -> u128 {
    factors.iter().fold(1u128, |a, &b| a.saturating_mul(b))
}

/// `buffer` of `actual` elements must hold `expected`.
pub fn need(
    op: &'static str,
    buffer: &'static str,
    actual: usize,
    expected: u128,
) -> Result<(), CudaError> {
    if (actual as u128) < expected {
        return Err(CudaError::Kernel(KernelError::BufferTooSmall {
            op,
            buffer,
            expected: usize::try_from(expected).unwrap_or(usize::MAX),
            actual,
        }));
    }
    Ok(())
}

/// A column group of `rows x width` must cover `need_rows x need_width`.
pub fn need_rows(
    op: &'static str,
    buffer: &'static str,
    (rows, width): (usize, usize),
    need_rows: u128,
    need_width: u128,
) -> Result<(), CudaError> {
    need(op, buffer, rows, need_rows)?;
    if (width as u128) < need_width {
        return Err(CudaError::Kernel(KernelError::Unsupported {
            op,
            what: buffer,
            value: width,
            reason: format!("its rows are {width} wide; the kernel reads {need_width}"),
        }));
    }
    Ok(())
}

/// A row stride as the kernels' 32-bit count.
pub fn stride(op: &'static str, buffer: &'static str, stride: usize) -> Result<u32, CudaError> {
    Check::new(op).count(buffer, stride)
}

/// A buffer read or written with 16-byte vector accesses must start 16-byte aligned.
pub fn aligned(op: &'static str, buffer: &'static str, address: u64) -> Result<(), CudaError> {
    if !address.is_multiple_of(16) {
        return Err(CudaError::Kernel(KernelError::Misaligned {
            op,
            buffer,
            address,
        }));
    }
    Ok(())
}

/// The shape rules of one op, named in its errors.
#[derive(Debug, Clone, Copy)]
pub struct Check {
    /// The op.
    pub op: &'static str,
}

impl Check {
    /// The rules of `op`.
    pub const fn new(op: &'static str) -> Check {
        Check { op }
    }

    /// The error for an unsupported `what = value`.
    pub fn unsupported(
        &self,
        what: &'static str,
        value: usize,
        reason: impl Into<String>,
    ) -> CudaError {
        CudaError::Kernel(KernelError::Unsupported {
            op: self.op,
            what,
            value,
            reason: reason.into(),
        })
    }

    /// `value` as the kernels' 32-bit count (below 2^31).
    pub fn count(&self, what: &'static str, value: usize) -> Result<u32, CudaError> {
        if value > MAX_INDEX {
            return Err(self.unsupported(what, value, "must be below 2^31"));
        }
        Ok(value as u32)
    }

    /// `value` must be at least `min`.
    pub fn at_least(&self, what: &'static str, value: usize, min: usize) -> Result<(), CudaError> {
        if value < min {
            return Err(self.unsupported(what, value, format!("must be at least {min}")));
        }
        Ok(())
    }

    /// `value` must be a positive multiple of 8 (16-byte vector loads of bf16).
    pub fn multiple_of_8(&self, what: &'static str, value: usize) -> Result<(), CudaError> {
        if value == 0 || !value.is_multiple_of(8) {
            return Err(self.unsupported(
                what,
                value,
                "must be a positive multiple of 8 (16-byte vector loads)",
            ));
        }
        Ok(())
    }

    /// `value` as a grid y / z dimension.
    pub fn grid_yz(&self, what: &'static str, value: usize) -> Result<u32, CudaError> {
        if value > MAX_GRID_YZ {
            return Err(self.unsupported(
                what,
                value,
                format!("must be at most {MAX_GRID_YZ} (a grid dimension)"),
            ));
        }
        Ok(value as u32)
    }

    /// Product of counts, which must stay a valid 32-bit index.
    pub fn product(&self, what: &'static str, factors: &[usize]) -> Result<usize, CudaError> {
        let mut total: usize = 1;
        for &f in factors {
            total = total
                .checked_mul(f)
                .ok_or_else(|| self.unsupported(what, usize::MAX, "overflows"))?;
        }
        if total > MAX_INDEX {
            return Err(self.unsupported(what, total, "must be below 2^31"));
        }
        Ok(total)
    }

    /// A float that must be finite and non-negative.
    pub fn finite(&self, what: &'static str, value: f32) -> Result<(), CudaError> {
        if !value.is_finite() || value < 0.0 {
            return Err(CudaError::Kernel(KernelError::InvalidFloat {
                op: self.op,
                what,
                value,
            }));
        }
        Ok(())
    }

    /// The index (into [`KERNEL_VARIANTS`]) of `family` compiled for `consts`.
    pub fn variant(
        &self,
        family: KernelFamily,
        what: &'static str,
        consts: &[u32],
    ) -> Result<usize, CudaError> {
        if let Some(index) = KERNEL_VARIANTS
            .iter()
            .position(|v| v.family == family && v.consts == consts)
        {
            return Ok(index);
        }
        let compiled: Vec<String> = KERNEL_VARIANTS
            .iter()
            .filter(|v| v.family == family)
            .map(|v| format!("{:?}", v.consts))
            .collect();
        let value = consts.first().map_or(0, |&c| c as usize);
        Err(self.unsupported(
            what,
            value,
            format!(
                "no compiled {} kernel for {:?} = {consts:?}; compiled: {}",
                family.name(),
                family.axes(),
                compiled.join(", ")
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_a_compiled_variant() {
        for family in KernelFamily::ALL {
            let variants: Vec<_> = KERNEL_VARIANTS
                .iter()
                .filter(|v| v.family == family)
                .collect();
            assert!(!variants.is_empty(), "{family:?}");
            for v in variants {
                assert_eq!(v.consts.len(), family.axes().len(), "{}", v.symbol);
                assert!(v.symbol.starts_with(family.name()), "{}", v.symbol);
            }
        }
    }
}
