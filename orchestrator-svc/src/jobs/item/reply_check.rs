//! What a Segment reply must hold before anything uses or caches it. The mask cache keeps a reply for later items
//! of the same bytes: one that is malformed must fail its item and not be kept, or every resubmission fails the
//! same way without the segmenter being asked again.

use palette_proto::segmenter::v1::SegmentResponse;

use crate::segmenter::SegmenterError;

/// A reply with one result per concept asked, about an image of the size sent (`sent`: width x height of the image
/// as this process has it, upright; masks are scaled to the photo by this size, so a reply about the image turned
/// another way would paint the wrong parts of it), sizes that are not zero, every instance's mask of mask_width x
/// mask_height bytes (the u8 probabilities asked for) and a finite score: a NaN would be written to the job's
/// records as JSON null, which no later read accepts.
pub fn check_reply(
    response: &SegmentResponse,
    asked: usize,
    sent: (u32, u32),
) -> Result<(), SegmenterError> {
    let bad = |m: String| Err(SegmenterError::BadReply(m));
    if response.concepts.len() != asked {
        return bad(format!(
            "asked for {asked} concepts, got {} results",
            response.concepts.len()
        ));
    }
    let (mw, mh) = (response.mask_width, response.mask_height);
    if response.image_width == 0 || response.image_height == 0 || mw == 0 || mh == 0 {
        return bad(format!(
            "image {}x{}, masks {mw}x{mh}: a size is zero",
            response.image_width, response.image_height
        ));
    }
    if (response.image_width, response.image_height) != sent {
        return bad(format!(
            "the reply is about a {}x{} image, the image sent is {}x{} (read in another orientation?)",
            response.image_width, response.image_height, sent.0, sent.1
        ));
    }
    let expected = mw as usize * mh as usize;
    for result in &response.concepts {
        for (n, instance) in result.instances.iter().enumerate() {
            let len = instance.mask.as_ref().map_or(0, |m| m.data.len());
            if len != expected {
                return bad(format!(
                    "{} instance {} mask has {len} bytes, expected {mw}x{mh} probabilities",
                    result.concept,
                    n + 1
                ));
            }
            if !instance.score.is_finite() {
                return bad(format!(
                    "{} instance {} has score {}",
                    result.concept,
                    n + 1,
                    instance.score
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use palette_proto::segmenter::v1::{ConceptResult, Instance, Tensor};

    use super::*;

    fn reply(masks: &[usize], score: f32) -> SegmentResponse {
        SegmentResponse {
            concepts: vec![ConceptResult {
                concept: "wall".into(),
                instances: masks
                    .iter()
                    .map(|&len| Instance {
                        score,
                        mask: Some(Tensor {
                            shape: vec![4, 3],
                            data: vec![0; len],
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            image_width: 40,
            image_height: 30,
            mask_width: 4,
            mask_height: 3,
            ..Default::default()
        }
    }

    fn says(response: &SegmentResponse, asked: usize) -> String {
        check_reply(response, asked, (40, 30))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_well_formed_reply_passes() {
        assert!(check_reply(&reply(&[12, 12], 0.9), 1, (40, 30)).is_ok());
        assert!(check_reply(&reply(&[], 0.9), 1, (40, 30)).is_ok());
    }

    #[test]
    fn each_malformed_part_is_named() {
        assert!(says(&reply(&[12], 0.9), 2).contains("asked for 2 concepts, got 1"));
        // Float masks where u8 were asked for: four times the bytes.
        assert!(says(&reply(&[12, 48], 0.9), 1).contains("wall instance 2 mask has 48 bytes"));
        assert!(says(&reply(&[12], f32::NAN), 1).contains("score NaN"));
        assert!(says(&reply(&[12], f32::INFINITY), 1).contains("score inf"));
        let mut zero = reply(&[12], 0.9);
        zero.image_width = 0;
        assert!(says(&zero, 1).contains("a size is zero"));
        // The segmenter read the photo turned (30x40) where this process has it 40x30.
        let mut turned = reply(&[12], 0.9);
        (turned.image_width, turned.image_height) = (30, 40);
        assert!(
            says(&turned, 1).contains("the reply is about a 30x40 image, the image sent is 40x30")
        );
    }
}
