//! The steps of one item: download -> size check -> decode upright -> one Segment call (or reused masks) ->
//! full-resolution masks stored -> each rule's region, edit and output stored -> preview.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use palette_proto::orchestrator::v1::{MaskKey, RuleOutput};
use palette_rules::mask::{ModelMask, PixelBox, upsample_instance};
use palette_rules::{Edited, GrayImage, RgbImage};
use sha2::{Digest, Sha256};

use super::imaging;
use super::mask_cache::{ConceptMasks, MaskCacheKey};
use super::pipeline::Pipeline;
use super::registry::ItemResult;
use super::validate::JobPlan;
use crate::error::Error;
use crate::keys;
use crate::storage::StorageError;

/// `RuleOutput.not_applied_reason`: the segmenter found no instance of the rule's concept in the photo.
pub const NOT_APPLIED_CONCEPT_NOT_FOUND: &str = "concept_not_found";
/// `RuleOutput.not_applied_reason`: instances were found, but occluders in front cover (nearly) all of them.
pub const NOT_APPLIED_REGION_EMPTY: &str = "region_empty";

/// Whether the occluders leave less than 2 % of the target's mask (by alpha) in the rule's region: soft edges keep a
/// rim where an occluder's edge meets the target's (1.5 % of a 64x48 photo's half, measured), so not exactly 0.
fn hidden_by_occluders(target: &GrayImage, region: &GrayImage) -> bool {
    let sum = |img: &GrayImage| img.iter().map(|&a| a as u64).sum::<u64>();
    sum(region) * 50 < sum(target)
}

/// Runs blocking (CPU) work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Internal(format!("worker task: {e}")))?
}

pub(super) fn record_stage(stage: &'static str, since: Instant) {
    metrics::histogram!("orchestrator_stage_seconds", "stage" => stage)
        .record(since.elapsed().as_secs_f64());
}

impl Pipeline {
    pub(super) async fn process(&self, plan: &Arc<JobPlan>, idx: u32) -> Result<ItemResult, Error> {
        let t = Instant::now();
        let input_key = keys::input(&plan.user_id, &plan.job_id, idx);
        let bytes = self.download_input(&input_key).await?;
        record_stage("download", t);

        let t = Instant::now();
        let max_pixels = self.limits.max_pixels;
        let encoded = bytes.clone();
        let photo =
            Arc::new(blocking(move || imaging::decode_upright(&encoded, max_pixels)).await?);
        record_stage("decode", t);

        let t = Instant::now();
        let (concept_masks, masks_reused) = self.segment(plan, &bytes, idx).await?;
        drop(bytes);
        record_stage("segment", t);

        let t = Instant::now();
        let (masks, full_masks) = self.store_masks(plan, idx, &concept_masks, &photo).await?;
        record_stage("masks", t);

        let t = Instant::now();
        let (outputs, preview) = self
            .apply_rules(plan, idx, &photo, Arc::new(full_masks))
            .await?;
        record_stage("rules", t);

        let preview = match preview {
            Some(p) => p,
            None => {
                let photo = photo.clone();
                blocking(move || imaging::preview_jpeg(&photo)).await?
            }
        };
        let preview_key = keys::preview(&plan.user_id, &plan.job_id, idx);
        self.store
            .put(&preview_key, Bytes::from(preview), "image/jpeg")
            .await?;
        Ok(ItemResult {
            outputs,
            masks,
            preview_key,
            masks_reused,
        })
    }

    async fn download_input(&self, key: &str) -> Result<Bytes, Error> {
        let max = self.limits.max_bytes;
        let meta = self
            .store
            .head(key)
            .await?
            .ok_or_else(|| Error::ObjectNotFound(key.to_string()))?;
        let too_large =
            |size: u64| Error::InputTooLarge(format!("{key} is {size} bytes; the limit is {max}"));
        if meta.size > max {
            return Err(too_large(meta.size));
        }
        let bytes = self.store.get(key).await?;
        if bytes.len() as u64 > max {
            return Err(too_large(bytes.len() as u64));
        }
        Ok(bytes)
    }

