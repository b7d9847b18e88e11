//! Model-resolution instance masks to photo-resolution soft alpha.

use image::GrayImage;

use crate::grid_rows::GridRows;
use crate::row_kernels::{blend_rows, interpolate_row};
use rayon::prelude::*;

/// An all-zero `width` x `height` plane, zeroed by writing rather than by asking the allocator for zeroed memory.
///
/// Why: `GrayImage::new` asks for zeroed memory (calloc). jemalloc (the orchestrator's allocator) satisfies a large
/// zeroed request from freed pages by discarding them (`MADV_DONTNEED`), so every page of the plane faults in
/// afresh on first touch (~2.5 µs each, 3000 per 12 MP plane). Writing the zeros reuses the freed pages as they
/// are: a 12 MB memset is ~1-2 ms.
#[allow(clippy::slow_vector_initialization)] // the point: `vec![0; n]` is the calloc this avoids
pub fn zeroed_plane(width: u32, height: u32) -> GrayImage {
    let n = width as usize * height as usize;
    let mut data = Vec::with_capacity(n);
    data.resize(n, 0u8);
    GrayImage::from_raw(width, height, data).expect("the buffer has width x height bytes")
}

/// Bytes tested at once by `first_nonzero` and `last_nonzero`: OR-folding a block vectorises, a byte-wise search
/// does not (a region's zero rows were scanned at ~1 byte per cycle: ~5 ms per 12 MP plane).
const ZERO_BLOCK: usize = 64;

/// The index of the first non-zero byte of `row`.
fn first_nonzero(row: &[u8]) -> Option<usize> {
    let mut start = 0;
    for block in row.chunks(ZERO_BLOCK) {
        if block.iter().fold(0u8, |a, &b| a | b) != 0 {
            return block.iter().position(|&v| v != 0).map(|i| start + i);
        }
        start += block.len();
    }
    None
}

/// The index of the last non-zero byte of `row`.
fn last_nonzero(row: &[u8]) -> Option<usize> {
    let mut end = row.len();
    for block in row.rchunks(ZERO_BLOCK) {
        end -= block.len();
        if block.iter().fold(0u8, |a, &b| a | b) != 0 {
            return block.iter().rposition(|&v| v != 0).map(|i| end + i);
        }
    }
    None
}

/// Model-resolution soft mask covering the whole image: u8 probabilities, row-major [height, width].
pub struct ModelMask<'a> {
    pub width: u32,
    pub height: u32,
    pub probs: &'a [u8],
}

/// An instance's box in original-image pixels.
#[derive(Clone, Copy, Debug)]
pub struct PixelBox {
    pub x0: f32,
    pub y0: f32,
    pub x1: f32,
    pub y1: f32,
}

/// Pixel rectangle [x0, x1) x [y0, y1) clamped to an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rect {
    pub x0: u32,
    pub y0: u32,
    pub x1: u32,
    pub y1: u32,
}

impl Rect {
    pub fn is_empty(&self) -> bool {
        self.x0 >= self.x1 || self.y0 >= self.y1
    }
    pub fn width(&self) -> u32 {
        self.x1.saturating_sub(self.x0)
    }
    pub fn height(&self) -> u32 {
        self.y1.saturating_sub(self.y0)
    }
    /// Grown by `m` on every side, clamped to w x h.
    pub fn grown(&self, m: u32, w: u32, h: u32) -> Rect {
        Rect {
            x0: self.x0.saturating_sub(m),
            y0: self.y0.saturating_sub(m),
            x1: (self.x1 + m).min(w),
            y1: (self.y1 + m).min(h),
        }
    }
}

/// Bounding rectangle of the non-zero pixels (empty rect when all zero). Rules use it to skip untouched rows.
pub fn nonzero_bounds(img: &GrayImage) -> Rect {
    let (w, h) = img.dimensions();
    let rows: Vec<Option<(u32, u32)>> = img
        .as_raw()
        .par_chunks(w.max(1) as usize)
        .map(|row| {
            let first = first_nonzero(row)?;
            let last = last_nonzero(row)?;
            Some((first as u32, last as u32 + 1))
        })
        .collect();
    let mut r = Rect {
        x0: w,
        y0: h,
        x1: 0,
        y1: 0,
    };
    for (y, span) in rows.iter().enumerate() {
        if let Some((a, b)) = span {
            r.x0 = r.x0.min(*a);
            r.x1 = r.x1.max(*b);
            r.y0 = r.y0.min(y as u32);
            r.y1 = y as u32 + 1;
        }
    }
    if r.x1 == 0 {
        Rect {
            x0: 0,
            y0: 0,
            x1: 0,
            y1: 0,
        }
    } else {
        r
    }
}

