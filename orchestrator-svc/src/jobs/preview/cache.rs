//! What PreviewEdit keeps between calls, bounded in bytes (least recently used first out): the records it read,
//! and the photo, each concept's mask and each refined region at preview size, so a second colour on the same
//! wall only re-runs the rule.

use std::sync::Arc;

use palette_rules::swatch::LinearSwatch;
use palette_rules::{GrayImage, RgbImage};

use crate::byte_lru::{ByteLru, Weigh};
use crate::jobs::edit::record::{MasksRecord, PhotosRecord};

/// One cached value.
#[derive(Clone)]
pub enum Cached {
    /// A job's photos record and when it was read (it is read again after `PHOTOS_RECORD_TTL`).
    Photos(Arc<PhotosRecord>, tokio::time::Instant),
    Masks(Arc<MasksRecord>),
    Photo(PreviewPhoto),
    /// A concept's union mask, or a rule's refined region, at preview size.
    Plane(Arc<GrayImage>),
    /// An uploaded swatch, decoded to linear light, with the SHA-256 of its bytes and when they were read
    /// (`swatch::SWATCH_TTL`).
    Swatch {
        image: Arc<LinearSwatch>,
        sha256: [u8; 32],
        read_at: tokio::time::Instant,
    },
}

/// The photo at preview size, its transparency at that size (when it has some: a cut-out keeps it), its full size,
/// and the SHA-256 of its bytes (checked against the masks record).
#[derive(Clone)]
pub struct PreviewPhoto {
    pub rgb: Arc<RgbImage>,
    pub transparency: Option<Arc<GrayImage>>,
    pub full_size: (u32, u32),
    pub sha256: [u8; 32],
}

impl Weigh for Cached {
    fn weight(&self) -> usize {
        const OVERHEAD: usize = 256;
        OVERHEAD
            + match self {
                Cached::Photos(r, _) => r.concepts.iter().map(|c| c.len() + 24).sum::<usize>(),
                Cached::Masks(r) => r.masks.iter().map(|m| m.key.len() + 96).sum(),
                Cached::Photo(p) => {
                    p.rgb.as_raw().len() + p.transparency.as_ref().map_or(0, |a| a.as_raw().len())
                }
                // Three f32 per texel, and a third more for the mip chain a texture builds on first use.
                Cached::Swatch { image, .. } => image.texels.len() * 16,
                Cached::Plane(p) => p.as_raw().len(),
            }
    }
}

/// PREVIEW_CACHE_MB of the above, keyed by what the value was made from (the keys are built where each value is
/// loaded, in the `preview` module, and a region's in `compose`).
#[derive(Debug)]
pub struct PreviewCache(ByteLru<String, Cached>);

impl PreviewCache {
    pub fn new(budget_bytes: usize) -> Self {
        PreviewCache(ByteLru::new(budget_bytes))
    }

    pub fn get(&self, key: &str) -> Option<Cached> {
        self.0.get(key)
    }

    pub fn insert(&self, key: String, value: Cached) {
        let used = self.0.insert(key, value);
        metrics::gauge!("orchestrator_preview_cache_bytes").set(used as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plane_weighs_its_pixels_and_the_budget_holds() {
        let plane = |w: u32| Cached::Plane(Arc::new(GrayImage::new(w, 1)));
        assert_eq!(plane(1000).weight(), 1000 + 256);
        let cache = PreviewCache::new(2 * (1000 + 256));
        for k in ["a", "b", "c"] {
            cache.insert(k.into(), plane(1000));
        }
        assert!(cache.get("a").is_none() && cache.get("c").is_some());
    }
}
