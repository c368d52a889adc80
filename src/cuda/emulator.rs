//! The kernel emulator (feature `testing`): runs a planner's launches on the CPU, with the kernels
//! of `csrc/` compiled by the host C++ compiler against `csrc/emulator/` (the device language as
//! C++: each block in turn, its threads as fibers switched at barriers and warp collectives; see
//! `csrc/emulator/README.md`). It checks the kernels' indexing, synchronisation and arithmetic
//! against the CPU reference on machines without a GPU; it says nothing of their speed, of the
//! GPU's memory model or of the Hopper-only CUTLASS kernels, which it does not run.
//!
//! The views given to the planners come from host memory ([`View::of_host`],
//! [`ViewMut::of_host`]); the planners and the generated argument checks run exactly as for a
//! device.

use std::ffi::{c_char, c_void, CString};

use super::error::CudaError;
use super::launch::Grid;
#[cfg(doc)]
use super::memory::{View, ViewMut};

/// The order the emulator runs a launch's blocks, and a block's threads between barriers, in: a
/// kernel whose result depends on it reads shared or global memory another thread writes without
/// a barrier between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Block 0 first; thread 0 first.
    Forward,
    /// The last block first; the last thread first.
    Reverse,
}

/// The device architecture an emulated launch takes the code paths of, where the kernels differ by
/// architecture (csrc/quant.cuh: FP8 byte pairs by the sm_89+ conversion instruction, or by their
/// bits before).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Compute capability 8.0 (A100).
    Sm80,
    /// Compute capability 9.0 (H100, H200).
    Sm90,
}

/// How the emulator runs one launch: its order and the architecture it emulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// The order of blocks and threads.
    pub order: Order,
    /// The architecture whose code paths run.
    pub arch: Arch,
}

/// Why an emulated launch failed.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// The planner refused the shapes or buffers, as it would for a device.
    #[error(transparent)]
    Refused(#[from] CudaError),
    /// The kernel did what a GPU would hang on, fault on or leave undefined (a barrier some threads
    /// never reach, a warp collective without its whole warp, `__trap`, a misaligned access, an
    /// index past a fixed-size array, ...), the launch is one a GPU refuses (a block over the
    /// kernel's `__launch_bounds__`, over 48 KiB of dynamic shared memory), or the emulator cannot
    /// run it.
    #[error("emulated kernel {symbol}: {message}")]
    Kernel {
        /// The kernel's symbol.
        symbol: &'static str,
        /// What went wrong, with the block and thread.
        message: String,
    },
}

/// The geometry of one launch (`MxEmulatorGrid` in `csrc/emulator/runtime.cpp`).
#[repr(C)]
struct EmulatorGrid {
    grid: [u32; 3],
    block: u32,
    shared_bytes: u32,
    reverse: u32,
    arch: u32,
}

extern "C" {
    /// Runs kernel `symbol` with the parameter struct at `params`; 0, or 1 with a message.
    fn mx_emulator_launch(
        symbol: *const c_char,
        params: *const c_void,
        geometry: *const EmulatorGrid,
        error: *mut c_char,
        error_bytes: usize,
    ) -> i32;
}

/// Runs what a planner returned on the emulator, its launches in turn (nothing for zero tokens or
/// rows), as `schedule` says.
///
/// # Safety
/// `planned` is what a planner just returned for views of host memory ([`View::of_host`],
/// [`ViewMut::of_host`]) that are still borrowed.
pub(crate) unsafe fn run_planned<P, const N: usize>(
    planned: Option<(P, [Grid; N])>,
    schedule: Schedule,
) -> Result<(), EmulatorError> {
    let Some((params, grids)) = planned else {
        return Ok(());
    };
    for g in &grids {
        // SAFETY: as this function's.
        unsafe { run_symbol(g.symbol(), &params, g, schedule)? };
    }
    Ok(())
}

