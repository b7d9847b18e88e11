//! A map bounded by the bytes its values hold, least recently used out first: the segmenter results kept for reuse
//! (`jobs::item::mask_cache`) and PreviewEdit's photos, masks and regions (`jobs::preview::cache`).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard};

/// Roughly the bytes a cached value holds (its pixels or tensors, plus a fixed overhead).
pub trait Weigh {
    fn weight(&self) -> usize;
}

pub struct ByteLru<K, V> {
    budget_bytes: usize,
    inner: Mutex<Inner<K, V>>,
}

struct Inner<K, V> {
    tick: u64,
    used_bytes: usize,
    /// Each value with the tick of its last use.
    entries: HashMap<K, (u64, V)>,
}

impl<K, V> std::fmt::Debug for ByteLru<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("ByteLru")
            .field("budget_bytes", &self.budget_bytes)
            .field("used_bytes", &inner.used_bytes)
            .field("entries", &inner.entries.len())
            .finish()
    }
}

impl<K, V> ByteLru<K, V> {
    pub fn new(budget_bytes: usize) -> Self {
        ByteLru {
            budget_bytes,
            inner: Mutex::new(Inner {
                tick: 0,
                used_bytes: 0,
                entries: HashMap::new(),
            }),
        }
    }

    /// A panic elsewhere while the lock was held leaves the map consistent (every update is one statement), so a
    /// poisoned lock is used as is.
    fn lock(&self) -> MutexGuard<'_, Inner<K, V>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn used_bytes(&self) -> usize {
        self.lock().used_bytes
    }
}

impl<K: Eq + Hash + Clone, V: Clone + Weigh> ByteLru<K, V> {
    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        let entry = inner.entries.get_mut(key)?;
        entry.0 = tick;
        Some(entry.1.clone())
    }

    /// Keeps `value` unless it alone exceeds the budget; the least recently used entries go to make room. Returns
    /// the bytes in use afterwards.
    pub fn insert(&self, key: K, value: V) -> usize {
        let weight = value.weight();
        let mut inner = self.lock();
        if weight > self.budget_bytes {
            return inner.used_bytes;
        }
        if let Some((_, old)) = inner.entries.remove(&key) {
            inner.used_bytes -= old.weight();
        }
        // A linear scan for the least recently used: these caches hold hundreds to a few thousand entries.
        while inner.used_bytes + weight > self.budget_bytes {
            let oldest = inner
                .entries
                .iter()
                .min_by_key(|(_, (t, _))| *t)
                .map(|(k, _)| k.clone());
            let Some(oldest) = oldest else { break };
            if let Some((_, old)) = inner.entries.remove(&oldest) {
                inner.used_bytes -= old.weight();
            }
        }
        inner.tick += 1;
        let tick = inner.tick;
        inner.used_bytes += weight;
        inner.entries.insert(key, (tick, value));
        inner.used_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone)]
    struct Bytes(usize);

    impl Weigh for Bytes {
        fn weight(&self) -> usize {
            self.0
        }
    }

    #[test]
    fn the_least_recently_used_goes_first_and_the_budget_holds() {
        let cache = ByteLru::<String, Bytes>::new(3000);
        for k in ["a", "b", "c"] {
            cache.insert(k.into(), Bytes(1000));
        }
        assert!(cache.get("a").is_some());
        cache.insert("d".into(), Bytes(1000));
        assert!(cache.get("b").is_none(), "b was the least recently used");
        assert!(cache.get("a").is_some() && cache.get("c").is_some() && cache.get("d").is_some());
        assert_eq!(cache.used_bytes(), 3000);
    }

    #[test]
    fn a_value_over_the_whole_budget_is_not_kept() {
        let cache = ByteLru::<String, Bytes>::new(3000);
        cache.insert("a".into(), Bytes(1000));
        cache.insert("huge".into(), Bytes(10_000));
        assert!(cache.get("huge").is_none());
        assert!(cache.get("a").is_some(), "nothing was evicted for it");
    }

    #[test]
    fn replacing_a_key_counts_its_bytes_once() {
        let cache = ByteLru::<String, Bytes>::new(3000);
        cache.insert("a".into(), Bytes(1000));
        cache.insert("a".into(), Bytes(1500));
        assert_eq!(cache.used_bytes(), 1500);
    }
}
