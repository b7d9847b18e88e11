//! From the decoder's outputs to a few kept instances, and from kept instances to wire formats.
//!
//! The exported decoder already keeps its best K queries per phrase (top-k inside the graph, so the dense
//! [N, Q, M, M] mask tensor, 66 MB per phrase at full size, never leaves ONNX Runtime); older dense exports return all
//! Q. Filtering (threshold, cap) happens first and on the inference thread, and only the kept instances' planes are
//! copied out. Encoding (probabilities, COCO RLE at the photo's resolution) happens later, off the inference thread.

use ndarray::ArrayView2;

use crate::mask_plane::{MaskPlane, MaskRows};
pub use crate::mask_plane::{sigmoid, to_probability_u8};

/// Decoder outputs of one concept, borrowed from the session's output buffers. Rows are the decoder's candidates:
/// every query (dense export), or its best K by logit with their query indices (top-k export).
pub struct ConceptOutputs<'a> {
    /// [R, M, M], logits or uint8 probabilities (whichever the export returns)
    pub masks: MaskRows<'a>,
    /// [R, 4], xyxy normalised to [0, 1]
    pub boxes: &'a [f32],
    /// [R]
    pub logits: &'a [f32],
    /// [R] query index of each row; None when row r is query r.
    pub queries: Option<&'a [i64]>,
    pub presence_logit: f32,
    /// [M, M]
    pub semantic: MaskRows<'a>,
}

#[derive(Clone, Copy, Debug)]
pub struct FilterParams {
    pub threshold: f32,
    pub max_instances: usize,
    pub keep_semantic: bool,
}

#[derive(Clone, Debug)]
pub struct KeptInstance {
    pub query: u32,
    pub score: f32,
    /// xyxy in original pixels, clamped.
    pub bbox: [f32; 4],
    /// [M, M], in the form the decoder returned it.
    pub mask: MaskPlane,
}

#[derive(Clone, Debug)]
pub struct KeptConcept {
    pub presence: f32,
    pub instances: Vec<KeptInstance>,
    pub semantic: Option<MaskPlane>,
}

/// score = σ(logit) · σ(presence); keep score > threshold, best first, at most `max_instances`. No NMS, as in both
/// references.
pub fn filter_concept(
    out: &ConceptOutputs,
    mask_size: usize,
    image: (u32, u32),
    p: FilterParams,
) -> KeptConcept {
    let presence = sigmoid(out.presence_logit);
    let mut scored: Vec<(usize, f32)> = out
        .logits
        .iter()
        .enumerate()
        .map(|(q, &l)| (q, sigmoid(l) * presence))
        .filter(|&(_, s)| s > p.threshold)
        .collect();
    let query = |row: usize| out.queries.map_or(row, |q| q[row] as usize);
    // Best first; equal scores in query order, whichever order the graph listed them in.
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(query(a.0).cmp(&query(b.0))));
    scored.truncate(p.max_instances);
    // [R, 4] boxes as a shape-checked view (the masks' rows are checked when copied out).
    let rows = out.logits.len();
    let boxes = ArrayView2::from_shape((rows, 4), out.boxes).expect("decoder boxes are [R, 4]");
    let (w, h) = (image.0 as f32, image.1 as f32);
    let instances = scored
        .into_iter()
        .map(|(q, score)| {
            let b = boxes.row(q);
            let bbox = [
                (b[0] * w).clamp(0.0, w),
                (b[1] * h).clamp(0.0, h),
                (b[2] * w).clamp(0.0, w),
                (b[3] * h).clamp(0.0, h),
            ];
            KeptInstance {
                query: query(q) as u32,
                score,
                bbox,
                mask: out.masks.row(rows, mask_size, q),
            }
        })
        .collect();
    KeptConcept {
        presence,
        instances,
        semantic: p.keep_semantic.then(|| out.semantic.to_plane()),
    }
}

pub fn to_le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Half-pixel-centre bilinear sampling positions of `dst` output pixels over `src` input pixels.
fn sample_axis(dst: u32, src: usize) -> Vec<(usize, usize, f32)> {
    let scale = src as f32 / dst as f32;
    (0..dst)
        .map(|i| {
            let x = ((i as f32 + 0.5) * scale - 0.5).clamp(0.0, (src - 1) as f32);
            let x0 = x.floor() as usize;
            let x1 = (x0 + 1).min(src - 1);
            (x0, x1, x - x0 as f32)
        })
        .collect()
}

