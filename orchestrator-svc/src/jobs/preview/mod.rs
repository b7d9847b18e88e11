//! PreviewEdit: rules on one photo of a job, from its stored masks, at preview size, answered synchronously with
//! the image. Nothing is written; the segmenter is not called.
//!
//! Cold, a preview reads the job's records, the photo and the masks of the rules' concepts, decodes and downscales
//! them; each of those, and each rule's refined region, is cached at preview size (`cache`), so the next colour on
//! the same wall costs only the rule and the encoding (`render`). Rules are validated as an edit's are
//! (`edit::plan_edit`), against the concepts the job segmented.

mod cache;
mod compose;
pub mod render;
mod request;
mod swatch;

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use palette_proto::orchestrator::v1::{EditJobRequest, PreviewEditRequest, PreviewEditResponse};
use palette_rules::preset::Preset;
use palette_rules::{GrayImage, RgbImage};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use super::edit::{self, record};
use super::item::admission::{Admitted, item_pixels};
use super::item::stored_masks::{read_record, union_of, usable_for};
use super::item::{InputLimits, ItemError, PixelBudget, blocking, imaging};
use super::stage::Stage;
use super::validate::{JobLimits, PlannedRule, Violations};
use crate::error::ApiError;
use crate::keys;
use crate::storage::SharedStore;
pub use cache::PreviewCache;
use cache::{Cached, PreviewPhoto};
use compose::render_all;
use request::{check_cutout_last, check_request, item_to_api};

/// How long a job's photos record is taken from the cache before it is read again: a job id used again (after the
/// first job expired) writes a new record, whose `run` moves every cache key to the new photos within this time.
const PHOTOS_RECORD_TTL: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug)]
pub struct PreviewService {
    store: SharedStore,
    cache: Arc<PreviewCache>,
    inputs: InputLimits,
    limits: JobLimits,
    presets: BTreeMap<String, Arc<Preset>>,
    /// Previews rendering at once: CPU-bound work, one per core.
    permits: Semaphore,
    /// MAX_INFLIGHT_MEGAPIXELS, shared with the items: a cold preview decodes the photo and builds each concept's
    /// union at full size, then renders at preview size; each step is admitted for its pixels, one at a time (never
    /// two held at once, so a preview cannot wait on itself).
    budget: PixelBudget,
}

/// What one preview works on, once loaded (from the cache or from storage).
struct Loaded {
    photo: Arc<RgbImage>,
    /// The photo's transparency at preview size, when it has some.
    transparency: Option<Arc<GrayImage>>,
    full_size: (u32, u32),
    /// Each rule concept's and occluder's union mask at preview size (absent: no instance in the photo).
    masks: BTreeMap<String, Arc<GrayImage>>,
    swatches: Vec<Option<Arc<palette_rules::swatch::LinearSwatch>>>,
}

