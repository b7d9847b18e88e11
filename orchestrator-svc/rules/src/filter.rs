//! Separable O(1)-per-pixel filters on f32 planes: box mean, Gaussian (three boxes), max/min, and integer-factor
//! down/upsampling. Rows run in parallel; the vertical pass works on bands of rows so it parallelises too.

use rayon::prelude::*;

/// A single-channel f32 image, row-major.
#[derive(Clone, Debug)]
pub struct Plane {
    pub w: usize,
    pub h: usize,
    pub data: Vec<f32>,
}

impl Plane {
    pub fn new(w: usize, h: usize) -> Plane {
        Plane {
            w,
            h,
            data: vec![0.0; w * h],
        }
    }
    /// A w x h plane of unspecified values, for code that writes every one (`spare::take`).
    pub(crate) fn spare(w: usize, h: usize) -> Plane {
        Plane {
            w,
            h,
            data: crate::spare::take(w * h),
        }
    }

    /// Hands the plane's buffer to `spare` for the next plane of its size.
    pub(crate) fn give_back(self) {
        crate::spare::give_back(self.data);
    }

    #[inline]
    pub fn at(&self, x: usize, y: usize) -> f32 {
        self.data[y * self.w + x]
    }
}

const BAND: usize = 64;

/// Mean over the (2r+1)^2 window clipped to the image (edge windows divide by their true pixel count).
pub fn box_mean(src: &Plane, r: usize) -> Plane {
    if r == 0 {
        return src.clone();
    }
    let (w, h) = (src.w, src.h);
    let tmp = horizontal_pass(&src.data, None, w, r);
    let out = vertical_pass(&tmp, w, h, r);
    crate::spare::give_back(tmp);
    out
}

/// box_mean(a * b) without materialising the product plane (the guided filter's solve takes nine of these: its
/// second moments).
pub fn box_mean_product(a: &Plane, b: &Plane, r: usize) -> Plane {
    let (w, h) = (a.w, a.h);
    debug_assert_eq!((b.w, b.h), (w, h));
    if r == 0 {
        let mut data = vec![0.0f32; w * h];
        multiply(&mut data, &a.data, &b.data);
        return Plane { w, h, data };
    }
    let tmp = horizontal_pass(&a.data, Some(&b.data), w, r);
    let out = vertical_pass(&tmp, w, h, r);
    crate::spare::give_back(tmp);
    out
}

/// Rows per group of the horizontal pass. A row's running sum is a chain of dependent adds, one pixel at a time
/// (it was a tenth of a 1 MP region); `LANES` rows side by side, transposed into a small buffer, are that many
/// independent chains in one vector: the same adds in the same order per row, so the same floats.
const LANES: usize = 8;

/// The horizontal half of a box mean of `a` (times `b`, when given: the product is taken as the rows are read),
/// rows of width w, in groups of `LANES` rows run in parallel.
fn horizontal_pass(a: &[f32], b: Option<&[f32]>, w: usize, r: usize) -> Vec<f32> {
    let avx = cfg!(target_arch = "x86_64") && crate::simd::active() == crate::simd::Level::Avx2Fma;
    // Every value is written below: a spare buffer will do (`spare`).
    let mut tmp = crate::spare::take(a.len());
    tmp.par_chunks_mut(w * LANES).enumerate().for_each_init(
        || {
            (
                vec![[0.0f32; LANES]; w],
                vec![[0.0f32; LANES]; w],
                vec![0.0f32; w],
            )
        },
        |(buf, out, prod), (g, dst)| {
            let range = g * LANES * w..g * LANES * w + dst.len();
            let (ra, rb) = (&a[range.clone()], b.map(|b| &b[range]));
            // Without AVX2 the transposes cost more than the chains save: a row at a time there.
            if avx && dst.len() == w * LANES {
                box_group(ra, rb.unwrap_or(&[]), dst, buf, out, r, avx);
                return;
            }
            for (k, d) in dst.chunks_exact_mut(w).enumerate() {
                let row = &ra[k * w..(k + 1) * w];
                match rb {
                    Some(rb) => {
                        multiply(prod, row, &rb[k * w..(k + 1) * w]);
                        box_row(prod, d, r);
                    }
                    None => box_row(row, d, r),
                }
            }
        },
    );
    tmp
}

