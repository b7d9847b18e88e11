//! The masks of every concept of a job on one image: from the cache where the same bytes were segmented by the same
//! model before, the rest in ONE Segment call (carrying the upload, or the photo downscaled to the model's input:
//! `segmenter_input`).

use std::sync::Arc;

use bytes::Bytes;
use palette_proto::segmenter::v1::image::Source;
use palette_rules::RgbImage;

use super::ItemRunner;
use super::error::ItemError;
use super::mask_cache::{ConceptMasks, MaskCacheKey};
use super::reply_check::check_reply;
use super::segmenter_input::{image_bytes, segmenter_input};
use crate::jobs::validate::JobPlan;

/// Every concept's masks, in plan order.
pub struct Segmented {
    pub concepts: Vec<Arc<ConceptMasks>>,
    /// Whether any concept came from the cache.
    pub reused: bool,
}

impl ItemRunner {
    pub(super) async fn segment(
        &self,
        plan: &JobPlan,
        bytes: &Bytes,
        sha: &[u8; 32],
        photo: &Arc<RgbImage>,
        idx: u32,
    ) -> Result<Segmented, ItemError> {
        let model = self.segmenter.model().await?;
        let model_id = model.model_id;
        let sha = *sha;
        let key = |concept: &str, model_id: &str| MaskCacheKey {
            input_sha256: sha,
            model_id: model_id.to_string(),
            concept: concept.to_string(),
        };
        let mut found: Vec<Option<Arc<ConceptMasks>>> = plan
            .concepts
            .iter()
            .map(|c| self.mask_cache.get(&key(c, &model_id)))
            .collect();
        let missing: Vec<String> = plan
            .concepts
            .iter()
            .zip(&found)
            .filter(|(_, hit)| hit.is_none())
            .map(|(c, _)| c.clone())
            .collect();
        let hits = (plan.concepts.len() - missing.len()) as u64;
        metrics::counter!("orchestrator_mask_cache_total", "result" => "hit").increment(hits);
        metrics::counter!("orchestrator_mask_cache_total", "result" => "miss")
            .increment(missing.len() as u64);
        if !missing.is_empty() {
            let request_id = format!("{}/{idx}", plan.job_id);
            let upright = photo.dimensions();
            let (photo, encoded) = (photo.clone(), bytes.clone());
            let image = self
                .cpu(move || Ok(segmenter_input(&photo, &encoded, model.input_size)))
                .await?;
            let (form, sent) = match &image {
                Source::Encoded(_) => ("encoded", upright),
                Source::Rgb(rgb) => ("rgb", (rgb.width, rgb.height)),
            };
            metrics::counter!("orchestrator_segmenter_image_bytes_total", "form" => form)
                .increment(image_bytes(&image) as u64);
            let response = self.segmenter.segment(image, &missing, &request_id).await?;
            // Results come in request order, one per concept asked; checked before any is cached.
            check_reply(&response, missing.len(), sent)?;
            let model_id = if response.model_id.is_empty() {
                model_id
            } else {
                response.model_id.clone()
            };
            let (image_width, image_height) = (response.image_width, response.image_height);
            let (mask_width, mask_height) = (response.mask_width, response.mask_height);
            let mut fresh = response.concepts.into_iter();
            for (slot, concept) in found.iter_mut().zip(&plan.concepts) {
                if slot.is_none()
                    && let Some(result) = fresh.next()
                {
                    let masks = Arc::new(ConceptMasks {
                        result,
                        image_width,
                        image_height,
                        mask_width,
                        mask_height,
                    });
                    self.mask_cache
                        .insert(key(concept, &model_id), masks.clone());
                    *slot = Some(masks);
                }
            }
        }
        Ok(Segmented {
            concepts: found.into_iter().flatten().collect(),
            reused: hits > 0,
        })
    }
}
