//! `rmsnorm` (csrc/rmsnorm.cu): optionally adds `addend` (`[rows, addend_count, hidden]`, bf16 or f32:
//! the attention projection, or the MoE slots) into the f32 residual stream `[rows, hidden]` in place,
//! then writes `out = residual * rsqrt(mean(residual^2) + eps) * weight` (f32 math, bf16 out).

use crate::cuda::args::{RmsnormArgs, RmsnormScalars};
use crate::cuda::checks::Check;
use crate::cuda::launch::{planned_launcher, unless_empty, Grid, Planned};
use crate::cuda::memory::AnyView;
use crate::cuda::params::{KernelFamily, RmsnormParams, RMSNORM_THREADS};

planned_launcher! {
    /// `residual += sum of addends; out = rmsnorm(residual) * weight`; zero rows launch nothing.
    rmsnorm(RmsnormScalars, RmsnormArgs) = plan; emulated rmsnorm_emulated
}

fn plan(s: &RmsnormScalars, a: &RmsnormArgs<'_>) -> Planned<RmsnormParams, 1> {
    let c = Check::new("rmsnorm");
    c.count("rows", s.rows as usize)?;
    c.at_least("hidden", s.hidden as usize, 1)?;
    c.count("hidden", s.hidden as usize)?;
    c.finite("eps", s.eps)?;
    c.product("rows * hidden", &[s.rows as usize, s.hidden as usize])?;
    // The variant's ADD: 0 none, 1 bf16, 2 f32; an addend needs a count and a count an addend.
    let add = match (&a.addend, s.addend_count) {
        (None, 0) => 0,
        (Some(addend), count) if count > 0 => {
            c.product(
                "rows * addend_count * hidden",
                &[s.rows as usize, count as usize, s.hidden as usize],
            )?;
            match addend {
                AnyView::Bf16(_) => 1,
                AnyView::F32(_) => 2,
            }
        }
        (_, count) => {
            return Err(c.unsupported(
                "addend_count",
                count as usize,
                "must be at least 1 with an addend and 0 without",
            ))
        }
    };
    let params = a.params(c.op, s)?;
    let variant = c.variant(KernelFamily::Rmsnorm, "add", &[add])?;
    Ok(unless_empty(
        s.rows,
        params,
        [Grid::linear(variant, s.rows, RMSNORM_THREADS)],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::error::{CudaError, KernelError};
    use crate::cuda::ops::fake::{too_small, unsupported, view, view_mut};

    fn args(residual: usize, addend: Option<usize>, weight: usize) -> RmsnormArgs<'static> {
        RmsnormArgs {
            out: view_mut(30),
            residual: view_mut(residual),
            addend: addend.map(|len| AnyView::F32(view(len))),
            weight: view(weight),
        }
    }

    #[test]
    fn checks_addends_and_eps() {
        let s = RmsnormScalars {
            rows: 3,
            hidden: 10,
            addend_count: 2,
            eps: 1e-5,
        };
        let (params, [grid]) = plan(&s, &args(30, Some(60), 10)).unwrap().unwrap();
        assert_eq!(grid.symbol(), "rmsnorm_add_f32");
        assert_eq!(params.addend_count, 2);
        let plain = RmsnormScalars {
            addend_count: 0,
            ..s
        };
        let (params, [grid]) = plan(&plain, &args(30, None, 10)).unwrap().unwrap();
        assert_eq!(grid.symbol(), "rmsnorm_plain");
        assert_eq!(params.addend, 0);
        too_small(plan(&s, &args(30, Some(59), 10)), "addend");
        too_small(plan(&plain, &args(29, None, 10)), "residual");
        too_small(plan(&plain, &args(30, None, 9)), "weight");
        unsupported(plan(&plain, &args(30, Some(60), 10)), "addend_count");
        unsupported(plan(&s, &args(30, None, 10)), "addend_count");
        for eps in [f32::NAN, -1e-6, f32::INFINITY] {
            assert!(matches!(
                plan(&RmsnormScalars { eps, ..plain }, &args(30, None, 10)),
                Err(CudaError::Kernel(KernelError::InvalidFloat {
                    what: "eps",
                    ..
                }))
            ));
        }
    }
}