/// `buf[x][k] = rows[k][x]`, in blocks of `LANES` columns (whole vectors in, shuffles, whole vectors out).
#[inline(always)]
fn transpose_in(rows: &[&[f32]; LANES], buf: &mut [[f32; LANES]], avx: bool) {
    let w = buf.len();
    let full = w - w % LANES;
    for (xb, blk_out) in (0..full).step_by(LANES).zip(buf.chunks_exact_mut(LANES)) {
        let blk: [[f32; LANES]; LANES] =
            std::array::from_fn(|k| rows[k][xb..xb + LANES].try_into().unwrap_or_default());
        blk_out.copy_from_slice(&transpose_block(&blk, avx));
    }
    for (x, v) in buf.iter_mut().enumerate().skip(full) {
        *v = std::array::from_fn(|k| rows[k][x]);
    }
}

/// `rows[k][x] = out[x][k]`, the inverse of `transpose_in`.
#[inline(always)]
fn transpose_out(out: &[[f32; LANES]], rows: &mut [&mut [f32]; LANES], avx: bool) {
    let w = out.len();
    let full = w - w % LANES;
    for (xb, blk) in (0..full).step_by(LANES).zip(out.chunks_exact(LANES)) {
        let blk: &[[f32; LANES]; LANES] = blk.try_into().unwrap_or(&[[0.0; LANES]; LANES]);
        for (row, t) in rows.iter_mut().zip(transpose_block(blk, avx)) {
            row[xb..xb + LANES].copy_from_slice(&t);
        }
    }
    for (x, o) in out.iter().enumerate().skip(full) {
        for (k, row) in rows.iter_mut().enumerate() {
            row[x] = o[k];
        }
    }
}

/// `m` transposed; `avx` only where the CPU has AVX2 (`horizontal_pass` asks `simd::active`).
#[inline(always)]
fn transpose_block(m: &[[f32; LANES]; LANES], avx: bool) -> [[f32; LANES]; LANES] {
    #[cfg(target_arch = "x86_64")]
    if avx {
        // SAFETY: `avx` is true only where `simd::active` is Avx2Fma, which `detected` found on this CPU.
        #[allow(unsafe_code)]
        return unsafe { avx::transpose(m) };
    }
    let _ = avx;
    std::array::from_fn(|x| std::array::from_fn(|k| m[k][x]))
}

/// The 8x8 transpose in registers: 24 shuffles instead of 64 scalar moves (LLVM did not find them in the portable
/// form). Moves floats, computes none: the same values at either level.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx {
    use super::LANES;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn transpose(m: &[[f32; LANES]; LANES]) -> [[f32; LANES]; LANES] {
        // SAFETY: each row is 8 f32s, what one unaligned 256-bit load reads.
        let [r0, r1, r2, r3, r4, r5, r6, r7] =
            m.map(|row| unsafe { _mm256_loadu_ps(row.as_ptr()) });
        let (t0, t1) = (_mm256_unpacklo_ps(r0, r1), _mm256_unpackhi_ps(r0, r1));
        let (t2, t3) = (_mm256_unpacklo_ps(r2, r3), _mm256_unpackhi_ps(r2, r3));
        let (t4, t5) = (_mm256_unpacklo_ps(r4, r5), _mm256_unpackhi_ps(r4, r5));
        let (t6, t7) = (_mm256_unpacklo_ps(r6, r7), _mm256_unpackhi_ps(r6, r7));
        let (s0, s1) = (
            _mm256_shuffle_ps::<0x44>(t0, t2),
            _mm256_shuffle_ps::<0xEE>(t0, t2),
        );
        let (s2, s3) = (
            _mm256_shuffle_ps::<0x44>(t1, t3),
            _mm256_shuffle_ps::<0xEE>(t1, t3),
        );
        let (s4, s5) = (
            _mm256_shuffle_ps::<0x44>(t4, t6),
            _mm256_shuffle_ps::<0xEE>(t4, t6),
        );
        let (s6, s7) = (
            _mm256_shuffle_ps::<0x44>(t5, t7),
            _mm256_shuffle_ps::<0xEE>(t5, t7),
        );
        let rows = [
            _mm256_permute2f128_ps::<0x20>(s0, s4),
            _mm256_permute2f128_ps::<0x20>(s1, s5),
            _mm256_permute2f128_ps::<0x20>(s2, s6),
            _mm256_permute2f128_ps::<0x20>(s3, s7),
            _mm256_permute2f128_ps::<0x31>(s0, s4),
            _mm256_permute2f128_ps::<0x31>(s1, s5),
            _mm256_permute2f128_ps::<0x31>(s2, s6),
            _mm256_permute2f128_ps::<0x31>(s3, s7),
        ];
        let mut out = [[0.0f32; LANES]; LANES];
        for (o, v) in out.iter_mut().zip(rows) {
            // SAFETY: each row is 8 f32s, what one unaligned 256-bit store writes.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr(), v) };
        }
        out
    }
}

