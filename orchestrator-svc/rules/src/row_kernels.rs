//! Per-row float loops of region building (`region`) and instance-mask upsampling (`mask`), each a
//! `simd::kernel!`: compiled for the baseline and for AVX2 + FMA, the same values either way.

crate::simd::kernel! {
    /// `region::refine`'s contrast stretch around 0.5 by `k`, clamped to 0..1.
    pub(crate) fn stretch(row: &mut [f32], k: f32) {
        for v in row.iter_mut() {
            *v = (0.5 + (*v - 0.5) * k).clamp(0.0, 1.0);
        }
    }
}

crate::simd::kernel! {
    /// `row` = max(`row`, `src` / 255): one more mask into a union's row.
    pub(crate) fn max_into(row: &mut [f32], src: &[u8]) {
        for (d, &v) in row.iter_mut().zip(src) {
            *d = d.max(v as f32 * (1.0 / 255.0));
        }
    }
}

crate::simd::kernel! {
    /// `row` = max(`row`, `src`): one more mask into a union's row of codes.
    pub(crate) fn max_codes(row: &mut [u8], src: &[u8]) {
        for (d, &v) in row.iter_mut().zip(src) {
            *d = (*d).max(v);
        }
    }
}

crate::simd::kernel! {
    /// A row of codes added to column sums (`guided::guide_small`, `region::union_small`: s rows of codes at most,
    /// s * 255 within u16).
    pub(crate) fn add_codes(sums: &mut [u16], codes: &[u8]) {
        for (d, &c) in sums.iter_mut().zip(codes) {
            *d += u16::from(c);
        }
    }
}

/// The means in 0..1 of cells `s` columns wide (the last one what is left) of `rows` rows of codes, from the rows'
/// column sums `columns` of `N` interleaved channels, into one output row per channel: each cell's exact integer
/// sum times 1 / (255 n). The whole cells' sums come from sums over windows of s columns at every column (s
/// shifted slices added, vectorised; `window` holds them), read at every s-th: a loop per cell over its s columns,
/// a few at a time, was 5 % of a 1 MP photo (perf). Where a window's sum could pass u16 (s > 16), per cell.
pub(crate) fn cell_means<const N: usize>(
    columns: &[u16],
    s: usize,
    rows: usize,
    window: &mut Vec<u16>,
    mut out: [&mut [f32]; N],
) {
    let cw = columns.len() / N;
    let whole = if s * s * 255 <= u16::MAX as usize {
        cw / s
    } else {
        0
    };
    if whole > 0 {
        // window[i] = sum of columns[i + N j], j < s: the cell starting at column x is window[N s x + k].
        let m = ((whole - 1) * s + 1) * N;
        window.clear();
        window.extend_from_slice(&columns[..m]);
        for j in 1..s {
            add_sums(window, &columns[j * N..j * N + m]);
        }
        let inv = 1.0 / (255.0 * (rows * s) as f32);
        for (x, cell) in window.chunks(s * N).enumerate() {
            (0..N).for_each(|k| out[k][x] = f32::from(cell[k]) * inv);
        }
    }
    for (x, cell) in columns.chunks(s * N).enumerate().skip(whole) {
        let mut acc = [0u32; N];
        for px in cell.chunks_exact(N) {
            (0..N).for_each(|k| acc[k] += u32::from(px[k]));
        }
        let inv = 1.0 / (255.0 * (rows * (cell.len() / N)) as f32);
        (0..N).for_each(|k| out[k][x] = acc[k] as f32 * inv);
    }
}

crate::simd::kernel! {
    /// `sums` += `more`, value by value (`cell_means`' windows; they fit u16 there).
    fn add_sums(sums: &mut [u16], more: &[u16]) {
        for (d, &v) in sums.iter_mut().zip(more) {
            *d += v;
        }
    }
}

