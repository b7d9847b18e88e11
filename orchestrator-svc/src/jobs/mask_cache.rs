//! Segment responses kept for reuse: a job on input bytes already segmented by the same model for the same
//! concepts skips the segmenter. Keyed by SHA-256 of the bytes, model id and the concept list; bounded (LRU).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use palette_proto::segmenter::v1::SegmentResponse;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MaskCacheKey {
    pub input_sha256: [u8; 32],
    pub model_id: String,
    /// In request order: the response lists concepts in that order.
    pub concepts: Vec<String>,
}

#[derive(Debug)]
pub struct MaskCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    tick: u64,
    entries: HashMap<MaskCacheKey, (u64, Arc<SegmentResponse>)>,
}

impl MaskCache {
    pub fn new(capacity: usize) -> Self {
        MaskCache {
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn get(&self, key: &MaskCacheKey) -> Option<Arc<SegmentResponse>> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.tick += 1;
        let tick = inner.tick;
        let entry = inner.entries.get_mut(key)?;
        entry.0 = tick;
        Some(entry.1.clone())
    }

    pub fn insert(&self, key: MaskCacheKey, response: Arc<SegmentResponse>) {
        if self.capacity == 0 {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.tick += 1;
        let tick = inner.tick;
        // A linear scan for the least recently used: capacity is small (tens of entries).
        if inner.entries.len() >= self.capacity && !inner.entries.contains_key(&key) {
            let oldest = inner
                .entries
                .iter()
                .min_by_key(|(_, (t, _))| *t)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                inner.entries.remove(&oldest);
            }
        }
        inner.entries.insert(key, (tick, response));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> MaskCacheKey {
        MaskCacheKey {
            input_sha256: [n; 32],
            model_id: "m".into(),
            concepts: vec!["wall".into()],
        }
    }

    #[test]
    fn evicts_the_least_recently_used() {
        let cache = MaskCache::new(2);
        cache.insert(key(1), Arc::default());
        cache.insert(key(2), Arc::default());
        assert!(cache.get(&key(1)).is_some());
        cache.insert(key(3), Arc::default());
        assert!(cache.get(&key(1)).is_some());
        assert!(cache.get(&key(2)).is_none());
        assert!(cache.get(&key(3)).is_some());
    }
}