    /// Every concept of the job for this image, in plan order: from the cache where the same bytes were segmented
    /// by the same model before, the rest in ONE Segment call. The flag says whether any came from the cache.
    async fn segment(
        &self,
        plan: &JobPlan,
        bytes: &Bytes,
        idx: u32,
    ) -> Result<(Vec<Arc<ConceptMasks>>, bool), Error> {
        let model_id = self.segmenter.model_id().await?;
        let sha: [u8; 32] = Sha256::digest(bytes).into();
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
            let response = self.segmenter.segment(bytes, &missing, &request_id).await?;
            // Results come in request order, one per concept asked.
            if response.concepts.len() != missing.len() {
                return Err(Error::SegmenterRejected(format!(
                    "asked for {} concepts, got {} results",
                    missing.len(),
                    response.concepts.len()
                )));
            }
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
        let masks: Vec<Arc<ConceptMasks>> = found.into_iter().flatten().collect();
        Ok((masks, hits > 0))
    }

    /// Upsamples every instance inside its box to full resolution and stores it as PNG. Keeps in memory only what a
    /// rule needs: the union (max) of each rule concept's instances, which is what a region is built from, so memory
    /// is one plane per concept whatever the number of instances.
    async fn store_masks(
        &self,
        plan: &JobPlan,
        idx: u32,
        concepts: &[Arc<ConceptMasks>],
        photo: &Arc<RgbImage>,
    ) -> Result<(Vec<MaskKey>, HashMap<String, GrayImage>), Error> {
        let (w, h) = photo.dimensions();
        let used = plan.concepts_used_by_rules();
        let mut keys_out = Vec::new();
        let mut full: HashMap<String, GrayImage> = HashMap::new();
        // The concept names used in keys are ours (validated), never the reply's.
        for (masks, concept) in concepts.iter().zip(&plan.concepts) {
            let (mw, mh) = (masks.mask_width, masks.mask_height);
            // Boxes are in the segmenter's view of the image; both apply EXIF orientation, so only a scale can
            // differ.
            let sx = w as f32 / masks.image_width.max(1) as f32;
            let sy = h as f32 / masks.image_height.max(1) as f32;
            for (n, instance) in masks.result.instances.iter().enumerate() {
                let probs_len = instance.mask.as_ref().map_or(0, |m| m.data.len());
                if probs_len != (mw as usize) * (mh as usize) || mw == 0 || mh == 0 {
                    return Err(Error::SegmenterRejected(format!(
                        "{concept} instance {} mask has {probs_len} bytes, expected {mw}x{mh} probabilities",
                        n + 1
                    )));
                }
                let bbox = instance.r#box.map_or(
                    PixelBox {
                        x0: 0.0,
                        y0: 0.0,
                        x1: w as f32,
                        y1: h as f32,
                    },
                    |b| PixelBox {
                        x0: b.x0 * sx,
                        y0: b.y0 * sy,
                        x1: b.x1 * sx,
                        y1: b.y1 * sy,
                    },
                );
                let masks = masks.clone();
                let keep = used.contains(&concept.as_str());
                let union_so_far = full.remove(concept);
                let (union, png) = blocking(move || {
                    let probs = masks.result.instances[n]
                        .mask
                        .as_ref()
                        .map_or(&[][..], |m| &m.data[..]);
                    let model = ModelMask {
                        width: mw,
                        height: mh,
                        probs,
                    };
                    let gray = upsample_instance(&model, bbox, w, h);
                    let png = imaging::encode_png_gray(&gray)?;
                    let union = keep.then(|| match union_so_far {
                        Some(mut union) => {
                            for (u, g) in union.iter_mut().zip(gray.iter()) {
                                *u = (*u).max(*g);
                            }
                            union
                        }
                        None => gray,
                    });
                    Ok((union, png))
                })
                .await?;
                let number = n as u32 + 1;
                let key = keys::mask(&plan.user_id, &plan.job_id, concept, idx, number);
                self.store.put(&key, Bytes::from(png), "image/png").await?;
                keys_out.push(MaskKey {
                    concept: concept.clone(),
                    instance: number,
                    key,
                    score: instance.score,
                });
                if let Some(union) = union {
                    full.insert(concept.clone(), union);
                }
            }
        }
        Ok((keys_out, full))
    }

    /// Each rule: region (target minus occluders, refined), edit, encode, store. Returns the outputs and the
    /// preview of the first one.
    async fn apply_rules(
        &self,
        plan: &Arc<JobPlan>,
        idx: u32,
        photo: &Arc<RgbImage>,
        masks: Arc<HashMap<String, GrayImage>>,
    ) -> Result<(Vec<RuleOutput>, Option<Vec<u8>>), Error> {
        let mut outputs = Vec::new();
        let mut preview = None;
        for r in 0..plan.rules.len() {
            let swatch = match plan.rules[r].rule.texture_key() {
                Some(key) => Some(Arc::new(
                    self.load_swatch(&plan.rules[r].rule_id, key).await?,
                )),
                None => None,
            };
            let (plan2, photo, masks, want_preview) =
                (plan.clone(), photo.clone(), masks.clone(), r == 0);
            let (encoded, has_alpha, rule_preview, not_applied) = blocking(move || {
                let rule = &plan2.rules[r];
                // Full-resolution masks are large: borrow them; copy only to join several occluder concepts.
                let of = |c: &String| masks.get(c).map_or(&[][..], std::slice::from_ref);
                let joined: Vec<GrayImage>;
                let occluders: &[GrayImage] = match rule.occluders.as_slice() {
                    [] => &[],
                    [one] => of(one),
                    many => {
                        joined = many.iter().flat_map(|c| of(c).iter().cloned()).collect();
                        &joined
                    }
                };
                let mut region = palette_rules::region::build_region(
                    &photo,
                    of(&rule.concept),
                    occluders,
                    &rule.rule.region_params(),
                );
                // A rule with nothing to edit still writes its output (the photo as it was), and says why.
                let not_applied = match masks.get(&rule.concept) {
                    None => Some(NOT_APPLIED_CONCEPT_NOT_FOUND),
                    Some(target) if hidden_by_occluders(target, &region) => {
                        // Soft edges leave a faint rim where the occluder's edge meets the target's: not an edit
                        // anyone asked for. Nothing at all, then, and the output type stays the rule's.
                        region.fill(0);
                        Some(NOT_APPLIED_REGION_EMPTY)
                    }
                    Some(_) => None,
                };
                let edited = palette_rules::apply(
                    &photo,
                    &region,
                    &rule.rule.for_image(idx),
                    swatch.as_deref(),
                )
                .map_err(|e| Error::RuleFailed(format!("rule {}: {e}", rule.rule_id)))?;
                let (encoded, has_alpha, preview) = match edited {
                    Edited::Rgb(img) => {
                        let preview = if want_preview {
                            Some(imaging::preview_jpeg(&img)?)
                        } else {
                            None
                        };
                        (imaging::encode_jpeg(&img)?, false, preview)
                    }
                    Edited::Rgba(img) => {
                        let preview = if want_preview {
                            Some(imaging::preview_jpeg(&imaging::flatten_on_white(&img))?)
                        } else {
                            None
                        };
                        (imaging::encode_png_rgba(&img)?, true, preview)
                    }
                };
                Ok((encoded, has_alpha, preview, not_applied))
            })
            .await?;
            let rule_id = &plan.rules[r].rule_id;
            let key = keys::output(&plan.user_id, &plan.job_id, rule_id, idx, has_alpha);
            let content_type = if has_alpha { "image/png" } else { "image/jpeg" };
            self.store
                .put(&key, Bytes::from(encoded), content_type)
                .await?;
            outputs.push(RuleOutput {
                rule_id: rule_id.clone(),
                output_key: key,
                applied: not_applied.is_none(),
                not_applied_reason: not_applied.unwrap_or_default().to_string(),
            });
            if preview.is_none() {
                preview = rule_preview;
            }
        }
        Ok((outputs, preview))
    }

    async fn load_swatch(&self, rule_id: &str, key: &str) -> Result<RgbImage, Error> {
        let bytes = self.store.get(key).await.map_err(|e| match e {
            StorageError::NotFound(_) | StorageError::InvalidKey(_) => {
                Error::RuleFailed(format!("rule {rule_id}: texture swatch {key:?}: {e}"))
            }
            StorageError::Unavailable(msg) => Error::StorageUnavailable(msg),
        })?;
        let max_pixels = self.limits.max_pixels;
        blocking(move || imaging::decode_upright(&bytes, max_pixels))
            .await
            .map_err(|e| Error::RuleFailed(format!("rule {rule_id}: texture swatch {key:?}: {e}")))
    }
}
