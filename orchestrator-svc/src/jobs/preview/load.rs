//! What a preview works on, loaded from the cache or from storage: the photo at preview size, the rule concepts'
//! masks, the rules' swatches.
//!
//! Masks and regions are cached under the photo's SHA-256 as well as its job's run: a cached one is only ever applied
//! to the photo it was made for. A photo changed under the cache (uploaded over `inputs/`, or the source job of an
//! edit run again) is read again once its masks record names another photo, or once it leaves the cache; then its
//! masks are read again too (before, a cached mask could be painted on the new photo without a word).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use palette_rules::GrayImage;
use sha2::{Digest, Sha256};

use super::cache::{Cached, PreviewPhoto};
use super::{Loaded, PhotoRef, PreviewService, render};
use crate::jobs::edit::record;
use crate::jobs::item::stored_masks::{read_record, union_of, usable_for};
use crate::jobs::item::{ItemError, blocking, imaging};
use crate::jobs::stage::Stage;
use crate::jobs::validate::PlannedRule;
use crate::keys;

impl PreviewService {
    /// The photo at preview size, the masks of `concepts`, the rules' swatches: from the cache, else from storage.
    pub(super) async fn load(
        &self,
        at: &PhotoRef<'_>,
        concepts: &[&str],
        rules: &[PlannedRule],
    ) -> Result<Loaded, ItemError> {
        let cached = match self.cache.get(&at.photo_key()) {
            Some(Cached::Photo(photo)) => Some(photo),
            _ => None,
        };
        let from_cache = cached.is_some();
        match self.load_with(at, concepts, rules, cached).await {
            // The masks record names another photo than the cached one: the photo changed under the cache (uploaded
            // over, or an edit's source job run again). Read again, once; a record of yet another photo is refused.
            Err(ItemError::EditSourceChanged { .. }) if from_cache => {
                tracing::info!(
                    "cached preview photo is not the one its masks record names; read again"
                );
                self.load_with(at, concepts, rules, None).await
            }
            loaded => loaded,
        }
    }

    /// `load` with `photo` as cached (None: read it).
    async fn load_with(
        &self,
        at: &PhotoRef<'_>,
        concepts: &[&str],
        rules: &[PlannedRule],
        photo: Option<PreviewPhoto>,
    ) -> Result<Loaded, ItemError> {
        // A photo to read, and the masks record with it: two storage round trips in the time of one (its failure
        // matters only if a mask is not cached).
        let (photo, record) = match photo {
            Some(photo) => (photo, None),
            None => {
                let (photo, record) = tokio::join!(self.photo(at), self.masks_record(at));
                (photo?, Some(record))
            }
        };
        // Keyed by the photo's bytes: a cached mask or region is only ever applied to the photo it was made for.
        let planes_prefix = at.planes_prefix(&photo.sha256);
        let plane_key = |concept: &str| format!("{planes_prefix}|c|{concept}");
        let cached: BTreeMap<&str, Arc<GrayImage>> = concepts
            .iter()
            .filter_map(|&c| match self.cache.get(&plane_key(c)) {
                Some(Cached::Plane(p)) => Some((c, p)),
                _ => None,
            })
            .collect();
        let needed: Vec<&str> = concepts
            .iter()
            .copied()
            .filter(|c| !cached.contains_key(c))
            .collect();
        let full_size = photo.full_size;
        let record = if needed.is_empty() {
            None
        } else {
            let got = match record {
                Some(read) => read?,
                None => self.masks_record(at).await?,
            };
            Some(self.checked_record(at, got, &photo.sha256, &needed).await?)
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
            planes_prefix,
        })
    }

    /// The photo read from storage (and cached, in place of the one cached before).
    async fn photo(&self, at: &PhotoRef<'_>) -> Result<PreviewPhoto, ItemError> {
        let key = at.photo_key();
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
