//! An edit's masks: read back from the source job's masks record and PNGs instead of segmenting (`jobs::edit`).
//! The union of a concept's instances is rebuilt from the stored crops or grids exactly as the job that stored them
//! built it (a crop is the instance's full-frame mask without its zero border; a grid is upsampled over its
//! rectangle as the job did), so an edit renders what a job with the same rules would have rendered.

use std::collections::HashMap;

use futures::{StreamExt, TryStreamExt, stream};
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
    let pngs: Vec<bytes::Bytes> = stream::iter(entries.clone())
        .map(|mask| {
            let store = store.clone();
            async move { fetch_crop(&store, &mask, max_bytes).await }
        })
        .buffered(FETCHES_IN_FLIGHT)
        .try_collect()
        .await?;
    // One blocking task folds them all, in the record's order (max is order-free; errors name the first bad key).
    blocking(move || {
        let mut union = UnionPlane::new(size.0, size.1);
        for (entry, png) in entries.iter().zip(&pngs) {
            paste_max(&mut union, entry, png, size)?;
        }
        Ok(Some(union.into_image()))
    })
    .await
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
    match (entry.grid_width > 0, mask_grid::read_placement(png)) {
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
    let (x, y) = mask_png::read_offset(png).unwrap_or((0, 0));
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
mod tests {
    use super::*;
    use crate::mask_png::{Placement, nonzero_bounds};

    fn entry(width: u32, height: u32) -> StoredMask {
        StoredMask {
            concept: "wall".into(),
            instance: 1,
            key: "masks/u/j/wall/0_1.png".into(),
            score: 0.9,
            x: 0,
            y: 0,
            width: 1,
            height: 1,
            image_width: width,
            image_height: height,
            grid_width: 0,
            grid_height: 0,
        }
    }

    #[test]
    fn crops_fold_back_into_the_union_the_job_built() {
        let (w, h) = (20, 10);
        let mut a = GrayImage::new(w, h);
        let mut b = GrayImage::new(w, h);
        for x in 2..8 {
            a.put_pixel(x, 3, image::Luma([200]));
        }
        for y in 1..9 {
            b.put_pixel(6, y, image::Luma([250]));
            b.put_pixel(15, y, image::Luma([40]));
        }
        let crop = |m: &GrayImage| {
            let at = nonzero_bounds(m).unwrap_or(Placement::EMPTY);
            mask_png::encode_crop(m, at)
        };
        let mut union = UnionPlane::new(w, h);
        paste_max(&mut union, &entry(w, h), &crop(&a), (w, h)).unwrap();
        paste_max(&mut union, &entry(w, h), &crop(&b), (w, h)).unwrap();
        let union = union.into_image();
        let expected = GrayImage::from_fn(w, h, |x, y| {
            image::Luma([a.get_pixel(x, y)[0].max(b.get_pixel(x, y)[0])])
        });
        assert!(union == expected);
    }

    #[test]
    fn every_layout_folds_back_into_the_union_the_job_built() {
        use crate::config::MaskLayout;
        use crate::jobs::item::instance_masks::instance_mask;
        use palette_rules::mask::{ModelMask, PixelBox};
        let (w, h) = (301u32, 203u32);
        let probs: Vec<u8> = (0..12 * 9u32)
            .map(|k| ((k * 37) % 256) as u8 & if k % 5 == 0 { 0 } else { 255 })
            .collect();
        let model = ModelMask {
            width: 12,
            height: 9,
            probs: &probs,
        };
        let boxes = [(10.0, 20.0, 150.0, 120.0), (120.0, 60.0, 290.0, 200.0)];
        for layout in [MaskLayout::Grid, MaskLayout::Crop, MaskLayout::Full] {
            let (mut job_union, mut edit_union) = (UnionPlane::new(w, h), UnionPlane::new(w, h));
            for (x0, y0, x1, y1) in boxes {
                let bbox = PixelBox { x0, y0, x1, y1 };
                let stored = instance_mask(&model, bbox, (w, h), Some(&mut job_union), layout);
                let entry = StoredMask {
                    grid_width: stored.grid.0,
                    grid_height: stored.grid.1,
                    ..entry(w, h)
                };
                let png = image::load_from_memory(&stored.png).unwrap();
                let size = match layout {
                    MaskLayout::Grid => (12, 9),
                    MaskLayout::Crop => (stored.placement.width, stored.placement.height),
                    MaskLayout::Full => (w, h),
                };
                assert_eq!((png.width(), png.height()), size, "{layout:?}");
                paste_max(&mut edit_union, &entry, &stored.png, (w, h)).unwrap();
            }
            assert!(
                job_union.into_image() == edit_union.into_image(),
                "{layout:?}"
            );
        }
    }

    /// A record and a PNG of different runs (the job id run again with another MASK_LAYOUT): a grid PNG under a
    /// crop entry was pasted raw at (0, 0), the wrong region painted; now the item fails naming the mask.
    #[test]
    fn a_png_of_another_layout_than_its_record_is_refused() {
        use crate::config::MaskLayout;
        use crate::jobs::item::instance_masks::instance_mask;
        use palette_rules::mask::{ModelMask, PixelBox};
        let (w, h) = (301u32, 203u32);
        let probs = vec![255u8; 12 * 9];
        let model = ModelMask {
            width: 12,
            height: 9,
            probs: &probs,
        };
        let bbox = PixelBox {
            x0: 10.0,
            y0: 20.0,
            x1: 150.0,
            y1: 120.0,
        };
        let grid = instance_mask(&model, bbox, (w, h), None, MaskLayout::Grid);
        let crop = instance_mask(&model, bbox, (w, h), None, MaskLayout::Crop);
        let grid_entry = StoredMask {
            grid_width: grid.grid.0,
            grid_height: grid.grid.1,
            ..entry(w, h)
        };
        let mut union = UnionPlane::new(w, h);
        for (entry, png, says) in [
            (entry(w, h), &grid.png, "another run"),
            (grid_entry, &crop.png, "placement chunk"),
        ] {
            let err = paste_max(&mut union, &entry, png, (w, h)).unwrap_err();
            assert!(err.to_string().contains(says), "{err}");
        }
    }

    #[test]
    fn a_record_naming_another_jobs_masks_is_not_read() {
        let record = |key: &str| MasksRecord {
            masks: vec![StoredMask {
                key: key.into(),
                ..entry(20, 10)
            }],
            input_sha256: String::new(),
            concepts: Vec::new(),
        };
        assert!(foreign_mask(&record("masks/u/j/wall/0_1.png"), "u", "j").is_none());
        for foreign in [
            "masks/other-user/j/wall/0_1.png",
            "masks/u/j2/wall/0_1.png",
            "outputs/u/j/rule1/0.jpg",
            "masks/u/j/../../v/k/wall/0_1.png",
        ] {
            assert!(
                foreign_mask(&record(foreign), "u", "j").is_some(),
                "{foreign}"
            );
        }
    }

    #[test]
    fn a_mask_larger_than_the_photo_is_refused_before_it_is_decoded() {
        let wide = GrayImage::from_pixel(64, 8, image::Luma([255]));
        let png = mask_png::encode_crop(&wide, nonzero_bounds(&wide).unwrap());
        let mut union = UnionPlane::new(20, 10);
        let err = paste_max(&mut union, &entry(20, 10), &png, (20, 10)).unwrap_err();
        assert_eq!(err.code(), "mask_missing");
        assert!(
            crate::error::report(&err).contains("at most 20x10"),
            "{err}"
        );
    }

    #[test]
    fn a_mask_stored_for_another_photo_size_is_refused_naming_its_key() {
        let png = mask_png::encode_crop(&GrayImage::new(4, 4), Placement::EMPTY);
        let mut union = UnionPlane::new(20, 10);
        let err = paste_max(&mut union, &entry(40, 30), &png, (20, 10)).unwrap_err();
        assert_eq!(err.code(), "mask_missing");
        assert!(err.to_string().contains("masks/u/j/wall/0_1.png"), "{err}");
    }
}
