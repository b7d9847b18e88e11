//! Items admitted by their pixels: an item's memory grows with its photo (the decoded photo, a plane per rule
//! concept, a rule's working planes and its edited copy), so BATCH_CONCURRENCY alone let four 48 MP photos past a
//! 4 GiB pod's limit. A weighted semaphore of MAX_INFLIGHT_MEGAPIXELS (see `LimitArgs::inflight_megapixels`) holds
//! what every admitted item costs; an item waits until its photo's pixels fit. A photo larger than the whole budget
//! takes all of it and runs alone: it waits for the others to finish, never forever.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Pixels per permit: budgets and costs are counted in kilopixels (a 48 MP photo is 48000 permits).
const UNIT: u64 = 1000;

/// What a remove in `fill` mode holds on top of an item's usual bytes, per pixel of the region's box and its margin
/// (at most the photo): the exemplar pyramid, the nearest-neighbour field, the membrane fill and the vote's planes.
/// Measured: 69 bytes per crop pixel (a 6.3 MP crop of a 12 MP photo, peak RSS 49 -> 484 MB); rounded up.
pub const FILL_BYTES_PER_PIXEL: u64 = 72;

/// Concept planes (1 byte per pixel each, held until the item's last rule has run) that `BYTES_PER_PIXEL_IN_FLIGHT`
/// covers: it was measured at ~10-12 bytes per pixel with 3 (recolour, tone, texture), so 24 leaves room for 8.
pub const PLANES_IN_BUDGET: u64 = 8;

/// The pixels an item is admitted for: its photo's; for a job with a fill that many again for every
/// `BYTES_PER_PIXEL_IN_FLIGHT` the fill may add over the whole photo (4x: the fill's region is unknown before the
/// masks are); and for rules on more than `PLANES_IN_BUDGET` concepts (targets and occluders, `planes`), a byte per
/// pixel more for each (32 concepts: 2x). Jobs without a fill on a few concepts are counted as before.
pub fn item_pixels(photo_pixels: u64, plan: &crate::jobs::JobPlan) -> u64 {
    pixels_for(
        photo_pixels,
        plan.fills(),
        plan.concepts_used_by_rules().len(),
    )
}

fn pixels_for(photo_pixels: u64, fills: bool, planes: usize) -> u64 {
    use crate::config::BYTES_PER_PIXEL_IN_FLIGHT as PER_PIXEL;
    let extra_planes = (planes as u64).saturating_sub(PLANES_IN_BUDGET);
    let per_pixel = PER_PIXEL + extra_planes + if fills { FILL_BYTES_PER_PIXEL } else { 0 };
    if per_pixel == PER_PIXEL {
        return photo_pixels;
    }
    photo_pixels.saturating_mul(per_pixel) / PER_PIXEL
}

/// The process's budget of pixels in flight.
#[derive(Debug, Clone)]
pub struct PixelBudget {
    permits: Arc<Semaphore>,
    total: u32,
}

/// An admitted item's share of the budget, given back when dropped.
#[derive(Debug)]
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
}

tokio::task_local! {
    /// The admission of the item whose future is running: blocking work started for it holds a clone.
    static ADMITTED: Arc<Admitted>;
}

impl Admitted {
    /// Runs the item's work `f` with this admission as the current one. Blocking work started inside it
    /// (`current`) keeps the pixels counted until that work ends, also when `f` is dropped first: a cancelled item's
    /// future goes at once, but its decode or rule already on a blocking thread runs on with the photo and planes.
    pub async fn hold_while<F: Future>(self, f: F) -> F::Output {
        ADMITTED.scope(Arc::new(self), f).await
    }
}

/// The admission of the item running here, for blocking work to hold (None outside `hold_while`).
pub fn current() -> Option<Arc<Admitted>> {
    ADMITTED.try_with(Arc::clone).ok()
}

