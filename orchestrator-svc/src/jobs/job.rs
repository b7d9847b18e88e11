//! One job in memory: its state is the proto `Job` itself (what GetJob returns), guarded by a mutex, with a
//! broadcast channel that carries one event per item change to WatchJob streams. Every item change goes through
//! here, so the counters, the job state and the events never disagree.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use palette_proto::orchestrator::v1::{CallbackState, Item, ItemState, Job, JobState};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::recorded::Recorded;
use super::validate::JobPlan;
use crate::keys;

mod hash;
mod outcome;
mod settling;
mod state;
mod unrecorded;
mod unsettled;
mod weight;
mod written;
pub use hash::{plan_hash, spec_hash};
pub use outcome::{ItemOutcome, ItemResult, is_terminal, job_is_terminal};
pub use settling::{Ended, Settling};
pub use state::Progress;
use state::State;
pub use unsettled::Held;
use weight::{JOB_OVERHEAD_BYTES, approx_item_bytes};

/// Events buffered per job for slow watchers; one that falls further behind gets a fresh snapshot instead.
const EVENT_BUFFER: usize = 256;

#[derive(Debug)]
pub struct JobHandle {
    pub plan: Arc<JobPlan>,
    /// Submission order, for forgetting the oldest finished jobs first.
    pub(super) seq: u64,
    /// The job's hash as recorded when it was submitted (`plan_hash`: the effective spec's `spec_hash`, and for an
    /// edit its source's ids too): with the job id, the job store's key.
    pub spec_hash: String,
    pub cancel: CancellationToken,
    /// Durable jobs: the queue gave the job to another worker (`JobService::hand_over`): none of its items starts
    /// here any more, and none ends unstarted (the other worker runs them).
    pub handed_over: CancellationToken,
    /// Durable jobs: this run is a redelivery, so earlier runs may have recorded items (`JobService::cancel` reads
    /// the unstarted ones' records first only then).
    pub redelivered: AtomicBool,
    /// Durable jobs: items started here whose report is not settled yet (`unsettled`).
    pub unsettled: unsettled::Unsettled,
    state: Mutex<State>,
    /// What `state` holds on the heap, roughly (see `approx_item_bytes`), kept up to date by every item change so
    /// the registry can weigh its jobs without walking their items.
    approx_bytes: AtomicUsize,
    /// Counted in `orchestrator_jobs_finished_total` (once, however many items end after it became terminal).
    finish_counted: AtomicBool,
    pub recorded: Recorded,
    /// Settled callbacks whose record is still being written (`settling`): the job is not settled until they are.
    settling: AtomicUsize,
    /// Durable jobs: items whose record is written (`written`).
    pub durable_written: written::DurableWritten,
    /// The receiver answered 410 Gone for this job's callback URL: the job's later callbacks are not sent (this
    /// process's view; a restart or another replica learns it from its own first attempt).
    pub callbacks_gone: AtomicBool,
    /// Items that ended here whose record the job store did not take in time (`unrecorded`).
    pub unrecorded: unrecorded::Unrecorded,
    /// The uploaded swatches its items in flight share (`swatches`).
    pub swatches: super::swatches::JobSwatches,
    /// Which item changed. Only the index travels: a full Job per event, kept in the channel's ring of
    /// EVENT_BUFFER slots, made a job's memory grow with the square of its size (measured: +50 MB over 160 images);
    /// WatchJob streams take the snapshot when they forward the event.
    events: broadcast::Sender<u32>,
}

