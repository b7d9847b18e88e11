//! A concept's union (max) of its instance masks, folded in a row at a time so that no byte of the full-frame plane
//! is read before it has been written.
//!
//! Why: a fresh full-frame plane is untouched memory the kernel maps on first access. Folding an instance in with
//! `max` reads each byte before writing it: the read maps the shared zero page, the write then replaces that
//! mapping (a copy-on-write fault), and replacing a mapping of a process running on several cores flushes their
//! TLBs (an inter-processor interrupt each time). perf on orchestrator-bench's 12 MP photos (2026-12-01): those
//! faults were 28 % of storing a photo's masks, ~0.1 CPU-s per photo. So each row remembers the one span of columns
//! written so far: columns outside it are copied (the first touch is a write: one plain fault), only the overlap is
//! folded with max, and a gap between the span and new columns is written with zeros to keep the span one piece.

use palette_rules::GrayImage;

pub struct UnionPlane {
    plane: GrayImage,
    /// Per row, the columns written so far, [start, end); empty when start == end.
    written: Vec<(u32, u32)>,
}

impl UnionPlane {
    /// An all-zero `width` x `height` plane (zeroed lazily by the allocator: pages no instance touches stay unmapped
    /// until a rule reads them).
    pub fn new(width: u32, height: u32) -> Self {
        UnionPlane {
            plane: palette_rules::mask::zeroed_plane(width, height),
            written: vec![(0, 0); height as usize],
        }
    }

    /// Folds `src`, an instance's pixels of row `y` from column `x` on, into the plane (max).
    pub fn fold_row(&mut self, y: u32, x: u32, src: &[u8]) {
        let width = self.plane.width() as usize;
        let (a, b) = (x as usize, x as usize + src.len());
        assert!(
            b <= width && y < self.plane.height(),
            "row out of the plane"
        );
        if a == b {
            return;
        }
        let row = &mut self.plane.as_mut()[y as usize * width..][..width];
        let span = &mut self.written[y as usize];
        let (lo, hi) = (span.0 as usize, span.1 as usize);
        if lo == hi {
            row[a..b].copy_from_slice(src);
            *span = (a as u32, b as u32);
            return;
        }
        // New columns left of the span, then the overlap, then new columns right of it.
        if a < lo {
            let end = b.min(lo);
            row[a..end].copy_from_slice(&src[..end - a]);
            row[end..lo].fill(0);
        }
        let (o_lo, o_hi) = (a.max(lo), b.min(hi));
        if o_lo < o_hi {
            for (u, &v) in row[o_lo..o_hi].iter_mut().zip(&src[o_lo - a..o_hi - a]) {
                *u = (*u).max(v);
            }
        }
        if b > hi {
            let start = a.max(hi);
            row[hi..start].fill(0);
            row[start..b].copy_from_slice(&src[start - a..]);
        }
        *span = (a.min(lo) as u32, b.max(hi) as u32);
    }

    pub fn into_image(self) -> GrayImage {
        self.plane
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain fold every case must agree with.
    fn reference(width: u32, rows: &[(u32, u32, Vec<u8>)]) -> GrayImage {
        let mut plane = GrayImage::new(width, 1);
        for (_, x, src) in rows {
            for (i, &v) in src.iter().enumerate() {
                let p = &mut plane.as_mut()[*x as usize + i];
                *p = (*p).max(v);
            }
        }
        plane
    }

    #[test]
    fn every_arrangement_of_spans_folds_to_the_plain_max() {
        // Spans left of, right of, overlapping, inside and around what was written, with gaps and without.
        let spans = [
            (0u32, 3u32),
            (2, 6),
            (10, 12),
            (5, 11),
            (0, 16),
            (14, 16),
            (7, 8),
        ];
        let mut seed = 7u32;
        let mut value = || {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (seed >> 16) as u8
        };
        for first in 0..spans.len() {
            for second in 0..spans.len() {
                for third in 0..spans.len() {
                    let rows: Vec<(u32, u32, Vec<u8>)> = [first, second, third]
                        .iter()
                        .map(|&i| {
                            let (a, b) = spans[i];
                            (0, a, (a..b).map(|_| value()).collect())
                        })
                        .collect();
                    let mut union = UnionPlane::new(16, 1);
                    for (y, x, src) in &rows {
                        union.fold_row(*y, *x, src);
                    }
                    assert_eq!(
                        union.into_image(),
                        reference(16, &rows),
                        "spans {first} {second} {third}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_written_span_covers_every_folded_column_and_nothing_outside() {
        let mut union = UnionPlane::new(20, 2);
        union.fold_row(1, 12, &[1, 2]);
        union.fold_row(1, 3, &[4]);
        assert_eq!(union.written, vec![(0, 0), (3, 14)]);
        assert_eq!(
            &union.plane.as_raw()[20..],
            &[0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0, 0]
        );
    }
}
