//! Item metrics: how long each stage of an item took (`orchestrator_stage_seconds{stage}`), how many items are
//! between start and end (`orchestrator_items_in_flight`) and how many were accepted here and wait for a permit
//! (`orchestrator_items_waiting`); PreviewEdit's stages
//! (`orchestrator_preview_stage_seconds{stage}`: photo, masks and region when not cached, rules, encode, and admit:
//! the wait for the pixel budget, left out of the others).

use std::time::Instant;

/// One stage's timer: records the time since `start` when `finish` is called. A stage that fails is not recorded,
/// so the histogram describes work that completed.
#[must_use = "call finish() when the stage is done"]
pub struct Stage {
    metric: &'static str,
    name: &'static str,
    started: Instant,
}

impl Stage {
    /// A stage of a job's item.
    pub fn start(name: &'static str) -> Self {
        Stage {
            metric: "orchestrator_stage_seconds",
            name,
            started: Instant::now(),
        }
    }

    /// A stage of a PreviewEdit.
    pub fn preview(name: &'static str) -> Self {
        Stage {
            metric: "orchestrator_preview_stage_seconds",
            name,
            started: Instant::now(),
        }
    }

    /// Leaves `waited` out of this stage's time: a wait inside it that is recorded as its own stage.
    pub fn exclude(&mut self, waited: std::time::Duration) {
        self.started += waited;
    }

    pub fn finish(self) {
        metrics::histogram!(self.metric, "stage" => self.name)
            .record(self.started.elapsed().as_secs_f64());
    }
}

/// Counts items between start and end, whatever way they end (dropped at the end).
pub struct InFlight(());

impl InFlight {
    pub fn start() -> Self {
        metrics::gauge!("orchestrator_items_in_flight").increment(1.0);
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!("orchestrator_items_in_flight").decrement(1.0);
    }
}

/// Items accepted by this process and not yet started or ended (`orchestrator_items_waiting`): what waits in a job's
/// runner for one of the BATCH_CONCURRENCY permits. A job's runner holds one for the job's open items and splits
/// off each item's share (`take_one`) as it takes a permit for it; the item drops its share when it starts, or
/// when it ends without starting. Whatever ends a runner or an item (cancel, shutdown, a dropped task), what it
/// still counts goes back with it.
#[must_use = "the items count as waiting until this is dropped"]
pub struct Waiting(u32);

impl Waiting {
    /// The gauge exists (at 0) from the start, so a replica with nothing waiting reports 0 rather than nothing.
    pub fn register() {
        metrics::gauge!("orchestrator_items_waiting").increment(0.0);
    }

    pub fn new(items: u32) -> Self {
        metrics::gauge!("orchestrator_items_waiting").increment(f64::from(items));
        Waiting(items)
    }

    /// One item's share, taken off this count (nothing once it is spent).
    pub fn take_one(&mut self) -> Waiting {
        let one = self.0.min(1);
        self.0 -= one;
        Waiting(one)
    }

    /// Counts nothing: for an item that was not counted (ended already when its job was scheduled).
    pub fn none() -> Self {
        Waiting(0)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.0 > 0 {
            metrics::gauge!("orchestrator_items_waiting").decrement(f64::from(self.0));
        }
    }
}
