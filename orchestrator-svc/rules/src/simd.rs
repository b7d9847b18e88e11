//! Runtime CPU-feature dispatch for the rules' hot float loops. The shipped binary targets baseline x86-64 (SSE2, 4
//! f32 lanes) so that it runs on any x86-64 node; a loop defined with `kernel!` is compiled a second time for AVX2
//! and FMA (8 lanes) and runs that way where the CPU has them. Only the instructions change, not the arithmetic:
//! LLVM neither contracts a * b + c into an FMA nor reorders float sums by itself, so both give the same bytes
//! (tests/simd.rs runs both). On other architectures (aarch64 nodes) a kernel is its baseline loop alone. Measured
//! in docs/operations.md ("CPU features").

use std::cell::Cell;

/// The instruction sets a kernel can run with, in increasing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// What the binary was built for (baseline x86-64, or the target's own default elsewhere).
    Baseline,
    /// x86-64 with AVX2 and FMA (x86-64-v3 less BMI/MOVBE, which float loops do not use).
    Avx2Fma,
}

thread_local! {
    /// A cap set by `with_level` on this thread (None: the detected level).
    static CAP: Cell<Option<Level>> = const { Cell::new(None) };
}

/// The best level this CPU runs.
pub fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        return Level::Avx2Fma;
    }
    Level::Baseline
}

/// Runs `f` with this thread's kernels capped at `level` (never above `detected()`), to compare the paths in tests
/// and benchmarks. The cap is per thread: run `f`'s parallel work on a one-thread rayon pool, inside `install`.
pub fn with_level<R>(level: Level, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Level>);
    impl Drop for Restore {
        fn drop(&mut self) {
            CAP.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CAP.with(|c| c.replace(Some(level))));
    f()
}

/// The level this thread's kernels run at now.
pub fn active() -> Level {
    let detected = detected();
    CAP.with(|c| c.get())
        .map_or(detected, |cap| cap.min(detected))
}

/// Defines a kernel: a function of slices and numbers (no generics, no `self`) whose body is compiled twice, for
/// the baseline and for AVX2 + FMA, and which runs the best this CPU has (and `with_level` allows) each call. Call
/// it per row or band, not per pixel: the choice costs a thread-local and an atomic load. Closures in the body are
/// compiled with their function's features; other functions it calls are too only where LLVM inlines them (the
/// std slice and iterator methods are), so keep a kernel's loop self-contained. A closure passed to one
/// feature-enabled function does not do: LLVM did not inline the loops' closures into it, and they ran as baseline.
macro_rules! kernel {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2_fma($($arg: $ty),*) $body
            #[inline(always)]
            fn baseline($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            if $crate::simd::active() == $crate::simd::Level::Avx2Fma {
                // SAFETY: `active` is at most `detected`, which found AVX2 and FMA on this CPU.
                #[allow(unsafe_code)]
                let () = unsafe { avx2_fma($($arg),*) };
                return;
            }
            baseline($($arg),*)
        }
    };
}
pub(crate) use kernel;
