//! Shared harness of the GPU kernel tests: the one device (or the printed reason there is none),
//! guard-banded device buffers, the helpers of `tests/common` re-exported, and the error bounds
//! every comparison uses, each derived from the arithmetic ([`f32_bound`], [`bf16_bound`],
//! [`propagated_bound`]; the derivations are on the functions, and the tests at the end of this file
//! check the rounding constants they rest on, on the CPU).
#![allow(dead_code)]

use std::sync::{Mutex, MutexGuard, OnceLock};

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use half::bf16;
use mixtral::cuda::{CudaDevice, Kernels};
use mixtral::quant::Q8;

use crate::shared;
pub use crate::shared::numeric::{random_values, rel_l2, round_bf16, to_bf16, to_f32};

/// Elements of poison on each side of every guarded buffer (128 or 256 bytes: keeps 16-byte alignment).
pub const GUARD: usize = 64;

/// The device and its loaded kernels.
pub struct Gpu {
    /// The device and its stream.
    pub device: CudaDevice,
    /// Every kernel.
    pub kernels: Kernels,
}

impl Gpu {
    /// The stream every op runs on.
    pub fn stream(&self) -> &std::sync::Arc<CudaStream> {
        self.device.stream()
    }
}

/// What opening the device gave, once per test binary.
enum Opened {
    /// The device and its kernels.
    Ready(Mutex<Gpu>),
    /// No CUDA driver or no device: the tests skip.
    NoGpu(String),
    /// A device is there but failed: the tests fail.
    Broken(&'static str, String),
}

static GPU: OnceLock<Opened> = OnceLock::new();

fn open() -> Opened {
    let device = match CudaDevice::new(0) {
        Ok(device) => device,
        Err(e) if shared::gpu::no_gpu(&e) => return Opened::NoGpu(e.to_string()),
        Err(e) => return Opened::Broken("opening device 0", e.to_string()),
    };
    match Kernels::load(&device) {
        Ok(kernels) => Opened::Ready(Mutex::new(Gpu { device, kernels })),
        Err(e) => Opened::Broken("loading the kernels", e.to_string()),
    }
}

/// The GPU, locked for one test (tests run one at a time on it); or `None` after printing why the
/// test skips, which only a machine without a CUDA driver or device does (`tests/common/gpu.rs`).
///
/// # Panics
/// When a device is present but cannot be opened or the kernels do not load: every GPU test then
/// fails with that error.
pub fn gpu(test: &str) -> Option<MutexGuard<'static, Gpu>> {
    match GPU.get_or_init(open) {
        Opened::Ready(gpu) => Some(gpu.lock().unwrap_or_else(|poisoned| poisoned.into_inner())),
        Opened::NoGpu(reason) => {
            shared::gpu::print_skip(test, reason);
            None
        }
        Opened::Broken(what, error) => shared::gpu::fail(test, what, error),
    }
}

/// A value a kernel never writes, with a bit pattern comparable exactly.
pub trait Poison: DeviceRepr + ValidAsZeroBits + Copy + Default + Unpin {
    /// The poison value.
    const POISON: Self;
    /// Bitwise equality (NaN-safe).
    fn same_bits(a: Self, b: Self) -> bool;
}

impl Poison for f32 {
    const POISON: f32 = f32::from_bits(0x7fc0_1234);
    fn same_bits(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits()
    }
}

impl Poison for bf16 {
    const POISON: bf16 = bf16::from_bits(0x7fd3);
    fn same_bits(a: bf16, b: bf16) -> bool {
        a.to_bits() == b.to_bits()
    }
}

impl Poison for i32 {
    const POISON: i32 = -0x5a5a_5a5b;
    fn same_bits(a: i32, b: i32) -> bool {
        a == b
    }
}

impl Poison for u8 {
    const POISON: u8 = 0xa5;
    fn same_bits(a: u8, b: u8) -> bool {
        a == b
    }
}

