//! The error type of the CUDA backend, [`CudaError`]: every failure names the device, allocation,
//! value or kernel involved; a refused kernel launch is a [`KernelError`] inside it.

use cudarc::driver::DriverError;

/// Why a CUDA call or a kernel launch was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// The CUDA driver library (libcuda.so) could not be loaded.
    #[error(
        "no CUDA driver: libcuda could not be loaded (install the NVIDIA driver, 580 or newer)"
    )]
    NoDriver,
    /// There is no device with this ordinal.
    #[error("no CUDA device {ordinal}: the driver reports {count} device(s)")]
    NoDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// Devices present.
        count: usize,
    },
    /// The GPU is older than the kernels support (they need compute capability 8.0).
    #[error(
        "CUDA device {name} has compute capability {major}.{minor}; the kernels need 8.0 or newer"
    )]
    UnsupportedDevice {
        /// Device name.
        name: String,
        /// Compute capability, major.
        major: i32,
        /// Compute capability, minor.
        minor: i32,
    },
    /// A driver call failed.
    #[error("CUDA driver call failed while {context}: {source}")]
    Driver {
        /// What was being done.
        context: String,
        /// The driver's error.
        #[source]
        source: DriverError,
    },
    /// The device has not enough free memory for an allocation (or for the whole plan, checked
    /// before allocating).
    #[error(
        "out of GPU memory allocating {what}: {bytes} bytes needed, {free} of {total} bytes free"
    )]
    OutOfMemory {
        /// What was being allocated.
        what: String,
        /// Bytes needed.
        bytes: usize,
        /// Free device memory when it failed.
        free: usize,
        /// Total device memory.
        total: usize,
    },
    /// The model or the options need something the CUDA engine does not support.
    #[error("the CUDA engine cannot run this model: {0}")]
    UnsupportedModel(String),
    /// An earlier failure left the device in an unknown state (a sticky CUDA error); the engine
    /// refuses all further work.
    #[error("the CUDA engine is unusable after an earlier failure: {0}")]
    Dead(String),
    /// A collective between the ranks of a sharded engine failed (NCCL missing or refusing a
    /// call).
    #[error("collective: {0}")]
    Collective(String),
    /// A step of a sharded engine's rank (or its warm-up) still waited on its collectives after
    /// the timeout: a peer rank died or hangs. The rank's communicators were aborted to end the
    /// wait, so the engine is dead.
    #[error(
        "a collective waited more than {timeout:?} for the other ranks (one died or hangs); this \
         rank's NCCL communicators were aborted"
    )]
    CollectiveTimeout {
        /// The rank's timeout.
        timeout: std::time::Duration,
    },
    /// A kernel launch refused by the launch checks or by the driver (a fault of the engine's plan,
    /// never of the model or the input).
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

/// Why a kernel launch was refused: by the checks every launch makes (buffers, shapes, compiled
/// variants) or by the driver. Each names the op, buffer, value or kernel involved.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A compiled kernel the crate expects is not in the embedded fatbins.
    #[error("kernel {symbol} is not in the embedded fatbin {module}")]
    MissingKernel {
        /// The `extern "C"` symbol.
        symbol: &'static str,
        /// The csrc file stem.
        module: &'static str,
    },
    /// A device buffer is shorter than the shapes require.
    #[error("{op}: buffer `{buffer}` holds {actual} elements but the shapes need {expected}")]
    BufferTooSmall {
        /// The op.
        op: &'static str,
        /// The buffer (parameter name).
        buffer: &'static str,
        /// Elements needed.
        expected: usize,
        /// Elements present.
        actual: usize,
    },
    /// A device buffer read with 16-byte vector loads does not start on a 16-byte boundary.
    #[error("{op}: buffer `{buffer}` at device address {address:#x} is not 16-byte aligned")]
    Misaligned {
        /// The op.
        op: &'static str,
        /// The buffer (parameter name).
        buffer: &'static str,
        /// Its device address.
        address: u64,
    },
    /// A shape value the kernels cannot take.
    #[error("{op}: {what} = {value} is not supported: {reason}")]
    Unsupported {
        /// The op.
        op: &'static str,
        /// The shape parameter.
        what: &'static str,
        /// Its value.
        value: usize,
        /// What the kernels accept.
        reason: String,
    },
    /// A float parameter that must be finite and non-negative is not.
    #[error("{op}: {what} = {value} must be finite and non-negative")]
    InvalidFloat {
        /// The op.
        op: &'static str,
        /// The parameter.
        what: &'static str,
        /// Its value.
        value: f32,
    },
    /// A host entry point of a kernel library (the CUTLASS shim, `csrc/cutlass/`) failed.
    #[error("{entry} failed with code {code}: {reason}")]
    Library {
        /// The `extern "C"` entry point.
        entry: &'static str,
        /// What it returned.
        code: i32,
        /// The code read as a `cudaError_t` or a `cutlass::Status`.
        reason: String,
    },
    /// A kernel launch was refused by the driver.
    #[error("launching kernel {symbol} failed: {source}")]
    Launch {
        /// The `extern "C"` symbol.
        symbol: &'static str,
        /// The driver's error.
        #[source]
        source: DriverError,
    },
}

impl CudaError {
    /// Wraps a driver error with what was being done.
    pub(crate) fn driver(context: impl Into<String>) -> impl FnOnce(DriverError) -> CudaError {
        let context = context.into();
        move |source| CudaError::Driver { context, source }
    }
}
