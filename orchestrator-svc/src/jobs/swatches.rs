//! A job's uploaded texture swatches, shared by its items while they use them: decoded and converted to linear light
//! (with its mip chain, built on first use) once for the items in flight together, instead of downloaded, decoded and
//! converted again by every item, for every rule (at 1 MP a 1024² swatch cost about as much CPU as the rest of the
//! item).
//!
//! Held weakly: a swatch lives as long as an item of the job holds it (items take theirs before segmenting and drop
//! them when their rules are applied), so nothing is kept between a job's bursts of items nor after it, and no swatch
//! is reused across jobs (the user may upload another under the same key). Items that start together before the
//! first load ends each load it, as before.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};

use palette_rules::swatch::LinearSwatch;

#[derive(Debug, Default)]
pub struct JobSwatches(Mutex<HashMap<String, Weak<LinearSwatch>>>);

impl JobSwatches {
    /// The swatch under `key` that an item of the job still holds, else `load`'s (then shared).
    pub async fn get_or_load<E>(
        &self,
        key: &str,
        load: impl Future<Output = Result<Arc<LinearSwatch>, E>>,
    ) -> Result<Arc<LinearSwatch>, E> {
        if let Some(held) = self.lock().get(key).and_then(Weak::upgrade) {
            return Ok(held);
        }
        let loaded = load.await?;
        let mut held = self.lock();
        // Entries of swatches no item holds any more go with this insert: the map stays as small as the rules.
        held.retain(|_, swatch| swatch.strong_count() > 0);
        held.insert(key.to_string(), Arc::downgrade(&loaded));
        Ok(loaded)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Weak<LinearSwatch>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn swatch() -> Arc<LinearSwatch> {
        Arc::new(LinearSwatch::from_rgb(&palette_rules::RgbImage::new(2, 2)))
    }

    #[tokio::test]
    async fn a_swatch_is_loaded_once_while_an_item_holds_it() {
        let swatches = JobSwatches::default();
        let loads = AtomicUsize::new(0);
        let load = || async {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ()>(swatch())
        };
        let first = swatches.get_or_load("s/a.jpg", load()).await.unwrap();
        let second = swatches.get_or_load("s/a.jpg", load()).await.unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        let other = swatches.get_or_load("s/b.jpg", load()).await.unwrap();
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(loads.load(Ordering::SeqCst), 2);

        // Once no item holds it, it is gone: the next item loads it again.
        drop((first, second));
        let again = swatches.get_or_load("s/a.jpg", load()).await.unwrap();
        assert_eq!(loads.load(Ordering::SeqCst), 3);
        drop((again, other));
        assert!(swatches.lock().values().all(|w| w.strong_count() == 0));
    }

    #[tokio::test]
    async fn a_failed_load_is_not_kept() {
        let swatches = JobSwatches::default();
        let failed = swatches
            .get_or_load("s/a.jpg", async {
                Err::<Arc<LinearSwatch>, _>("unavailable")
            })
            .await;
        assert_eq!(failed.err(), Some("unavailable"));
        let loaded = swatches
            .get_or_load("s/a.jpg", async { Ok::<_, &str>(swatch()) })
            .await
            .unwrap();
        assert_eq!(loaded.width, 2);
    }
}