impl Poison for u64 {
    const POISON: u64 = 0xdead_beef_5a5a_a5a5;
    fn same_bits(a: u64, b: u64) -> bool {
        a == b
    }
}

impl Poison for u32 {
    const POISON: u32 = 0xa5a5_a5a5;
    fn same_bits(a: u32, b: u32) -> bool {
        a == b
    }
}

/// Where a test's buffers live and its kernels run: the device's stream, or the host memory of
/// the kernel emulator ([`target`]).
#[derive(Clone, Copy)]
pub enum Stream<'a> {
    /// The GPU's stream.
    Cuda(&'a std::sync::Arc<CudaStream>),
    /// Host memory, for the kernel emulator.
    Host,
}

impl<'a> From<&'a std::sync::Arc<CudaStream>> for Stream<'a> {
    fn from(stream: &'a std::sync::Arc<CudaStream>) -> Self {
        Stream::Cuda(stream)
    }
}

impl Stream<'_> {
    /// Waits for the device's work (nothing to wait for on the emulator).
    pub fn synchronize(&self) {
        if let Stream::Cuda(stream) = self {
            stream.synchronize().expect("synchronize");
        }
    }
}

/// Where a test runs its kernels: the GPU, or, on a machine without one, the kernel emulator
/// (`mixtral::cuda::emulator`: the same kernel sources compiled for the CPU, the same planners
/// and argument checks), which alternates the order of its blocks and threads from one launch to
/// the next, and the architecture it emulates (sm_80, sm_90: the FP8 decoding differs) every two
/// launches, so that consecutive launches cover all four.
pub enum Target {
    /// The GPU, locked for the test.
    Gpu(MutexGuard<'static, Gpu>),
    /// The emulator, with the number of launches run so far.
    Emulator(std::cell::Cell<u32>),
}

/// How [`launch!`] issues one op on a [`Target`] ([`Target::on`]).
#[derive(Clone, Copy)]
pub enum On<'a> {
    /// On the GPU.
    Gpu(&'a Kernels, &'a std::sync::Arc<CudaStream>),
    /// On the emulator, in this order, as this architecture.
    Emulator(mixtral::cuda::emulator::Schedule),
}

impl Target {
    /// Where the buffers live.
    pub fn stream(&self) -> Stream<'_> {
        match self {
            Target::Gpu(gpu) => Stream::Cuda(gpu.stream()),
            Target::Emulator(_) => Stream::Host,
        }
    }

    /// How the next launch is issued.
    pub fn on(&self) -> On<'_> {
        use mixtral::cuda::emulator::{Arch, Order, Schedule};
        match self {
            Target::Gpu(gpu) => On::Gpu(&gpu.kernels, gpu.stream()),
            Target::Emulator(launches) => {
                let n = launches.get();
                launches.set(n + 1);
                On::Emulator(Schedule {
                    order: if n % 2 == 0 {
                        Order::Forward
                    } else {
                        Order::Reverse
                    },
                    arch: if n / 2 % 2 == 0 {
                        Arch::Sm90
                    } else {
                        Arch::Sm80
                    },
                })
            }
        }
    }

    /// The GPU's stream.
    ///
    /// # Panics
    /// On the emulator: for the tests of kernels it does not run (CUTLASS), which get
    /// their target from [`gpu`] only.
    pub fn cuda_stream(&self) -> &std::sync::Arc<CudaStream> {
        match self {
            Target::Gpu(gpu) => gpu.stream(),
            Target::Emulator(_) => panic!("this test needs a GPU; the emulator does not run it"),
        }
    }

    /// True on the emulator (slow: tests run fewer random cases there).
    pub fn emulated(&self) -> bool {
        matches!(self, Target::Emulator(_))
    }

    /// A count of random cases or of rows: `gpu` on the GPU, `emulated` (fewer) on the emulator
    /// unless `MIXTRAL_EMULATOR_FULL` is set (a longer run than CI's, with the GPU's counts).
    pub fn cases<T>(&self, gpu: T, emulated: T) -> T {
        if self.emulated() && std::env::var_os("MIXTRAL_EMULATOR_FULL").is_none() {
            emulated
        } else {
            gpu
        }
    }
}

