//! How closely two exports agree on one photo, through the service: the GPU procedure saves one reply per
//! precision (`--masks-out`) and compares the fp16 reply with the fp32 one (`--compare-masks`), so the issue's
//! "fp16 vs fp32 mask IoU on the full-size model" is measured on what a caller gets, on the device's provider.
//!
//! The request keeps every top-k instance (score threshold 0): which instances pass a threshold is a property of
//! the scores, compared on their own, and a score near the threshold would otherwise make an instance appear on one
//! side only. Instances are paired by the decoder query that produced them (`query_index`), so a reordering of
//! close scores does not count as disagreement; the semantic maps are compared per concept as they are.

use anyhow::Context;
use palette_proto::segmenter::v1 as pb;
use prost::Message;
use serde::Serialize;

/// The request whose reply is saved: every top-k instance and each concept's semantic map, as u8 probabilities.
pub fn request(source: pb::image::Source, concepts: Vec<String>) -> pb::SegmentRequest {
    pb::SegmentRequest {
        image: Some(pb::Image {
            source: Some(source),
        }),
        concepts,
        score_threshold: Some(0.0),
        mask_format: pb::MaskFormat::ProbabilityU8 as i32,
        include_semantic: true,
        request_id: "mask-agreement".into(),
        ..Default::default()
    }
}

pub fn save(path: &std::path::Path, reply: &pb::SegmentResponse) -> anyhow::Result<()> {
    std::fs::write(path, reply.encode_to_vec())
        .with_context(|| format!("writing --masks-out {}", path.display()))
}

pub fn load(path: &std::path::Path) -> anyhow::Result<pb::SegmentResponse> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    pb::SegmentResponse::decode(bytes.as_slice())
        .with_context(|| format!("{} is not a saved SegmentResponse", path.display()))
}