crate::simd::kernel! {
    /// `box_row` on `LANES` rows of `a` (times `b` unless it is empty) into `dst`, side by side: `buf` and `out`
    /// (the rows' width each) hold the rows transposed, in and out.
    fn box_group(
        a: &[f32],
        b: &[f32],
        dst: &mut [f32],
        buf: &mut [[f32; LANES]],
        out: &mut [[f32; LANES]],
        r: usize,
        avx: bool,
    ) {
        let w = buf.len();
        let rows: [&[f32]; LANES] = std::array::from_fn(|k| &a[k * w..(k + 1) * w]);
        transpose_in(&rows, buf, avx);
        if !b.is_empty() {
            // `out` is free until the sums: b's rows go there, then into the product.
            transpose_in(&std::array::from_fn(|k| &b[k * w..(k + 1) * w]), out, avx);
            for (v, p) in buf.iter_mut().zip(out.iter()) {
                (0..LANES).for_each(|k| v[k] *= p[k]);
            }
        }
        let mut acc: [f32; LANES] = std::array::from_fn(|k| buf[..r.min(w)].iter().map(|v| v[k]).sum());
        // The same three segments and sums as `box_row`, a lane per row.
        let edge = |x: usize, acc: &mut [f32; LANES]| -> [f32; LANES] {
            let n = (x + r).min(w - 1) + 1 - x.saturating_sub(r);
            std::array::from_fn(|k| {
                if x + r < w {
                    acc[k] += buf[x + r][k];
                }
                if x > r {
                    acc[k] -= buf[x - r - 1][k];
                }
                acc[k] / n as f32
            })
        };
        let (lo, hi) = ((r + 1).min(w), w.saturating_sub(r).max((r + 1).min(w)));
        for (x, o) in out.iter_mut().enumerate().take(lo) {
            *o = edge(x, &mut acc);
        }
        let inv = 1.0 / (2 * r + 1) as f32;
        if hi > lo {
            // Whole-array values in a local: with `acc` behind the edges' reference it stayed in memory, a lane at
            // a time. lo = r + 1, so the subtracted pixels x - r - 1 start at 0.
            let mut sum = acc;
            let adds = &buf[lo + r..hi + r];
            for ((o, add), sub) in out[lo..hi].iter_mut().zip(adds).zip(&buf[..hi - lo]) {
                let d: [f32; LANES] = std::array::from_fn(|k| add[k] - sub[k]);
                sum = std::array::from_fn(|k| sum[k] + d[k]);
                *o = sum.map(|v| v * inv);
            }
            acc = sum;
        }
        for (x, o) in out.iter_mut().enumerate().skip(hi) {
            *o = edge(x, &mut acc);
        }
        let mut rows = dst.chunks_exact_mut(w);
        let mut rows: [&mut [f32]; LANES] = std::array::from_fn(|_| rows.next().unwrap_or_default());
        transpose_out(out, &mut rows, avx);
    }
}

/// The vertical half of a box mean, over the horizontal pass's output, in bands of rows run in parallel.
fn vertical_pass(tmp: &[f32], w: usize, h: usize, r: usize) -> Plane {
    // Every row is written below (`scale_row`): a spare buffer will do.
    let mut out = Plane::spare(w, h);
    out.data
        .par_chunks_mut(w * BAND)
        .enumerate()
        .for_each(|(band, dst)| {
            let y0 = band * BAND;
            let rows = dst.len() / w;
            let mut acc = vec![0.0f32; w];
            // Invariant before row y: acc holds rows y-r-1 ..= y+r-1 (clipped), so the loop's add/subtract stay paired.
            for yy in y0.saturating_sub(r + 1)..(y0 + r).min(h) {
                add_row(&mut acc, &tmp[yy * w..(yy + 1) * w], 1.0);
            }
            for i in 0..rows {
                let y = y0 + i;
                if y + r < h {
                    add_row(&mut acc, &tmp[(y + r) * w..(y + r + 1) * w], 1.0);
                }
                if y > r {
                    add_row(&mut acc, &tmp[(y - r - 1) * w..(y - r) * w], -1.0);
                }
                let inv = 1.0 / ((y + r).min(h - 1) + 1 - y.saturating_sub(r)) as f32;
                scale_row(&mut dst[i * w..(i + 1) * w], &acc, inv);
            }
        });
    out
}