/// Bilinear (half-pixel centres) upsample to out_w x out_h, computed only inside the box grown by a small margin;
/// 0 elsewhere. The margin (two model pixels) keeps the soft edge that SAM puts just outside its own box.
pub fn upsample_instance(mask: &ModelMask, bbox: PixelBox, out_w: u32, out_h: u32) -> GrayImage {
    let mut out = GrayImage::new(out_w, out_h);
    let up = InstanceUpsampler::new(mask, bbox, out_w, out_h);
    let span = up.span();
    if span.is_empty() {
        return out;
    }
    let (x0, x1) = (span.x0 as usize, span.x1 as usize);
    out.as_mut()
        .par_chunks_mut(out_w as usize)
        .enumerate()
        .skip(span.y0 as usize)
        .take(span.height() as usize)
        .for_each(|(y, row)| up.row(y as u32, span.x0, &mut row[x0..x1]));
    out
}

/// `upsample_instance` a row or a pixel at a time, with no full-frame plane: an instance is zero outside its box,
/// and at 12 MP a plane per instance (~20 per photo) cost more in page faults and zeroing than the upsample itself.
pub struct InstanceUpsampler<'a> {
    probs: &'a [u8],
    mw: usize,
    mh: usize,
    sy: f32,
    span: Rect,
    /// Horizontal taps of the span's columns (the same for every row).
    taps: Vec<(usize, usize, f32)>,
}

impl<'a> InstanceUpsampler<'a> {
    pub fn new(mask: &ModelMask<'a>, bbox: PixelBox, out_w: u32, out_h: u32) -> Self {
        let (mw, mh) = (mask.width as usize, mask.height as usize);
        let empty = Rect {
            x0: 0,
            y0: 0,
            x1: 0,
            y1: 0,
        };
        let mut up = InstanceUpsampler {
            probs: mask.probs,
            mw,
            mh,
            sy: 0.0,
            span: empty,
            taps: Vec::new(),
        };
        if mw == 0 || mh == 0 || out_w == 0 || out_h == 0 || mask.probs.len() < mw * mh {
            return up;
        }
        let sx = mw as f32 / out_w as f32;
        let sy = mh as f32 / out_h as f32;
        let margin_x = 2.0 / sx + 2.0;
        let margin_y = 2.0 / sy + 2.0;
        let clampf = |v: f32, hi: u32| v.max(0.0).min(hi as f32) as u32;
        let span = Rect {
            x0: clampf((bbox.x0.min(bbox.x1) - margin_x).floor(), out_w),
            x1: clampf((bbox.x1.max(bbox.x0) + margin_x).ceil(), out_w),
            y0: clampf((bbox.y0.min(bbox.y1) - margin_y).floor(), out_h),
            y1: clampf((bbox.y1.max(bbox.y0) + margin_y).ceil(), out_h),
        };
        if span.is_empty() {
            return up;
        }
        up.taps = (span.x0..span.x1)
            .map(|x| {
                let fx = ((x as f32 + 0.5) * sx - 0.5).clamp(0.0, (mw - 1) as f32);
                let i = fx.floor() as usize;
                (i, (i + 1).min(mw - 1), fx - i as f32)
            })
            .collect();
        up.sy = sy;
        up.span = span;
        up
    }

    /// Where values may be non-zero: the box plus its margin (empty when nothing is).
    pub fn span(&self) -> Rect {
        self.span
    }

    /// The model rows and weight of output row y.
    #[inline]
    fn rows(&self, y: u32) -> (&[u8], &[u8], f32) {
        let (mw, mh) = (self.mw, self.mh);
        let fy = ((y as f32 + 0.5) * self.sy - 0.5).clamp(0.0, (mh - 1) as f32);
        let j = fy.floor() as usize;
        let j1 = (j + 1).min(mh - 1);
        let p = self.probs;
        (
            &p[j * mw..(j + 1) * mw],
            &p[j1 * mw..(j1 + 1) * mw],
            fy - j as f32,
        )
    }

