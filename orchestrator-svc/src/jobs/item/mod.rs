//! One item, start to finish: download -> size check -> decode upright -> one Segment call (or reused masks) ->
//! instance masks stored (`MASK_LAYOUT`) -> each rule's region, edit and output stored -> preview. `ItemRunner`
//! owns what an item needs and does the I/O; the CPU work is in `instance_masks` and `cpu`, run on the blocking
//! pool.

pub(in crate::jobs) mod admission;
pub(in crate::jobs) mod cpu;
mod error;
pub(in crate::jobs) mod imaging;
mod inputs;
mod instance_masks;
mod mask_cache;
mod reply_check;
mod segment;
mod segmenter_input;
mod single_thread;
pub(in crate::jobs) mod stored_masks;
mod union_plane;
mod uploads;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use palette_proto::orchestrator::v1::{MaskKey, RuleOutput};
use palette_rules::guide_stats::GuideCache;
use palette_rules::{GrayImage, RgbImage};
use sha2::{Digest, Sha256};

pub use admission::PixelBudget;
pub use error::ItemError;
pub use mask_cache::MaskCache;

use super::job::ItemResult;
use super::stage::Stage;
use super::swatches::JobSwatches;
use super::validate::JobPlan;
use crate::config::MaskLayout;
use crate::jobs::edit::record as edit_record;
use crate::keys;
use crate::segmenter::Segmenter;
use crate::storage::SharedStore;
use cpu::{Region, RuleInput, render_rule, rule_region};
use instance_masks::concept_masks;
use mask_cache::ConceptMasks;
use single_thread::single_thread;
use uploads::Uploads;

/// Limits on one input, checked before its pixels are decoded.
#[derive(Debug, Clone, Copy)]
pub struct InputLimits {
    pub max_bytes: u64,
    pub max_pixels: u64,
}

/// Runs items: storage, the segmenter, the mask cache and the input limits, shared by every item of every job.
#[derive(Debug)]
pub struct ItemRunner {
    store: SharedStore,
    segmenter: Arc<Segmenter>,
    limits: InputLimits,
    mask_cache: MaskCache,
    budget: PixelBudget,
    /// ITEM_THREADS=one: an item's CPU work runs on its blocking thread alone (`single_thread`).
    one_thread_per_item: bool,
    /// MASK_LAYOUT: instance masks stored as photo-resolution crops or as the model's grids.
    mask_layout: MaskLayout,
}

/// Runs blocking (CPU) work off the async threads.
pub(in crate::jobs) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ItemError> + Send + 'static,
) -> Result<T, ItemError> {
    // The item's pixels stay admitted while this runs, even if the item is cancelled meanwhile.
    let admitted = admission::current();
    tokio::task::spawn_blocking(move || {
        let _admitted = admitted;
        work()
    })
    .await
    .map_err(ItemError::Worker)?
}

impl ItemRunner {
    pub fn new(
        store: SharedStore,
        segmenter: Arc<Segmenter>,
        limits: InputLimits,
        mask_cache_bytes: usize,
    ) -> Self {
        ItemRunner {
            store,
            segmenter,
            limits,
            mask_cache: MaskCache::new(mask_cache_bytes),
            // Until `with_pixel_budget`: the default where no memory limit is set.
            budget: PixelBudget::new(crate::config::default_inflight_megapixels(None)),
            one_thread_per_item: false,
            mask_layout: MaskLayout::Grid,
        }
    }

    /// MASK_LAYOUT (see `crate::mask_png::grid`).
    pub fn with_mask_layout(mut self, layout: MaskLayout) -> Self {
        self.mask_layout = layout;
        self
    }

    /// ITEM_THREADS: `One` runs each item's CPU work on one thread, the items in flight sharing the cores; `Shared`
    /// splits every item's loops over the process's rayon pool.
    pub fn with_item_threads(mut self, threads: crate::config::ItemThreads) -> Self {
        self.one_thread_per_item = threads == crate::config::ItemThreads::One;
        self
    }

