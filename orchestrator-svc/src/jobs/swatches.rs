//! A job's uploaded texture swatches, shared by its items while they use them: decoded and converted to linear light
//! (with its mip chain, built on first use) once for the items applying a rule together, instead of downloaded,
//! decoded and converted again by every item, for every rule (at 1 MP a 1024² swatch cost about as much CPU as the
//! rest of the item).
//!
//! Held weakly: a swatch lives while an item of the job holds it (items take one per rule while applying it, as
//! before, so an item holds at most one and memory stays as it was), nothing is kept between a job's bursts of items
//! nor after it, and no swatch is reused across jobs (the user may upload another under the same key). Loads are
//! single-flight: items asking while one loads wait for it. A failed load is not kept: the next item tries again.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};

use palette_rules::swatch::LinearSwatch;
use tokio::sync::OnceCell;

type Cell = OnceCell<Arc<LinearSwatch>>;

#[derive(Debug, Default)]
pub struct JobSwatches(Mutex<HashMap<String, Weak<Cell>>>);

/// A swatch an item holds: keeps it (and its entry) alive for the job's other items.
pub struct HeldSwatch(Arc<Cell>);

impl std::ops::Deref for HeldSwatch {
    type Target = LinearSwatch;

    fn deref(&self) -> &LinearSwatch {
        self.0.get().expect("a held swatch is loaded")
    }
}

impl JobSwatches {
    /// The swatch under `key` that an item of the job holds or is loading, else `load`'s (then shared).
    pub async fn get_or_load<E>(
        &self,
        key: &str,
        load: impl Future<Output = Result<Arc<LinearSwatch>, E>>,
    ) -> Result<HeldSwatch, E> {
        let cell = {
            let mut cells = self.lock();
            match cells.get(key).and_then(Weak::upgrade) {
                Some(cell) => cell,
                None => {
                    // Entries of swatches no item holds any more go with this insert: the map stays as small as
                    // the rules.
                    cells.retain(|_, cell| cell.strong_count() > 0);
                    let cell = Arc::new(Cell::new());
                    cells.insert(key.to_string(), Arc::downgrade(&cell));
                    cell
                }
            }
        };
        cell.get_or_try_init(|| load).await?;
        Ok(HeldSwatch(cell))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Weak<Cell>>> {
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
        assert!(std::ptr::eq(&*first, &*second));
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        let other = swatches.get_or_load("s/b.jpg", load()).await.unwrap();
        assert!(!std::ptr::eq(&*first, &*other));
        assert_eq!(loads.load(Ordering::SeqCst), 2);

        // Once no item holds it, it is gone: the next item loads it again.
        drop((first, second));
        let again = swatches.get_or_load("s/a.jpg", load()).await.unwrap();
        assert_eq!(loads.load(Ordering::SeqCst), 3);
        drop((again, other));
        assert!(swatches.lock().values().all(|w| w.strong_count() == 0));
    }

    #[tokio::test]
    async fn items_asking_while_one_loads_wait_for_that_load() {
        let swatches = Arc::new(JobSwatches::default());
        let loads = Arc::new(AtomicUsize::new(0));
        let (release, released) = tokio::sync::watch::channel(false);
        let ask = |swatches: Arc<JobSwatches>| {
            let (loads, mut released) = (loads.clone(), released.clone());
            tokio::spawn(async move {
                swatches
                    .get_or_load("s/a.jpg", async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        let _ = released.wait_for(|&r| r).await;
                        Ok::<_, ()>(swatch())
                    })
                    .await
            })
        };
        let items: Vec<_> = (0..4).map(|_| ask(swatches.clone())).collect();
        tokio::task::yield_now().await;
        release.send_replace(true);
        // Every item keeps its swatch until all have theirs (as items in flight together do).
        let mut held = Vec::new();
        for item in items {
            held.push(item.await.unwrap().unwrap());
        }
        assert!(held.iter().all(|h| std::ptr::eq(&**h, &*held[0])));
        assert_eq!(loads.load(Ordering::SeqCst), 1);
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