crate::simd::kernel! {
    /// Floats in 0..1 to bytes, rounded (a region's last step).
    pub(crate) fn quantize(src: &[f32], dst: &mut [u8]) {
        for (d, v) in dst.iter_mut().zip(src) {
            // max/min rather than clamp: NaN becomes 0 here instead of in the cast (0 either way), so x is always in
            // 0.5..=255.5 and converts with one plain truncation; the saturating cast ran a lane at a time on both
            // targets and cost a 12 MP region two thirds of what its guided filter's apply does.
            #[allow(clippy::manual_clamp)]
            let x = v.max(0.0).min(1.0) * 255.0 + 0.5;
            // SAFETY: x is finite and in 0.5..=255.5, so its truncation fits an i32.
            #[allow(unsafe_code)]
            let q = unsafe { x.to_int_unchecked::<i32>() };
            *d = q as u8;
        }
    }
}

crate::simd::kernel! {
    /// `InstanceUpsampler::horizontal`'s loop: the model row `r` interpolated at the columns' taps.
    pub(crate) fn interpolate_row(out: &mut [f32], r: &[u8], taps: &[(usize, usize, f32)]) {
        for (d, &(i, i1, wx)) in out.iter_mut().zip(taps) {
            *d = r[i] as f32 + wx * (r[i1] as f32 - r[i] as f32);
        }
    }
}

crate::simd::kernel! {
    /// `RowWriter::row`'s loop: the rows above and below blended by `wy`, rounded to bytes.
    pub(crate) fn blend_rows(out: &mut [u8], top: &[f32], bot: &[f32], wy: f32) {
        for ((d, &t), &b) in out.iter_mut().zip(top).zip(bot) {
            // A blend of bytes is in 0.5..=255.5 already; max/min make it certain (and drop NaN) so that it
            // converts with a plain truncation, as `quantize` does.
            #[allow(clippy::manual_clamp)]
            let x = (t + wy * (b - t) + 0.5).max(0.0).min(255.5);
            // SAFETY: x is finite and in 0..=255.5, so its truncation fits an i32.
            #[allow(unsafe_code)]
            let q = unsafe { x.to_int_unchecked::<i32>() };
            *d = q as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cell_means_are_each_cells_own_sum() {
        // Whole cells through the windows, the partial last one and s > 16 per cell, at both SIMD levels, against
        // each cell's sum taken on its own.
        for level in [crate::simd::Level::Baseline, crate::simd::detected()] {
            for (cw, s) in [
                (1usize, 2usize),
                (7, 3),
                (31, 3),
                (40, 10),
                (100, 16),
                (45, 21),
            ] {
                let rows = s.min(5);
                let columns: Vec<u16> = (0..cw * 3)
                    .map(|i| ((i * 7919) % (rows * 255 + 1)) as u16)
                    .collect();
                let n = cw.div_ceil(s);
                let (mut r, mut g, mut b) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
                crate::simd::with_level(level, || {
                    cell_means(&columns, s, rows, &mut Vec::new(), [&mut r, &mut g, &mut b])
                });
                let mut one = vec![0.0; n];
                let grey = &columns[..cw];
                crate::simd::with_level(level, || {
                    cell_means(grey, s, rows, &mut Vec::new(), [&mut one])
                });
                for x in 0..n {
                    let (x0, x1) = (x * s, ((x + 1) * s).min(cw));
                    let inv = 1.0 / (255.0 * (rows * (x1 - x0)) as f32);
                    let sum = |k: usize, c: &[u16], m: usize| {
                        (x0..x1).map(|i| u32::from(c[i * m + k])).sum::<u32>()
                    };
                    for (k, got) in [r[x], g[x], b[x]].into_iter().enumerate() {
                        assert_eq!(
                            got,
                            sum(k, &columns, 3) as f32 * inv,
                            "{level:?} cw={cw} s={s} x={x} k={k}"
                        );
                    }
                    assert_eq!(
                        one[x],
                        sum(0, grey, 1) as f32 * inv,
                        "{level:?} cw={cw} s={s} x={x}"
                    );
                }
            }
        }
    }
}
