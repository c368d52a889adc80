//! [`open`]: builds any backend from a device string (`cpu`, `cuda`, `cuda:N`) with one set of
//! [`EngineOptions`], returning a boxed [`Engine`]. A string that names no device, or a CUDA device
//! in a build without the `cuda` feature, is an [`OpenError`] naming the string. A tensor- or
//! expert-parallel split ([`EngineOptions::parallel`]) runs on the CPU as simulated ranks
//! ([`ShardedCpuEngine`]); on CUDA, over one GPU per rank with NCCL in a build with the `nccl`
//! feature (`mixtral::cuda::ShardedCudaEngine`), and is refused without it.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use super::{Engine, EngineError, OptInKernels};
use crate::checkpoint::LoadProgress;
use crate::cpu::{CpuEngine, CpuEngineOptions};
use crate::shard::engine::DEFAULT_TIMEOUT;
use crate::shard::{Layout, ShardError, ShardedCpuEngine, ShardedOptions};
use crate::weights::ModelWeights;

/// Where an engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// The CPU reference engine.
    Cpu,
    /// A CUDA device, by ordinal.
    Cuda(usize),
}

impl Device {
    /// Parses `cpu`, `cuda` (device 0) or `cuda:N` (N decimal digits); anything else is
    /// [`OpenError::BadDevice`]. Parsing does not ask whether this build can run the device: see
    /// [`Device::check_supported`].
    pub fn parse(text: &str) -> Result<Device, OpenError> {
        let ordinal = |n: &str| {
            n.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| n.parse::<usize>().ok())
                .flatten()
        };
        match text {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => text
                .strip_prefix("cuda:")
                .and_then(ordinal)
                .map(Device::Cuda)
                .ok_or_else(|| OpenError::BadDevice {
                    device: text.to_string(),
                }),
        }
    }

    /// Refuses a CUDA device in a build without the `cuda` feature ([`OpenError::NoCudaSupport`]),
    /// to check before anything is loaded.
    pub fn check_supported(self) -> Result<(), OpenError> {
        self.supported(&self.to_string())
    }

    /// [`Device::check_supported`], naming the device `text` (as the user wrote it).
    fn supported(self, text: &str) -> Result<(), OpenError> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(_) if cfg!(feature = "cuda") => Ok(()),
            Device::Cuda(_) => Err(OpenError::NoCudaSupport {
                device: text.to_string(),
            }),
        }
    }
}

impl FromStr for Device {
    type Err = OpenError;

    fn from_str(text: &str) -> Result<Device, OpenError> {
        Device::parse(text)
    }
}

impl fmt::Display for Device {
    /// `cpu` or `cuda:N`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Options every backend takes; `None` leaves the backend's default (see [`CpuEngineOptions`]
/// and, with the `cuda` feature, `CudaEngineOptions`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EngineOptions {
    /// Longest sequence, in tokens; `None` = the model's `max_position_embeddings`.
    pub max_context: Option<usize>,
    /// Most sequences alive at once (on the GPU also the largest decode batch).
    pub max_sequences: Option<usize>,
    /// Tokens per KV-cache block.
    pub block_size: Option<usize>,
    /// Blocks in the KV pool; `None` = the backend's rule (enough for `max_sequences` full
    /// contexts, on the GPU at most what the free memory holds).
    pub kv_blocks: Option<usize>,
    /// Most tokens in one forward pass on the GPU (longer steps run in chunks); the CPU engine
    /// takes any step whole and ignores it.
    pub max_step_tokens: Option<usize>,
    /// Tensor- and expert-parallel split; the default (1 x 1) is one rank. On the CPU a split runs
    /// on simulated ranks, one thread each ([`ShardedCpuEngine`]); on CUDA over the GPUs from the
    /// device given on, with the `nccl` feature (refused without it:
    /// [`OpenError::MultiGpuNotBuilt`]).
    pub parallel: Layout,
    /// CUDA kernels that are off until asked for ([`OptInKernels`]); the CPU engine ignores them.
    pub opt_in: OptInKernels,
}

impl EngineOptions {
    /// The CPU engine's options: its defaults with every field given here.
    pub fn cpu(&self) -> CpuEngineOptions {
        let d = CpuEngineOptions::default();
        CpuEngineOptions {
            max_context: self.max_context.or(d.max_context),
            block_size: self.block_size.unwrap_or(d.block_size),
            kv_blocks: self.kv_blocks.or(d.kv_blocks),
            max_sequences: self.max_sequences.unwrap_or(d.max_sequences),
        }
    }