/// One row of the horizontal pass. Split into the two edges, where the window is clipped and divides by its true
/// count, and the interior, where it is a running sum times one constant: no branches or divisions per pixel there.
fn box_row(row: &[f32], dst: &mut [f32], r: usize) {
    let w = row.len();
    let mut acc: f32 = row[..r.min(w)].iter().sum();
    // Invariant before pixel x: acc = sum of row[x-r-1+1 ..= x+r-1], clipped.
    let edge = |x: usize, acc: &mut f32| {
        if x + r < w {
            *acc += row[x + r];
        }
        if x > r {
            *acc -= row[x - r - 1];
        }
        let n = (x + r).min(w - 1) + 1 - x.saturating_sub(r);
        *acc / n as f32
    };
    let (lo, hi) = ((r + 1).min(w), w.saturating_sub(r).max((r + 1).min(w)));
    for (x, d) in dst.iter_mut().enumerate().take(lo) {
        *d = edge(x, &mut acc);
    }
    let inv = 1.0 / (2 * r + 1) as f32;
    for (x, d) in dst.iter_mut().enumerate().take(hi).skip(lo) {
        acc += row[x + r] - row[x - r - 1];
        *d = acc * inv;
    }
    for (x, d) in dst.iter_mut().enumerate().skip(hi) {
        *d = edge(x, &mut acc);
    }
}

crate::simd::kernel! {
    fn add_row(acc: &mut [f32], row: &[f32], s: f32) {
        for (a, v) in acc.iter_mut().zip(row) {
            *a += s * v;
        }
    }
}

crate::simd::kernel! {
    fn scale_row(dst: &mut [f32], src: &[f32], k: f32) {
        for (d, a) in dst.iter_mut().zip(src) {
            *d = a * k;
        }
    }
}

crate::simd::kernel! {
    fn multiply(dst: &mut [f32], a: &[f32], b: &[f32]) {
        for ((p, x), y) in dst.iter_mut().zip(a).zip(b) {
            *p = x * y;
        }
    }
}

/// Gaussian blur approximated by three box means (within ~3 % of a true Gaussian); below sigma 0.8 three boxes
/// of radius 1 would already blur to sigma 1.4, so small sigmas use a 3-tap kernel of the same variance.
pub fn gaussian(src: &Plane, sigma: f32) -> Plane {
    match three_tap_weight(sigma) {
        Some(0.0) => return src.clone(),
        Some(wt) => return three_tap(src, wt),
        None => {}
    }
    let r = (((12.0 * sigma * sigma / 3.0 + 1.0).sqrt() - 1.0) / 2.0)
        .round()
        .max(1.0) as usize;
    box_mean(&box_mean(&box_mean(src, r), r), r)
}

/// The weight w of the 3-tap kernel `gaussian` uses for `sigma` (0 where it blurs nothing); None where it uses three
/// boxes instead. Lets a caller fuse the blur into its own passes (`region`) with the same numbers.
pub fn three_tap_weight(sigma: f32) -> Option<f32> {
    if sigma < 0.3 {
        Some(0.0)
    } else if sigma < 0.8 {
        Some(0.5 * sigma * sigma)
    } else {
        None
    }
}

/// Separable [w, 1 - 2w, w] blur (variance 2w per axis), edges clamped.
fn three_tap(src: &Plane, wt: f32) -> Plane {
    let (w, h) = (src.w, src.h);
    let mut tmp = vec![0.0f32; w * h];
    tmp.par_chunks_mut(w)
        .zip(src.data.par_chunks(w))
        .for_each(|(d, r)| three_tap_row(r, d, wt));
    let mut out = Plane::new(w, h);
    out.data.par_chunks_mut(w).enumerate().for_each(|(y, d)| {
        let (up, dn) = (y.saturating_sub(1), (y + 1).min(h - 1));
        let row = |k: usize| &tmp[k * w..(k + 1) * w];
        three_tap_column(row(up), row(y), row(dn), d, wt);
    });
    out
}