/// The GPU, locked for one test; on a machine without a CUDA driver or device, the kernel
/// emulator (saying so). A device that is present but fails fails the test, as in [`gpu`].
pub fn target(test: &str) -> Target {
    match GPU.get_or_init(open) {
        Opened::Ready(gpu) => {
            Target::Gpu(gpu.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
        }
        Opened::NoGpu(reason) => {
            eprintln!("{test}: no GPU ({reason}): on the kernel emulator");
            Target::Emulator(std::cell::Cell::new(0))
        }
        Opened::Broken(what, error) => shared::gpu::fail(test, what, error),
    }
}

/// The GPU's kernels and stream of `on`, for an op the emulator does not run (CUTLASS).
///
/// # Panics
/// On the emulator ([`Target::cuda_stream`]).
pub fn on_gpu(on: On<'_>) -> (&Kernels, &std::sync::Arc<CudaStream>) {
    match on {
        On::Gpu(kernels, stream) => (kernels, stream),
        On::Emulator(_) => panic!("this op runs on a GPU only; the emulator does not run it"),
    }
}

/// The emulator's refusal of an op as the device launcher's error; a kernel fault the emulator
/// found (a barrier some threads never reach, a warp collective without its warp, `__trap`)
/// fails the test.
pub fn refused(e: mixtral::cuda::emulator::EmulatorError) -> mixtral::cuda::CudaError {
    match e {
        mixtral::cuda::emulator::EmulatorError::Refused(e) => e,
        fault => panic!("{fault}"),
    }
}

/// Runs `op` (on the GPU) or its emulated twin `emulated` (on the emulator) as [`On`] says, with
/// the op's arguments after `kernels, stream`; the launcher's `Result`.
macro_rules! launch {
    ($on:expr, $op:path | $emulated:path, $($arg:expr),+ $(,)?) => {
        match $on {
            $crate::common::On::Gpu(kernels, stream) => $op(kernels, stream, $($arg),+),
            // SAFETY: on the emulator every buffer is a host one (`Guarded` on `Stream::Host`).
            $crate::common::On::Emulator(schedule) => unsafe {
                $emulated($($arg),+, schedule).map_err($crate::common::refused)
            },
        }
    };
}
pub(crate) use launch;

/// The memory of a guarded buffer.
enum Memory<T> {
    Device(CudaSlice<T>),
    /// Host memory from `start`, 256-byte aligned as a device allocation is.
    Host {
        buf: Vec<T>,
        start: usize,
    },
}

/// A buffer of `len` elements with [`GUARD`] poisoned elements on each side, on the device or in
/// host memory for the emulator ([`Stream`]).
pub struct Guarded<T> {
    memory: Memory<T>,
    len: usize,
}

impl<T: Poison> Guarded<T> {
    /// `len` poisoned elements (an output).
    pub fn poisoned<'s>(stream: impl Into<Stream<'s>>, len: usize) -> Self {
        Self::with_guards(stream.into(), &vec![T::POISON; len], len)
    }

    /// `data` between poisoned guards (an input, or an in/out buffer).
    pub fn with<'s>(stream: impl Into<Stream<'s>>, data: &[T]) -> Self {
        Self::with_guards(stream.into(), data, data.len())
    }

    fn with_guards(stream: Stream<'_>, data: &[T], len: usize) -> Self {
        let mut host = vec![T::POISON; len + 2 * GUARD];
        host[GUARD..GUARD + len].copy_from_slice(data);
        let memory = match stream {
            Stream::Cuda(stream) => Memory::Device(stream.clone_htod(&host).expect("upload")),
            Stream::Host => {
                let size = std::mem::size_of::<T>();
                let mut buf = vec![T::POISON; host.len() + 256 / size];
                let start = (0..256 / size)
                    .find(|&i| (buf.as_ptr() as usize + i * size).is_multiple_of(256))
                    .expect("an element aligned to 256 bytes");
                buf[start..start + host.len()].copy_from_slice(&host);
                Memory::Host { buf, start }
            }
        };
        Guarded { memory, len }
    }

    /// The interior as a crate view, read-only.
    pub fn dev(&self) -> mixtral::cuda::memory::View<'_, T> {
        match &self.memory {
            Memory::Device(buf) => mixtral::cuda::memory::View::of(buf)
                .sub(GUARD, self.len)
                .expect("inside the guarded buffer"),
            // SAFETY: host memory is only ever passed to the emulator (`launch!` on `On::Emulator`:
            // a `Stream::Host` buffer exists only on the emulator target).
            Memory::Host { buf, start } => unsafe {
                mixtral::cuda::memory::View::of_host(&buf[start + GUARD..start + GUARD + self.len])
            },
        }
    }

    /// The interior as a crate view, written.
    pub fn dev_mut(&mut self) -> mixtral::cuda::memory::ViewMut<'_, T> {
        match &mut self.memory {
            Memory::Device(buf) => mixtral::cuda::memory::ViewMut::of(buf)
                .sub(GUARD, self.len)
                .expect("inside the guarded buffer"),
            // SAFETY: as in `dev`.
            Memory::Host { buf, start } => unsafe {
                mixtral::cuda::memory::ViewMut::of_host(
                    &mut buf[*start + GUARD..*start + GUARD + self.len],
                )
            },
        }
    }

    /// Reads the interior back after checking both guards are intact.
    pub fn read<'s>(&self, stream: impl Into<Stream<'s>>, name: &str) -> Vec<T> {
        let host = match (&self.memory, stream.into()) {
            (Memory::Device(buf), Stream::Cuda(stream)) => {
                stream.clone_dtoh(buf).expect("download")
            }
            (Memory::Host { buf, start }, Stream::Host) => {
                buf[*start..*start + self.len + 2 * GUARD].to_vec()
            }
            _ => panic!("{name}: read through another stream than the buffer's"),
        };
        for (i, &v) in host[..GUARD]
            .iter()
            .chain(&host[GUARD + self.len..])
            .enumerate()
        {
            assert!(
                T::same_bits(v, T::POISON),
                "{name}: guard element {i} was overwritten"
            );
        }
        host[GUARD..GUARD + self.len].to_vec()
    }

    /// Reads the interior back, checking the guards and that every element was written.
    pub fn read_written<'s>(&self, stream: impl Into<Stream<'s>>, name: &str) -> Vec<T> {
        let out = self.read(stream, name);
        if let Some(i) = out.iter().position(|&v| T::same_bits(v, T::POISON)) {
            panic!("{name}: element {i} of {} was never written", out.len());
        }
        out
    }
}

