//! [`OptInKernels`]: the CUDA kernels that stay off until asked for (they have not been verified
//! on hardware, or are slower where they were measured), named as a comma-separated list
//! (`cutlass,mma-decode,pdl,fast-sample`) by the `--cuda-kernels` flag of `mixtral-run` and
//! `mixtral-serve` ([`OptInKernels::from_flag`]). The CPU engine ignores them.

use std::fmt;
use std::str::FromStr;

use super::Device;

/// Opt-in CUDA kernels; each asks the CUDA engine for the option of the same meaning in
/// `mixtral::cuda::CudaEngineOptions`. The default is none.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct OptInKernels {
    /// `cutlass`: CUTLASS's Hopper grouped GEMM for the prefill experts and its dense GEMM for the
    /// prefill projections (`cutlass_experts`).
    pub cutlass: bool,
    /// `mma-decode`: the tensor-core decode products (`mma_decode`).
    pub mma_decode: bool,
    /// `pdl`: every kernel issued as a programmatic dependent launch on compute capability 9.0+
    /// (`dependent_launches`).
    pub dependent_launches: bool,
    /// `fast-sample`: device sampling through the `sample` kernel's fast paths (`fast_sampling`).
    pub fast_sampling: bool,
}

/// The names of the list, in the order [`OptInKernels`]'s `Display` writes them.
const NAMES: [&str; 4] = ["cutlass", "mma-decode", "pdl", "fast-sample"];

impl OptInKernels {
    /// The flags in the order of [`NAMES`].
    fn flags_mut(&mut self) -> [&mut bool; 4] {
        [
            &mut self.cutlass,
            &mut self.mma_decode,
            &mut self.dependent_launches,
            &mut self.fast_sampling,
        ]
    }

    /// The flags in the order of [`NAMES`].
    fn flags(&self) -> [bool; 4] {
        [
            self.cutlass,
            self.mma_decode,
            self.dependent_launches,
            self.fast_sampling,
        ]
    }
}

impl OptInKernels {
    /// The `--cuda-kernels` flag of both command lines: the list `value` (none when the flag is
    /// absent), asked of `device`.
    pub fn from_flag(value: Option<&str>, device: Device) -> Result<Self, KernelsFlagError> {
        let kernels = match value {
            None => OptInKernels::default(),
            Some(list) => list.parse()?,
        };
        if device == Device::Cpu && kernels != OptInKernels::default() {
            return Err(KernelsFlagError::NeedsCuda(kernels));
        }
        Ok(kernels)
    }
}

/// Why a `--cuda-kernels` flag was refused; the message names the flag and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelsFlagError {
    /// A name that is not an opt-in kernel.
    #[error("--cuda-kernels: {0}")]
    Unknown(#[from] UnknownKernel),
    /// Kernels asked of the CPU engine.
    #[error("--cuda-kernels {0} needs --device cuda (the CPU engine has no CUDA kernels)")]
    NeedsCuda(OptInKernels),
}

/// A `--cuda-kernels` list naming something that is not an opt-in kernel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown CUDA kernel {name:?} in {list:?}: expected a comma-separated list of cutlass, mma-decode, pdl, fast-sample (or none)")]
pub struct UnknownKernel {
    /// The list as given.
    pub list: String,
    /// The name not recognised.
    pub name: String,
}

impl FromStr for OptInKernels {
    type Err = UnknownKernel;

    /// Parses `cutlass,mma-decode,pdl,fast-sample` (any subset, any order, repeats allowed, spaces
    /// around the names ignored); `none` or an empty string is none.
    fn from_str(list: &str) -> Result<Self, Self::Err> {
        let mut kernels = OptInKernels::default();
        if matches!(list.trim(), "" | "none") {
            return Ok(kernels);
        }
        for name in list.split(',').map(str::trim) {
            let Some(i) = NAMES.iter().position(|n| *n == name) else {
                return Err(UnknownKernel {
                    list: list.to_string(),
                    name: name.to_string(),
                });
            };
            *kernels.flags_mut()[i] = true;
        }
        Ok(kernels)
    }
}

impl fmt::Display for OptInKernels {
    /// The comma-separated list [`FromStr`] reads back, or `none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on: Vec<&str> = NAMES
            .iter()
            .zip(self.flags())
            .filter_map(|(name, on)| on.then_some(*name))
            .collect();
        if on.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&on.join(","))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subset_round_trips_through_its_list() {
        for bits in 0..16u8 {
            let kernels = OptInKernels {
                cutlass: bits & 1 != 0,
                mma_decode: bits & 2 != 0,
                dependent_launches: bits & 4 != 0,
                fast_sampling: bits & 8 != 0,
            };
            let text = kernels.to_string();
            assert_eq!(text.parse::<OptInKernels>(), Ok(kernels), "{text}");
        }
    }

    #[test]
    fn names_order_spaces_and_repeats() {
        let all = OptInKernels {
            cutlass: true,
            mma_decode: true,
            dependent_launches: true,
            fast_sampling: true,
        };
        assert_eq!(
            " mma-decode , pdl,cutlass,fast-sample,cutlass".parse(),
            Ok(all)
        );
        assert_eq!(
            "cutlass".parse::<OptInKernels>().map(|k| k.flags()),
            Ok([true, false, false, false])
        );
        assert_eq!("".parse(), Ok(OptInKernels::default()));
        assert_eq!(" none ".parse(), Ok(OptInKernels::default()));
    }

    #[test]
    fn unknown_names_are_refused_naming_the_name_and_the_list() {
        for (list, name) in [
            ("pdl,mma_decode", "mma_decode"),
            ("wgmma", "wgmma"),
            ("CUTLASS", "CUTLASS"),
            ("pdl,", ""),
            ("none,cutlass", "none"),
        ] {
            let error = list.parse::<OptInKernels>().unwrap_err();
            assert_eq!((error.list.as_str(), error.name.as_str()), (list, name));
            assert!(error.to_string().contains("mma-decode"), "{error}");
        }
    }
}