crate::simd::kernel! {
    /// The horizontal pass of `three_tap` on one row.
    pub fn three_tap_row(r: &[f32], d: &mut [f32], wt: f32) {
        let (w, c) = (r.len(), 1.0 - 2.0 * wt);
        let tap = |x: usize| c * r[x] + wt * (r[x.saturating_sub(1)] + r[(x + 1).min(w - 1)]);
        if w < 3 {
            (0..w).for_each(|x| d[x] = tap(x));
            return;
        }
        (d[0], d[w - 1]) = (tap(0), tap(w - 1));
        // The interior as three shifted slices, the same sums: clamped indices kept it from vectorising.
        for (((d, l), m), rt) in d[1..w - 1].iter_mut().zip(r).zip(&r[1..]).zip(&r[2..]) {
            *d = c * m + wt * (l + rt);
        }
    }
}

crate::simd::kernel! {
    /// The vertical pass of `three_tap` for one row, from the horizontal pass's rows above, at and below it.
    pub fn three_tap_column(up: &[f32], mid: &[f32], dn: &[f32], d: &mut [f32], wt: f32) {
        let c = 1.0 - 2.0 * wt;
        for (x, d) in d.iter_mut().enumerate() {
            *d = c * mid[x] + wt * (up[x] + dn[x]);
        }
    }
}

/// Max (grow) or min (shrink) over a square window of radius r; soft values stay soft. Up to r = 3 each pixel's
/// window is read directly (rows in parallel); beyond, `morph::van_herk` (the same values, a constant number of
/// comparisons per pixel: `grow` goes up to 200).
pub fn morph(src: &Plane, r: usize, max: bool) -> Plane {
    if r == 0 {
        return src.clone();
    }
    if r > 3 {
        return crate::morph::van_herk(src, r, max);
    }
    morph_direct(src, r, max)
}

/// `morph` reading each pixel's whole window (rows in parallel): faster than van Herk for small r.
pub(crate) fn morph_direct(src: &Plane, r: usize, max: bool) -> Plane {
    let pick = move |a: f32, b: f32| if max { a.max(b) } else { a.min(b) };
    let (w, h) = (src.w, src.h);
    let mut tmp = vec![0.0f32; w * h];
    tmp.par_chunks_mut(w)
        .zip(src.data.par_chunks(w))
        .for_each(|(dst, row)| {
            for (x, d) in dst.iter_mut().enumerate() {
                let lo = x.saturating_sub(r);
                let hi = (x + r).min(w - 1);
                *d = row[lo..=hi].iter().copied().reduce(pick).unwrap_or(0.0);
            }
        });
    let mut out = Plane::new(w, h);
    out.data.par_chunks_mut(w).enumerate().for_each(|(y, dst)| {
        let lo = y.saturating_sub(r);
        let hi = (y + r).min(h - 1);
        dst.copy_from_slice(&tmp[lo * w..(lo + 1) * w]);
        for yy in lo + 1..=hi {
            for (d, v) in dst.iter_mut().zip(&tmp[yy * w..(yy + 1) * w]) {
                *d = pick(*d, *v);
            }
        }
    });
    out
}

/// Area-average downsample by an integer factor (partial blocks at the edge average what they have).
pub fn downsample(src: &Plane, s: usize) -> Plane {
    if s <= 1 {
        return src.clone();
    }
    let (w, h) = (src.w.div_ceil(s), src.h.div_ceil(s));
    let mut out = Plane::new(w, h);
    out.data.par_chunks_mut(w).enumerate().for_each(|(y, dst)| {
        let (y0, y1) = (y * s, ((y + 1) * s).min(src.h));
        for (x, d) in dst.iter_mut().enumerate() {
            let (x0, x1) = (x * s, ((x + 1) * s).min(src.w));
            let mut acc = 0.0;
            for yy in y0..y1 {
                acc += src.data[yy * src.w + x0..yy * src.w + x1]
                    .iter()
                    .sum::<f32>();
            }
            *d = acc / ((y1 - y0) * (x1 - x0)) as f32;
        }
    });
    out
}