/// Asserts `rel_l2(out, reference) <= bound` with a message naming `what`.
/// Records `launch` into a CUDA graph on `stream` (nothing runs) and replays the graph twice, as a
/// captured chunk runs: what the launch computes on the host and the device work it needs first
/// (workspace initialisation) must be recorded, and a replay must not depend on what the one before
/// left. Returns `launch`'s error, if any; capture failures panic.
pub fn replayed_twice(
    stream: &std::sync::Arc<CudaStream>,
    launch: impl FnOnce() -> Result<(), mixtral::cuda::CudaError>,
) -> Result<(), mixtral::cuda::CudaError> {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let mode = CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
    stream.begin_capture(mode).expect("begin capture");
    let recorded = launch();
    let graph = stream.end_capture(CUgraphInstantiate_flags(0));
    recorded?;
    let graph = graph.expect("end capture").expect("a recorded graph");
    for _ in 0..2 {
        graph.launch().expect("replay");
    }
    stream.synchronize().expect("synchronise");
    Ok(())
}

pub fn assert_close(what: &str, out: &[f32], reference: &[f32], bound: f64) {
    let err = rel_l2(out, reference);
    assert!(
        err <= bound,
        "{what}: relative L2 error {err:e} > {bound:e}"
    );
}

// ---------------------------------------------------------------------------------------------
// Error bounds (DESIGN.md, "Correctness rules for tests"). Every float comparison of the kernel
// tests uses one of these, with the rounding chain of its kernel written beside it.

