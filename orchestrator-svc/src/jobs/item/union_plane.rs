//! A concept's union (max) of its instance masks, folded in a row at a time.
//!
//! The plane is zeroed by writing (`palette_rules::mask::zeroed_plane`), never left to the allocator's lazily mapped
//! zero pages: folding with `max` reads each byte before writing it, and on a lazily mapped page the read maps the
//! shared zero page, the write then replaces it (a copy-on-write fault), and replacing a mapping of a process running
//! on several cores flushes their TLBs (an inter-processor interrupt each time). perf on orchestrator-bench's 12 MP
//! photos (2026-12-01): those faults were 28 % of storing a photo's masks, ~0.1 CPU-s per photo. Written zeros also
//! let jemalloc hand back a freed plane's pages as they are (see `crate::allocator`).

use palette_rules::GrayImage;

pub struct UnionPlane {
    plane: GrayImage,
}

impl UnionPlane {
    /// An all-zero `width` x `height` plane.
    pub fn new(width: u32, height: u32) -> Self {
        UnionPlane {
            plane: palette_rules::mask::zeroed_plane(width, height),
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
        let row = &mut self.plane.as_mut()[y as usize * width..][..width];
        for (u, &v) in row[a..b].iter_mut().zip(src) {
            *u = (*u).max(v);
        }
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
}
