//! A job's counters (completed, failed, cancelled, running, callbacks pending) and its state, kept as items change.

use palette_proto::orchestrator::v1::{CallbackState, ItemState, Job, JobState};

/// A job's proto value with the counts its state is derived from, kept up to date by `change_item` (the one place
/// an item changes) instead of counted over every item at each change: a cancelled 10,000-image job changes 10,000
/// items at once, each change on every replica (JOB_STORE=nats), and counting them all each time made that
/// quadratic (a 10,000-image cancel took 72 s to call back, debug build, two replicas; 3,000 took 15.6 s).
#[derive(Debug)]
pub(super) struct State {
    /// `completed`, `failed` and `cancelled` are kept in it as counts.
    pub(super) job: Job,
    /// Items RUNNING.
    running: u32,
    /// Items whose callback is PENDING: a terminal job is settled when none is.
    pub(super) callbacks_pending: u32,
}

impl State {
    /// A new job's: no item running, no callback pending.
    pub(super) fn new(job: Job) -> Self {
        State {
            job,
            running: 0,
            callbacks_pending: 0,
        }
    }

    /// Adds `by` to the counts of an item in `(state, callback_state)`.
    pub(super) fn count(&mut self, (state, callback_state): (i32, i32), by: i32) {
        let counter = match ItemState::try_from(state) {
            Ok(ItemState::Completed) => Some(&mut self.job.completed),
            Ok(ItemState::Failed) => Some(&mut self.job.failed),
            Ok(ItemState::Cancelled) => Some(&mut self.job.cancelled),
            Ok(ItemState::Running) => Some(&mut self.running),
            _ => None,
        };
        if let Some(counter) = counter {
            *counter = counter.wrapping_add_signed(by);
        }
        if callback_state == CallbackState::Pending as i32 {
            self.callbacks_pending = self.callbacks_pending.wrapping_add_signed(by);
        }
    }

    /// The job's state from the counts. CANCELLED only when the cancel ended an item: one that came as the last
    /// item finished (or whose record a restart reads) must not turn a job already DONE, and told so, CANCELLED.
    pub(super) fn recount(&mut self, cancel_requested: bool) {
        let job = &mut self.job;
        let terminal = job.completed + job.failed + job.cancelled;
        job.state = if terminal as usize == job.items.len() {
            if cancel_requested && job.cancelled > 0 {
                JobState::Cancelled
            } else {
                JobState::Done
            }
        } else if terminal > 0 || self.running > 0 {
            JobState::Running
        } else {
            JobState::Queued
        } as i32;
    }
}

/// A job's counts at one moment, copied without its items: what a follower checks at every change. A snapshot of
/// the job at each change cost O(items) per change, O(items²) per job (a 100,000-image job's items hold ~500 MB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    pub state: i32,
    pub items: u32,
    pub completed: u32,
    pub failed: u32,
    pub cancelled: u32,
    pub running: u32,
    pub callbacks_pending: u32,
}

impl Progress {
    pub fn ended(&self) -> u32 {
        self.completed + self.failed + self.cancelled
    }

    pub fn is_terminal(&self) -> bool {
        self.state == JobState::Done as i32 || self.state == JobState::Cancelled as i32
    }
}

impl State {
    pub(super) fn progress(&self) -> Progress {
        let job = &self.job;
        Progress {
            state: job.state,
            items: job.items.len() as u32,
            completed: job.completed,
            failed: job.failed,
            cancelled: job.cancelled,
            running: self.running,
            callbacks_pending: self.callbacks_pending,
        }
    }
}
