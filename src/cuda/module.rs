//! The kernels: the fatbins build.rs compiled from `csrc/` are embedded in the binary and loaded
//! into the device's context once, and every instantiation listed in [`KERNEL_VARIANTS`] is looked
//! up by symbol once, at load time. Launchers then take a function by its index in that list (no
//! string lookups after loading). They are issued in stream order, or, when asked for on compute
//! capability 9.0+, as programmatic dependent launches ([`Kernels::enable_dependent_launches`]).

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use super::device::CudaDevice;
use super::error::{CudaError, KernelError};
use super::params::KERNEL_VARIANTS;

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
    /// Whether [`launch`](super::launch::launch) issues programmatic dependent launches.
    dependent_launches: bool,
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
        for (index, variant) in KERNEL_VARIANTS.iter().enumerate() {
            let missing = || missing_kernel(index);
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
            dependent_launches: false,
        })
    }

    /// From now on, issues every launch as a programmatic dependent launch where `device` has them
    /// (compute capability 9.0 or newer): a kernel's blocks may be placed on the SMs while the
    /// kernel before it still runs, and wait there (every kernel's first statement,
    /// `mx::after_prior_kernels` in `csrc/common.cuh`, waits for the kernels before it and their
    /// writes), which hides the gap between consecutive kernels. [`Kernels::dependent_launches`]
    /// says whether they are on.
    pub fn enable_dependent_launches(&mut self, device: &CudaDevice) {
        self.dependent_launches = device.compute_capability().0 >= 9;
    }

    /// Whether launches are programmatic dependent launches.
    pub fn dependent_launches(&self) -> bool {
        self.dependent_launches
    }

    /// The function of [`KERNEL_VARIANTS`]`[index]`; [`KernelError::MissingKernel`] when none was
    /// loaded for it.
    pub fn function(&self, index: usize) -> Result<&CudaFunction, CudaError> {
        self.functions
            .get(index)
            .ok_or_else(|| missing_kernel(index))
    }
}

/// The error of variant `index` with no loaded function (or no such variant).
fn missing_kernel(index: usize) -> CudaError {
    let (symbol, module) = KERNEL_VARIANTS
        .get(index)
        .map_or(("(no such variant)", "(none)"), |v| (v.symbol, v.module));
    CudaError::Kernel(KernelError::MissingKernel { symbol, module })
}

/// What one compiled kernel uses, as `cuobjdump -res-usage` reports it for one architecture.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct KernelResources {
    /// The `extern "C"` symbol.
    pub symbol: String,
    /// The SASS architecture (`sm_80`, `sm_90a`, ...).
    pub arch: String,
    /// Bytes of stack frame (0 unless the kernel calls a non-inlined function or spills).
    pub stack: usize,
    /// Bytes of local memory per thread (spills, dynamically indexed arrays).
    pub local: usize,
    /// Bytes of static shared memory the kernel declares (without the 1 KiB a block of sm_90 keeps
    /// for the system, which cuobjdump counts for sm_90 code).
    pub static_shared: usize,
}

/// The resource usage of every kernel of every embedded fatbin, on every architecture it holds
/// code for, read with the cuobjdump beside the nvcc that compiled them (`MIXTRAL_CUOBJDUMP`, set
/// by build.rs). `None` (said on stderr) when the kernels were not built or that cuobjdump is not
/// on this machine (a test binary carried to a GPU machine without the toolkit).
#[cfg(test)]
pub(crate) fn compiled_resources() -> Option<Vec<KernelResources>> {
    let cuobjdump = option_env!("MIXTRAL_CUOBJDUMP")?;
    if !std::path::Path::new(cuobjdump).is_file() {
        eprintln!(
            "{cuobjdump} is not on this machine: the compiled kernels' resources are not read"
        );
        return None;
    }
    let mut found = Vec::new();
    for (stem, _) in embedded_fatbins() {
        // The copy build.rs embedded (kernels.rs names these files).
        let path = std::path::Path::new(env!("OUT_DIR")).join(format!("{stem}.fatbin"));
        let output = std::process::Command::new(cuobjdump)
            .arg("-res-usage")
            .arg(&path)
            .output()
            .unwrap_or_else(|e| panic!("running {cuobjdump}: {e}"));
        assert!(
            output.status.success(),
            "{cuobjdump} -res-usage {} failed",
            path.display()
        );
        let mut arch = String::new();
        let mut symbol = String::new();
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let line = line.trim();
            if let Some(a) = line.strip_prefix("arch = ") {
                arch = a.to_string();
            } else if let Some(f) = line.strip_prefix("Function ") {
                symbol = f.trim_end_matches(':').to_string();
            } else if line.starts_with("REG:") {
                let field = |name: &str| -> usize {
                    line.split_whitespace()
                        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix(':')?.parse().ok())
                        .unwrap_or_else(|| panic!("no {name} in {line:?}"))
                };
                let reserved = if arch.starts_with("sm_9") { 1024 } else { 0 };
                found.push(KernelResources {
                    symbol: symbol.clone(),
                    arch: arch.clone(),
                    stack: field("STACK"),
                    local: field("LOCAL"),
                    static_shared: field("SHARED").saturating_sub(reserved),
                });
            }
        }
    }
    Some(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No kernel spills or keeps arrays in local memory, on any architecture: every value lives in
    /// registers or shared memory (each SASS instance of every variant, as compiled).
    #[test]
    fn no_kernel_uses_local_memory_or_a_stack() {
        let Some(resources) = compiled_resources() else {
            return;
        };
        // Every variant on sm_80 and sm_90a at least.
        assert!(
            resources.len() >= 2 * KERNEL_VARIANTS.len(),
            "{} kernels read for {} variants",
            resources.len(),
            KERNEL_VARIANTS.len()
        );
        for r in &resources {
            assert_eq!((r.stack, r.local), (0, 0), "{} on {}", r.symbol, r.arch);
        }
    }

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

    /// Every kernel entry in `csrc/` is defined through `MX_ENTRY` (`csrc/common.cuh`), whose first
    /// statement is `mx::after_prior_kernels()`: with dependent launches on, an entry without it
    /// could read its inputs before the kernel writing them ends.
    #[test]
    fn every_kernel_entry_first_waits_for_the_kernels_before_it() {
        let csrc = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("csrc");
        let common = std::fs::read_to_string(csrc.join("common.cuh")).expect("common.cuh");
        let entry = &common[common.find("#define MX_ENTRY(").expect("MX_ENTRY")..];
        let entry = &entry[..entry.find("__VA_ARGS__").expect("the entry's body")];
        assert!(
            entry.contains("{") && entry.contains("mx::after_prior_kernels();"),
            "MX_ENTRY must wait for the kernels before it before its body: {entry}"
        );
        let mut entries = 0;
        for file in std::fs::read_dir(&csrc).expect("csrc/") {
            let path = file.expect("csrc/ entry").path();
            if path.extension().is_none_or(|e| e != "cu") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("a kernel file");
            assert!(
                !text.contains("__global__"),
                "{} declares a kernel entry outside MX_ENTRY",
                path.display()
            );
            entries += text.matches("MX_ENTRY(").count();
        }
        // Every family has at least one entry (families share entries through variants).
        assert!(entries >= 25, "found {entries} kernel entries");
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
