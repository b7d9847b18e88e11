//! Mask planes in the two forms a decoder returns them: float32 logits (exports made before 2026-11-30, or with
//! `--mask-output f32`), or uint8 probabilities round(σ(logit) · 255) computed inside the graph
//! (export/mask_output.py: a quarter of the bytes copied from the device and held on the host).
//!
//! Both serve every wire format. From codes, MASK_FORMAT_PROBABILITY_U8 is the code itself (the same bytes the
//! server computes from logits, within one code where ONNX Runtime's sigmoid and ours round differently), and
//! logits (MASK_FORMAT_LOGITS_F32, COCO RLE) are reconstructed as the logit of the probability interval's centre.
//! That keeps the sign exact at every model pixel (code >= 128 <=> logit >= 0), so RLE differs from the float32
//! export's only where bilinear interpolation between two pixels places the edge a fraction of a pixel apart.

use std::borrow::Cow;
use std::sync::LazyLock;

use ndarray::{ArrayView3, Axis};

/// How the decoder returns its mask planes (the manifest's dtype of `topk_masks` / `pred_masks` / `semantic_seg`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskOutput {
    /// float32 logits.
    Logits,
    /// uint8 round(σ(logit) · 255).
    ProbabilityU8,
}

/// One [M, M] plane, owned (a kept instance's mask, a semantic map).
#[derive(Clone, Debug, PartialEq)]
pub enum MaskPlane {
    Logits(Vec<f32>),
    ProbabilityU8(Vec<u8>),
}

/// A decoder output of [R, M, M] planes, borrowed from the run's output buffer.
#[derive(Clone, Copy, Debug)]
pub enum MaskRows<'a> {
    Logits(&'a [f32]),
    ProbabilityU8(&'a [u8]),
}

impl MaskRows<'_> {
    pub fn len(&self) -> usize {
        match self {
            MaskRows::Logits(v) => v.len(),
            MaskRows::ProbabilityU8(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Planes `from..to` of `plane_len` values each (the rows of one phrase), still borrowed.
    pub fn planes(&self, from: usize, to: usize, plane_len: usize) -> Self {
        let range = from * plane_len..to * plane_len;
        match self {
            MaskRows::Logits(v) => MaskRows::Logits(&v[range]),
            MaskRows::ProbabilityU8(v) => MaskRows::ProbabilityU8(&v[range]),
        }
    }

    /// Row `row` of `rows` [M, M] planes, copied out (a shape-checked view: a wrong length is a bug, not input).
    pub fn row(&self, rows: usize, mask_size: usize, row: usize) -> MaskPlane {
        fn copy<T: Copy>(all: &[T], rows: usize, m: usize, row: usize) -> Vec<T> {
            ArrayView3::from_shape((rows, m, m), all)
                .expect("decoder masks are [R, M, M]")
                .index_axis(Axis(0), row)
                .iter()
                .copied()
                .collect()
        }
        match self {
            MaskRows::Logits(v) => MaskPlane::Logits(copy(v, rows, mask_size, row)),
            MaskRows::ProbabilityU8(v) => MaskPlane::ProbabilityU8(copy(v, rows, mask_size, row)),
        }
    }

    /// The whole borrowed output as one owned plane.
    pub fn to_plane(self) -> MaskPlane {
        match self {
            MaskRows::Logits(v) => MaskPlane::Logits(v.to_vec()),
            MaskRows::ProbabilityU8(v) => MaskPlane::ProbabilityU8(v.to_vec()),
        }
    }
}

impl MaskPlane {
    /// round(σ(logit) · 255) per pixel: the stored codes, or computed from logits.
    pub fn probability_u8(&self) -> Cow<'_, [u8]> {
        match self {
            MaskPlane::Logits(logits) => Cow::Owned(to_probability_u8(logits)),
            MaskPlane::ProbabilityU8(codes) => Cow::Borrowed(codes),
        }
    }

    /// Logits per pixel: the stored ones, or reconstructed from the codes (`code_logit`).
    pub fn logits(&self) -> Cow<'_, [f32]> {
        match self {
            MaskPlane::Logits(logits) => Cow::Borrowed(logits),
            MaskPlane::ProbabilityU8(codes) => {
                Cow::Owned(codes.iter().map(|&c| code_logit(c)).collect())
            }
        }
    }
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// σ(logit) · 255, rounded: a quarter of the bytes of f32 logits and plenty for soft edges. An export with uint8
/// masks computes the same in its graph (export/mask_output.py).
pub fn to_probability_u8(logits: &[f32]) -> Vec<u8> {
    logits
        .iter()
        .map(|&l| (sigmoid(l) * 255.0).round() as u8)
        .collect()
}

/// The logit whose probability is the centre of the interval a code stands for: code c covers σ · 255 in
/// [c - 0.5, c + 0.5), clipped to [0, 255] at the ends. Positive exactly for codes >= 128.
pub fn code_logit(code: u8) -> f32 {
    static TABLE: LazyLock<[f32; 256]> = LazyLock::new(|| {
        std::array::from_fn(|c| {
            let centre = match c {
                0 => 0.25,
                255 => 254.75,
                c => c as f64,
            } / 255.0;
            (centre / (1.0 - centre)).ln() as f32
        })
    });
    TABLE[usize::from(code)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probabilities_round_trip_the_sigmoid() {
        assert_eq!(to_probability_u8(&[-100.0, 0.0, 100.0]), vec![0, 128, 255]);
    }

    #[test]
    fn codes_keep_the_sign_of_the_logit_and_round_trip() {
        for code in 0..=255u8 {
            let logit = code_logit(code);
            assert_eq!(logit > 0.0, code >= 128, "code {code}");
            assert_eq!(to_probability_u8(&[logit]), vec![code], "code {code}");
        }
        let plane = MaskPlane::ProbabilityU8(vec![0, 127, 128, 255]);
        assert_eq!(plane.probability_u8().as_ref(), &[0, 127, 128, 255]);
        let logits = MaskPlane::Logits(vec![-20.0, -0.01, 0.01, 20.0]);
        assert_eq!(logits.probability_u8().as_ref(), &[0, 127, 128, 255]);
    }

    #[test]
    fn rows_are_copied_out_of_either_form() {
        let codes: Vec<u8> = (0..12).collect();
        let rows = MaskRows::ProbabilityU8(&codes);
        assert_eq!(rows.planes(1, 3, 4).len(), 8);
        assert_eq!(
            rows.row(3, 2, 1),
            MaskPlane::ProbabilityU8(vec![4, 5, 6, 7])
        );
        let logits: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let rows = MaskRows::Logits(&logits);
        assert_eq!(
            rows.row(2, 2, 0),
            MaskPlane::Logits(vec![0.0, 1.0, 2.0, 3.0])
        );
    }
}
