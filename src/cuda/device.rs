//! One CUDA device: its primary context and the single stream every op of this crate is issued on.
//! A missing driver is a typed [`CudaError::NoDriver`], never a panic.

use std::sync::Arc;

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaStream};

use super::error::CudaError;

/// Oldest compute capability the embedded kernels run on (sm_80 SASS; sm_90a SASS and compute_90 PTX
/// for newer parts).
pub const MIN_COMPUTE_CAPABILITY: (i32, i32) = (8, 0);

/// True when the CUDA driver library can be loaded (a machine without the NVIDIA driver answers false).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library and closes it again; no CUDA call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// A CUDA device with its context and stream.
///
/// All work goes to one non-default stream (capturable into CUDA graphs), so stream order alone
/// serialises every access to a buffer: cudarc's per-buffer event tracking is switched off before
/// any buffer exists, which also keeps event records out of captured graphs.
#[derive(Debug)]
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    compute_capability: (i32, i32),
    multiprocessors: usize,
}

impl CudaDevice {
    /// Opens device `ordinal`: checks the driver is present, the device exists and is sm_80 or newer,
    /// and creates the stream.
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        if !driver_present() {
            return Err(CudaError::NoDriver);
        }
        let count = CudaContext::device_count().map_err(CudaError::driver("counting devices"))?;
        let count = usize::try_from(count).unwrap_or(0);
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(CudaError::driver(format!("opening device {ordinal}")))?;
        let name = ctx
            .name()
            .map_err(CudaError::driver("reading the device name"))?;
        let compute_capability = ctx
            .compute_capability()
            .map_err(CudaError::driver("reading the compute capability"))?;
        if compute_capability < MIN_COMPUTE_CAPABILITY {
            return Err(CudaError::UnsupportedDevice {
                name,
                major: compute_capability.0,
                minor: compute_capability.1,
            });
        }
        let multiprocessors = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(CudaError::driver("reading the multiprocessor count"))?;
        // SAFETY: no buffer exists yet, and every op of this crate runs on the one stream below, so
        // no buffer is ever used by two streams (the case event tracking exists for).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(CudaError::driver("creating the stream"))?;
        Ok(CudaDevice {
            ctx,
            stream,
            name,
            compute_capability,
            multiprocessors: usize::try_from(multiprocessors).unwrap_or(0),
        })
    }

    /// The device's (primary) context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every op is issued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Device name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// Streaming multiprocessors (132 on an H100 SXM).
    pub fn multiprocessors(&self) -> usize {
        self.multiprocessors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without the driver this must be the typed error; with one, a usable device or a
    /// driver-reported error, never a panic.
    #[test]
    fn opening_a_device_never_panics() {
        match CudaDevice::new(0) {
            Err(CudaError::NoDriver) => assert!(!driver_present()),
            Ok(device) => assert!(device.compute_capability() >= MIN_COMPUTE_CAPABILITY),
            Err(other) => assert!(driver_present(), "{other}"),
        }
    }
}
