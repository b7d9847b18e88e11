//! Max (grow) and min (shrink) over a square window of radius r in a constant number of comparisons per pixel,
//! whatever r (van Herk / Gil-Werman): a rule's `grow` goes up to 200 px, and comparing all 2r + 1 neighbours in
//! each direction cost ~800 comparisons per pixel there (~40 billion for one rule on a 48 MP photo).
//!
//! The window [x - r, x + r] clamped to the row is the window [p, p + k - 1] (k = 2r + 1) of the row padded with r
//! neutral values (-inf for max, +inf for min) on each side. Cut the padded row into blocks of k: `g` runs the
//! extreme forward from each block's start, `h` backward from each block's end, and every window spans at most two
//! blocks, so its extreme is pick(h[p], g[p + k - 1]). Max and min are exact, so the result equals the direct one
//! bit for bit. The vertical pass does the same on whole rows, a block of k rows at a time (memory: 2k rows).

use crate::filter::Plane;

/// `morph` for any r > 0: the same values as the direct window, in O(1) per pixel.
pub(crate) fn van_herk(src: &Plane, r: usize, max: bool) -> Plane {
    let (w, h) = (src.w, src.h);
    let pick = move |a: f32, b: f32| if max { a.max(b) } else { a.min(b) };
    let neutral = if max {
        f32::NEG_INFINITY
    } else {
        f32::INFINITY
    };
    let k = 2 * r + 1;
    let mut rows = Plane::new(w, h);
    let (mut g, mut hh) = (Vec::new(), Vec::new());
    for (dst, row) in rows.data.chunks_mut(w).zip(src.data.chunks(w)) {
        window_extreme(row, r, pick, neutral, dst, (&mut g, &mut hh));
    }
    columns(&rows, k, r, pick, neutral)
}

/// One row: out[x] = extreme of row[x - r ..= x + r] (clamped). `scratch`: g and h, reused across rows.
fn window_extreme(
    row: &[f32],
    r: usize,
    pick: impl Fn(f32, f32) -> f32,
    neutral: f32,
    out: &mut [f32],
    scratch: (&mut Vec<f32>, &mut Vec<f32>),
) {
    let (n, k) = (row.len(), 2 * r + 1);
    let len = n + 2 * r;
    let padded = |i: usize| {
        if i < r || i >= r + n {
            neutral
        } else {
            row[i - r]
        }
    };
    let (g, h) = scratch;
    g.clear();
    g.resize(len, neutral);
    h.clear();
    h.resize(len, neutral);
    for i in 0..len {
        g[i] = if i % k == 0 {
            padded(i)
        } else {
            pick(g[i - 1], padded(i))
        };
    }
    for i in (0..len).rev() {
        h[i] = if i % k == k - 1 || i == len - 1 {
            padded(i)
        } else {
            pick(h[i + 1], padded(i))
        };
    }
    for (p, o) in out.iter_mut().enumerate() {
        *o = pick(h[p], g[p + k - 1]);
    }
}