/// Bilinear upsample (half-pixel centres) of a plane made by `downsample(_, s)` back to w x h.
pub fn upsample(src: &Plane, s: usize, w: usize, h: usize) -> Plane {
    if s <= 1 {
        return src.clone();
    }
    let coord = |i: usize, n: usize| {
        let f = ((i as f32 + 0.5) / s as f32 - 0.5).clamp(0.0, (n - 1) as f32);
        let k = f.floor() as usize;
        (k, (k + 1).min(n - 1), f - k as f32)
    };
    let xs: Vec<_> = (0..w).map(|x| coord(x, src.w)).collect();
    let mut out = Plane::new(w, h);
    out.data.par_chunks_mut(w).enumerate().for_each(|(y, dst)| {
        let (j, j1, wy) = coord(y, src.h);
        let (r0, r1) = (&src.data[j * src.w..], &src.data[j1 * src.w..]);
        for (d, &(i, i1, wx)) in dst.iter_mut().zip(&xs) {
            let top = r0[i] + wx * (r0[i1] - r0[i]);
            let bot = r1[i] + wx * (r1[i1] - r1[i]);
            *d = top + wy * (bot - top);
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_box(p: &Plane, r: usize) -> Plane {
        let mut o = Plane::new(p.w, p.h);
        for y in 0..p.h {
            for x in 0..p.w {
                let (mut s, mut n) = (0.0, 0);
                for yy in y.saturating_sub(r)..=(y + r).min(p.h - 1) {
                    for xx in x.saturating_sub(r)..=(x + r).min(p.w - 1) {
                        s += p.at(xx, yy);
                        n += 1;
                    }
                }
                o.data[y * p.w + x] = s / n as f32;
            }
        }
        o
    }

    #[test]
    fn box_mean_matches_naive_across_bands() {
        let mut p = Plane::new(37, 150);
        for (i, v) in p.data.iter_mut().enumerate() {
            *v = ((i * 7919) % 101) as f32 / 100.0;
        }
        for r in [1, 3, 40] {
            let (a, b) = (box_mean(&p, r), naive_box(&p, r));
            let err = a
                .data
                .iter()
                .zip(&b.data)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            assert!(err < 1e-4, "r={r} err={err}");
        }
    }

    #[test]
    fn box_mean_of_a_product_equals_box_mean_of_the_product_plane() {
        let (w, h) = (41, 70);
        let a = Plane {
            w,
            h,
            data: (0..w * h).map(|i| ((i * 31) % 17) as f32 / 16.0).collect(),
        };
        let b = Plane {
            w,
            h,
            data: (0..w * h).map(|i| ((i * 13) % 23) as f32 / 22.0).collect(),
        };
        let prod = Plane {
            w,
            h,
            data: a.data.iter().zip(&b.data).map(|(x, y)| x * y).collect(),
        };
        for r in [0, 1, 4, 50] {
            let (got, want) = (box_mean_product(&a, &b, r), box_mean(&prod, r));
            assert_eq!(got.data, want.data, "r={r}");
        }
    }

    #[test]
    fn row_groups_give_box_rows_bytes() {
        // The grouped horizontal pass against `box_row` a row at a time (the old formulation), at every SIMD level,
        // for widths around the radius and heights with and without a partial last group.
        for level in [crate::simd::Level::Baseline, crate::simd::detected()] {
            for (w, h) in [(1, 9), (3, 8), (7, 17), (41, 24), (337, 21)] {
                let a: Vec<f32> = (0..w * h)
                    .map(|i| ((i * 7919) % 251) as f32 / 250.0)
                    .collect();
                let b: Vec<f32> = (0..w * h).map(|i| ((i * 31) % 17) as f32 / 16.0).collect();
                for r in [1, 2, 5, 40] {
                    let mut want = vec![0.0f32; w * h];
                    let mut prod = vec![0.0f32; w * h];
                    for (d, row) in want.chunks_exact_mut(w).zip(a.chunks_exact(w)) {
                        box_row(row, d, r);
                    }
                    let got = crate::simd::with_level(level, || horizontal_pass(&a, None, w, r));
                    assert_eq!(got, want, "{level:?} w={w} h={h} r={r}");
                    for ((d, x), y) in prod.iter_mut().zip(&a).zip(&b) {
                        *d = x * y;
                    }
                    for (d, row) in want.chunks_exact_mut(w).zip(prod.chunks_exact(w)) {
                        box_row(row, d, r);
                    }
                    let got =
                        crate::simd::with_level(level, || horizontal_pass(&a, Some(&b), w, r));
                    assert_eq!(got, want, "{level:?} product w={w} h={h} r={r}");
                }
            }
        }
    }

    #[test]
    fn morph_grows_and_shrinks() {
        let mut p = Plane::new(9, 9);
        p.data[4 * 9 + 4] = 1.0;
        let g = morph(&p, 2, true);
        assert_eq!(g.at(2, 2), 1.0);
        assert_eq!(g.at(1, 4), 0.0);
        assert_eq!(morph(&g, 2, false).data, p.data);
    }
}