    #[inline]
    fn value(r0: &[u8], r1: &[u8], wy: f32, &(i, i1, wx): &(usize, usize, f32)) -> u8 {
        let top = r0[i] as f32 + wx * (r0[i1] as f32 - r0[i] as f32);
        let bot = r1[i] as f32 + wx * (r1[i1] as f32 - r1[i] as f32);
        (top + wy * (bot - top) + 0.5) as u8
    }

    /// Row y (inside the span) from column `x0` on: `out.len()` pixels, which must stay inside the span.
    pub fn row(&self, y: u32, x0: u32, out: &mut [u8]) {
        let (r0, r1, wy) = self.rows(y);
        let taps = &self.taps[(x0 - self.span.x0) as usize..][..out.len()];
        for (dst, tap) in out.iter_mut().zip(taps) {
            *dst = Self::value(r0, r1, wy, tap);
        }
    }

    /// A writer of rows `x0 .. x0 + len` taken in increasing y (see `RowWriter`).
    pub fn row_writer(&self, x0: u32, len: usize) -> RowWriter<'_, 'a> {
        RowWriter {
            up: self,
            x0,
            rows: GridRows::new(len),
        }
    }

    /// Model row j interpolated horizontally at the columns from `x0` on, as `value` does it.
    fn horizontal(&self, j: usize, x0: u32, out: &mut [f32]) {
        let r = &self.probs[j * self.mw..(j + 1) * self.mw];
        let taps = &self.taps[(x0 - self.span.x0) as usize..][..out.len()];
        interpolate_row(out, r, taps);
    }

    /// The smallest rectangle holding every non-zero pixel (empty when none), found without upsampling the
    /// inside: rows are scanned from each end only until their first non-zero pixel, and only outside the
    /// columns found so far.
    pub fn nonzero_bounds(&self) -> Rect {
        let s = self.span;
        let (mut x0, mut x1) = (s.x1, s.x0);
        let (mut y0, mut y1) = (s.y1, s.y0);
        for y in s.y0..s.y1 {
            let (r0, r1, wy) = self.rows(y);
            let at = |x: u32| Self::value(r0, r1, wy, &self.taps[(x - s.x0) as usize]) != 0;
            // Left end: up to the leftmost column found so far (the whole row while none is).
            let left_limit = if x0 < x1 { x0 } else { s.x1 };
            let left = (s.x0..left_limit).find(|&x| at(x));
            if let Some(x) = left {
                x0 = x;
            }
            // Right end: down to the rightmost column found so far (or to the left end just found).
            let right_limit = if x0 < x1 { x1 } else { x0.min(s.x1) };
            let right = (right_limit..s.x1).rev().find(|&x| at(x));
            if let Some(x) = right {
                x1 = x + 1;
            }
            let nonzero = left.is_some() || right.is_some() || (x0 < x1 && (x0..x1).any(at));
            if nonzero {
                y0 = y0.min(y);
                y1 = y + 1;
            }
        }
        if x0 < x1 && y0 < y1 {
            Rect { x0, y0, x1, y1 }
        } else {
            Rect {
                x0: 0,
                y0: 0,
                x1: 0,
                y1: 0,
            }
        }
    }
}

/// [`InstanceUpsampler::row`] for rows taken in increasing y over one column range: each model row is interpolated
/// horizontally once and kept while output rows fall between it and the next (84 output rows per model row for the
/// tiny model's 48x48 masks at 12 MP, 10 for the real model's 288), so a pixel costs one vertical blend instead of
/// three blends. The same floats in the same order as `row`: the same bytes. Masks stage at 12 MP: see
/// docs/operations.md (orchestrator sizing).
pub struct RowWriter<'u, 'a> {
    up: &'u InstanceUpsampler<'a>,
    x0: u32,
    /// The model rows above and below the current output row, interpolated horizontally.
    rows: GridRows<f32>,
}