/// Runs kernel `symbol` (an emulated entry: a kernel of `csrc/` or a self-test kernel) with
/// `params` over `g`'s geometry.
///
/// # Safety
/// `params` is `symbol`'s parameter struct, every address in it valid for what the kernel touches.
unsafe fn run_symbol<P>(
    symbol: &'static str,
    params: &P,
    g: &Grid,
    schedule: Schedule,
) -> Result<(), EmulatorError> {
    let name = CString::new(symbol).expect("kernel symbols have no NUL");
    let geometry = EmulatorGrid {
        grid: [g.grid.0, g.grid.1, g.grid.2],
        block: g.block,
        shared_bytes: g.shared_bytes,
        reverse: u32::from(schedule.order == Order::Reverse),
        arch: match schedule.arch {
            Arch::Sm80 => 800,
            Arch::Sm90 => 900,
        },
    };
    let mut message = vec![0u8; 1024];
    // SAFETY: (the caller's) `params` is `symbol`'s parameter struct, valid for what the kernel
    // touches. The runtime writes at most `message.len()` bytes, NUL included.
    let status = unsafe {
        mx_emulator_launch(
            name.as_ptr(),
            params as *const P as *const c_void,
            &geometry,
            message.as_mut_ptr() as *mut c_char,
            message.len(),
        )
    };
    if status == 0 {
        return Ok(());
    }
    let end = message
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(message.len());
    Err(EmulatorError::Kernel {
        symbol,
        message: String::from_utf8_lossy(&message[..end]).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    //! The emulator's own kernels (`csrc/emulator/self_test.cpp`): what its collectives return, that
    //! the two orders tell a racing read apart, that launches on several threads keep their shared
    //! memory apart, and that what would hang or be undefined on a GPU
    //! is an error naming the fault.

    use super::*;

    /// One block of 64 threads.
    const BLOCK: Grid = Grid {
        variant: usize::MAX,
        grid: (1, 1, 1),
        block: 64,
        shared_bytes: 0,
    };

    /// `MxEmulatorSelfTestParams`.
    #[repr(C)]
    struct SelfTest {
        out: *mut i32,
    }

    /// Runs self-test kernel `symbol` in `order`; its 64 outputs, or the error.
    fn self_test(symbol: &'static str, order: Order) -> Result<Vec<i32>, EmulatorError> {
        self_test_on(symbol, &BLOCK, order)
    }

    /// Runs self-test kernel `symbol` on one block of `grid` in `order`; its outputs (one per
    /// thread), or the error.
    fn self_test_on(
        symbol: &'static str,
        grid: &Grid,
        order: Order,
    ) -> Result<Vec<i32>, EmulatorError> {
        assert_eq!(grid.grid, (1, 1, 1), "one block");
        let mut out = vec![-1i32; grid.block as usize];
        let params = SelfTest {
            out: out.as_mut_ptr(),
        };
        let schedule = Schedule {
            order,
            arch: Arch::Sm90,
        };
        // SAFETY: every self-test kernel writes at most out[threadIdx.x], one block of
        // `grid.block` threads, as many elements.
        unsafe { run_symbol(symbol, &params, grid, schedule) }?;
        Ok(out)
    }

    #[test]
    fn collectives_exchange_within_each_warp() {
        for order in [Order::Forward, Order::Reverse] {
            let out = self_test("emulator_shuffles", order).unwrap();
            for (t, &v) in out.iter().enumerate() {
                let t = t as i32;
                // xor-5 partner, 16 odd lanes in the ballot, 4 lanes share t / 4.
                assert_eq!(v, (t ^ 5) + 100 * 16 + 1000 * 4, "thread {t}, {order:?}");
            }
        }
    }

    #[test]
    fn the_two_orders_tell_a_racing_read_apart() {
        let forward = self_test("emulator_unsynchronised_read", Order::Forward).unwrap();
        let reverse = self_test("emulator_unsynchronised_read", Order::Reverse).unwrap();
        // Thread 0 writes first in forward order: every thread reads its write.
        assert!(forward.iter().all(|&v| v == 1), "{forward:?}");
        // Last in reverse order: only thread 0 itself reads it.
        assert_eq!(reverse[0], 1);
        assert!(reverse[1..].iter().all(|&v| v == 0), "{reverse:?}");
    }

    /// A block larger than the kernel's `__launch_bounds__` (64 for the self-tests) is refused, as
    /// a GPU refuses the launch.
    #[test]
    fn a_block_over_the_launch_bounds_is_refused() {
        let grid = Grid {
            block: 128,
            ..BLOCK
        };
        match self_test_on("emulator_shuffles", &grid, Order::Forward) {
            Err(EmulatorError::Kernel { message, .. }) => assert!(
                message.contains("over the kernel's __launch_bounds__ of 64"),
                "{message}"
            ),
            other => panic!("expected the launch refused, got {other:?}"),
        }
    }

    /// More than 48 KiB of dynamic shared memory is refused, as a GPU refuses it from a kernel
    /// that has not opted in to more (the crate never does).
    #[test]
    fn dynamic_shared_memory_over_48_kib_is_refused() {
        for (bytes, refused) in [(48 * 1024, false), (48 * 1024 + 16, true)] {
            let grid = Grid {
                shared_bytes: bytes,
                ..BLOCK
            };
            match self_test_on("emulator_shuffles", &grid, Order::Forward) {
                Err(EmulatorError::Kernel { message, .. }) if refused => {
                    assert!(message.contains("over the 48 KiB"), "{message}")
                }
                Ok(_) if !refused => {}
                other => panic!("{bytes} bytes: got {other:?}"),
            }
        }
    }

    /// A cp.async copy lands when its thread waits for its group, not when it is issued: a read
    /// before the wait sees the old values (as it may on a GPU), a read after it the copied ones.
    #[test]
    fn cp_async_copies_land_at_the_wait() {
        for order in [Order::Forward, Order::Reverse] {
            let out = self_test("emulator_cp_async_lands_at_the_wait", order).unwrap();
            assert_eq!(out, vec![3; 64], "{order:?}");
        }
    }

    /// Launches from several OS threads at once run side by side, each block with its own shared
    /// memory: every launch reads back the seed it stored, never another launch's.
    #[test]
    fn launches_on_different_threads_have_their_own_shared_memory() {
        let threads: Vec<_> = (0..4)
            .map(|thread| {
                std::thread::spawn(move || {
                    for i in 0..25 {
                        let seed = 1000 * thread + i;
                        let mut out = vec![seed; 64];
                        let params = SelfTest {
                            out: out.as_mut_ptr(),
                        };
                        let order = if i % 2 == 0 {
                            Order::Forward
                        } else {
                            Order::Reverse
                        };
                        let schedule = Schedule {
                            order,
                            arch: Arch::Sm90,
                        };
                        // SAFETY: the kernel reads out[0] and writes out[threadIdx.x], 64 threads.
                        unsafe {
                            run_symbol("emulator_shared_per_launch", &params, &BLOCK, schedule)
                        }
                        .unwrap();
                        assert_eq!(out, vec![seed; 64], "thread {thread}, launch {i}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("a launching thread failed");
        }
    }

    /// A kernel whose frames outgrow its emulated thread's stack kills the process on the guard
    /// page under the stack (a crash, never a silently overwritten thread identity): the test
    /// runs itself in a child process, which must die of SIGSEGV.
    #[test]
    fn a_stack_overflow_is_a_crash() {
        const CHILD: &str = "MIXTRAL_EMULATOR_DEEP_STACK_CHILD";
        const NAME: &str = "cuda::emulator::tests::a_stack_overflow_is_a_crash";
        if std::env::var_os(CHILD).is_some() {
            let result = self_test("emulator_deep_stack", Order::Forward);
            // Only reached when nothing faulted.
            eprintln!("the deep frame returned {result:?}");
            std::process::exit(0);
        }
        let exe = std::env::current_exe().expect("the test binary's path");
        // Through sh, to turn core dumps off for the child (`exec` keeps its exit status).
        let child = std::process::Command::new("sh")
            .args(["-c", "ulimit -c 0 && exec \"$0\" \"$@\""])
            .arg(exe)
            .args([NAME, "--exact", "--test-threads=1", "--nocapture"])
            .env(CHILD, "1")
            .output()
            .expect("running the test binary again");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            child.status.signal(),
            Some(11),
            "expected SIGSEGV, got {:?}; stderr:\n{}",
            child.status,
            String::from_utf8_lossy(&child.stderr)
        );
    }

    /// What would hang or be undefined on a GPU, and a kernel the emulator does not have, end the
    /// launch with an error naming the fault.
    #[test]
    fn faults_are_errors_naming_them() {
        // The undefined-behaviour checks also name the kernel's source line.
        const LINE: &str = "self_test.cpp:";
        for (symbol, expected) in [
            // A warp split between a barrier and a shuffle.
            ("emulator_split_warp", &["without all 32 lanes"][..]),
            // A shuffle with an exited lane.
            ("emulator_exited_lane", &["without all 32 lanes"]),
            ("emulator_trap", &["thread 7: __trap()"]),
            // A 16-byte load 8 bytes past a 16-byte boundary (a GPU's misaligned address).
            (
                "emulator_misaligned_load",
                &["thread 5: ", "16-byte aligned as its", LINE],
            ),
            // cp.async from 8 bytes past a 16-byte boundary.
            ("emulator_misaligned_cp_async", &["thread 3: cp.async of"]),
            // A write one past the end of a shared array.
            (
                "emulator_shared_index_past_end",
                &["thread 9: index 64 past the end", LINE],
            ),
            // A 32-bit shift by 32.
            ("emulator_wide_shift", &["thread 31: a shift by", LINE]),
            // 3e9 converted to an int.
            (
                "emulator_float_to_int_overflow",
                &["thread 12: a float", LINE],
            ),
            ("no_such_kernel", &["not emulated"]),
        ] {
            match self_test(symbol, Order::Forward) {
                Err(EmulatorError::Kernel { message, .. }) => {
                    for part in expected {
                        assert!(message.contains(part), "{symbol}: {message}")
                    }
                }
                other => panic!("{symbol}: expected a kernel fault, got {other:?}"),
            }
        }
    }
}
