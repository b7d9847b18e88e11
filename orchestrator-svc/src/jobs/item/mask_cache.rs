//! Segmentation results kept for reuse, per concept: a job on input bytes already segmented by the same model skips
//! the segmenter for every concept seen before, and asks only for the new ones. Keyed by SHA-256 of the bytes, the
//! model id and the concept phrase; bounded in bytes (least recently used entries go first).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use palette_proto::segmenter::v1::ConceptResult;

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

impl ConceptMasks {
    /// Roughly what the entry holds in memory.
    fn cost(&self) -> usize {
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

#[derive(Debug)]
pub struct MaskCache {
    budget_bytes: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    tick: u64,
    used_bytes: usize,
    entries: HashMap<MaskCacheKey, (u64, Arc<ConceptMasks>)>,
}

impl MaskCache {
    pub fn new(budget_bytes: usize) -> Self {
        MaskCache {
            budget_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn get(&self, key: &MaskCacheKey) -> Option<Arc<ConceptMasks>> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.tick += 1;
        let tick = inner.tick;
        let entry = inner.entries.get_mut(key)?;
        entry.0 = tick;
        Some(entry.1.clone())
    }

    pub fn insert(&self, key: MaskCacheKey, masks: Arc<ConceptMasks>) {
        let cost = masks.cost();
        if cost > self.budget_bytes {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, old)) = inner.entries.remove(&key) {
            inner.used_bytes -= old.cost();
        }
        // A linear scan for the least recently used: entries are few thousand at most.
        while inner.used_bytes + cost > self.budget_bytes {
            let oldest = inner
                .entries
                .iter()
                .min_by_key(|(_, (t, _))| *t)
                .map(|(k, _)| k.clone());
            let Some(oldest) = oldest else { break };
            if let Some((_, old)) = inner.entries.remove(&oldest) {
                inner.used_bytes -= old.cost();
            }
        }
        inner.tick += 1;
        let tick = inner.tick;
        inner.used_bytes += cost;
        inner.entries.insert(key, (tick, masks));
    }
}

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
        let entry = masks(1000).cost();
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