/// f32's unit roundoff: one rounding to nearest moves a value by at most 2^-24 of itself.
pub const F32_UNIT: f64 = 1.0 / (1u64 << 24) as f64;

/// bf16's unit roundoff (8 significant bits): one rounding to nearest moves each element by at
/// most half an ulp, which is at most 2^-8 of the element, so a vector by at most 2^-8 = 3.9e-3 in
/// relative L2 (random data: 1.5e-3 to 1.7e-3; `tests::one_bf16_rounding_is_within_its_constants`).
pub const BF16_UNIT: f64 = 1.0 / 256.0;

/// The RMS of one bf16 rounding error relative to the value rounded: uniform on plus or minus half
/// an ulp, at most 2^-8 of the value, so at most 2^-8 / sqrt(3) = 2.26e-3.
pub const BF16_RMS: f64 = BF16_UNIT / 1.732_050_807_568_877_2;

/// Relative L2 bound of an f32 output summing `k` products of identical bf16 inputs (exact in f32)
/// in an order, or with a rounding, other than the reference's.
///
/// Derivation: rounding to nearest, each of the k additions errs by at most 2^-24 of the running
/// sum, and over random signs the errors add like a random walk: about sqrt(k) * 2^-24 relative at
/// most (2e-6 at k = 1024; the CPU and a sequential sum measure a tenth of that). Tensor cores
/// (mma.sync) truncate instead when they add a k-step's products into the f32 accumulator,
/// a bias that grows like k: modelled with one truncation per 4 products, 9e-6 at k = 4096
/// (`tests::f32_bound_covers_reordered_and_truncated_sums`). Bound: `max(1e-5, (k / 16) * 2^-24)`,
/// 1e-5 up to k = 2684 and 1.5e-5 at 4096; an accumulator or an input in bf16 (1e-3 and more) is two
/// orders above it.
pub fn f32_bound(k: usize) -> f64 {
    (k as f64 / 16.0 * F32_UNIT).max(1e-5)
}

/// Relative L2 bound of an output that went through `roundings` bf16 roundings after an f32
/// accumulation of `k` terms: its own bf16 store counts one, and so does each bf16 intermediate
/// whose error reaches the output through element-wise operations or a softmax-weighted average.
///
/// Derivation: each rounding moves the values it rounds by at most [`BF16_UNIT`] of themselves, so
/// by at most 2^-8 in relative L2 where nothing after it amplifies relative error; roundings add at
/// most linearly; plus [`f32_bound`]`(k)`. One rounding: 3.9e-3 + 1e-5 (random data: 1.5e-3 to
/// 1.7e-3). Where a bf16 intermediate feeds a projection, whose amplification depends on the data,
/// use [`propagated_bound`].
pub fn bf16_bound(k: usize, roundings: usize) -> f64 {
    roundings as f64 * BF16_UNIT + f32_bound(k)
}

