//! The kernels: the fatbins build.rs compiled from `csrc/` are embedded in the binary, loaded into
//! the device's context once, and every compiled instantiation listed in
//! [`KERNEL_VARIANTS`](super::params::KERNEL_VARIANTS) is looked up by symbol once, at load time.
//! Launchers then find a function by family and template constants (integers, no strings).

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use super::device::CudaDevice;
use super::error::CudaError;
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
            let missing = || CudaError::MissingKernel {
                symbol: variant.symbol,
                module: variant.module,
            };
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