impl JobHandle {
    pub(super) fn new(plan: JobPlan, seq: u64) -> Self {
        let items = (0..plan.image_count)
            .map(|idx| Item {
                idx,
                state: ItemState::Pending as i32,
                input_key: keys::input(&plan.user_id, plan.photos_job_id(), idx),
                ..Default::default()
            })
            .collect();
        let job = Job {
            user_id: plan.user_id.clone(),
            job_id: plan.job_id.clone(),
            state: JobState::Queued as i32,
            items,
            completed: 0,
            failed: 0,
            cancelled: 0,
            effective_spec: Some(plan.effective_spec.clone()),
            source_job_id: plan
                .source
                .as_ref()
                .map(|s| s.source_job_id.clone())
                .unwrap_or_default(),
        };
        let state = State::new(job);
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let approx_bytes = JOB_OVERHEAD_BYTES
            + 2 * prost::Message::encoded_len(&plan.effective_spec)
            + state.job.items.iter().map(approx_item_bytes).sum::<usize>();
        JobHandle {
            spec_hash: plan_hash(&plan),
            plan: Arc::new(plan),
            seq,
            cancel: CancellationToken::new(),
            handed_over: CancellationToken::new(),
            redelivered: AtomicBool::new(false),
            unsettled: Default::default(),
            state: Mutex::new(state),
            approx_bytes: AtomicUsize::new(approx_bytes),
            finish_counted: AtomicBool::new(false),
            recorded: Recorded::default(),
            settling: AtomicUsize::new(0),
            durable_written: Default::default(),
            callbacks_gone: AtomicBool::new(false),
            unrecorded: Default::default(),
            swatches: Default::default(),
            events,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock left a consistent proto value behind: keep serving it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> Job {
        self.lock().job.clone()
    }

    /// The job's counts now, in O(1) (`Progress`).
    pub fn progress(&self) -> Progress {
        self.lock().progress()
    }

    /// Item `idx` as it is now (None when out of range): one item copied, not the job.
    pub fn item(&self, idx: u32) -> Option<Item> {
        self.lock().job.items.get(idx as usize).cloned()
    }

    /// The indices of the items still PENDING (not started), read under the lock: no copy of the items.
    pub fn pending_items(&self) -> Vec<u32> {
        let pending = ItemState::Pending as i32;
        let state = self.lock();
        state
            .job
            .items
            .iter()
            .filter(|i| i.state == pending)
            .map(|i| i.idx)
            .collect()
    }

    /// Item `idx` as it is now, with the job's state and counters (the job without its items and spec): one
    /// change, for a watcher that asked for changes only. Copies one item, not the whole job.
    pub fn change(&self, idx: u32) -> (Job, Option<Item>) {
        let state = self.lock();
        let job = &state.job;
        let header = Job {
            user_id: job.user_id.clone(),
            job_id: job.job_id.clone(),
            state: job.state,
            items: Vec::new(),
            completed: job.completed,
            failed: job.failed,
            cancelled: job.cancelled,
            effective_spec: None,
            source_job_id: job.source_job_id.clone(),
        };
        (header, job.items.get(idx as usize).cloned())
    }

    /// The current state and a receiver of every later change, taken atomically so no event falls in between.
    pub fn subscribe(&self) -> (Job, broadcast::Receiver<u32>) {
        let state = self.lock();
        (state.job.clone(), self.events.subscribe())
    }

    pub fn is_terminal(&self) -> bool {
        job_is_terminal(&self.lock().job)
    }

    /// True the first time it is asked once the job is terminal, false before and after.
    pub fn first_time_terminal(&self) -> bool {
        self.is_terminal() && !self.finish_counted.swap(true, Ordering::Relaxed)
    }

    /// Terminal, with no item's callback still pending: what retention may forget. A terminal job whose callbacks
    /// are still being retried keeps its record (in memory and in the job store), or a restart would lose them.
    pub fn is_settled(&self) -> bool {
        let state = self.lock();
        // Read under the lock `record_callback` takes: a callback seen settled here shows its `settling` guard too.
        job_is_terminal(&state.job)
            && state.callbacks_pending == 0
            && self.settling.load(Ordering::SeqCst) == 0
    }

    /// Roughly what this job's record holds in memory, in bytes.
    pub fn approx_bytes(&self) -> usize {
        self.approx_bytes.load(Ordering::Relaxed)
    }

    /// Applies `change` to item `idx` (if `applies` says so), recomputes counters and job state, and publishes
    /// one event. Returns the item after the change, or None when nothing changed.
    fn change_item(
        &self,
        idx: u32,
        applies: impl FnOnce(&Item) -> bool,
        change: impl FnOnce(&mut Item),
    ) -> Option<Item> {
        let mut state = self.lock();
        let item = state.job.items.get_mut(idx as usize)?;
        if !applies(item) {
            return None;
        }
        let before = approx_item_bytes(item);
        let was = (item.state, item.callback_state);
        change(item);
        let after = approx_item_bytes(item);
        // Under the job's lock: the counter moves in the same order as the items do.
        self.approx_bytes.fetch_add(after, Ordering::Relaxed);
        self.approx_bytes.fetch_sub(before, Ordering::Relaxed);
        let item = item.clone();
        state.count(was, -1);
        state.count((item.state, item.callback_state), 1);
        state.recount(self.cancel.is_cancelled());
        // No receiver is fine: nobody watches.
        let _ = self.events.send(idx);
        Some(item)
    }

    /// PENDING -> RUNNING; false when the item is no longer pending (cancelled meanwhile).
    pub fn start_item(&self, idx: u32) -> bool {
        self.change_item(
            idx,
            |i| i.state == ItemState::Pending as i32,
            |i| i.state = ItemState::Running as i32,
        )
        .is_some()
    }

    /// JOB_STORE=nats, the holder of the item's task: like `start_item`, and also for an item shown RUNNING by an
    /// earlier holder's claim (that holder died; this one runs it now). False when the item ended meanwhile.
    pub fn start_held_item(&self, idx: u32) -> bool {
        self.change_item(
            idx,
            |i| !is_terminal(i.state),
            |i| i.state = ItemState::Running as i32,
        )
        .is_some()
    }

    /// JOB_STORE=nats: another replica claimed item `idx` and runs it; PENDING -> RUNNING here too. An item that
    /// ended (the claim comes late, or from an earlier holder) is left as it is. False when nothing changed.
    pub fn show_running(&self, idx: u32) -> bool {
        self.start_item(idx)
    }

    /// Moves the item to its one terminal state. Returns the final item only for the caller that made the
    /// transition: that caller, and no other, sends the item's callback.
    pub fn finish_item(
        self: &Arc<Self>,
        idx: u32,
        outcome: ItemOutcome,
        callbacks_on: bool,
    ) -> Option<Ended> {
        self.finish_if(idx, outcome, callbacks_on, |i| !is_terminal(i.state))
    }

    fn finish_if(
        self: &Arc<Self>,
        idx: u32,
        outcome: ItemOutcome,
        callbacks_on: bool,
        applies: impl FnOnce(&Item) -> bool,
    ) -> Option<Ended> {
        // `applies` runs under the same lock as the change: check and transition are one step.
        let item = self.change_item(
            idx,
            |i| !is_terminal(i.state) && applies(i),
            |item| {
                // Under the lock `is_settled` reads: the last item's end and its report's guard are one step.
                self.settling.fetch_add(1, Ordering::SeqCst);
                item.callback_state = if callbacks_on {
                    CallbackState::Pending as i32
                } else {
                    CallbackState::NotConfigured as i32
                };
                match outcome {
                    ItemOutcome::Completed(result) => {
                        item.state = ItemState::Completed as i32;
                        item.output_key = result
                            .outputs
                            .first()
                            .map(|o| o.output_key.clone())
                            .unwrap_or_default();
                        item.outputs = result.outputs;
                        item.masks = result.masks;
                        item.preview_key = result.preview_key;
                        item.masks_reused = result.masks_reused;
                    }
                    ItemOutcome::Failed { code, message } => {
                        item.state = ItemState::Failed as i32;
                        item.error_code = code.to_string();
                        item.error = message;
                    }
                    ItemOutcome::Cancelled => {
                        item.state = ItemState::Cancelled as i32;
                        item.error_code = "cancelled".to_string();
                        item.error = "the job was cancelled before this image finished".to_string();
                    }
                }
            },
        )?;
        Some(Ended {
            item,
            settling: Settling::counted(self.clone()),
        })
    }

    /// Like `finish_item`, but only for an item that never started.
    pub fn finish_item_if_pending(
        self: &Arc<Self>,
        idx: u32,
        outcome: ItemOutcome,
        callbacks_on: bool,
    ) -> Option<Ended> {
        self.finish_if(idx, outcome, callbacks_on, |i| {
            i.state == ItemState::Pending as i32
        })
    }

    /// Marks the job cancelled and every non-terminal item CANCELLED; returns those items (for their callbacks).
    pub fn cancel_pending(self: &Arc<Self>, callbacks_on: bool) -> Vec<Ended> {
        if self.is_terminal() {
            // A finished job stays as it finished.
            return Vec::new();
        }
        self.cancel.cancel();
        let open: Vec<u32> = self
            .lock()
            .job
            .items
            .iter()
            .filter(|i| !is_terminal(i.state))
            .map(|i| i.idx)
            .collect();
        open.into_iter()
            .filter_map(|idx| self.finish_item(idx, ItemOutcome::Cancelled, callbacks_on))
            .collect()
    }

    /// An item that a previous run of this job already finished (durable jobs, see `JobPlan::durable_items`): takes
    /// the recorded item as it is, callback included. False when the item was no longer pending or running.
    pub fn restore_item(&self, idx: u32, recorded: Item) -> bool {
        self.change_item(
            idx,
            |i| !is_terminal(i.state),
            |item| *item = Item { idx, ..recorded },
        )
        .is_some()
    }

    /// JOB_STORE=nats: item `idx` as the shared store recorded it (by whichever replica ended it), which stands over
    /// what this process holds, except that a record with its callback still pending never undoes a settled callback
    /// of the same terminal state: the bucket's watch can bring this replica's own first write (callback pending)
    /// after the callback settled here, and the settled record follows it. False when nothing changed.
    pub fn apply_record(&self, idx: u32, recorded: Item) -> bool {
        let recorded = Item { idx, ..recorded };
        let compare = recorded.clone();
        self.change_item(
            idx,
            |i| *i != compare && !is_older_report(&compare, i),
            |item| *item = recorded,
        )
        .is_some()
    }

    /// Records how the item's callback ended; the item as it now stands (None when `idx` is out of range).
    pub fn record_callback(
        &self,
        idx: u32,
        delivered: bool,
        attempts: u32,
        error: Option<String>,
    ) -> Option<Item> {
        self.change_item(
            idx,
            |_| true,
            |item| {
                item.callback_state = if delivered {
                    CallbackState::Delivered as i32
                } else {
                    CallbackState::Failed as i32
                };
                item.callback_attempts = attempts;
                item.callback_error = error.unwrap_or_default();
            },
        )
    }
}

/// Whether `recorded` is an earlier report of the item `current` holds: the same terminal state, written before its
/// callback settled.
pub(in crate::jobs) fn is_older_report(recorded: &Item, current: &Item) -> bool {
    let pending = CallbackState::Pending as i32;
    recorded.state == current.state
        && recorded.callback_state == pending
        && current.callback_state != pending
}

#[cfg(test)]
mod tests;
