//! Text features by phrase. A phrase's features do not depend on the image, so each distinct phrase goes through
//! the text encoder once for the life of the process (or until evicted).

use std::num::NonZeroUsize;
use std::sync::Arc;

use lru::LruCache;

pub struct TextCache {
    entries: LruCache<String, Arc<[f32]>>,
}

impl TextCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: LruCache::new(NonZeroUsize::new(capacity.max(1)).expect("max(1) is non-zero")),
        }
    }

    /// A lookup that counts: a hit or a miss in segmenter_text_cache_total (once per phrase and batch).
    pub fn get(&mut self, phrase: &str) -> Option<Arc<[f32]>> {
        let hit = self.entries.get(phrase).cloned();
        metrics::counter!("segmenter_text_cache_total", "result" => if hit.is_some() { "hit" } else { "miss" })
            .increment(1);
        hit
    }

    /// The features of a phrase already looked up by `get` (or just inserted), neither counted nor moved up the
    /// eviction order again.
    pub fn peek(&self, phrase: &str) -> Option<Arc<[f32]>> {
        self.entries.peek(phrase).cloned()
    }

    /// The gauge moves by what changed, not to this cache's size: with ENGINE_INSTANCES > 1 each inference thread
    /// has a cache of its own, and the gauge is their sum.
    pub fn insert(&mut self, phrase: String, features: Arc<[f32]>) {
        let before = self.entries.len();
        self.entries.put(phrase, features);
        let grown = self.entries.len() as f64 - before as f64;
        if grown != 0.0 {
            metrics::gauge!("segmenter_text_cache_entries").increment(grown);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let mut cache = TextCache::new(2);
        cache.insert("wall".into(), Arc::from(vec![1.0]));
        cache.insert("floor".into(), Arc::from(vec![2.0]));
        assert!(cache.get("wall").is_some());
        cache.insert("sofa".into(), Arc::from(vec![3.0]));
        assert!(cache.get("floor").is_none());
        assert!(cache.get("wall").is_some() && cache.get("sofa").is_some());
        assert_eq!(cache.entries.len(), 2);
    }
}
