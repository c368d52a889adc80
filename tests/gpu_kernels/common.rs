//! Shared harness of the GPU kernel tests: the one device (or the printed reason there is none),
//! guard-banded device buffers, bf16 helpers and the relative L2 error.
#![allow(dead_code)]

use std::sync::{Mutex, MutexGuard, OnceLock};

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr, ValidAsZeroBits};
use half::bf16;
use mixtral::cuda::{CudaDevice, Kernels};

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

static GPU: OnceLock<Result<Mutex<Gpu>, String>> = OnceLock::new();

/// The GPU, locked for one test (tests run one at a time on it), or `None` after printing why the
/// test is skipped (no driver, no device, kernels failed to load).
pub fn gpu(test: &str) -> Option<MutexGuard<'static, Gpu>> {
    let gpu = GPU.get_or_init(|| {
        let device = CudaDevice::new(0).map_err(|e| e.to_string())?;
        let kernels = Kernels::load(&device).map_err(|e| format!("loading kernels: {e}"))?;
        Ok(Mutex::new(Gpu { device, kernels }))
    });
    match gpu {
        Ok(gpu) => Some(gpu.lock().unwrap_or_else(|poisoned| poisoned.into_inner())),
        Err(reason) => {
            eprintln!("skipped {test}: no usable CUDA device ({reason})");
            None
        }
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

impl Poison for u32 {
    const POISON: u32 = 0xa5a5_a5a5;
    fn same_bits(a: u32, b: u32) -> bool {
        a == b
    }
}

/// A device buffer of `len` elements with [`GUARD`] poisoned elements on each side.
pub struct Guarded<T> {
    buf: CudaSlice<T>,
    len: usize,
}

impl<T: Poison> Guarded<T> {
    /// `len` poisoned elements (an output).
    pub fn poisoned(stream: &std::sync::Arc<CudaStream>, len: usize) -> Self {
        let host = vec![T::POISON; len + 2 * GUARD];
        let buf = stream.clone_htod(&host).expect("upload");
        Guarded { buf, len }
    }

    /// `data` between poisoned guards (an input, or an in/out buffer).
    pub fn with(stream: &std::sync::Arc<CudaStream>, data: &[T]) -> Self {
        let mut host = vec![T::POISON; data.len() + 2 * GUARD];
        host[GUARD..GUARD + data.len()].copy_from_slice(data);
        let buf = stream.clone_htod(&host).expect("upload");
        Guarded {
            buf,
            len: data.len(),
        }
    }

    /// The interior, read-only.
    pub fn view(&self) -> CudaView<'_, T> {
        self.buf.slice(GUARD..GUARD + self.len)
    }

    /// The interior, writable.
    pub fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.buf.slice_mut(GUARD..GUARD + self.len)
    }

    /// The interior as a crate view, read-only.
    pub fn dev(&self) -> mixtral::cuda::memory::View<'_, T> {
        mixtral::cuda::memory::View::of(&self.buf)
            .sub(GUARD, self.len)
            .expect("inside the guarded buffer")
    }

    /// The interior as a crate view, written.
    pub fn dev_mut(&mut self) -> mixtral::cuda::memory::ViewMut<'_, T> {
        mixtral::cuda::memory::ViewMut::of(&mut self.buf)
            .sub(GUARD, self.len)
            .expect("inside the guarded buffer")
    }

    /// Reads the interior back after checking both guards are intact.
    pub fn read(&self, stream: &std::sync::Arc<CudaStream>, name: &str) -> Vec<T> {
        let host = stream.clone_dtoh(&self.buf).expect("download");
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
    pub fn read_written(&self, stream: &std::sync::Arc<CudaStream>, name: &str) -> Vec<T> {
        let out = self.read(stream, name);
        if let Some(i) = out.iter().position(|&v| T::same_bits(v, T::POISON)) {
            panic!("{name}: element {i} of {} was never written", out.len());
        }
        out
    }
}

/// bf16 copies of `values`.
pub fn to_bf16(values: &[f32]) -> Vec<bf16> {
    values.iter().map(|&v| bf16::from_f32(v)).collect()
}

/// f32 copies of bf16 `values`.
pub fn to_f32(values: &[bf16]) -> Vec<f32> {
    values.iter().map(|v| v.to_f32()).collect()
}

/// `values` rounded through bf16 (what the device sees of a host f32 input).
pub fn round_bf16(values: &[f32]) -> Vec<f32> {
    values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
}

/// `||out - reference|| / ||reference||`; infinite when anything is not finite.
pub fn rel_l2(out: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(out.len(), reference.len(), "length mismatch");
    let mut diff = 0.0f64;
    let mut norm = 0.0f64;
    for (&o, &r) in out.iter().zip(reference) {
        if !o.is_finite() || !r.is_finite() {
            return f64::INFINITY;
        }
        diff += (o as f64 - r as f64).powi(2);
        norm += (r as f64).powi(2);
    }
    diff.sqrt() / norm.sqrt().max(f64::MIN_POSITIVE)
}

/// Asserts `rel_l2(out, reference) <= bound` with a message naming `what`.
pub fn assert_close(what: &str, out: &[f32], reference: &[f32], bound: f64) {
    let err = rel_l2(out, reference);
    assert!(
        err <= bound,
        "{what}: relative L2 error {err:e} > {bound:e}"
    );
}

/// Deterministic pseudo-random values in [-scale, scale) (splitmix64), never constant.
pub fn random_values(seed: u64, len: usize, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}