impl PreviewService {
    pub fn new(
        store: SharedStore,
        budget: PixelBudget,
        cache_bytes: usize,
        inputs: InputLimits,
        limits: JobLimits,
        presets: BTreeMap<String, Arc<Preset>>,
    ) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        PreviewService {
            store,
            cache: Arc::new(PreviewCache::new(cache_bytes)),
            inputs,
            limits,
            presets,
            permits: Semaphore::new(cores),
            budget,
        }
    }

    pub async fn preview(
        &self,
        request: &PreviewEditRequest,
    ) -> Result<PreviewEditResponse, ApiError> {
        let (max_side, png) = check_request(request)?;
        let source = self.photos_record(request).await?;
        if request.idx >= source.image_count {
            let mut v = Violations::default();
            v.add(
                "idx",
                format!(
                    "job {:?} has {} photos (0 to {})",
                    request.job_id,
                    source.image_count,
                    source.image_count - 1
                ),
            );
            v.finish()?;
        }
        let plan = edit::plan_edit(
            &EditJobRequest {
                user_id: request.user_id.clone(),
                job_id: request.job_id.clone(),
                source_job_id: request.job_id.clone(),
                rules: request.rules.clone(),
                preset: request.preset.clone(),
                // A preview's own `format` says how it is encoded.
                output_format: String::new(),
            },
            &source,
            &self.presets,
            self.limits,
        )?;
        check_cutout_last(&plan.rules)?;
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| ApiError::Internal {
                what: "preview permits closed".into(),
            })?;
        let at = PhotoRef {
            user_id: &request.user_id,
            photos_job_id: &source.photos_job_id,
            run: &source.run,
            idx: request.idx,
            max_side,
        };
        let loaded = self
            .load(&at, &plan.concepts_used_by_rules(), &plan.rules)
            .await
            .map_err(|e| item_to_api(&request.job_id, e))?;
        let cache = self.cache.clone();
        let prefix = at.prefix();
        let (w, h) = loaded.photo.dimensions();
        let pixels = item_pixels(
            u64::from(w) * u64::from(h),
            plan.fills(),
            plan.concepts_used_by_rules().len(),
        );
        let rules = Arc::new(plan.rules);
        let idx = request.idx;
        self.admit(pixels, None)
            .await
            .hold_while(blocking(move || {
                render_all(&cache, &prefix, &loaded, &rules, idx, png)
            }))
            .await
            .map_err(|e| item_to_api(&request.job_id, e))
    }

    async fn photos_record(
        &self,
        request: &PreviewEditRequest,
    ) -> Result<Arc<record::PhotosRecord>, ApiError> {
        let key = format!("r|{}|{}", request.user_id, request.job_id);
        if let Some(Cached::Photos(r, read_at)) = self.cache.get(&key)
            && read_at.elapsed() < PHOTOS_RECORD_TTL
        {
            return Ok(r);
        }
        let r = record::read_photos(&self.store, &request.user_id, &request.job_id)
            .await
            .map_err(|e| e.of_photos(&request.job_id))?;
        let r = Arc::new(r);
        self.cache
            .insert(key, Cached::Photos(r.clone(), tokio::time::Instant::now()));
        Ok(r)
    }

    /// The photo at preview size, the masks of `concepts`, the rules' swatches: from the cache, else from storage.
    async fn load(
        &self,
        at: &PhotoRef<'_>,
        concepts: &[&str],
        rules: &[PlannedRule],
    ) -> Result<Loaded, ItemError> {
        let plane_key = |concept: &str| format!("{}|c|{concept}", at.prefix());
        let cached: BTreeMap<&str, Arc<GrayImage>> = concepts
            .iter()
            .filter_map(|&c| match self.cache.get(&plane_key(c)) {
                Some(Cached::Plane(p)) => Some((c, p)),
                _ => None,
            })
            .collect();
        // The photo and the masks record are read at once: two storage round trips in the time of one.
        let need_record = concepts.iter().any(|c| !cached.contains_key(c));
        let (photo, record) = tokio::join!(self.photo(at), async {
            if need_record {
                self.masks_record(at).await.map(Some)
            } else {
                Ok(None)
            }
        });
        let (photo, record) = (photo?, record?);
        let full_size = photo.full_size;
        let record = match record {
            Some(got) => {
                let needed: Vec<&str> = concepts
                    .iter()
                    .copied()
                    .filter(|c| !cached.contains_key(c))
                    .collect();
                Some(self.checked_record(at, got, &photo.sha256, &needed).await?)
            }
            None => None,
        };
        let preview_size = photo.rgb.dimensions();
        let mut masks = BTreeMap::new();
        for &concept in concepts {
            let plane = match cached.get(concept) {
                Some(p) => p.clone(),
                None => {
                    let key = plane_key(concept);
                    let stored = record.as_deref().expect("read when a plane is not cached");
                    let mut stage = Stage::preview("masks");
                    let admitted = self
                        .admit(
                            u64::from(full_size.0) * u64::from(full_size.1),
                            Some(&mut stage),
                        )
                        .await;
                    let plane = admitted
                        .hold_while(async {
                            let union = union_of(
                                &self.store,
                                stored,
                                concept,
                                full_size,
                                self.inputs.max_bytes,
                            )
                            .await?;
                            // No instance: an empty plane, cached as such.
                            Ok::<_, ItemError>(match union {
                                Some(u) => {
                                    blocking(move || Ok(render::downscale_gray(&u, preview_size)))
                                        .await?
                                }
                                None => GrayImage::new(0, 0),
                            })
                        })
                        .await?;
                    let plane = Arc::new(plane);
                    self.cache.insert(key, Cached::Plane(plane.clone()));
                    stage.finish();
                    plane
                }
            };
            if plane.width() > 0 {
                masks.insert(concept.to_string(), plane);
            }
        }
        let mut swatches = Vec::new();
        for rule in rules {
            swatches.push(match rule.rule.texture_key() {
                Some(key) => Some(self.swatch(&rule.rule_id, key).await?),
                None => None,
            });
        }
        Ok(Loaded {
            photo: photo.rgb,
            transparency: photo.transparency,
            full_size,
            masks,
            swatches,
        })
    }

    async fn photo(&self, at: &PhotoRef<'_>) -> Result<PreviewPhoto, ItemError> {
        let key = format!("{}|p", at.prefix());
        if let Some(Cached::Photo(p)) = self.cache.get(&key) {
            return Ok(p);
        }
        let mut stage = Stage::preview("photo");
        let input = keys::input(at.user_id, at.photos_job_id, at.idx);
        let bytes: Bytes = self
            .store
            .get_at_most(&input, self.inputs.max_bytes)
            .await?;
        let (max_pixels, max_side) = (self.inputs.max_pixels, at.max_side);
        let pixels = imaging::admissible_pixels(&bytes, max_pixels)?;
        let admitted = self.admit(pixels, Some(&mut stage)).await;
        let photo = admitted
            .hold_while(blocking(move || {
                let sha256: [u8; 32] = Sha256::digest(&bytes).into();
                let (full, alpha) = imaging::decode_photo(&bytes, max_pixels)?;
                let full_size = full.dimensions();
                let to = render::preview_size(full_size, max_side);
                Ok(PreviewPhoto {
                    rgb: Arc::new(render::downscale_rgb(&full, to)),
                    transparency: alpha.map(|a| Arc::new(render::downscale_gray(&a, to))),
                    full_size,
                    sha256,
                })
            }))
            .await?;
        self.cache.insert(key, Cached::Photo(photo.clone()));
        stage.finish();
        Ok(photo)
    }

    /// The pixel budget's admission, its wait recorded as the `admit` stage and left out of `within` (the stage
    /// that waited), so the photo and masks histograms show work, not queueing behind other previews and items.
    async fn admit(&self, pixels: u64, within: Option<&mut Stage>) -> Admitted {
        let wait = Stage::preview("admit");
        let started = std::time::Instant::now();
        let admitted = self.budget.admit(pixels).await;
        if let Some(stage) = within {
            stage.exclude(started.elapsed());
        }
        wait.finish();
        admitted
    }

    /// The photo's masks record from the cache (true), else read (false); `checked_record` decides whether it is
    /// usable, and caches it then.
    async fn masks_record(
        &self,
        at: &PhotoRef<'_>,
    ) -> Result<(Arc<record::MasksRecord>, bool), ItemError> {
        if let Some(Cached::Masks(r)) = self.cache.get(&format!("m|{}", at.prefix())) {
            return Ok((r, true));
        }
        let r = read_record(&self.store, at.user_id, at.photos_job_id, at.idx).await?;
        Ok((Arc::new(r), false))
    }

    /// The masks record if it is of this photo and its run segmented `concepts` (`usable_for`). Only such a record is
    /// cached: a job id run again writes its photos record (a new `run`, the cache keys' prefix) when it starts and
    /// a photo's masks record only once its masks are stored, so a preview in between reads the earlier run's
    /// record, which, cached, stood for the whole run. A cached record that lacks a concept (an earlier run's, of
    /// the same photo, cached before) is read again.
    async fn checked_record(
        &self,
        at: &PhotoRef<'_>,
        (record, from_cache): (Arc<record::MasksRecord>, bool),
        photo_sha256: &[u8; 32],
        concepts: &[&str],
    ) -> Result<Arc<record::MasksRecord>, ItemError> {
        let check = |r: &record::MasksRecord| {
            usable_for(
                r,
                photo_sha256,
                concepts,
                at.user_id,
                at.photos_job_id,
                at.idx,
            )
        };
        let record = match check(&record) {
            Ok(()) if from_cache => return Ok(record),
            Ok(()) => record,
            Err(_) if from_cache => {
                let r = read_record(&self.store, at.user_id, at.photos_job_id, at.idx).await?;
                check(&r)?;
                Arc::new(r)
            }
            Err(e) => return Err(e),
        };
        self.cache
            .insert(format!("m|{}", at.prefix()), Cached::Masks(record.clone()));
        Ok(record)
    }
}

/// Which photo of which run of its job, at which size: the cache keys' common part.
struct PhotoRef<'a> {
    user_id: &'a str,
    photos_job_id: &'a str,
    /// `PhotosRecord::run`: a job id used again is another run, whose photos and masks are not the cached ones.
    run: &'a str,
    idx: u32,
    max_side: u32,
}

impl PhotoRef<'_> {
    fn prefix(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}",
            self.user_id, self.photos_job_id, self.run, self.idx, self.max_side
        )
    }
}