impl RowWriter<'_, '_> {
    /// Row y (inside the span): as many pixels as the writer was made for.
    pub fn row(&mut self, y: u32, out: &mut [u8]) {
        let up = self.up;
        let fy = ((y as f32 + 0.5) * up.sy - 0.5).clamp(0.0, (up.mh - 1) as f32);
        let j = fy.floor() as usize;
        let j1 = (j + 1).min(up.mh - 1);
        let wy = fy - j as f32;
        let x0 = self.x0;
        let (top, bot) = self
            .rows
            .around(j, j1, |row, line| up.horizontal(row, x0, line));
        blend_rows(out, top, bot, wy);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_search_finds_the_first_and_last_non_zero_byte() {
        for len in [0usize, 1, 63, 64, 65, 130, 1000] {
            let mut row = vec![0u8; len];
            assert_eq!((first_nonzero(&row), last_nonzero(&row)), (None, None));
            for (a, b) in [
                (0, 0),
                (3, 3),
                (0, len.saturating_sub(1)),
                (len / 2, len / 2 + 1),
                (63, 64),
            ] {
                if b >= len {
                    continue;
                }
                row.fill(0);
                row[a] = 7;
                row[b] = 1;
                assert_eq!(
                    (first_nonzero(&row), last_nonzero(&row)),
                    (Some(a), Some(b)),
                    "{len} {a} {b}"
                );
            }
        }
    }

    #[test]
    fn the_row_upsampler_and_its_bounds_match_the_full_plane() {
        // Soft blobs with zero borders, boxes inside, across, and outside the frame.
        let (mw, mh) = (24u32, 18u32);
        let probs: Vec<u8> = (0..mw * mh)
            .map(|k| {
                let (x, y) = ((k % mw) as f32, (k / mw) as f32);
                let d = ((x - 9.0).powi(2) + (y - 8.0).powi(2)).sqrt();
                (200.0 - 40.0 * d).clamp(0.0, 255.0) as u8
            })
            .collect();
        let m = ModelMask {
            width: mw,
            height: mh,
            probs: &probs,
        };
        let boxes = [
            (0.0, 0.0, 300.0, 200.0),
            (40.0, 30.0, 150.0, 120.0),
            (-50.0, 90.0, 90.0, 400.0),
            (250.0, 150.0, 260.0, 160.0),
            (400.0, 300.0, 500.0, 400.0),
        ];
        for (x0, y0, x1, y1) in boxes {
            let b = PixelBox { x0, y0, x1, y1 };
            let full = upsample_instance(&m, b, 301, 203);
            let up = InstanceUpsampler::new(&m, b, 301, 203);
            assert_eq!(up.nonzero_bounds(), nonzero_bounds(&full), "{b:?}");
            let s = up.span();
            let len = (s.x1 - s.x0).saturating_sub(3) as usize;
            let mut writer = up.row_writer(s.x0 + 3, len);
            for y in s.y0..s.y1 {
                let mut row = vec![0u8; len];
                up.row(y, s.x0 + 3, &mut row);
                let want = &full.as_raw()[(y * 301 + s.x0 + 3) as usize..][..row.len()];
                assert_eq!(&row[..], want);
                writer.row(y, &mut row);
                assert_eq!(&row[..], want, "row writer, row {y}");
            }
        }
    }

    #[test]
    fn upsample_is_zero_outside_box_and_interpolates_inside() {
        // 40 model px over 100 output px: the margin is two model pixels (5 px) plus 2.
        let probs: Vec<u8> = vec![255; 1600];
        let m = ModelMask {
            width: 40,
            height: 40,
            probs: &probs,
        };
        let b = PixelBox {
            x0: 10.0,
            y0: 10.0,
            x1: 20.0,
            y1: 20.0,
        };
        let out = upsample_instance(&m, b, 100, 100);
        assert_eq!(out.get_pixel(15, 15)[0], 255);
        assert_eq!(out.get_pixel(28, 15)[0], 0);
        assert_eq!(out.get_pixel(26, 15)[0], 255);
        // A half-on model mask gives a ramp across the boundary, not a step.
        let probs: Vec<u8> = (0..16).map(|i| if i % 4 < 2 { 0 } else { 255 }).collect();
        let m = ModelMask {
            width: 4,
            height: 4,
            probs: &probs,
        };
        let full = PixelBox {
            x0: 0.0,
            y0: 0.0,
            x1: 100.0,
            y1: 100.0,
        };
        let out = upsample_instance(&m, full, 100, 100);
        assert_eq!(out.get_pixel(5, 50)[0], 0);
        assert_eq!(out.get_pixel(95, 50)[0], 255);
        let mid = out.get_pixel(50, 50)[0];
        assert!((100..=155).contains(&mid), "{mid}");
        assert_eq!(
            nonzero_bounds(&out),
            Rect {
                x0: 38,
                y0: 0,
                x1: 100,
                y1: 100
            }
        );
    }
}