/// `sum_o sum_i (scale * m[o, i] * a[i])^2` for `m: [rows, a.len()]` row-major: what a bf16
/// rounding of `a` contributes to the squared error of `scale * m a`, per unit of relative error
/// variance ([`propagated_bound`] adds these over the rows of an output).
pub fn propagation(m: &[f32], a: &[f32], scale: f32) -> f64 {
    let cols = a.len();
    assert_eq!(
        m.len() % cols.max(1),
        0,
        "propagation: m is not [rows, {cols}]"
    );
    let mut column_sq = vec![0.0f64; cols];
    for row in m.chunks_exact(cols.max(1)) {
        for (c, &w) in column_sq.iter_mut().zip(row) {
            *c += (w as f64).powi(2);
        }
    }
    let scale = (scale as f64).powi(2);
    column_sq
        .iter()
        .zip(a)
        .map(|(c, &x)| scale * c * (x as f64).powi(2))
        .sum()
}

/// Relative L2 bound of an f32 output `y = m a` whose input `a` the device rounded to bf16 and the
/// reference did not, `propagated` being the sum of [`propagation`] over the output's rows, `k` the
/// longest f32 sum on the path.
///
/// Derivation: the rounding errors d_i are independent, zero-mean, of RMS at most [`BF16_RMS`]
/// times |a_i|, so E |m d|^2 <= BF16_RMS^2 * sum_o sum_i m_oi^2 a_i^2: the expected error follows
/// from the data, with no assumed amplification (a small projection of random data amplifies
/// relative error several times in about 1% of cases:
/// `tests::propagated_bound_covers_a_rounded_activation_through_small_projections`). |m d| is a sum of
/// independent terms and exceeds 4 times its RMS with probability below 1e-4 (the chi-square tail
/// of one degree of freedom, the worst case). Plus [`f32_bound`]`(k)`.
pub fn propagated_bound(propagated: f64, reference: &[f32], k: usize) -> f64 {
    let norm = reference
        .iter()
        .map(|&r| (r as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    4.0 * BF16_RMS * propagated.sqrt() / norm.max(f64::MIN_POSITIVE) + f32_bound(k)
}

/// Relative difference, in the model of [`q8_bound`], between an FP8 tensor-core sum of exact
/// E4M3 x E4M3 products and the f32 sum of the same products: 2^-10.
///
/// Derivation (a model from the hardware's documented behaviour, not yet a measurement on this
/// crate's kernels): the products are exact; the tensor cores add them into an accumulator that
/// keeps about 14 significant bits, which CUTLASS's FP8 mainloop promotes into f32 registers every
/// 128 products (4 k-blocks of 32). Each interval therefore errs by up to 2^-14 of its magnitude
/// (the sum of |products| over 128 terms, about sqrt(128) = 2^3.5 times its sum for random signs),
/// and the intervals' errors add like a random walk, as their sums do: 2^-14 * 2^3.5 = 2^-10.5 of
/// the sum, taken as 2^-10.
pub const FP8_ACCUMULATION: f64 = 1.0 / 1024.0;

/// How far apart, relative to themselves, the device's and the reference's SwiGLU activations of a
/// W8A8 expert kernel over `k` = hidden inputs can be. See [`q8_bound`].
pub fn q8_activation_spread(format: Q8, k: usize) -> f64 {
    match format {
        // The FP8 accumulation of w1 x and w3 x (the row scale, from the row maximum, moves by as
        // much).
        Q8::Fp8 => 2.0 * FP8_ACCUMULATION,
        // Exact i32 sums on the device: only the reference's f32 sums differ, twice.
        Q8::Int8 => 2.0 * f32_bound(k),
    }
}

/// The per-element variance of the code flips of activation `a` (of a row whose largest magnitude
/// is `amax`) for activations `d` apart relative to themselves: a code flips with probability
/// d |a| / step and then moves by one step, so the variance is d |a| step. FP8: step <= 2^-3 |a|,
/// so at most d a^2 / 8. INT8: step = amax / 127, and d |a| step <= d (a^2 + step^2) / 2.
pub fn q8_flip_variance(format: Q8, d: f64, a: f32, amax: f32) -> f64 {
    let a = a as f64;
    match format {
        Q8::Fp8 => d * a * a / 8.0,
        Q8::Int8 => {
            let step = amax as f64 / 127.0;
            d * (a * a + step * step) / 2.0
        }
    }
}

/// Relative L2 bound of the W8A8 expert output `out = weight * w2 q(act)` against the CPU reference
/// with the same per-row quantization (`expert_mlp_q8_activations`), `flips` being the sum over the
/// output's rows of [`propagation`] of w2 against the per-element RMS of the activation code flips
/// (square roots of [`q8_flip_variance`]), `d` the [`q8_activation_spread`] and `k_down` = inter.
///
/// Derivation: the rows of x quantize to the same codes on both sides (identical bf16 inputs, the
/// same IEEE division and rounding). The activations then differ by d of themselves, which moves a
/// code by one step where a rounding boundary falls between the two values, independently from
/// element to element: [`propagated_bound`]'s argument with the flip RMS in place of bf16's (4
/// times the RMS: a tail below 1e-4), plus the direct effect of d and the w2 sum's own difference
/// ([`FP8_ACCUMULATION`] for FP8, f32 roundings for INT8).
pub fn q8_bound(format: Q8, flips: f64, reference: &[f32], d: f64, k_down: usize) -> f64 {
    let norm = reference
        .iter()
        .map(|&r| (r as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let down = match format {
        Q8::Fp8 => FP8_ACCUMULATION,
        Q8::Int8 => f32_bound(k_down),
    };
    4.0 * flips.sqrt() / norm.max(f64::MIN_POSITIVE) + d + down
}

/// Checks, on the CPU, the constants the bounds above rest on. They run without a device.
mod tests {
    use super::*;

    /// bf16 rounding to nearest, done on the bits (independent of `half`): the f32 value.
    fn bf16_bits(x: f32) -> f32 {
        let bits = x.to_bits();
        let round = 0x7fff + ((bits >> 16) & 1);
        f32::from_bits(bits.wrapping_add(round) & 0xffff_0000)
    }

    #[test]
    fn one_bf16_rounding_is_within_its_constants() {
        let uniform = random_values(1, 100_000, 1.0);
        let cubes: Vec<f32> = random_values(2, 100_000, 3.0)
            .iter()
            .map(|v| v * v * v)
            .collect();
        let binades: Vec<f32> = random_values(3, 100_000, 20.0)
            .iter()
            .zip(random_values(4, 100_000, 1.0))
            .map(|(e, m)| m * e.exp2())
            .collect();
        for (name, values) in [
            ("uniform", uniform),
            ("cubes", cubes),
            ("many binades", binades),
        ] {
            let rounded = round_bf16(&values);
            let by_bits: Vec<f32> = values.iter().map(|&v| bf16_bits(v)).collect();
            assert_eq!(rounded, by_bits, "{name}: half rounds to nearest even");
            let err = rel_l2(&rounded, &values);
            assert!(
                (1.0e-3..=1.8e-3).contains(&err),
                "{name}: one rounding gives rel L2 {err:e}"
            );
            let worst = values
                .iter()
                .zip(&rounded)
                .filter(|(v, _)| **v != 0.0)
                .map(|(&v, &r)| ((r - v) / v).abs() as f64)
                .fold(0.0, f64::max);
            assert!(worst <= BF16_UNIT, "{name}: element error {worst:e} > 2^-8");
            let rms = (values
                .iter()
                .zip(&rounded)
                .filter(|(v, _)| **v != 0.0)
                .map(|(&v, &r)| (((r - v) / v) as f64).powi(2))
                .sum::<f64>()
                / values.len() as f64)
                .sqrt();
            assert!(
                rms <= BF16_RMS,
                "{name}: relative RMS {rms:e} > {BF16_RMS:e}"
            );
        }
    }

    /// Dot products of random bf16 rows of length `k` (products exact in f32): the exact sums, and
    /// the sums accumulated by `accumulate` (one f32 accumulator given the products in order).
    fn dots(k: usize, accumulate: impl Fn(&[f32]) -> f32) -> (Vec<f32>, Vec<f32>) {
        let (mut exact, mut summed) = (Vec::new(), Vec::new());
        for row in 0..256u64 {
            let x = round_bf16(&random_values(row, k, 1.0));
            let w = round_bf16(&random_values(row ^ 0xabcd, k, 0.5));
            let products: Vec<f32> = x.iter().zip(&w).map(|(a, b)| a * b).collect();
            exact.push(products.iter().map(|&p| p as f64).sum::<f64>() as f32);
            summed.push(accumulate(&products));
        }
        (summed, exact)
    }

    /// Rounds toward zero to f32 (a truncating adder).
    fn truncate(x: f64) -> f32 {
        let f = x as f32;
        if (f as f64).abs() > x.abs() {
            f32::from_bits(f.to_bits() - 1)
        } else {
            f
        }
    }

    #[test]
    fn f32_bound_covers_reordered_and_truncated_sums() {
        for k in [64usize, 1024, 4096] {
            let bound = f32_bound(k);
            let sequential = |p: &[f32]| p.iter().fold(0.0f32, |acc, &v| acc + v);
            let lanes = |p: &[f32]| {
                let mut lane = [0.0f32; 16];
                for (i, &v) in p.iter().enumerate() {
                    lane[i % 16] += v;
                }
                lane.iter().sum()
            };
            // A tensor-core model: 4 exact products added into the accumulator, truncated.
            let truncating = |p: &[f32]| {
                p.chunks(4).fold(0.0f32, |acc, c| {
                    truncate(acc as f64 + c.iter().map(|&v| v as f64).sum::<f64>())
                })
            };
            let bf16_accumulator = |p: &[f32]| p.iter().fold(0.0f32, |acc, &v| bf16_bits(acc + v));
            let (seq, exact) = dots(k, sequential);
            let (lane, _) = dots(k, lanes);
            let (trunc, _) = dots(k, truncating);
            let (bf16_acc, _) = dots(k, bf16_accumulator);
            for (name, err) in [
                ("sequential vs exact", rel_l2(&seq, &exact)),
                ("sequential vs 16 lanes", rel_l2(&seq, &lane)),
                ("truncating vs 16 lanes", rel_l2(&trunc, &lane)),
            ] {
                assert!(err <= bound, "k {k}: {name}: {err:e} > {bound:e}");
            }
            let caught = rel_l2(&bf16_acc, &exact);
            assert!(
                caught > 10.0 * bound,
                "k {k}: a bf16 accumulator ({caught:e}) is not caught by {bound:e}"
            );
        }
    }

    #[test]
    fn propagated_bound_covers_a_rounded_activation_through_small_projections() {
        let mut beyond_one_rounding = 0;
        for (trial, (rows, cols)) in
            (0..4000u64).zip([(8, 16), (8, 8), (16, 8), (64, 40)].iter().cycle())
        {
            let a = random_values(trial, *cols, 1.0);
            let m = round_bf16(&random_values(trial ^ 0x5eed, rows * cols, 0.5));
            let project = |a: &[f32]| -> Vec<f32> {
                m.chunks_exact(*cols)
                    .map(|row| row.iter().zip(a).map(|(w, x)| w * x).sum())
                    .collect()
            };
            let reference = project(&a);
            let out = project(&round_bf16(&a));
            let err = rel_l2(&out, &reference);
            let bound = propagated_bound(propagation(&m, &a, 1.0), &reference, *cols);
            assert!(
                err <= bound,
                "trial {trial} [{rows}, {cols}]: {err:e} > {bound:e}"
            );
            if err > bf16_bound(*cols, 1) {
                beyond_one_rounding += 1;
            }
        }
        // The reason for a data-derived bound: a fixed one-rounding bound fails some of these.
        assert!(beyond_one_rounding > 0);
    }
}
