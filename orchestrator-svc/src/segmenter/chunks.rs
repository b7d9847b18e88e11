//! A job may name more concepts than a segmenter replica takes in one call (its MAX_CONCEPTS, learnt from
//! GetModelInfo, can be set below the orchestrator's MAX_CONCEPTS_PER_JOB): such a request is sent as several
//! Segment calls of at most that many concepts each, and their answers are joined back in request order. Each call
//! runs the image encoder again, so this is a fallback for a mismatched deployment, not a way to go faster.

use palette_proto::segmenter::v1::{SegmentResponse, StageTimings};

use super::SegmenterError;

/// `concepts` in consecutive groups of at most `max` (all of them at once when `max` is 0: the limit is not known).
pub(super) fn split(concepts: &[String], max: u32) -> Vec<&[String]> {
    if max == 0 || concepts.len() <= max as usize {
        return vec![concepts];
    }
    concepts.chunks(max as usize).collect()
}

/// The answers of consecutive groups (`asked`: each group's concept count) as one answer: concepts in order, image
/// and mask sizes and the model from the first (a later group answered by another model, or with other sizes, cannot
/// be joined: a bad reply), timings added up (the calls ran one after another). A group answered with another number
/// of concepts than it asked is a bad reply too: the joined total could still match the request (2 + 4 for 3 + 3),
/// and the concepts, matched by position, would each take the next one's masks.
pub(super) fn join(
    parts: Vec<SegmentResponse>,
    asked: &[usize],
) -> Result<SegmentResponse, SegmenterError> {
    if let Some((i, (part, &n))) = parts
        .iter()
        .zip(asked)
        .enumerate()
        .find(|(_, (part, n))| part.concepts.len() != **n)
    {
        return Err(SegmenterError::BadReply(format!(
            "group {} of the concepts was answered with {} concepts for {n} asked",
            i + 1,
            part.concepts.len()
        )));
    }
    let mut parts = parts.into_iter();
    let Some(mut joined) = parts.next() else {
        return Err(SegmenterError::BadReply("no answer to join".into()));
    };
    for part in parts {
        let same = part.model_id == joined.model_id
            && (part.image_width, part.image_height) == (joined.image_width, joined.image_height)
            && (part.mask_width, part.mask_height) == (joined.mask_width, joined.mask_height);
        if !same {
            return Err(SegmenterError::BadReply(format!(
                "the concepts' groups were answered differently (model {:?} at {}x{} then {:?} at {}x{}): a \
                 segmenter was replaced while the image was sent in groups",
                joined.model_id,
                joined.image_width,
                joined.image_height,
                part.model_id,
                part.image_width,
                part.image_height
            )));
        }
        joined.concepts.extend(part.concepts);
        joined.timings = Some(add(
            joined.timings.unwrap_or_default(),
            part.timings.unwrap_or_default(),
        ));
    }
    Ok(joined)
}

fn add(a: StageTimings, b: StageTimings) -> StageTimings {
    StageTimings {
        queue_ms: a.queue_ms + b.queue_ms,
        decode_ms: a.decode_ms + b.decode_ms,
        preprocess_ms: a.preprocess_ms + b.preprocess_ms,
        vision_ms: a.vision_ms + b.vision_ms,
        text_ms: a.text_ms + b.text_ms,
        decoder_ms: a.decoder_ms + b.decoder_ms,
        postprocess_ms: a.postprocess_ms + b.postprocess_ms,
        total_ms: a.total_ms + b.total_ms,
        vision_batch_size: a.vision_batch_size.max(b.vision_batch_size),
    }
}

#[cfg(test)]
mod tests {
    use palette_proto::segmenter::v1::ConceptResult;

    use super::*;

    fn phrases(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("c{i}")).collect()
    }

    fn answer(concepts: &[&str], model: &str) -> SegmentResponse {
        SegmentResponse {
            concepts: concepts
                .iter()
                .map(|c| ConceptResult {
                    concept: c.to_string(),
                    ..Default::default()
                })
                .collect(),
            image_width: 640,
            image_height: 480,
            mask_width: 288,
            mask_height: 288,
            model_id: model.into(),
            timings: Some(StageTimings {
                vision_ms: 10.0,
                total_ms: 20.0,
                vision_batch_size: 1,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn groups_are_consecutive_and_at_most_the_limit() {
        let all = phrases(7);
        let groups = split(&all, 3);
        assert_eq!(
            groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
            [3, 3, 1]
        );
        assert_eq!(groups.concat(), all);
        assert_eq!(split(&all, 7).len(), 1);
        assert_eq!(
            split(&all, 0).len(),
            1,
            "an unknown limit sends everything at once"
        );
    }

    #[test]
    fn answers_are_joined_in_order_with_their_times_added() {
        let joined = join(vec![answer(&["a", "b"], "m"), answer(&["c"], "m")], &[2, 1]).unwrap();
        let order: Vec<_> = joined.concepts.iter().map(|c| c.concept.as_str()).collect();
        assert_eq!(order, ["a", "b", "c"]);
        let timings = joined.timings.unwrap();
        assert_eq!((timings.vision_ms, timings.total_ms), (20.0, 40.0));
    }

    #[test]
    fn answers_of_different_models_are_not_joined() {
        let err = join(vec![answer(&["a"], "m1"), answer(&["b"], "m2")], &[1, 1]).unwrap_err();
        assert!(matches!(err, SegmenterError::BadReply(_)), "{err:?}");
    }

    #[test]
    fn a_group_answered_with_another_number_of_concepts_is_not_joined() {
        // 2 + 4 answers for 3 + 3 asked: the total matches the request, the concepts would not.
        let parts = vec![answer(&["a", "b"], "m"), answer(&["c", "d", "e", "f"], "m")];
        let err = join(parts, &[3, 3]).unwrap_err();
        assert!(
            matches!(&err, SegmenterError::BadReply(m) if m.contains("2 concepts for 3")),
            "{err:?}"
        );
    }
}