/// The vertical pass over whole rows: out row y = extreme of rows y - r ..= y + r (clamped), from h of the block
/// holding padded row y and g of padded row y + k - 1 (this block's last row, or the next block's).
fn columns(
    rows: &Plane,
    k: usize,
    r: usize,
    pick: impl Fn(f32, f32) -> f32 + Copy,
    neutral: f32,
) -> Plane {
    let (w, h) = (rows.w, rows.h);
    let len = h + 2 * r;
    let padded = |i: usize| (i >= r && i < r + h).then(|| &rows.data[(i - r) * w..(i - r + 1) * w]);
    let set = |dst: &mut [f32], i: usize| match padded(i) {
        Some(src) => dst.copy_from_slice(src),
        None => dst.fill(neutral),
    };
    let fold = |dst: &mut [f32], i: usize| {
        if let Some(src) = padded(i) {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = pick(*d, *s);
            }
        }
    };
    let mut out = Plane::new(w, h);
    // g of the current block (k rows) and h of the current block (k rows); g of the block before's last row.
    let mut g_block = vec![neutral; k * w];
    let mut h_block = vec![neutral; k * w];
    let blocks = len.div_ceil(k);
    // g of block b, rows b*k .. b*k + k (past `len`: never read).
    let fill_g = |g: &mut [f32], b: usize| {
        for j in 0..k {
            let i = b * k + j;
            if i >= len {
                break;
            }
            let (before, this) = g.split_at_mut(j * w);
            let this = &mut this[..w];
            if j == 0 {
                set(this, i);
            } else {
                this.copy_from_slice(&before[(j - 1) * w..j * w]);
                fold(this, i);
            }
        }
    };
    let fill_h = |hb: &mut [f32], b: usize| {
        let last = ((b + 1) * k).min(len) - 1 - b * k;
        for j in (0..=last).rev() {
            let i = b * k + j;
            let (this, after) = hb.split_at_mut((j + 1) * w);
            let this = &mut this[j * w..];
            if j == last {
                set(this, i);
            } else {
                this.copy_from_slice(&after[..w]);
                fold(this, i);
            }
        }
    };
    fill_g(&mut g_block, 0);
    for b in 0..blocks {
        fill_h(&mut h_block, b);
        // Window starts p in this block: p + k - 1 is this block's last row (j = 0) or row j - 1 of the next block.
        let last_g: Vec<f32> = g_block[(k - 1) * w..k * w].to_vec();
        if b + 1 < blocks {
            fill_g(&mut g_block, b + 1);
        }
        for j in 0..k {
            let p = b * k + j;
            if p >= h {
                break;
            }
            let hr = &h_block[j * w..(j + 1) * w];
            let gr = if j == 0 {
                &last_g[..]
            } else {
                &g_block[(j - 1) * w..j * w]
            };
            for ((o, a), c) in out.data[p * w..(p + 1) * w].iter_mut().zip(hr).zip(gr) {
                *o = pick(*a, *c);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direct(src: &Plane, r: usize, max: bool) -> Plane {
        let pick = |a: f32, b: f32| if max { a.max(b) } else { a.min(b) };
        let mut out = Plane::new(src.w, src.h);
        for y in 0..src.h {
            for x in 0..src.w {
                let mut v = src.data[y * src.w + x];
                for yy in y.saturating_sub(r)..=(y + r).min(src.h - 1) {
                    for xx in x.saturating_sub(r)..=(x + r).min(src.w - 1) {
                        v = pick(v, src.data[yy * src.w + xx]);
                    }
                }
                out.data[y * src.w + x] = v;
            }
        }
        out
    }

    /// `cargo test --release -p palette-rules --lib grow_speed -- --ignored --nocapture`: one 12 MP plane, one thread.
    #[test]
    #[ignore = "a measurement"]
    fn grow_speed() {
        let (w, h) = (4032, 3024);
        let mut src = Plane::new(w, h);
        for (i, v) in src.data.iter_mut().enumerate() {
            *v = ((i * 2_654_435_761) % 1000) as f32 / 1000.0;
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        for r in [4, 20, 200] {
            let t = std::time::Instant::now();
            let fast = van_herk(&src, r, true);
            let fast_ms = t.elapsed().as_secs_f64() * 1e3;
            let t = std::time::Instant::now();
            // The direct path of filter::morph (kept for r <= 3), forced.
            let slow = pool.install(|| crate::filter::morph_direct(&src, r, true));
            let slow_ms = t.elapsed().as_secs_f64() * 1e3;
            assert_eq!(fast.data, slow.data);
            println!(
                "r = {r}: van Herk {fast_ms:.0} ms, direct {slow_ms:.0} ms ({:.1}x)",
                slow_ms / fast_ms
            );
        }
    }

    #[test]
    fn equals_the_direct_window_for_every_size_and_radius() {
        let mut seed = 12345u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32
        };
        for (w, h) in [(1, 1), (1, 9), (9, 1), (7, 5), (13, 29), (40, 23)] {
            let mut src = Plane::new(w, h);
            for v in src.data.iter_mut() {
                *v = if next() < 0.7 { 0.0 } else { next() };
            }
            for r in 1..=17 {
                for max in [true, false] {
                    let fast = van_herk(&src, r, max);
                    assert_eq!(
                        fast.data,
                        direct(&src, r, max).data,
                        "{w}x{h} r={r} max={max}"
                    );
                }
            }
        }
    }
}
