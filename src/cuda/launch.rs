//! Issuing kernels: a planner decides each launch's [`Grid`] (which compiled instantiation, grid,
//! block, shared memory) and fills one parameter struct through the generated
//! [`args`](super::args); [`launch`] issues them in order on the stream, as programmatic dependent
//! launches when the kernels were set up for them
//! ([`Kernels::enable_dependent_launches`](super::module::Kernels::enable_dependent_launches)).

use cudarc::driver::{
    sys, CudaFunction, CudaStream, DeviceRepr, DriverError, LaunchConfig, PushKernelArg,
};

use super::error::{CudaError, KernelError};
use super::module::Kernels;
use super::params::KERNEL_VARIANTS;

/// The geometry of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    /// Index of the instantiation in [`KERNEL_VARIANTS`].
    pub variant: usize,
    /// Blocks in x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads per block.
    pub block: u32,
    /// Dynamic shared memory bytes.
    pub shared_bytes: u32,
}

impl Grid {
    /// A one-dimensional grid of `blocks` blocks of `block` threads, no dynamic shared memory.
    pub fn linear(variant: usize, blocks: u32, block: u32) -> Grid {
        Grid {
            variant,
            grid: (blocks, 1, 1),
            block,
            shared_bytes: 0,
        }
    }

    /// The instantiation's symbol.
    pub fn symbol(&self) -> &'static str {
        KERNEL_VARIANTS[self.variant].symbol
    }
}

/// What a planner returns: the parameter struct and its `N` launches, or nothing to launch (zero
/// tokens or rows), or why the shapes or buffers are refused.
pub type Planned<P, const N: usize> = Result<Option<(P, [Grid; N])>, CudaError>;

/// Issues `grids` in order, each with `params` (checked by the generated `params()`), on `stream`.
pub fn launch<P: DeviceRepr>(
    kernels: &Kernels,
    stream: &CudaStream,
    params: &P,
    grids: &[Grid],
) -> Result<(), CudaError> {
    for g in grids {
        let function = kernels.function(g.variant)?;
        // SAFETY: the function takes exactly one argument, the `#[repr(C)]` struct `P` whose layout
        // is asserted equal to the C definition (params.rs / params.h). `params` was filled by the
        // generated `XArgs::params` from views borrowed from live buffers (an output exclusively),
        // after checking each covers every element and alignment the kernel touches for the scalars
        // in `params`; a buffer dropped after this call is freed in stream order, after the kernel.
        // The planner chose the geometry and shared memory the kernel was written for. A dependent
        // launch may start before the kernel ahead of it ends, but every kernel's first statement
        // waits for it and its writes (`MX_ENTRY`; module.rs's tests check every entry uses it).
        let issued = if kernels.dependent_launches() {
            unsafe { launch_dependent(function, stream, g, params) }
        } else {
            let config = LaunchConfig {
                grid_dim: g.grid,
                block_dim: (g.block, 1, 1),
                shared_mem_bytes: g.shared_bytes,
            };
            let mut builder = stream.launch_builder(function);
            builder.arg(params);
            unsafe { builder.launch(config) }.map(|_| ())
        };
        issued.map_err(|source| {
            CudaError::Kernel(KernelError::Launch {
                symbol: g.symbol(),
                source,
            })
        })?;
    }
    Ok(())
}

/// Issues `function` over `g` with the single argument `params` on `stream` as a programmatic
/// dependent launch: its blocks may be placed on the SMs once every block of the kernel ahead of it
/// has started (that kernel's `griddepcontrol.launch_dependents`), and wait in its first statement
/// for that kernel to end.
///
/// # Safety
/// As a plain launch of `function` with `params`: `P` is the kernel's parameter struct, every
/// address in it valid for what the kernel touches, and `g` the geometry it was written for.
unsafe fn launch_dependent<P: DeviceRepr>(
    function: &CudaFunction,
    stream: &CudaStream,
    g: &Grid,
    params: &P,
) -> Result<(), DriverError> {
    stream.context().bind_to_thread()?;
    // SAFETY: an all-zero attribute is a valid value of the plain C struct; both fields set below.
    let mut attribute: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attribute.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attribute.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: g.grid.0,
        gridDimY: g.grid.1,
        gridDimZ: g.grid.2,
        blockDimX: g.block,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: g.shared_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attribute,
        numAttrs: 1,
    };
    // The driver copies the argument (one pointer to the struct) before returning.
    let mut argument = params as *const P as *mut std::ffi::c_void;
    // SAFETY: `config` and `argument` outlive the call; the caller vouches for the kernel's inputs.
    unsafe {
        sys::cuLaunchKernelEx(
            &config,
            function.cu_function(),
            &mut argument,
            std::ptr::null_mut(),
        )
    }
    .result()
}

/// Issues what a planner returned: its launches, or nothing (zero tokens or rows).
pub fn launch_planned<P: DeviceRepr, const N: usize>(
    kernels: &Kernels,
    stream: &CudaStream,
    planned: Option<(P, [Grid; N])>,
) -> Result<(), CudaError> {
    match planned {
        Some((params, grids)) => launch(kernels, stream, &params, &grids),
        None => Ok(()),
    }
}

/// Defines an op's launcher, `pub fn NAME(kernels, stream, scalars, args)`: plans with the op's
/// planner, then issues what it planned (nothing for zero tokens or rows). With `, if REQUIRE`, it
/// first calls `REQUIRE(stream)`, which refuses a device the op's kernels cannot run on. With
/// `; emulated EMULATED` (and feature `testing`) it also defines `EMULATED(scalars, args, schedule)`,
/// which runs the same plan on the kernel emulator.
macro_rules! planned_launcher {
    (
        $(#[$doc:meta])* $name:ident($scalars:ty, $args:ident) = $plan:path $(, if $require:path)?
        $(; emulated $emulated:ident)?
    ) => {
        $(#[$doc])*
        pub fn $name(
            kernels: &$crate::cuda::module::Kernels,
            stream: &cudarc::driver::CudaStream,
            scalars: &$scalars,
            args: $crate::cuda::args::$args<'_>,
        ) -> Result<(), $crate::cuda::error::CudaError> {
            $($require(stream)?;)?
            $crate::cuda::launch::launch_planned(kernels, stream, $plan(scalars, &args)?)
        }
        $(
            #[doc = concat!("[`", stringify!($name), "`] on the kernel emulator (feature `testing`).")]
            ///
            /// # Safety
            /// Every view in `args` is of host memory
            /// ([`View::of_host`](crate::cuda::memory::View::of_host)): the emulator reads and
            /// writes through the addresses on the CPU.
            #[cfg(feature = "testing")]
            pub unsafe fn $emulated(
                scalars: &$scalars,
                args: $crate::cuda::args::$args<'_>,
                schedule: $crate::cuda::emulator::Schedule,
            ) -> Result<(), $crate::cuda::emulator::EmulatorError> {
                let planned = $plan(scalars, &args)?;
                // SAFETY: planned just now over `args`, views of host memory (the caller's
                // contract) borrowed until this returns.
                unsafe { $crate::cuda::emulator::run_planned(planned, schedule) }
            }
        )?
    };
}
pub(crate) use planned_launcher;

/// A planner's result: `grids` with `params`, or nothing to launch when `count` (the op's tokens
/// or rows) is zero.
pub fn unless_empty<P, const N: usize>(
    count: u32,
    params: P,
    grids: [Grid; N],
) -> Option<(P, [Grid; N])> {
    (count > 0).then_some((params, grids))
}
