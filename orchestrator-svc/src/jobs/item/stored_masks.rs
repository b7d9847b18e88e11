//! An edit's masks: read back from the source job's masks record and PNGs instead of segmenting (`jobs::edit`).
//! The union of a concept's instances is rebuilt from the stored crops or grids exactly as the job that stored them
//! built it (a crop is the instance's full-frame mask without its zero border; a grid is upsampled over its
//! rectangle as the job did), so an edit renders what a job with the same rules would have rendered.

use std::collections::HashMap;

use futures::{StreamExt, stream};
use std::sync::Arc;

use palette_proto::orchestrator::v1::MaskKey;
use palette_rules::{GrayImage, RgbImage};

use super::error::ItemError;
use super::union_plane::UnionPlane;
use super::{ItemRunner, blocking};
use crate::jobs::edit::record::{self, MasksRecord, RecordError, StoredMask};
use crate::jobs::validate::JobPlan;
use crate::mask_png::{self, grid as mask_grid};
use crate::storage::{SharedStore, StorageError};

impl ItemRunner {
    /// The source's mask entries for photo `idx` (reported on the edit's item as they are), and the full-resolution
    /// union of every concept a rule needs.
    pub(super) async fn stored_masks(
        &self,
        plan: &JobPlan,
        idx: u32,
        photo: &Arc<RgbImage>,
        photo_sha256: &[u8; 32],
    ) -> Result<(Vec<MaskKey>, HashMap<String, GrayImage>), ItemError> {
        let stored = read_record(&self.store, &plan.user_id, plan.photos_job_id(), idx).await?;
        let concepts = plan.concepts_used_by_rules();
        usable_for(
            &stored,
            photo_sha256,
            &concepts,
            &plan.user_id,
            plan.photos_job_id(),
            idx,
        )?;
        let mut unions = HashMap::new();
        for concept in concepts {
            let union = union_of(
                &self.store,
                &stored,
                concept,
                photo.dimensions(),
                self.limits.max_bytes,
            )
            .await?;
            if let Some(union) = union {
                unions.insert(concept.to_string(), union);
            }
        }
        Ok((stored.masks.iter().map(MaskKey::from).collect(), unions))
    }
}

/// The masks record of photo `idx` of the job whose masks they are.
pub(in crate::jobs) async fn read_record(
    store: &SharedStore,
    user_id: &str,
    photos_job_id: &str,
    idx: u32,
) -> Result<MasksRecord, ItemError> {
    let stored = record::read_masks(store, user_id, photos_job_id, idx)
        .await
        .map_err(|e| match e {
            RecordError::Missing(key) => ItemError::EditSourceMissing { key },
            RecordError::Unreadable { key, reason } => ItemError::StoredMask { key, reason },
            RecordError::Storage(e) => ItemError::Storage(e),
        })?;
    match foreign_mask(&stored, user_id, photos_job_id) {
        None => Ok(stored),
        Some(mask) => Err(ItemError::StoredMask {
            key: mask.key.clone(),
            reason: format!(
                "the masks record of photo {idx} names a mask outside masks/{user_id}/{photos_job_id}/: not read"
            ),
        }),
    }
}

/// A mask the record names outside the job's own masks folder. The job wrote only its own keys; a record rewritten
/// in the bucket could otherwise make an edit or a preview read another user's masks.
fn foreign_mask<'a>(
    stored: &'a MasksRecord,
    user_id: &str,
    photos_job_id: &str,
) -> Option<&'a StoredMask> {
    let folder = format!("masks/{user_id}/{photos_job_id}/");
    stored
        .masks
        .iter()
        .find(|m| !m.key.starts_with(&folder) || m.key.contains(".."))
}

/// The stored masks were computed from this photo (`MasksRecord::input_sha256`): masks of another photo of the same
/// size would otherwise pass every other check and paint the wrong wall. And by a run that segmented each of
/// `concepts` (`MasksRecord::concepts`): an earlier run's record has no entry for a concept only the latest run
/// asks for, which would read as "no instance" and leave the photo unedited.
pub(in crate::jobs) fn usable_for(
    stored: &MasksRecord,
    photo_sha256: &[u8; 32],
    concepts: &[&str],
    user_id: &str,
    photos_job_id: &str,
    idx: u32,
) -> Result<(), ItemError> {
    let key = || crate::keys::input(user_id, photos_job_id, idx);
    if !stored.is_of(photo_sha256) {
        return Err(ItemError::EditSourceChanged { key: key() });
    }
    match stored.unsegmented(concepts) {
        None => Ok(()),
        Some(concept) => Err(ItemError::EditSourceStale {
            key: key(),
            concept: concept.to_string(),
        }),
    }
}

/// Stored crops fetched at once: object storage answers each GET in tens of milliseconds (R2), so a concept's
/// instances are read concurrently rather than one after another.
const FETCHES_IN_FLIGHT: usize = 8;