    /// `blocking`, on the calling blocking thread alone when `one_thread_per_item`.
    async fn cpu<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, ItemError> + Send + 'static,
    ) -> Result<T, ItemError> {
        if self.one_thread_per_item {
            blocking(move || single_thread(work)).await
        } else {
            blocking(work).await
        }
    }

    /// Admits items by pixels: at most `megapixels` of photos in flight together (see `admission`).
    pub fn with_pixel_budget(mut self, megapixels: u64) -> Self {
        tracing::info!(
            megapixels,
            "images start once their pixels fit in this many megapixels in flight"
        );
        self.budget = PixelBudget::new(megapixels);
        self
    }

    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    pub fn segmenter(&self) -> &Segmenter {
        &self.segmenter
    }

    /// MAX_INFLIGHT_MEGAPIXELS, shared with PreviewEdit (its decodes and planes count too).
    pub fn pixel_budget(&self) -> &PixelBudget {
        &self.budget
    }

    /// Item `idx` of the job, every output stored. `swatches`: the job's, shared with its other items.
    pub async fn run(
        &self,
        plan: &Arc<JobPlan>,
        idx: u32,
        swatches: &JobSwatches,
    ) -> Result<ItemResult, ItemError> {
        let input_key = keys::input(&plan.user_id, plan.photos_job_id(), idx);
        // An edit reads its source job's photo: that photo unusable is source_missing, not the edit's own input.
        let photo_error = |e: ItemError| match plan.source {
            Some(_) => e.of_source_photo(&input_key),
            None => e,
        };
        let stage = Stage::start("download");
        let bytes = self.download_input(&input_key).await.map_err(photo_error)?;
        stage.finish();

        // Held to the end of the item (its photo, planes and outputs live until then), and by its blocking work.
        let stage = Stage::start("admit");
        let photo_pixels =
            imaging::admissible_pixels(&bytes, self.limits.max_pixels).map_err(photo_error)?;
        let pixels = admission::item_pixels(photo_pixels, plan);
        let admitted = self.budget.admit(pixels).await;
        stage.finish();
        admitted
            .hold_while(self.run_admitted(plan, idx, bytes, &photo_error, swatches))
            .await
    }

    async fn run_admitted(
        &self,
        plan: &Arc<JobPlan>,
        idx: u32,
        bytes: Bytes,
        photo_error: &impl Fn(ItemError) -> ItemError,
        swatches: &JobSwatches,
    ) -> Result<ItemResult, ItemError> {
        // The rules' uploaded swatches are there: one missing fails the item before the segmenter is asked.
        self.check_swatches(plan).await?;

        let stage = Stage::start("decode");
        let max_pixels = self.limits.max_pixels;
        let encoded = bytes.clone();
        let (photo, transparency) = self
            .cpu(move || imaging::decode_photo(&encoded, max_pixels))
            .await
            .map_err(photo_error)?;
        let (photo, transparency) = (Arc::new(photo), transparency.map(Arc::new));
        stage.finish();

        // The photo's fingerprint: keys reused masks, and ties stored masks to the photo they were computed from.
        let sha: [u8; 32] = Sha256::digest(&bytes).into();
        let mut uploads = Uploads::new(self.store.clone());
        let (masks, full_masks, masks_reused) = if plan.source.is_some() {
            // An edit: the source job's stored masks, no segmenter.
            drop(bytes);
            let stage = Stage::start("stored_masks");
            let (masks, full) = self.stored_masks(plan, idx, &photo, &sha).await?;
            stage.finish();
            (masks, full, true)
        } else {
            let stage = Stage::start("segment");
            let segmented = self.segment(plan, &bytes, &sha, &photo, idx).await?;
            drop(bytes);
            stage.finish();

            let stage = Stage::start("masks");
            let (masks, full) = self
                .store_masks(plan, idx, &segmented.concepts, &photo, &mut uploads)
                .await?;
            // What an edit of this photo reads back (`jobs::edit::record`), once every mask it names is stored.
            uploads.flush().await?;
            let (key, body) = edit_record::masks_record_object(plan, idx, &masks, &sha);
            uploads.put(key, body, "application/json").await?;
            stage.finish();
            (masks, full, segmented.reused)
        };

        let stage = Stage::start("rules");
        let (outputs, preview) = self
            .apply_rules(
                plan,
                idx,
                (&photo, transparency),
                Arc::new(full_masks),
                swatches,
                &mut uploads,
            )
            .await?;
        stage.finish();

        let preview = match preview {
            Some(p) => p,
            None => {
                let photo = photo.clone();
                self.cpu(move || imaging::preview_jpeg(&photo)).await?
            }
        };
        let preview_key = keys::preview(&plan.user_id, &plan.job_id, idx);
        uploads
            .put(preview_key.clone(), Bytes::from(preview), "image/jpeg")
            .await?;
        let stage = Stage::start("upload");
        uploads.flush().await?;
        stage.finish();
        Ok(ItemResult {
            outputs,
            masks,
            preview_key,
            masks_reused,
        })
    }

    /// Stores every instance as PNG (`MASK_LAYOUT`: the model's grid with its placement, its crop upsampled to full
    /// resolution, or the whole full-frame mask; the placement also in its `MaskKey`). Keeps in memory only what a
    /// rule needs: the union of each rule concept's instances at full resolution (see
    /// `instance_masks::instance_mask`). One blocking task per concept, its instances one after the other: the items
    /// in flight already fill the cores, and no full-frame plane per instance is made.
    async fn store_masks(
        &self,
        plan: &JobPlan,
        idx: u32,
        concepts: &[Arc<ConceptMasks>],
        photo: &Arc<RgbImage>,
        uploads: &mut Uploads,
    ) -> Result<(Vec<MaskKey>, HashMap<String, GrayImage>), ItemError> {
        let (w, h) = photo.dimensions();
        let used = plan.concepts_used_by_rules();
        let mut keys_out = Vec::new();
        let mut full: HashMap<String, GrayImage> = HashMap::new();
        // The concept names used in keys are ours (validated), never the reply's.
        for (masks, concept) in concepts.iter().zip(&plan.concepts) {
            // Sizes and scores were checked when the reply came (`reply_check`), before it was cached.
            let keep = used.contains(&concept.as_str());
            let (masks2, layout) = (masks.clone(), self.mask_layout);
            let (stored, union) = self
                .cpu(move || Ok(concept_masks(&masks2, (w, h), keep, layout)))
                .await?;
            for (n, (mask, instance)) in stored.into_iter().zip(&masks.result.instances).enumerate()
            {
                let number = n as u32 + 1;
                let key = keys::mask(&plan.user_id, &plan.job_id, concept, idx, number);
                uploads
                    .put(key.clone(), Bytes::from(mask.png), "image/png")
                    .await?;
                keys_out.push(MaskKey {
                    concept: concept.clone(),
                    instance: number,
                    key,
                    score: instance.score,
                    x: mask.placement.x,
                    y: mask.placement.y,
                    width: mask.placement.width,
                    height: mask.placement.height,
                    image_width: w,
                    image_height: h,
                    grid_width: mask.grid.0,
                    grid_height: mask.grid.1,
                });
            }
            if let Some(union) = union {
                full.insert(concept.clone(), union);
            }
        }
        Ok((keys_out, full))
    }

    /// Each rule: region, edit, encode (`cpu::render_rule`), store. Returns the outputs and the preview of the first
    /// one. The rules edit one copy of the photo in turn (each but the last restores it), and rules with the same
    /// region share it: it is built for the first and kept until the last of them.
    async fn apply_rules(
        &self,
        plan: &Arc<JobPlan>,
        idx: u32,
        (photo, transparency): (&Arc<RgbImage>, Option<Arc<GrayImage>>),
        masks: Arc<HashMap<String, GrayImage>>,
        swatches: &JobSwatches,
        uploads: &mut Uploads,
    ) -> Result<(Vec<RuleOutput>, Option<Vec<u8>>), ItemError> {
        let mut outputs = Vec::new();
        let mut preview = None;
        let mut work: Option<RgbImage> = None;
        // (rule index that built it, region), while a later rule still needs it.
        let mut regions: Vec<(usize, Arc<Region>)> = Vec::new();
        // The guided filter's photo-only statistics, shared by the regions over the same crop.
        let guides = Arc::new(GuideCache::new());
        for r in 0..plan.rules.len() {
            let rule_id = &plan.rules[r].rule_id;
            // Held while this rule is applied, shared with the job's other items applying it now.
            let swatch = match plan.rules[r].rule.texture_key() {
                Some(key) => Some(self.swatch(swatches, rule_id, key).await?),
                None => None,
            };
            let shared = regions
                .iter()
                .find(|(first, _)| cpu::same_region(&plan.rules[*first], &plan.rules[r]))
                .map(|(_, region)| region.clone());
            let (plan2, photo, masks, guides, transparency) = (
                plan.clone(),
                photo.clone(),
                masks.clone(),
                guides.clone(),
                transparency.clone(),
            );
            let mut buffer = work.take();
            let (rendered, buffer, region) = self
                .cpu(move || {
                    let rule = &plan2.rules[r];
                    let region = match shared {
                        Some(region) => region,
                        None => Arc::new(rule_region(&photo, &masks, rule, &guides)),
                    };
                    let work = buffer.get_or_insert_with(|| (*photo).clone());
                    // The last rule leaves its edit in the copy, and the copy goes.
                    let last = r + 1 == plan2.rules.len();
                    let rendered = render_rule(RuleInput {
                        photo: &photo,
                        transparency: transparency.as_deref(),
                        work,
                        region: &region,
                        rule,
                        idx,
                        swatch: swatch.as_deref(),
                        want_preview: r == 0,
                        restore: !last,
                        png: plan2.png_outputs(),
                    })?;
                    Ok((rendered, buffer.filter(|_| !last), region))
                })
                .await?;
            work = buffer;
            // Keep the region only while a later rule has the same one.
            regions.retain(|(first, _)| {
                plan.rules[r + 1..]
                    .iter()
                    .any(|later| cpu::same_region(&plan.rules[*first], later))
            });
            let needed_later = plan.rules[r + 1..]
                .iter()
                .any(|later| cpu::same_region(&plan.rules[r], later));
            if needed_later && !regions.iter().any(|(_, kept)| Arc::ptr_eq(kept, &region)) {
                regions.push((r, region));
            }
            let key = keys::output(
                &plan.user_id,
                &plan.job_id,
                rule_id,
                idx,
                rendered.format.is_png(),
            );
            uploads
                .put(
                    key.clone(),
                    Bytes::from(rendered.encoded),
                    rendered.format.content_type(),
                )
                .await?;
            outputs.push(RuleOutput {
                rule_id: rule_id.clone(),
                output_key: key,
                applied: rendered.not_applied.is_none(),
                not_applied_reason: rendered.not_applied.map_or("", |n| n.as_str()).to_string(),
            });
            if preview.is_none() {
                preview = rendered.preview;
            }
        }
        Ok((outputs, preview))
    }
}