/// Agreement of reply `b` with the reference reply `a`.
#[derive(Debug, Serialize, PartialEq)]
pub struct Agreement {
    /// Instances of both replies from the same query, and those of one reply only.
    pub matched: usize,
    pub only_reference: usize,
    pub only_other: usize,
    /// Intersection over union of the matched instances' masks pooled (pixels >= 128 of 255).
    pub instance_iou: f64,
    /// The lowest IoU of one matched instance (instances empty on both sides count 1).
    pub worst_instance_iou: f64,
    /// The lowest IoU of one concept's semantic map.
    pub worst_semantic_iou: f64,
    pub max_score_delta: f64,
    pub max_presence_delta: f64,
    pub concepts: Vec<ConceptAgreement>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ConceptAgreement {
    pub concept: String,
    pub matched: usize,
    pub instance_iou: f64,
    pub semantic_iou: Option<f64>,
    pub presence_delta: f64,
}

/// Pixels set in both and in either (a pixel is set at probability >= 128 of 255, the service's mask threshold).
fn overlap(a: &pb::Tensor, b: &pb::Tensor) -> anyhow::Result<(u64, u64)> {
    anyhow::ensure!(
        a.shape == b.shape && a.data.len() == b.data.len(),
        "mask shapes differ: {:?} and {:?}",
        a.shape,
        b.shape
    );
    anyhow::ensure!(
        a.dtype == pb::DataType::Uint8 as i32 && b.dtype == a.dtype,
        "masks are not u8 probabilities (dtype {} and {})",
        a.dtype,
        b.dtype
    );
    let (mut both, mut either) = (0u64, 0u64);
    for (&x, &y) in a.data.iter().zip(&b.data) {
        let (x, y) = (x >= 128, y >= 128);
        both += u64::from(x && y);
        either += u64::from(x || y);
    }
    Ok((both, either))
}

fn iou((both, either): (u64, u64)) -> f64 {
    if either == 0 {
        1.0
    } else {
        both as f64 / either as f64
    }
}

pub fn compare(a: &pb::SegmentResponse, b: &pb::SegmentResponse) -> anyhow::Result<Agreement> {
    anyhow::ensure!(
        a.concepts.len() == b.concepts.len(),
        "the replies answer {} and {} concepts",
        a.concepts.len(),
        b.concepts.len()
    );
    let mut out = Agreement {
        matched: 0,
        only_reference: 0,
        only_other: 0,
        instance_iou: 1.0,
        worst_instance_iou: 1.0,
        worst_semantic_iou: 1.0,
        max_score_delta: 0.0,
        max_presence_delta: 0.0,
        concepts: Vec::new(),
    };
    let (mut both_all, mut either_all) = (0u64, 0u64);
    for (ca, cb) in a.concepts.iter().zip(&b.concepts) {
        anyhow::ensure!(
            ca.concept == cb.concept,
            "concepts differ: {:?} and {:?}",
            ca.concept,
            cb.concept
        );
        let (mut both_c, mut either_c, mut matched) = (0u64, 0u64, 0usize);
        for ia in &ca.instances {
            let Some(ib) = cb
                .instances
                .iter()
                .find(|i| i.query_index == ia.query_index)
            else {
                out.only_reference += 1;
                continue;
            };
            matched += 1;
            let (ma, mb) = (ia.mask.as_ref(), ib.mask.as_ref());
            let counts = overlap(
                ma.context("an instance without a mask tensor")?,
                mb.context("an instance without a mask tensor")?,
            )?;
            out.worst_instance_iou = out.worst_instance_iou.min(iou(counts));
            both_c += counts.0;
            either_c += counts.1;
            out.max_score_delta = out
                .max_score_delta
                .max(f64::from((ia.score - ib.score).abs()));
        }
        out.only_other += cb
            .instances
            .iter()
            .filter(|ib| {
                !ca.instances
                    .iter()
                    .any(|ia| ia.query_index == ib.query_index)
            })
            .count();
        let semantic_iou = match (&ca.semantic, &cb.semantic) {
            (Some(sa), Some(sb)) => Some(iou(overlap(sa, sb)?)),
            _ => None,
        };
        if let Some(s) = semantic_iou {
            out.worst_semantic_iou = out.worst_semantic_iou.min(s);
        }
        let presence_delta = f64::from((ca.presence_score - cb.presence_score).abs());
        out.max_presence_delta = out.max_presence_delta.max(presence_delta);
        out.matched += matched;
        both_all += both_c;
        either_all += either_c;
        out.concepts.push(ConceptAgreement {
            concept: ca.concept.clone(),
            matched,
            instance_iou: iou((both_c, either_c)),
            semantic_iou,
            presence_delta,
        });
    }
    out.instance_iou = iou((both_all, either_all));
    Ok(out)
}

/// One line for the log and the summary.
pub fn line(label: &str, a: &Agreement) -> String {
    format!(
        "MASKS {label}: instance mask IoU {:.4} pooled, worst instance {:.4}, worst semantic map {:.4}; \
         {} instances paired by query ({} only in the reference, {} only in the other); score |d| max {:.4}, \
         presence |d| max {:.4}",
        a.instance_iou,
        a.worst_instance_iou,
        a.worst_semantic_iou,
        a.matched,
        a.only_reference,
        a.only_other,
        a.max_score_delta,
        a.max_presence_delta
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(bits: &[u8]) -> pb::Tensor {
        pb::Tensor {
            shape: vec![1, bits.len() as u32],
            dtype: pb::DataType::Uint8 as i32,
            data: bits
                .iter()
                .map(|&b| if b == 1 { 200 } else { 10 })
                .collect(),
        }
    }

    fn instance(query: u32, score: f32, bits: &[u8]) -> pb::Instance {
        pb::Instance {
            score,
            query_index: query,
            mask: Some(mask(bits)),
            ..Default::default()
        }
    }

    fn reply(instances: Vec<pb::Instance>, semantic: &[u8], presence: f32) -> pb::SegmentResponse {
        pb::SegmentResponse {
            concepts: vec![pb::ConceptResult {
                concept: "wall".into(),
                presence_score: presence,
                instances,
                semantic: Some(mask(semantic)),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_reply_agrees_with_itself() {
        let a = reply(vec![instance(3, 0.9, &[1, 1, 0, 0])], &[1, 0, 0, 0], 0.8);
        let r = compare(&a, &a).unwrap();
        assert_eq!((r.matched, r.only_reference, r.only_other), (1, 0, 0));
        assert_eq!((r.instance_iou, r.worst_semantic_iou), (1.0, 1.0));
        assert_eq!((r.max_score_delta, r.max_presence_delta), (0.0, 0.0));
    }

    #[test]
    fn instances_pair_by_query_not_by_rank() {
        // The same two instances, ranked the other way round (close scores), one pixel apart in query 7's mask.
        let a = reply(
            vec![
                instance(7, 0.50, &[1, 1, 1, 1]),
                instance(2, 0.49, &[0, 0, 1, 0]),
            ],
            &[1, 1, 0, 0],
            0.5,
        );
        let b = reply(
            vec![
                instance(2, 0.52, &[0, 0, 1, 0]),
                instance(7, 0.48, &[1, 1, 1, 0]),
                instance(9, 0.10, &[0, 0, 0, 1]),
            ],
            &[1, 0, 0, 0],
            0.25,
        );
        let r = compare(&a, &b).unwrap();
        assert_eq!((r.matched, r.only_reference, r.only_other), (2, 0, 1));
        assert_eq!(r.worst_instance_iou, 0.75);
        assert_eq!(r.instance_iou, 4.0 / 5.0); // (3 + 1) / (4 + 1)
        assert_eq!(r.worst_semantic_iou, 0.5);
        assert!((r.max_score_delta - 0.03).abs() < 1e-6);
        assert_eq!(r.max_presence_delta, 0.25);
    }

    #[test]
    fn replies_of_different_shapes_are_refused() {
        let a = reply(vec![instance(1, 0.9, &[1, 1])], &[1, 0], 0.5);
        let b = reply(vec![instance(1, 0.9, &[1, 1, 0])], &[1, 0], 0.5);
        assert!(compare(&a, &b).is_err());
    }

    #[test]
    fn a_saved_reply_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("masks.pb");
        let a = reply(vec![instance(1, 0.9, &[1, 0])], &[1, 0], 0.5);
        save(&path, &a).unwrap();
        assert_eq!(load(&path).unwrap(), a);
    }
}
