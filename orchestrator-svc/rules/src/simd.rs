//! Runtime CPU-feature dispatch for the rules' hot float loops. The shipped binary targets baseline x86-64 (SSE2, 4
//! f32 lanes) so that it runs on any x86-64 node; a loop defined with `kernel!` is compiled a second time for AVX2
//! and FMA (8 lanes) and runs that way where the CPU has them. Only the instructions change, not the arithmetic:
//! LLVM neither contracts a * b + c into an FMA nor reorders float sums by itself, so both give the same bytes
//! (tests/simd.rs runs both). Hand-written AVX2 kernels (texture's shading, tone's and recolour's blends) follow
//! the same rule; the one FMA among them is tone's cell index (`lut.rs`, a corrected reciprocal that equals the
//! division for every 8-bit code, tested exhaustively). On other architectures (aarch64 nodes) a kernel is its
//! baseline loop alone. Measured in docs/operations.md ("CPU features").

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

/// The R, G and B codes of 8 RGB pixels at `$p` (a byte pointer with 24 readable bytes) as three vectors of 8 i32,
/// for AVX2 row kernels: use inside a `#[target_feature(enable = "avx2")]` function with `std::arch::x86_64::*` in
/// scope (a macro, not a function, so that it is compiled inline with the kernel's features).
#[cfg(target_arch = "x86_64")]
macro_rules! load_rgb8 {
    ($p:expr) => {{
        let p: *const u8 = $p;
        // SAFETY: the caller's `p` has 24 readable bytes; the loads read 0..16 and 16..24.
        #[allow(unsafe_code)]
        let (lo, hi) = unsafe {
            (
                _mm_loadu_si128(p as *const __m128i),
                _mm_loadl_epi64(p.add(16) as *const __m128i),
            )
        };
        // Byte shuffles that pick one channel out of bytes 0..16 (`lo`) and 16..24 (`hi`).
        let x = -1;
        let channel = [
            (
                _mm_setr_epi8(0, 3, 6, 9, 12, 15, x, x, x, x, x, x, x, x, x, x),
                _mm_setr_epi8(x, x, x, x, x, x, 2, 5, x, x, x, x, x, x, x, x),
            ),
            (
                _mm_setr_epi8(1, 4, 7, 10, 13, x, x, x, x, x, x, x, x, x, x, x),
                _mm_setr_epi8(x, x, x, x, x, 0, 3, 6, x, x, x, x, x, x, x, x),
            ),
            (
                _mm_setr_epi8(2, 5, 8, 11, 14, x, x, x, x, x, x, x, x, x, x, x),
                _mm_setr_epi8(x, x, x, x, x, 1, 4, 7, x, x, x, x, x, x, x, x),
            ),
        ];
        let mut out = [_mm256_setzero_si256(); 3];
        for c in 0..3 {
            let bytes = _mm_or_si128(
                _mm_shuffle_epi8(lo, channel[c].0),
                _mm_shuffle_epi8(hi, channel[c].1),
            );
            out[c] = _mm256_cvtepu8_epi32(bytes);
        }
        out
    }};
}

