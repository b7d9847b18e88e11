//! What PreviewEdit keeps between calls, bounded in bytes (least recently used first out): the records it read,
//! and the photo, each concept's mask and each refined region at preview size, so a second colour on the same
//! wall only re-runs the rule.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use palette_rules::{GrayImage, RgbImage};

use crate::jobs::edit::record::{MasksRecord, PhotosRecord};

/// One cached value.
#[derive(Clone)]
pub enum Cached {
    Photos(Arc<PhotosRecord>),
    Masks(Arc<MasksRecord>),
    /// The photo at preview size, and its full size.
    Photo(Arc<RgbImage>, (u32, u32)),
    /// A concept's union mask, or a rule's refined region, at preview size.
    Plane(Arc<GrayImage>),
    Swatch(Arc<RgbImage>),
}

impl Cached {
    /// Roughly the bytes the value holds.
    fn cost(&self) -> usize {
        const OVERHEAD: usize = 256;
        OVERHEAD
            + match self {
                Cached::Photos(r) => r.concepts.iter().map(|c| c.len() + 24).sum::<usize>(),
                Cached::Masks(r) => r.masks.iter().map(|m| m.key.len() + 96).sum(),
                Cached::Photo(p, _) | Cached::Swatch(p) => p.as_raw().len(),
                Cached::Plane(p) => p.as_raw().len(),
            }
    }
}

#[derive(Debug)]
pub struct PreviewCache {
    budget_bytes: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    tick: u64,
    used_bytes: usize,
    entries: HashMap<String, (u64, Cached)>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("entries", &self.entries.len())
            .field("used_bytes", &self.used_bytes)
            .finish()
    }
}

impl PreviewCache {
    pub fn new(budget_bytes: usize) -> Self {
        PreviewCache {
            budget_bytes,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, key: &str) -> Option<Cached> {
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        let entry = inner.entries.get_mut(key)?;
        entry.0 = tick;
        Some(entry.1.clone())
    }

    /// Keeps `value` unless it alone exceeds the budget; older entries go to make room.
    pub fn insert(&self, key: String, value: Cached) {
        let cost = value.cost();
        if cost > self.budget_bytes {
            return;
        }
        let mut inner = self.lock();
        if let Some((_, old)) = inner.entries.remove(&key) {
            inner.used_bytes -= old.cost();
        }
        // A linear scan for the least recently used: a preview cache holds hundreds of entries, not millions.
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
        inner.entries.insert(key, (tick, value));
        metrics::gauge!("orchestrator_preview_cache_bytes").set(inner.used_bytes as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plane(bytes: u32) -> Cached {
        Cached::Plane(Arc::new(GrayImage::new(bytes, 1)))
    }

    #[test]
    fn least_recently_used_goes_first_and_the_budget_holds() {
        let cache = PreviewCache::new(3 * (1000 + 256));
        for k in ["a", "b", "c"] {
            cache.insert(k.into(), plane(1000));
        }
        assert!(cache.get("a").is_some());
        cache.insert("d".into(), plane(1000));
        assert!(cache.get("b").is_none(), "b was the least recently used");
        assert!(cache.get("a").is_some() && cache.get("c").is_some() && cache.get("d").is_some());
        cache.insert("huge".into(), plane(10_000));
        assert!(
            cache.get("huge").is_none(),
            "larger than the whole budget: not kept"
        );
        assert!(cache.lock().used_bytes <= 3 * (1000 + 256));
    }
}
