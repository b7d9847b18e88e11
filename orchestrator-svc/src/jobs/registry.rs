//! Jobs in memory: each job's state is the proto `Job` itself (what GetJob returns), guarded by a mutex, with a
//! broadcast channel that carries one event per item change to WatchJob streams.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use palette_proto::orchestrator::v1::{
    CallbackState, Item, ItemState, Job, JobState, MaskKey, RuleOutput,
};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::validate::JobPlan;
use crate::error::Error;
use crate::keys;

/// Events buffered per job for slow watchers; one that falls further behind gets a fresh snapshot instead.
const EVENT_BUFFER: usize = 256;

/// How one item ended.
#[derive(Debug, Clone)]
pub enum ItemOutcome {
    Completed(ItemResult),
    Failed { code: &'static str, message: String },
    Cancelled,
}

#[derive(Debug, Clone, Default)]
pub struct ItemResult {
    pub outputs: Vec<RuleOutput>,
    pub masks: Vec<MaskKey>,
    pub preview_key: String,
    pub masks_reused: bool,
}

pub fn is_terminal(state: i32) -> bool {
    state == ItemState::Completed as i32
        || state == ItemState::Failed as i32
        || state == ItemState::Cancelled as i32
}

#[derive(Debug)]
pub struct JobHandle {
    pub plan: Arc<JobPlan>,
    /// Submission order, for forgetting the oldest finished jobs first.
    seq: u64,
    pub cancel: CancellationToken,
    state: Mutex<Job>,
    /// What `state` holds on the heap, roughly (see `approx_item_bytes`), kept up to date by every item change so
    /// the registry can weigh its jobs without walking their items.
    approx_bytes: AtomicUsize,
    /// Which item changed. Only the index travels: a full Job per event, kept in the channel's ring of
    /// EVENT_BUFFER slots, made a job's memory grow with the square of its size (measured: +50 MB over 160 images);
    /// WatchJob streams take the snapshot when they forward the event.
    events: broadcast::Sender<u32>,
}

impl JobHandle {
    fn new(plan: JobPlan, seq: u64) -> Self {
        let items = (0..plan.image_count)
            .map(|idx| Item {
                idx,
                state: ItemState::Pending as i32,
                input_key: keys::input(&plan.user_id, &plan.job_id, idx),
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
        };
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let approx_bytes = JOB_OVERHEAD_BYTES
            + 2 * prost::Message::encoded_len(&plan.effective_spec)
            + job.items.iter().map(approx_item_bytes).sum::<usize>();
        JobHandle {
            plan: Arc::new(plan),
            seq,
            cancel: CancellationToken::new(),
            state: Mutex::new(job),
            approx_bytes: AtomicUsize::new(approx_bytes),
            events,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Job> {
        // A panic while holding the lock left a consistent proto value behind: keep serving it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> Job {
        self.lock().clone()
    }

    /// The current state and a receiver of every later change, taken atomically so no event falls in between.
    pub fn subscribe(&self) -> (Job, broadcast::Receiver<u32>) {
        let job = self.lock();
        (job.clone(), self.events.subscribe())
    }

    pub fn is_terminal(&self) -> bool {
        job_is_terminal(&self.lock())
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
        let mut job = self.lock();
        let item = job.items.get_mut(idx as usize)?;
        if !applies(item) {
            return None;
        }
        let before = approx_item_bytes(item);
        change(item);
        let after = approx_item_bytes(item);
        // Under the job's lock: the counter moves in the same order as the items do.
        self.approx_bytes.fetch_add(after, Ordering::Relaxed);
        self.approx_bytes.fetch_sub(before, Ordering::Relaxed);
        let item = item.clone();
        recount(&mut job, self.cancel.is_cancelled());
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

    /// Moves the item to its one terminal state. Returns the final item only for the caller that made the
    /// transition: that caller, and no other, sends the item's callback.
    pub fn finish_item(&self, idx: u32, outcome: ItemOutcome, callbacks_on: bool) -> Option<Item> {
        self.finish_if(idx, outcome, callbacks_on, |i| !is_terminal(i.state))
    }

    fn finish_if(
        &self,
        idx: u32,
        outcome: ItemOutcome,
        callbacks_on: bool,
        applies: impl FnOnce(&Item) -> bool,
    ) -> Option<Item> {
        // `applies` runs under the same lock as the change: check and transition are one step.
        self.change_item(
            idx,
            |i| !is_terminal(i.state) && applies(i),
            |item| {
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
        )
    }

    /// Like `finish_item`, but only for an item that never started.
    pub fn finish_item_if_pending(
        &self,
        idx: u32,
        outcome: ItemOutcome,
        callbacks_on: bool,
    ) -> Option<Item> {
        self.finish_if(idx, outcome, callbacks_on, |i| {
            i.state == ItemState::Pending as i32
        })
    }

    /// Marks the job cancelled and every non-terminal item CANCELLED; returns those items (for their callbacks).
    pub fn cancel_pending(&self, callbacks_on: bool) -> Vec<Item> {
        if self.is_terminal() {
            // A finished job stays as it finished.
            return Vec::new();
        }
        self.cancel.cancel();
        let open: Vec<u32> = self
            .lock()
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

    pub fn record_callback(&self, idx: u32, delivered: bool, attempts: u32, error: Option<String>) {
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
        );
    }
}

/// Heap bytes of a job record outside its items: the handle, its event ring, the plan's fixed parts.
const JOB_OVERHEAD_BYTES: usize = 4096;

/// What one item's record holds in memory, roughly: the structs and every string's buffer. A finished item is
/// dominated by its mask keys (one per instance: ~23 on the benchmark's photos, up to
/// MAX_INSTANCES_PER_CONCEPT x concepts), which is why the registry weighs jobs instead of counting them.
fn approx_item_bytes(item: &Item) -> usize {
    use std::mem::size_of;
    // Allocators round small allocations up; 16 bytes per string is about what glibc adds.
    let text = |s: &String| {
        if s.capacity() == 0 {
            0
        } else {
            s.capacity() + 16
        }
    };
    size_of::<Item>()
        + text(&item.input_key)
        + text(&item.output_key)
        + text(&item.preview_key)
        + text(&item.error)
        + text(&item.error_code)
        + text(&item.callback_error)
        + item.outputs.capacity() * size_of::<RuleOutput>()
        + item
            .outputs
            .iter()
            .map(|o| text(&o.rule_id) + text(&o.output_key) + text(&o.not_applied_reason))
            .sum::<usize>()
        + item.masks.capacity() * size_of::<MaskKey>()
        + item
            .masks
            .iter()
            .map(|m| text(&m.concept) + text(&m.key))
            .sum::<usize>()
}

pub fn job_is_terminal(job: &Job) -> bool {
    job.state == JobState::Done as i32 || job.state == JobState::Cancelled as i32
}

fn recount(job: &mut Job, cancel_requested: bool) {
    let count = |s: ItemState| job.items.iter().filter(|i| i.state == s as i32).count() as u32;
    job.completed = count(ItemState::Completed);
    job.failed = count(ItemState::Failed);
    job.cancelled = count(ItemState::Cancelled);
    let terminal = job.completed + job.failed + job.cancelled;
    job.state = if terminal as usize == job.items.len() {
        if cancel_requested {
            JobState::Cancelled
        } else {
            JobState::Done
        }
    } else if terminal > 0
        || job
            .items
            .iter()
            .any(|i| i.state == ItemState::Running as i32)
    {
        JobState::Running
    } else {
        JobState::Queued
    } as i32;
}

/// How many job records, and how much memory for them, the registry may keep.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Most jobs kept, running ones included (MAX_RETAINED_JOBS).
    pub max_jobs: usize,
    /// Most bytes of job records kept, running ones included (RETAINED_JOBS_MB); finished jobs are forgotten,
    /// oldest first, to stay under it. Running jobs are never forgotten, so they alone may exceed it.
    pub max_bytes: usize,
}

/// The jobs this process knows, by job id: at most `Retention::max_jobs` of them in at most
/// `Retention::max_bytes`, the oldest finished ones forgotten first.
#[derive(Debug)]
pub struct JobRegistry {
    jobs: Mutex<HashMap<String, Arc<JobHandle>>>,
    next_seq: AtomicU64,
    retention: Retention,
}

/// What `JobRegistry::submit` did.
pub enum Submitted {
    Created(Arc<JobHandle>),
    /// The same spec was submitted before: nothing new to run.
    Existing(Arc<JobHandle>),
}

impl JobRegistry {
    pub fn new(retention: Retention) -> Self {
        JobRegistry {
            jobs: Mutex::default(),
            next_seq: AtomicU64::new(0),
            retention: Retention {
                max_jobs: retention.max_jobs.max(1),
                max_bytes: retention.max_bytes,
            },
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<JobHandle>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets the oldest finished jobs until `jobs` + `extra_jobs` fit both limits (or nothing finished is
    /// left), and publishes what is retained.
    fn forget_finished(&self, jobs: &mut HashMap<String, Arc<JobHandle>>, extra_jobs: usize) {
        let mut bytes: usize = jobs.values().map(|j| j.approx_bytes()).sum();
        let over = |count: usize, bytes: usize| {
            count + extra_jobs > self.retention.max_jobs || bytes > self.retention.max_bytes
        };
        if over(jobs.len(), bytes) {
            let mut finished: Vec<(u64, String, usize)> = jobs
                .values()
                .filter(|j| j.is_terminal())
                .map(|j| (j.seq, j.plan.job_id.clone(), j.approx_bytes()))
                .collect();
            finished.sort_unstable();
            let mut forgotten = 0u64;
            for (_, job_id, job_bytes) in finished {
                if !over(jobs.len(), bytes) {
                    break;
                }
                jobs.remove(&job_id);
                bytes -= job_bytes;
                forgotten += 1;
            }
            metrics::counter!("orchestrator_jobs_forgotten_total").increment(forgotten);
        }
        metrics::gauge!("orchestrator_retained_jobs").set(jobs.len() as f64);
        metrics::gauge!("orchestrator_retained_job_bytes").set(bytes as f64);
    }

    /// Keeps the registry within its limits after a job finished (its record grew while it ran).
    pub fn trim(&self) {
        self.forget_finished(&mut self.lock(), 0);
    }

    pub fn get(&self, job_id: &str) -> Result<Arc<JobHandle>, Error> {
        self.lock()
            .get(job_id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no job {job_id:?}")))
    }

    /// Registers the plan under its job id: idempotent for the same effective spec, ALREADY_EXISTS otherwise.
    pub fn submit(&self, plan: JobPlan) -> Result<Submitted, Error> {
        let mut jobs = self.lock();
        if let Some(existing) = jobs.get(&plan.job_id) {
            return if existing.plan.effective_spec == plan.effective_spec {
                Ok(Submitted::Existing(existing.clone()))
            } else {
                Err(Error::AlreadyExists(format!(
                    "job {:?} exists with a different spec; use a new job id",
                    plan.job_id
                )))
            };
        }
        self.forget_finished(&mut jobs, 1);
        if jobs.len() >= self.retention.max_jobs {
            return Err(Error::Overloaded(format!(
                "{} jobs are still running (MAX_RETAINED_JOBS); retry later",
                jobs.len()
            )));
        }
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let handle = Arc::new(JobHandle::new(plan, seq));
        jobs.insert(handle.plan.job_id.clone(), handle.clone());
        Ok(Submitted::Created(handle))
    }

    pub fn all(&self) -> Vec<Arc<JobHandle>> {
        self.lock().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palette_proto::orchestrator::v1::JobSpec;

    fn plan(job_id: &str) -> JobPlan {
        JobPlan {
            user_id: "u".into(),
            job_id: job_id.into(),
            image_count: 2,
            concepts: vec!["wall".into()],
            rules: vec![],
            effective_spec: JobSpec {
                job_id: job_id.into(),
                ..Default::default()
            },
            durable_items: false,
        }
    }

    fn jobs_only(max_jobs: usize) -> Retention {
        Retention {
            max_jobs,
            max_bytes: usize::MAX,
        }
    }

    /// Finishes every item of `job` with `masks` mask keys each, as a segmentation with that many instances does.
    fn complete_with_masks(job: &JobHandle, masks: usize) {
        for idx in 0..job.plan.image_count {
            let result = ItemResult {
                masks: (0..masks)
                    .map(|i| MaskKey {
                        concept: "wall".into(),
                        instance: i as u32,
                        key: format!("masks/u/{}/{idx}/wall_{i}.png", job.plan.job_id),
                        score: 0.9,
                    })
                    .collect(),
                ..Default::default()
            };
            job.finish_item(idx, ItemOutcome::Completed(result), false);
        }
    }

    fn created(s: Submitted) -> Arc<JobHandle> {
        match s {
            Submitted::Created(j) => j,
            Submitted::Existing(_) => panic!("not created"),
        }
    }

    #[test]
    fn each_item_ends_once() {
        let registry = JobRegistry::new(jobs_only(10));
        let job = created(registry.submit(plan("j")).unwrap());
        assert!(job.start_item(0));
        let done = ItemOutcome::Completed(ItemResult::default());
        assert!(job.finish_item(0, done.clone(), true).is_some());
        assert!(job.finish_item(0, ItemOutcome::Cancelled, true).is_none());
        let cancelled = job.cancel_pending(true);
        assert_eq!(cancelled.iter().map(|i| i.idx).collect::<Vec<_>>(), [1]);
        assert!(!job.start_item(1));
        let snapshot = job.snapshot();
        assert_eq!((snapshot.completed, snapshot.cancelled), (1, 1));
        assert_eq!(snapshot.state, JobState::Cancelled as i32);
        assert!(
            job.cancel_pending(true).is_empty(),
            "a finished job stays finished"
        );
    }

    #[test]
    fn forgets_the_oldest_finished_jobs_and_refuses_when_all_run() {
        let registry = JobRegistry::new(jobs_only(2));
        let a = created(registry.submit(plan("a")).unwrap());
        created(registry.submit(plan("b")).unwrap());
        assert!(matches!(
            registry.submit(plan("c")),
            Err(Error::Overloaded(_))
        ));
        a.cancel_pending(false);
        created(registry.submit(plan("c")).unwrap());
        assert!(matches!(registry.get("a"), Err(Error::NotFound(_))));
        assert!(registry.get("b").is_ok() && registry.get("c").is_ok());
    }

    #[test]
    fn a_job_weighs_what_its_items_hold() {
        let registry = JobRegistry::new(jobs_only(10));
        let job = created(registry.submit(plan("j")).unwrap());
        let pending = job.approx_bytes();
        complete_with_masks(&job, 30);
        let done = job.approx_bytes();
        // 2 items x 30 mask keys of ~30 characters: each key's struct and buffer, at least.
        assert!(done >= pending + 2 * 30 * (30 + 16), "{pending} -> {done}");
        assert!(done < pending + 2 * 30 * 400, "{pending} -> {done}");
    }

    #[test]
    fn forgets_the_oldest_finished_jobs_beyond_the_byte_budget() {
        let probe = JobRegistry::new(jobs_only(10));
        let sample = created(probe.submit(plan("sample")).unwrap());
        complete_with_masks(&sample, 50);
        // Room for two finished jobs of this weight, not three.
        let budget = sample.approx_bytes() * 5 / 2;
        let registry = JobRegistry::new(Retention {
            max_jobs: 100,
            max_bytes: budget,
        });
        let jobs: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|id| created(registry.submit(plan(id)).unwrap()))
            .collect();
        for job in &jobs {
            complete_with_masks(job, 50);
        }
        // Over the budget only because the jobs grew while running: the pipeline trims when a job ends.
        registry.trim();
        assert!(matches!(registry.get("a"), Err(Error::NotFound(_))));
        assert!(registry.get("b").is_ok() && registry.get("c").is_ok());
        // Running jobs are never forgotten, even when they alone exceed the budget.
        let tight = JobRegistry::new(Retention {
            max_jobs: 100,
            max_bytes: 1,
        });
        created(tight.submit(plan("x")).unwrap());
        created(tight.submit(plan("y")).unwrap());
        tight.trim();
        assert!(tight.get("x").is_ok() && tight.get("y").is_ok());
    }
}