/// The full-resolution union (max) of `concept`'s stored instances in a photo of `size`; None when the source found
/// no instance of it.
pub(in crate::jobs) async fn union_of(
    store: &SharedStore,
    stored: &MasksRecord,
    concept: &str,
    size: (u32, u32),
    max_bytes: u64,
) -> Result<Option<GrayImage>, ItemError> {
    let entries: Vec<StoredMask> = stored
        .masks
        .iter()
        .filter(|m| m.concept == concept)
        .cloned()
        .collect();
    if entries.is_empty() {
        return Ok(None);
    }
    // Owned futures (a cloned store handle and entry each): borrowing ones make the caller's future not `Send`.
    // Each PNG is folded as it arrives, in the record's order (max is order-free; errors name the first bad key):
    // at most FETCHES_IN_FLIGHT of them are held at once, not every instance of the concept (20 full-frame PNGs of
    // a 12 MP photo, outside the pixel budget, per item and per preview).
    // Each fetch is a task of its own, so the fetches in flight go on while a PNG is folded.
    let mut fetched = stream::iter(entries)
        .map(|mask| {
            let store = store.clone();
            tokio::spawn(async move {
                let png = fetch_crop(&store, &mask, max_bytes).await?;
                Ok::<_, ItemError>((mask, png))
            })
        })
        .buffered(FETCHES_IN_FLIGHT);
    let mut union = UnionPlane::new(size.0, size.1);
    while let Some(next) = fetched.next().await {
        let (entry, png) = next.map_err(ItemError::Worker)??;
        union = blocking(move || {
            let mut union = union;
            paste_max(&mut union, &entry, &png, size)?;
            Ok(union)
        })
        .await?;
    }
    Ok(Some(union.into_image()))
}

async fn fetch_crop(
    store: &SharedStore,
    mask: &StoredMask,
    max_bytes: u64,
) -> Result<bytes::Bytes, ItemError> {
    store
        .get_at_most(&mask.key, max_bytes)
        .await
        .map_err(|e| match e {
            StorageError::NotFound(_) => ItemError::StoredMask {
                key: mask.key.clone(),
                reason: "not in storage (deleted?); the photo cannot be edited without it".into(),
            },
            e @ (StorageError::TooLarge { .. } | StorageError::InvalidKey(_)) => {
                ItemError::StoredMask {
                    key: mask.key.clone(),
                    reason: e.to_string(),
                }
            }
            e => ItemError::Storage(e),
        })
}

/// Folds one stored crop into the concept's union (max), at its placement in a `width` x `height` photo.
fn paste_max(
    union: &mut UnionPlane,
    entry: &StoredMask,
    png: &[u8],
    (width, height): (u32, u32),
) -> Result<(), ItemError> {
    let bad = |reason: String| ItemError::StoredMask {
        key: entry.key.clone(),
        reason,
    };
    // Masks stored before crops (width 0 in the record) are full-frame, placed at (0, 0).
    if entry.width > 0 && (entry.image_width, entry.image_height) != (width, height) {
        return Err(bad(format!(
            "stored for a {}x{} photo; the photo is {width}x{height} now (replaced?)",
            entry.image_width, entry.image_height
        )));
    }
    // The PNG says what it is; the record only agrees with it while both are of one run. A PNG stored again by a
    // later run of the job id (another MASK_LAYOUT) pasted as the record's layout painted the wrong region.
    let other_run = || {
        bad("the mask PNG was stored by another run of the job than its record (stored again since?); submit the \
             job again to segment the photo"
            .into())
    };
    // Nor may a PNG of the record's layout be another run's (the job id run again on the same photo, its record not
    // yet rewritten, or its item failed after storing some masks; a model updated since): its own placement must
    // be the record's, or the union mixed two runs' masks.
    let placed = (entry.x, entry.y, entry.width, entry.height);
    match (entry.grid_width > 0, mask_grid::read_placement(png)) {
        (true, Some(at))
            if (at.x, at.y, at.width, at.height) != placed
                || (at.image_width, at.image_height) != (width, height) =>
        {
            return Err(other_run());
        }
        (true, Some(at)) => {
            // A model grid: upsampled into the union over its rectangle, as the job that stored it did.
            let grid = mask_grid::decode(png, &at, width, height).map_err(bad)?;
            mask_grid::upsample_rows(&grid, &at, |y, x, row| union.fold_row(y, x, row));
            return Ok(());
        }
        (true, None) => return Err(bad("a grid mask without its placement chunk".into())),
        (false, Some(_)) => return Err(other_run()),
        (false, None) => {}
    }
    // At most the photo's size: a crop is never larger (checked before decoding, see `mask_png::bounded`).
    let crop = mask_png::bounded::gray_within(png, width, height).map_err(bad)?;
    let offset = mask_png::read_offset(png);
    // A crop says where it sits (a full-frame PNG does not: nothing to compare); records from before crops have no
    // placement (width 0).
    if let Some((x, y)) = offset
        && entry.width > 0
        && (i64::from(x), i64::from(y), crop.width(), crop.height())
            != (
                i64::from(entry.x),
                i64::from(entry.y),
                entry.width,
                entry.height,
            )
    {
        return Err(other_run());
    }
    let (x, y) = offset.unwrap_or((0, 0));
    let fits = x >= 0
        && y >= 0
        && x as u64 + u64::from(crop.width()) <= u64::from(width)
        && y as u64 + u64::from(crop.height()) <= u64::from(height);
    if !fits {
        return Err(bad(format!(
            "a {}x{} mask at ({x}, {y}) does not fit the {width}x{height} photo",
            crop.width(),
            crop.height()
        )));
    }
    let cw = crop.width() as usize;
    for (row, src) in crop.as_raw().chunks_exact(cw.max(1)).enumerate() {
        union.fold_row(y as u32 + row as u32, x as u32, src);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