/// `ops::blend_masked`'s blend of 8 pixels, to the same bytes, stored over the 24 bytes at `$p` (writable):
/// round(src + a k (e - src)) per channel, saturating, with `$src` and `$e` as three vectors of 8 floats, `$a` the
/// alphas as 8 i32 and `$k` the strength / 255. Lanes of alpha 0 keep `src` whatever their `e` (NaN included).
/// The operations are the scalar ones in the same order, with no FMA contraction. For the same contexts as
/// `load_rgb8!`.
#[cfg(target_arch = "x86_64")]
macro_rules! blend_store_rgb8 {
    ($p:expr, $src:expr, $e:expr, $a:expr, $k:expr) => {{
        let (p, src, e, a): (*mut u8, [__m256; 3], [__m256; 3], __m256i) = ($p, $src, $e, $a);
        let wgt = _mm256_mul_ps(_mm256_cvtepi32_ps(a), _mm256_set1_ps($k));
        let keep = _mm256_castsi256_ps(_mm256_cmpeq_epi32(a, _mm256_setzero_si256()));
        let mut q = [_mm256_setzero_si256(); 3];
        for c in 0..3 {
            let (s, e) = (src[c], _mm256_blendv_ps(e[c], src[c], keep));
            let v = _mm256_add_ps(s, _mm256_mul_ps(wgt, _mm256_sub_ps(e, s)));
            // `(v + 0.5) as u8`: saturating, NaN to 0 (max returns its second operand for NaN).
            let v = _mm256_add_ps(v, _mm256_set1_ps(0.5));
            let v = _mm256_min_ps(_mm256_max_ps(v, _mm256_setzero_ps()), _mm256_set1_ps(255.0));
            q[c] = _mm256_cvttps_epi32(v);
        }
        // Lanes 0..4 of each 128-bit half: [r0..3 g0..3 b0..3 b0..3 | r4..7 g4..7 b4..7 b4..7] as bytes.
        let bytes = _mm256_packus_epi16(
            _mm256_packus_epi32(q[0], q[1]),
            _mm256_packus_epi32(q[2], q[2]),
        );
        let (l, h) = (
            _mm256_castsi256_si128(bytes),
            _mm256_extracti128_si256::<1>(bytes),
        );
        // Back to RGB order: bytes 0..16 from both halves, 16..24 from the upper.
        let x = -1;
        let head = _mm_or_si128(
            _mm_shuffle_epi8(l, _mm_setr_epi8(0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11, x, x, x, x)),
            _mm_shuffle_epi8(h, _mm_setr_epi8(x, x, x, x, x, x, x, x, x, x, x, x, 0, 4, 8, 1)),
        );
        let tail = _mm_shuffle_epi8(h, _mm_setr_epi8(5, 9, 2, 6, 10, 3, 7, 11, x, x, x, x, x, x, x, x));
        // SAFETY: the caller's `p` has 24 writable bytes: these write 0..16 and 16..24.
        #[allow(unsafe_code)]
        unsafe {
            _mm_storeu_si128(p as *mut __m128i, head);
            _mm_storel_epi64(p.add(16) as *mut __m128i, tail);
        }
    }};
}
/// Entries `$idx` (8 indices) of `$table` (a slice of [r, g, b, _] floats) as three vectors of 8 floats: one
/// 128-bit load per entry and a transpose, which beat 3 gathers per 8 entries. Indexing is checked. For the same
/// contexts as `load_rgb8!`.
#[cfg(target_arch = "x86_64")]
macro_rules! load_rgb4x8 {
    ($table:expr, $idx:expr) => {{
        let (table, idx): (&[[f32; 4]], [i32; 8]) = ($table, $idx);
        let mut t = [_mm256_setzero_ps(); 4];
        for j in 0..4 {
            let (lo, hi) = (&table[idx[j] as usize], &table[idx[j + 4] as usize]);
            // SAFETY: each reads the 4 floats of one entry through its reference.
            #[allow(unsafe_code)]
            let (lo, hi) = unsafe { (_mm_loadu_ps(lo.as_ptr()), _mm_loadu_ps(hi.as_ptr())) };
            t[j] = _mm256_insertf128_ps::<1>(_mm256_castps128_ps256(lo), hi);
        }
        $crate::simd::transpose_rgb4x8!(t)
    }};
}
/// Eight [r, g, b, _] entries loaded as four registers, entry j in the low half of `$t[j % 4]` and entry j + 4 in
/// its high half, turned into three vectors of 8 floats (r, g, b) in entry order: unpacks and shuffles.
#[cfg(target_arch = "x86_64")]
macro_rules! transpose_rgb4x8 {
    ($t:expr) => {{
        let t: [__m256; 4] = $t;
        let (u0, u1) = (
            _mm256_unpacklo_ps(t[0], t[1]),
            _mm256_unpackhi_ps(t[0], t[1]),
        );
        let (u2, u3) = (
            _mm256_unpacklo_ps(t[2], t[3]),
            _mm256_unpackhi_ps(t[2], t[3]),
        );
        [
            _mm256_shuffle_ps::<0x44>(u0, u2),
            _mm256_shuffle_ps::<0xEE>(u0, u2),
            _mm256_shuffle_ps::<0x44>(u1, u3),
        ]
    }};
}
#[cfg(target_arch = "x86_64")]
pub(crate) use {blend_store_rgb8, load_rgb4x8, load_rgb8, transpose_rgb4x8};
