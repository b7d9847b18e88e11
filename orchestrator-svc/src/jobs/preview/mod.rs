//! PreviewEdit: rules on one photo of a job, from its stored masks, at preview size, answered synchronously with
//! the image. Nothing is written; the segmenter is not called.
//!
//! Cold, a preview reads the job's records, the photo and the masks of the rules' concepts, decodes and downscales
//! them; each of those, and each rule's refined region, is cached at preview size (`cache`), so the next colour on
//! the same wall costs only the rule and the encoding (`render`). Rules are validated as an edit's are
//! (`edit::plan_edit`), against the concepts the job segmented.

mod cache;
mod compose;
mod load;
pub mod render;
mod request;
mod swatch;

use std::collections::BTreeMap;
use std::sync::Arc;

use palette_proto::orchestrator::v1::{EditJobRequest, PreviewEditRequest, PreviewEditResponse};
use palette_rules::preset::Preset;
use palette_rules::{GrayImage, RgbImage};
use tokio::sync::Semaphore;

use super::edit::{self, record};
use super::item::admission::{Admitted, item_pixels};
use super::item::{InputLimits, PixelBudget, blocking};
use super::stage::Stage;
use super::validate::{JobLimits, Violations};
use crate::error::ApiError;
use crate::storage::SharedStore;
use cache::Cached;
pub use cache::PreviewCache;
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
    /// The cache keys' prefix for the photo's masks and regions (`PhotoRef::planes_prefix`).
    planes_prefix: String,
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
        let source = self
            .photos_record(&request.user_id, &request.job_id)
            .await
            .map_err(|e| e.of_photos(&request.job_id))?;
        // An edit's photos are its source's: their run is that job's (run again on new photos, it has a new one,
        // and the edit's own does not change). Its record gone, the edit's own run stands in.
        let photos_run = match source.photos_job_id != request.job_id {
            true => self
                .photos_record(&request.user_id, &source.photos_job_id)
                .await
                .ok()
                .filter(|photos| photos.photos_job_id == source.photos_job_id)
                .map(|photos| photos.run.clone()),
            false => None,
        };
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
            run: photos_run.as_deref().unwrap_or(&source.run),
            idx: request.idx,
            max_side,
        };
        let loaded = self
            .load(&at, &plan.concepts_used_by_rules(), &plan.rules)
            .await
            .map_err(|e| item_to_api(&request.job_id, e))?;
        let cache = self.cache.clone();
        let prefix = loaded.planes_prefix.clone();
        let (w, h) = loaded.photo.dimensions();
        let pixels = item_pixels(u64::from(w) * u64::from(h), &plan);
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

    /// Job `job_id`'s photos record, cached for PHOTOS_RECORD_TTL.
    async fn photos_record(
        &self,
        user_id: &str,
        job_id: &str,
    ) -> Result<Arc<record::PhotosRecord>, edit::record::RecordError> {
        let key = format!("r|{user_id}|{job_id}");
        if let Some(Cached::Photos(r, read_at)) = self.cache.get(&key)
            && read_at.elapsed() < PHOTOS_RECORD_TTL
        {
            return Ok(r);
        }
        let r = Arc::new(record::read_photos(&self.store, user_id, job_id).await?);
        self.cache
            .insert(key, Cached::Photos(r.clone(), tokio::time::Instant::now()));
        Ok(r)
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

    fn photo_key(&self) -> String {
        format!("{}|p", self.prefix())
    }

    /// The prefix of the masks' and regions' keys: the photo's, and the SHA-256 of the photo's bytes.
    fn planes_prefix(&self, photo_sha256: &[u8; 32]) -> String {
        let sha: String = photo_sha256.iter().map(|b| format!("{b:02x}")).collect();
        format!("{}|{sha}", self.prefix())
    }
}