    /// The CUDA engine's options on device `ordinal`: these limits and opt-in kernels, the CUDA
    /// defaults for the rest.
    #[cfg(feature = "cuda")]
    pub fn cuda(&self, ordinal: usize) -> crate::cuda::CudaEngineOptions {
        crate::cuda::CudaEngineOptions {
            engine: self.clone(),
            device: ordinal,
            cutlass_experts: self.opt_in.cutlass,
            mma_decode: self.opt_in.mma_decode,
            dependent_launches: self.opt_in.dependent_launches,
            fast_sampling: self.opt_in.fast_sampling,
            ..crate::cuda::CudaEngineOptions::default()
        }
    }
}

/// Why [`open`] built no engine. Each names the device as given.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OpenError {
    /// The string names no device.
    #[error("invalid device {device:?}: expected cpu, cuda or cuda:N")]
    BadDevice {
        /// The string given.
        device: String,
    },
    /// A CUDA device in a build without the `cuda` feature.
    #[error("device {device}: this build has no CUDA support (rebuild with --features cuda)")]
    NoCudaSupport {
        /// The device as given.
        device: String,
    },
    /// A tensor- or expert-parallel split on CUDA in a build without the `nccl` feature.
    #[error(
        "device {device}: {layout} needs {} GPUs, and this build has no multi-GPU support \
         (rebuild with --features cuda,nccl; --device cpu runs the same split on simulated ranks)",
        layout.world()
    )]
    MultiGpuNotBuilt {
        /// The device as given.
        device: String,
        /// The split asked for.
        layout: Layout,
    },
    /// The sharded CPU engine refused to build (a size the split does not divide, a weight format
    /// that cannot be cut, bad cache options).
    #[error("device {device}: {source}")]
    Shard {
        /// The device as given.
        device: String,
        /// Why.
        #[source]
        source: ShardError,
    },
    /// The backend refused to build: bad options ([`EngineError::InvalidOptions`]) or a backend
    /// failure ([`EngineError::Backend`], for CUDA holding the `CudaError`: no driver, no such
    /// device, out of memory, ...).
    #[error("device {device}: {source}")]
    Engine {
        /// The device as given.
        device: String,
        /// The backend's error.
        #[source]
        source: EngineError,
    },
}

/// Builds an engine for `device` (`cpu`, `cuda`, `cuda:N`) over `weights`; see [`open_device`].
pub fn open(
    device: &str,
    weights: &Arc<ModelWeights>,
    options: &EngineOptions,
    progress: Option<&dyn Fn(LoadProgress)>,
) -> Result<Box<dyn Engine>, OpenError> {
    build(Device::parse(device)?, device, weights, options, progress)
}

/// Builds an engine on `device` over `weights` with `options`. The CPU engine shares the weights;
/// the CUDA engine uploads them, reporting `progress` (the CPU engine never calls it).
pub fn open_device(
    device: Device,
    weights: &Arc<ModelWeights>,
    options: &EngineOptions,
    progress: Option<&dyn Fn(LoadProgress)>,
) -> Result<Box<dyn Engine>, OpenError> {
    build(device, &device.to_string(), weights, options, progress)
}

/// Refuses a tensor- or expert-parallel split on a CUDA device in a build without the `nccl`
/// feature ([`OpenError::MultiGpuNotBuilt`]), to check before anything is loaded.
pub fn check_parallel_supported(device: Device, layout: Layout) -> Result<(), OpenError> {
    check_parallel(device, &device.to_string(), layout)
}

/// [`check_parallel_supported`], naming the device `text`.
fn check_parallel(device: Device, text: &str, layout: Layout) -> Result<(), OpenError> {
    match device {
        Device::Cuda(_) if layout.is_sharded() && !cfg!(feature = "nccl") => {
            Err(OpenError::MultiGpuNotBuilt {
                device: text.to_string(),
                layout,
            })
        }
        _ => Ok(()),
    }
}