impl PixelBudget {
    pub fn new(megapixels: u64) -> Self {
        let total = megapixels
            .saturating_mul(1_000_000 / UNIT)
            .clamp(1, u64::from(u32::MAX)) as u32;
        PixelBudget {
            permits: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    /// Waits until `pixels` fit in the budget (all of it, for a photo larger than the budget). Cancel-safe: a
    /// dropped wait takes nothing.
    pub async fn admit(&self, pixels: u64) -> Admitted {
        let want = pixels.div_ceil(UNIT).clamp(1, u64::from(self.total)) as u32;
        let permit = self
            .permits
            .clone()
            .acquire_many_owned(want)
            .await
            .expect("the budget's semaphore is never closed");
        Admitted { _permit: permit }
    }

    /// Megapixels not held by an admitted item now.
    #[cfg(test)]
    pub fn available_megapixels(&self) -> f64 {
        (self.permits.available_permits() as u64 * UNIT) as f64 / 1e6
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn admitted_within(budget: &PixelBudget, pixels: u64) -> Option<Admitted> {
        tokio::time::timeout(Duration::from_millis(50), budget.admit(pixels))
            .await
            .ok()
    }

    #[test]
    fn a_job_with_a_fill_or_many_concepts_is_counted_more_than_its_photo() {
        assert_eq!(pixels_for(12_000_000, false, 3), 12_000_000);
        assert_eq!(pixels_for(12_000_000, false, 8), 12_000_000);
        assert_eq!(pixels_for(12_000_000, true, 3), 48_000_000);
        // 16 rules on 32 concepts: a plane each, 24 more than the budget's bytes per pixel cover.
        assert_eq!(pixels_for(12_000_000, false, 32), 24_000_000);
        assert_eq!(pixels_for(12_000_000, true, 32), 60_000_000);
        assert_eq!(pixels_for(u64::MAX, true, 3), u64::MAX / 24);
    }

    #[tokio::test]
    async fn items_wait_until_their_pixels_fit() {
        let budget = PixelBudget::new(100);
        let a = admitted_within(&budget, 48_000_000).await.expect("fits");
        let b = admitted_within(&budget, 48_000_000).await.expect("fits");
        assert!((budget.available_megapixels() - 4.0).abs() < 1e-9);
        // A third 48 MP photo does not fit next to two; a 1 MP one does.
        assert!(admitted_within(&budget, 48_000_000).await.is_none());
        let small = admitted_within(&budget, 1_000_000)
            .await
            .expect("1 MP fits");
        drop(a);
        let c = admitted_within(&budget, 48_000_000)
            .await
            .expect("fits once one ended");
        drop((b, c, small));
        assert!((budget.available_megapixels() - 100.0).abs() < 1e-9);
    }

    #[tokio::test]
    async fn a_photo_larger_than_the_budget_runs_alone_and_never_deadlocks() {
        let budget = PixelBudget::new(12);
        let small = admitted_within(&budget, 3_000_000).await.expect("fits");
        // 48 MP on a 12 MP budget: waits for the small one, then takes everything.
        let big = tokio::spawn({
            let budget = budget.clone();
            async move { budget.admit(48_000_000).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!big.is_finished(), "waits while another item holds pixels");
        drop(small);
        let big = tokio::time::timeout(Duration::from_secs(5), big)
            .await
            .expect("admitted once alone")
            .unwrap();
        assert_eq!(budget.available_megapixels(), 0.0);
        assert!(admitted_within(&budget, 1).await.is_none(), "it runs alone");
        drop(big);
        assert!(admitted_within(&budget, 1).await.is_some());
    }

    #[tokio::test]
    async fn blocking_work_keeps_a_dropped_items_pixels_until_it_ends() {
        let budget = PixelBudget::new(10);
        let admitted = budget.admit(10_000_000).await;
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let mut item = Box::pin(admitted.hold_while(super::super::blocking(move || {
            let _ = started_tx.send(());
            let _ = release_rx.recv();
            Ok(())
        })));
        tokio::select! {
            _ = &mut item => panic!("the work waits for its release"),
            _ = started_rx => {}
        }
        // A cancel: the item's future goes while its blocking work runs on.
        drop(item);
        assert_eq!(budget.available_megapixels(), 0.0, "still held by the work");
        release_tx.send(()).unwrap();
        let back = async {
            while budget.available_megapixels() < 10.0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), back)
            .await
            .expect("given back when the work ends");
    }

    #[test]
    fn the_default_budget_follows_the_containers_memory() {
        use crate::config::default_inflight_megapixels as default;
        // 4 GiB pod: half of it at 24 bytes per pixel is ~89 MP (one 48 MP photo at a time plus small ones).
        assert_eq!(default(Some(4 << 30)), 89);
        // No limit: the constant; a tiny limit still admits one photo at a time (at least 1 MP).
        assert_eq!(default(None), 200);
        assert_eq!(default(Some(1 << 20)), 1);
    }
}
