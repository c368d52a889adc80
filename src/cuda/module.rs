//! The kernels: the fatbins build.rs compiled from `csrc/` are embedded in the binary and loaded
//! into the device's context once, and every instantiation listed in [`KERNEL_VARIANTS`] is looked
//! up by symbol once, at load time. Launchers then take a function by its index in that list (no
//! string lookups after loading).

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use super::device::CudaDevice;
use super::error::{CudaError, KernelError};
use super::params::{KernelFamily, KernelVariant, KERNEL_VARIANTS};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The embedded fatbins: (csrc file stem, bytes).
pub fn embedded_fatbins() -> &'static [(&'static str, &'static [u8])] {
    embedded::KERNELS
}

/// Every kernel function, loaded once per device.
#[derive(Debug)]
pub struct Kernels {
    /// One function per entry of [`KERNEL_VARIANTS`], same order.
    functions: Vec<CudaFunction>,
    /// Keeps the modules loaded as long as the functions are used.
    _modules: Vec<Arc<CudaModule>>,
}

impl Kernels {
    /// Loads every embedded fatbin into `device`'s context and looks up every kernel instantiation.
    pub fn load(device: &CudaDevice) -> Result<Self, CudaError> {
        let ctx = device.context();
        let mut modules: Vec<(&'static str, Arc<CudaModule>)> =
            Vec::with_capacity(embedded::KERNELS.len());
        for &(stem, bytes) in embedded::KERNELS {
            // Copied into a fresh allocation: the driver reads the fatbin header with aligned loads.
            let module = ctx
                .load_module(Ptx::from_binary(bytes.to_vec()))
                .map_err(CudaError::driver(format!("loading the {stem} fatbin")))?;
            modules.push((stem, module));
        }
        let mut functions = Vec::with_capacity(KERNEL_VARIANTS.len());
        for variant in KERNEL_VARIANTS {
            let missing = || CudaError::Kernel(KernelError::MissingKernel {
                symbol: variant.symbol,
                module: variant.module,
            });
            let module = modules
                .iter()
                .find(|(stem, _)| *stem == variant.module)
                .map(|(_, module)| module)
                .ok_or_else(missing)?;
            functions.push(
                module
                    .load_function(variant.symbol)
                    .map_err(|_| missing())?,
            );
        }
        Ok(Kernels {
            functions,
            _modules: modules.into_iter().map(|(_, module)| module).collect(),
        })
    }

    /// The function of [`KERNEL_VARIANTS`]`[index]`.
    pub fn function(&self, index: usize) -> Option<&CudaFunction> {
        self.functions.get(index)
    }

    /// The instantiation of `family` compiled for template constants `consts`, with its variant.
    pub fn get(
        &self,
        family: KernelFamily,
        consts: &[u32],
    ) -> Option<(&'static KernelVariant, &CudaFunction)> {
        let index = KERNEL_VARIANTS
            .iter()
            .position(|v| v.family == family && v.consts == consts)?;
        Some((&KERNEL_VARIANTS[index], self.functions.get(index)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Magic number at the start of a CUDA fatbin container (little endian 0xBA55ED50).
    const FATBIN_MAGIC: [u8; 4] = [0x50, 0xed, 0x55, 0xba];

    #[test]
    fn every_variant_symbol_is_in_its_embedded_fatbin() {
        for variant in KERNEL_VARIANTS {
            let (_, bytes) = embedded_fatbins()
                .iter()
                .find(|(stem, _)| *stem == variant.module)
                .unwrap_or_else(|| panic!("no fatbin {} for {}", variant.module, variant.symbol));
            assert_eq!(
                bytes.get(..4),
                Some(&FATBIN_MAGIC[..]),
                "{} is not a fatbin",
                variant.module
            );
            // The cubins' string tables hold each kernel name NUL-terminated (fatbins are not compressed).
            let needle: Vec<u8> = variant.symbol.bytes().chain([0]).collect();
            assert!(
                bytes.windows(needle.len()).any(|w| w == needle),
                "{} is missing from {}.fatbin",
                variant.symbol,
                variant.module
            );
        }
    }

    #[test]
    fn every_fatbin_is_used() {
        for (stem, _) in embedded_fatbins() {
            assert!(
                KERNEL_VARIANTS.iter().any(|v| v.module == *stem),
                "{stem}.fatbin has no listed kernel"
            );
        }
    }
}