/// [`open_device`], naming the device `text` in errors.
fn build(
    device: Device,
    text: &str,
    weights: &Arc<ModelWeights>,
    options: &EngineOptions,
    progress: Option<&dyn Fn(LoadProgress)>,
) -> Result<Box<dyn Engine>, OpenError> {
    check_parallel(device, text, options.parallel)?;
    device.supported(text)?;
    #[cfg(feature = "nccl")]
    if let (Device::Cuda(first), true) = (device, options.parallel.is_sharded()) {
        let sharded = crate::cuda::ShardedCudaOptions {
            layout: options.parallel,
            cuda: options.cuda(first),
            timeout: crate::cuda::sharded::DEFAULT_TIMEOUT,
        };
        let built = crate::cuda::ShardedCudaEngine::new(weights, &sharded, progress);
        let engine = built.map_err(|e| OpenError::Engine {
            device: text.to_string(),
            source: EngineError::backend(e),
        })?;
        return Ok(Box::new(engine));
    }
    if options.parallel.is_sharded() {
        let sharded = ShardedOptions {
            layout: options.parallel,
            cpu: options.cpu(),
            timeout: DEFAULT_TIMEOUT,
        };
        let engine =
            ShardedCpuEngine::new(weights, &sharded).map_err(|source| OpenError::Shard {
                device: text.to_string(),
                source,
            })?;
        return Ok(Box::new(engine));
    }
    let refused = |source: EngineError| OpenError::Engine {
        device: text.to_string(),
        source,
    };
    match device {
        Device::Cpu => {
            let _ = progress;
            let engine = CpuEngine::new(Arc::clone(weights), options.cpu()).map_err(refused)?;
            Ok(Box::new(engine))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => {
            let built = crate::cuda::CudaEngine::new(weights, options.cuda(ordinal), progress);
            let engine = built.map_err(|e| refused(EngineError::backend(e)))?;
            Ok(Box::new(engine))
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(OpenError::NoCudaSupport {
            device: text.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings_parse() {
        assert_eq!(Device::parse("cpu"), Ok(Device::Cpu));
        assert_eq!(Device::parse("cuda"), Ok(Device::Cuda(0)));
        assert_eq!(Device::parse("cuda:0"), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse::<Device>(), Ok(Device::Cuda(3)));
        assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
        assert_eq!(Device::Cpu.to_string(), "cpu");
    }

    #[test]
    fn bad_device_strings_are_typed_errors_naming_the_string() {
        for bad in [
            "",
            "tpu",
            "CPU",
            " cpu",
            "cpu ",
            "cuda:",
            "cuda:x",
            "cuda:+1",
            "cuda:-1",
            "cuda0",
            "cuda:1:2",
            "cuda:99999999999999999999999",
        ] {
            let error = Device::parse(bad).expect_err(bad);
            assert_eq!(
                error,
                OpenError::BadDevice {
                    device: bad.to_string()
                }
            );
            assert!(error.to_string().contains(&format!("{bad:?}")), "{error}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_refused_naming_the_string() {
        for (text, named) in [("cuda", "cuda:0"), ("cuda:1", "cuda:1")] {
            let device = Device::parse(text).unwrap();
            let error = device.check_supported().unwrap_err();
            assert_eq!(
                error,
                OpenError::NoCudaSupport {
                    device: named.to_string()
                }
            );
            assert!(error.to_string().contains(named), "{error}");
            assert!(error.to_string().contains("no CUDA support"), "{error}");
        }
        assert_eq!(Device::Cpu.check_supported(), Ok(()));
    }

    #[cfg(not(feature = "nccl"))]
    #[test]
    fn a_split_on_cuda_is_refused_naming_the_layout() {
        let layout = Layout { tp: 2, ep: 1 };
        let error = check_parallel_supported(Device::Cuda(1), layout).unwrap_err();
        assert_eq!(
            error,
            OpenError::MultiGpuNotBuilt {
                device: "cuda:1".into(),
                layout
            }
        );
        assert!(
            error.to_string().contains("no multi-GPU support"),
            "{error}"
        );
        assert!(error.to_string().contains("2 GPUs"), "{error}");
        assert_eq!(check_parallel_supported(Device::Cpu, layout), Ok(()));
        assert_eq!(
            check_parallel_supported(Device::Cuda(0), Layout::default()),
            Ok(())
        );
    }

    #[test]
    fn unified_options_fill_only_what_they_name() {
        assert_eq!(
            format!("{:?}", EngineOptions::default().cpu()),
            format!("{:?}", CpuEngineOptions::default())
        );
        let options = EngineOptions {
            max_context: Some(64),
            max_sequences: Some(2),
            block_size: Some(8),
            kv_blocks: Some(5),
            max_step_tokens: Some(16),
            parallel: Layout::default(),
            opt_in: OptInKernels {
                cutlass: true,
                ..OptInKernels::default()
            },
        };
        let cpu = options.cpu();
        assert_eq!(
            (
                cpu.max_context,
                cpu.max_sequences,
                cpu.block_size,
                cpu.kv_blocks
            ),
            (Some(64), 2, 8, Some(5))
        );
        #[cfg(feature = "cuda")]
        {
            let cuda = options.cuda(3);
            assert_eq!(cuda.device, 3);
            assert_eq!(
                (
                    cuda.cutlass_experts,
                    cuda.mma_decode,
                    cuda.dependent_launches,
                    cuda.fast_sampling
                ),
                (true, false, false, false)
            );
            assert_eq!(cuda.engine, options);
        }
    }
}