/// COCO RLE (column-major, background run first) of `logits > 0` after bilinear upsampling from M×M to the photo's
/// size. Only pixels inside the instance's box, grown by two model pixels, are evaluated: outside it the mask is
/// taken as background, which keeps the cost proportional to the object rather than the photo.
pub fn rle_from_logits(
    logits: &[f32],
    mask_size: usize,
    bbox: [f32; 4],
    width: u32,
    height: u32,
) -> Vec<u32> {
    let margin_x = 2.0 * width as f32 / mask_size as f32;
    let margin_y = 2.0 * height as f32 / mask_size as f32;
    let x_lo = (bbox[0] - margin_x).floor().max(0.0) as u32;
    let x_hi = ((bbox[2] + margin_x).ceil() as u32).min(width);
    let y_lo = (bbox[1] - margin_y).floor().max(0.0) as u32;
    let y_hi = ((bbox[3] + margin_y).ceil() as u32).min(height);
    let xs = sample_axis(width, mask_size);
    let ys = sample_axis(height, mask_size);
    let mut counts = Vec::new();
    let mut current = false;
    let mut run: u64 = 0;
    let push = |value: bool, n: u64, counts: &mut Vec<u32>, current: &mut bool, run: &mut u64| {
        if n == 0 {
            return;
        }
        if value != *current {
            counts.push(*run as u32);
            *run = 0;
            *current = value;
        }
        *run += n;
    };
    for x in 0..width {
        if x < x_lo || x >= x_hi || y_lo >= y_hi {
            push(
                false,
                u64::from(height),
                &mut counts,
                &mut current,
                &mut run,
            );
            continue;
        }
        push(false, u64::from(y_lo), &mut counts, &mut current, &mut run);
        let (x0, x1, fx) = xs[x as usize];
        for &(y0, y1, fy) in &ys[y_lo as usize..y_hi as usize] {
            let top = logits[y0 * mask_size + x0] * (1.0 - fx) + logits[y0 * mask_size + x1] * fx;
            let bottom =
                logits[y1 * mask_size + x0] * (1.0 - fx) + logits[y1 * mask_size + x1] * fx;
            let v = top * (1.0 - fy) + bottom * fy;
            push(v > 0.0, 1, &mut counts, &mut current, &mut run);
        }
        push(
            false,
            u64::from(height - y_hi),
            &mut counts,
            &mut current,
            &mut run,
        );
    }
    counts.push(run as u32);
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask_plane::MaskPlane;

    fn decode_rle(counts: &[u32], w: u32, h: u32) -> Vec<bool> {
        let mut col_major = Vec::new();
        for (i, &c) in counts.iter().enumerate() {
            col_major.extend(std::iter::repeat_n(i % 2 == 1, c as usize));
        }
        assert_eq!(col_major.len(), (w * h) as usize);
        let mut row_major = vec![false; (w * h) as usize];
        for x in 0..w {
            for y in 0..h {
                row_major[(y * w + x) as usize] = col_major[(x * h + y) as usize];
            }
        }
        row_major
    }

    #[test]
    fn filter_applies_presence_threshold_order_and_cap() {
        let m = 2;
        let masks: Vec<f32> = (0..3 * m * m).map(|i| i as f32).collect();
        let boxes = [0.1, 0.2, 0.5, 0.6, 0.0, 0.0, 1.0, 1.0, -0.1, 0.5, 1.2, 0.9];
        let logits = [2.0, 5.0, -5.0];
        let out = ConceptOutputs {
            masks: MaskRows::Logits(&masks),
            boxes: &boxes,
            logits: &logits,
            queries: None,
            presence_logit: 10.0,
            semantic: MaskRows::Logits(&[0.0; 4]),
        };
        let kept = filter_concept(
            &out,
            m,
            (200, 100),
            FilterParams {
                threshold: 0.5,
                max_instances: 10,
                keep_semantic: false,
            },
        );
        assert_eq!(
            kept.instances.iter().map(|i| i.query).collect::<Vec<_>>(),
            vec![1, 0]
        );
        let expected = [20.0, 20.0, 100.0, 60.0];
        assert!(
            kept.instances[1]
                .bbox
                .iter()
                .zip(expected)
                .all(|(a, b)| (a - b).abs() < 1e-3)
        );
        assert_eq!(
            kept.instances[0].mask,
            MaskPlane::Logits(vec![4.0, 5.0, 6.0, 7.0])
        );
        assert!(kept.semantic.is_none());
        let capped = filter_concept(
            &out,
            m,
            (200, 100),
            FilterParams {
                threshold: 0.0,
                max_instances: 1,
                keep_semantic: true,
            },
        );
        assert_eq!(capped.instances.len(), 1);
        assert_eq!(capped.semantic, Some(MaskPlane::Logits(vec![0.0; 4])));
        let absent = ConceptOutputs {
            presence_logit: -10.0,
            ..out
        };
        let none = filter_concept(
            &absent,
            m,
            (200, 100),
            FilterParams {
                threshold: 0.5,
                max_instances: 10,
                keep_semantic: false,
            },
        );
        assert!(none.instances.is_empty());
    }

    #[test]
    fn top_k_rows_report_their_query_and_break_ties_by_it() {
        // A top-k decoder's rows: best logit first, each with its query index. Rows 1 and 2 tie.
        let m = 1;
        let masks = [10, 11, 12];
        let boxes = [0.0; 12];
        let logits = [4.0, 1.0, 1.0];
        let queries = [17i64, 9, 3];
        let out = ConceptOutputs {
            masks: MaskRows::ProbabilityU8(&masks),
            boxes: &boxes,
            logits: &logits,
            queries: Some(&queries),
            presence_logit: 10.0,
            semantic: MaskRows::ProbabilityU8(&[0]),
        };
        let kept = filter_concept(
            &out,
            m,
            (10, 10),
            FilterParams {
                threshold: 0.5,
                max_instances: 10,
                keep_semantic: false,
            },
        );
        let got: Vec<(u32, u8)> = kept
            .instances
            .iter()
            .map(|i| (i.query, i.mask.probability_u8()[0]))
            .collect();
        assert_eq!(got, vec![(17, 10), (3, 12), (9, 11)]);
    }

    #[test]
    fn rle_matches_a_dense_upsample() {
        // A 4x4 logit map with a positive 2x2 block, upsampled to 10x6.
        let m = 4;
        let mut logits = vec![-4.0f32; m * m];
        for (y, x) in [(1, 1), (1, 2), (2, 1), (2, 2)] {
            logits[y * m + x] = 4.0;
        }
        let (w, h) = (10u32, 6u32);
        let counts = rle_from_logits(&logits, m, [0.0, 0.0, w as f32, h as f32], w, h);
        let mask = decode_rle(&counts, w, h);
        let xs = sample_axis(w, m);
        let ys = sample_axis(h, m);
        for y in 0..h as usize {
            for x in 0..w as usize {
                let (x0, x1, fx) = xs[x];
                let (y0, y1, fy) = ys[y];
                let v = (logits[y0 * m + x0] * (1.0 - fx) + logits[y0 * m + x1] * fx) * (1.0 - fy)
                    + (logits[y1 * m + x0] * (1.0 - fx) + logits[y1 * m + x1] * fx) * fy;
                assert_eq!(mask[y * w as usize + x], v > 0.0, "pixel {x},{y}");
            }
        }
        assert!(mask.iter().any(|&b| b) && mask.iter().any(|&b| !b));
    }

    #[test]
    fn rle_outside_the_box_is_background_and_starts_with_background() {
        let logits = vec![5.0f32; 16];
        let counts = rle_from_logits(&logits, 4, [0.0, 0.0, 2.0, 2.0], 8, 8);
        let mask = decode_rle(&counts, 8, 8);
        assert!(mask[0], "inside the box");
        assert!(!mask[7 * 8 + 7], "far outside the box");
        let all = rle_from_logits(&logits, 4, [0.0, 0.0, 8.0, 8.0], 8, 8);
        assert_eq!(all, vec![0, 64]);
    }

    /// RLE at the photo's size from codes vs from the logits they came from: a smooth blob upsampled 14x.
    #[test]
    fn rle_from_codes_matches_rle_from_logits() {
        let m = 24;
        let logits: Vec<f32> = (0..m * m)
            .map(|i| {
                let (y, x) = ((i / m) as f32 - 11.3, (i % m) as f32 - 9.7);
                8.0 - 0.12 * (x * x + 1.7 * y * y)
            })
            .collect();
        let codes: Vec<u8> = logits
            .iter()
            .map(|&l| (sigmoid(l) * 255.0).round() as u8)
            .collect();
        let from_codes = MaskPlane::ProbabilityU8(codes).logits().into_owned();
        let (w, h) = (336, 336);
        let bbox = [0.0, 0.0, w as f32, h as f32];
        let a = decode_counts(&rle_from_logits(&logits, m, bbox, w, h));
        let b = decode_counts(&rle_from_logits(&from_codes, m, bbox, w, h));
        let inter = a.iter().zip(&b).filter(|(x, y)| **x && **y).count();
        let union = a.iter().zip(&b).filter(|(x, y)| **x || **y).count();
        let iou = inter as f64 / union as f64;
        assert!(
            union > 10_000 && iou > 0.99,
            "IoU {iou} over {union} pixels"
        );
    }

    fn decode_counts(counts: &[u32]) -> Vec<bool> {
        counts
            .iter()
            .enumerate()
            .flat_map(|(i, &c)| std::iter::repeat_n(i % 2 == 1, c as usize))
            .collect()
    }
}
