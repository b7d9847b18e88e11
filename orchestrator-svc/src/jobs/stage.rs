//! Item metrics: how long each stage of an item took (`orchestrator_stage_seconds{stage}`) and how many items are
//! between start and end (`orchestrator_items_in_flight`); PreviewEdit's stages
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
