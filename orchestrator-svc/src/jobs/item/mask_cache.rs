//! Segmentation results kept for reuse, per concept: a job on input bytes already segmented by the same model skips
//! the segmenter for every concept seen before, and asks only for the new ones. Keyed by SHA-256 of the bytes, the
//! model id and the concept phrase; bounded in bytes (least recently used entries go first).

use std::sync::Arc;

use palette_proto::segmenter::v1::ConceptResult;

use crate::byte_lru::{ByteLru, Weigh};

/// One concept's instances on one image, at model resolution, as the segmenter returned them.
#[derive(Debug)]
pub struct ConceptMasks {
    pub result: ConceptResult,
    /// The image size the segmenter saw (after EXIF orientation): boxes are in these pixels.
    pub image_width: u32,
    pub image_height: u32,
    pub mask_width: u32,
    pub mask_height: u32,
}

impl Weigh for Arc<ConceptMasks> {
    fn weight(&self) -> usize {
        let masks: usize = self
            .result
            .instances
            .iter()
            .map(|i| i.mask.as_ref().map_or(0, |m| m.data.len()))
            .sum();
        masks + 256 * (self.result.instances.len() + 1)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MaskCacheKey {
    pub input_sha256: [u8; 32],
    pub model_id: String,
    pub concept: String,
}

/// MASK_CACHE_MB of segmentation results.
pub type MaskCache = ByteLru<MaskCacheKey, Arc<ConceptMasks>>;

#[cfg(test)]
mod tests {
    use super::*;
    use palette_proto::segmenter::v1::{Instance, Tensor};

    fn key(n: u8) -> MaskCacheKey {
        MaskCacheKey {
            input_sha256: [n; 32],
            model_id: "m".into(),
            concept: "wall".into(),
        }
    }

    fn masks(bytes: usize) -> Arc<ConceptMasks> {
        let instance = Instance {
            mask: Some(Tensor {
                shape: vec![],
                dtype: 1,
                data: vec![0; bytes],
            }),
            ..Default::default()
        };
        Arc::new(ConceptMasks {
            result: ConceptResult {
                instances: vec![instance],
                ..Default::default()
            },
            image_width: 1,
            image_height: 1,
            mask_width: 1,
            mask_height: 1,
        })
    }

    #[test]
    fn evicts_the_least_recently_used_within_the_byte_budget() {
        let entry = masks(1000).weight();
        let cache = MaskCache::new(entry * 2);
        cache.insert(key(1), masks(1000));
        cache.insert(key(2), masks(1000));
        assert!(cache.get(&key(1)).is_some());
        cache.insert(key(3), masks(1000));
        assert!(cache.get(&key(1)).is_some());
        assert!(cache.get(&key(2)).is_none());
        assert!(cache.get(&key(3)).is_some());
    }

    #[test]
    fn an_entry_over_budget_is_not_kept() {
        let cache = MaskCache::new(100);
        cache.insert(key(1), masks(1000));
        assert!(cache.get(&key(1)).is_none());
    }
}
