//! The jobs this process knows, by (user id, job id): idempotent submission, lookups, and forgetting the oldest finished jobs
//! to stay within MAX_RETAINED_JOBS and RETAINED_JOBS_MB. What it forgets is queued for the job store to forget too
//! (`take_forgotten`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::job::JobHandle;
use super::store::{self, RecordKey};
use super::validate::{JobKey, JobPlan};
use crate::error::ApiError;

/// What a refused submission is told to wait: long enough for a few running jobs to finish.
pub const RETRY_AFTER_BUSY: Duration = Duration::from_secs(5);

/// How many job records, and how much memory for them, the registry may keep.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Most jobs kept, running ones included (MAX_RETAINED_JOBS).
    pub max_jobs: usize,
    /// Most bytes of job records kept, running ones included (RETAINED_JOBS_MB); finished jobs are forgotten,
    /// oldest first, to stay under it. Running jobs are never forgotten, so they alone may exceed it.
    pub max_bytes: usize,
}

/// The jobs this process knows, by (user id, job id): at most `Retention::max_jobs` of them in at most
/// `Retention::max_bytes`, the oldest finished ones forgotten first.
#[derive(Debug)]
pub struct JobRegistry {
    jobs: Mutex<HashMap<JobKey, Arc<JobHandle>>>,
    next_seq: AtomicU64,
    retention: Retention,
    /// Jobs forgotten here and not yet in the job store (see `take_forgotten`).
    forgotten: Mutex<Vec<RecordKey>>,
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
            forgotten: Mutex::default(),
        }
    }

    /// The jobs forgotten since the last call, for the job store to delete.
    pub fn take_forgotten(&self) -> Vec<RecordKey> {
        std::mem::take(&mut *self.forgotten.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JobKey, Arc<JobHandle>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets the oldest settled jobs (finished, no callback pending) until `jobs` + `extra_jobs` fit both limits (or nothing finished is
    /// left), and publishes what is retained.
    fn forget_finished(&self, jobs: &mut HashMap<JobKey, Arc<JobHandle>>, extra_jobs: usize) {
        let mut bytes: usize = jobs.values().map(|j| j.approx_bytes()).sum();
        let over = |count: usize, bytes: usize| {
            count + extra_jobs > self.retention.max_jobs || bytes > self.retention.max_bytes
        };
        if over(jobs.len(), bytes) {
            let mut finished: Vec<(u64, JobKey, usize)> = jobs
                .values()
                .filter(|j| j.is_settled())
                .map(|j| (j.seq, j.plan.key(), j.approx_bytes()))
                .collect();
            finished.sort_unstable();
            let mut forgotten = 0u64;
            for (_, key, job_bytes) in finished {
                if !over(jobs.len(), bytes) {
                    break;
                }
                if let Some(job) = jobs.remove(&key) {
                    self.forgotten
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(store::key_of(&job));
                }
                // Read again after the sum above: the job may have grown since (a callback's error recorded).
                bytes = bytes.saturating_sub(job_bytes);
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

    /// The job, if `key.user_id` has one under `key.job_id`: another user's job is NOT_FOUND like a missing one.
    pub fn get(&self, key: &JobKey) -> Result<Arc<JobHandle>, ApiError> {
        self.lock()
            .get(key)
            .cloned()
            .ok_or_else(|| ApiError::JobNotFound {
                job_id: key.job_id.clone(),
            })
    }

    /// Registers the plan under its (user id, job id): idempotent for the same effective spec, ALREADY_EXISTS
    /// otherwise.
    pub fn submit(&self, plan: JobPlan) -> Result<Submitted, ApiError> {
        let mut jobs = self.lock();
        if let Some(existing) = jobs.get(&plan.key()) {
            return if existing.plan.effective_spec == plan.effective_spec
                && existing.plan.source == plan.source
            {
                Ok(Submitted::Existing(existing.clone()))
            } else {
                Err(ApiError::JobExists {
                    job_id: plan.job_id.clone(),
                })
            };
        }
        self.forget_finished(&mut jobs, 1);
        if jobs.len() >= self.retention.max_jobs {
            return Err(ApiError::Overloaded {
                running: jobs.len(),
                retry_after: RETRY_AFTER_BUSY,
            });
        }
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let handle = Arc::new(JobHandle::new(plan, seq));
        handle.recorded.pending(); // until the creating call has recorded it (`JobService::register`)
        jobs.insert(handle.plan.key(), handle.clone());
        Ok(Submitted::Created(handle))
    }

    /// Takes back a job whose record the job store could not keep (SubmitJob then fails).
    pub fn remove(&self, job: &JobHandle) {
        let mut jobs = self.lock();
        let key = job.plan.key();
        if jobs.get(&key).is_some_and(|j| std::ptr::eq(&**j, job)) {
            jobs.remove(&key);
        }
    }

    /// A job resumed from the job store, under its recorded submission order; never refused (retention is applied
    /// by `trim` once every job is back).
    pub fn restore(&self, plan: JobPlan, seq: u64, spec_hash: String) -> Arc<JobHandle> {
        self.next_seq.fetch_max(seq + 1, Ordering::Relaxed);
        let mut handle = JobHandle::new(plan, seq);
        handle.spec_hash = spec_hash;
        let handle = Arc::new(handle);
        self.lock().insert(handle.plan.key(), handle.clone());
        handle
    }

    /// JOB_STORE=nats: the job as another replica recorded it. The handle already here under the same spec hash is
    /// kept (it may be the one this process submitted); one under another hash lost the race to record, and is
    /// replaced.
    pub fn adopt(&self, plan: JobPlan, seq: u64, spec_hash: String) -> Arc<JobHandle> {
        let mut jobs = self.lock();
        if let Some(existing) = jobs.get(&plan.key())
            && existing.spec_hash == spec_hash
        {
            return existing.clone();
        }
        self.next_seq.fetch_max(seq + 1, Ordering::Relaxed);
        let mut handle = JobHandle::new(plan, seq);
        handle.spec_hash = spec_hash;
        let handle = Arc::new(handle);
        jobs.insert(handle.plan.key(), handle.clone());
        handle
    }

    /// JOB_STORE=nats: drops a job another replica deleted from the store (retention).
    pub fn drop_deleted(&self, key: &JobKey) {
        self.lock().remove(key);
    }

    pub fn all(&self) -> Vec<Arc<JobHandle>> {
        self.lock().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::job::{ItemOutcome, ItemResult};
    use palette_proto::orchestrator::v1::{JobSpec, JobState, MaskKey};

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
            source: None,
        }
    }

    fn key(job_id: &str) -> JobKey {
        JobKey {
            user_id: "u".into(),
            job_id: job_id.into(),
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
                        ..Default::default()
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
            Err(ApiError::Overloaded { .. })
        ));
        a.cancel_pending(false);
        created(registry.submit(plan("c")).unwrap());
        assert!(matches!(
            registry.get(&key("a")),
            Err(ApiError::JobNotFound { .. })
        ));
        assert!(registry.get(&key("b")).is_ok() && registry.get(&key("c")).is_ok());
    }

    #[test]
    fn jobs_are_scoped_by_user() {
        let registry = JobRegistry::new(jobs_only(10));
        let mine = created(registry.submit(plan("j")).unwrap());
        let theirs = JobPlan {
            user_id: "other".into(),
            ..plan("j")
        };
        let theirs = created(registry.submit(theirs).unwrap());
        assert!(!Arc::ptr_eq(&mine, &theirs), "the same job id, two jobs");
        assert!(Arc::ptr_eq(&registry.get(&key("j")).unwrap(), &mine));
        let stranger = JobKey {
            user_id: "stranger".into(),
            job_id: "j".into(),
        };
        assert!(matches!(
            registry.get(&stranger),
            Err(ApiError::JobNotFound { .. })
        ));
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
        assert!(matches!(
            registry.get(&key("a")),
            Err(ApiError::JobNotFound { .. })
        ));
        assert!(registry.get(&key("b")).is_ok() && registry.get(&key("c")).is_ok());
        // Running jobs are never forgotten, even when they alone exceed the budget.
        let tight = JobRegistry::new(Retention {
            max_jobs: 100,
            max_bytes: 1,
        });
        created(tight.submit(plan("x")).unwrap());
        created(tight.submit(plan("y")).unwrap());
        tight.trim();
        assert!(tight.get(&key("x")).is_ok() && tight.get(&key("y")).is_ok());
    }

    #[test]
    fn a_finished_job_whose_callbacks_are_pending_is_kept_until_they_settle() {
        let registry = JobRegistry::new(jobs_only(1));
        let a = created(registry.submit(plan("a")).unwrap());
        for idx in 0..a.plan.image_count {
            a.finish_item(idx, ItemOutcome::Completed(ItemResult::default()), true);
        }
        assert!(a.is_terminal() && !a.is_settled());
        // Over the limit, but the only finished job still has callbacks to send.
        assert!(matches!(
            registry.submit(plan("b")),
            Err(ApiError::Overloaded { .. })
        ));
        for idx in 0..a.plan.image_count {
            a.record_callback(idx, true, 1, None);
        }
        assert!(a.is_settled());
        created(registry.submit(plan("b")).unwrap());
        assert!(matches!(
            registry.get(&key("a")),
            Err(ApiError::JobNotFound { .. })
        ));
    }

    #[test]
    fn what_it_forgets_is_queued_for_the_job_store_and_restored_jobs_keep_their_order() {
        let registry = JobRegistry::new(jobs_only(2));
        let a = registry.restore(plan("a"), 7, "recorded-hash".into());
        assert_eq!(a.seq, 7);
        assert_eq!(
            a.spec_hash, "recorded-hash",
            "the recorded hash, not a new one"
        );
        // Later submissions come after every restored one.
        let b = created(registry.submit(plan("b")).unwrap());
        assert!(b.seq > a.seq);
        a.cancel_pending(false);
        created(registry.submit(plan("c")).unwrap());
        let forgotten = registry.take_forgotten();
        assert_eq!(forgotten.len(), 1);
        assert_eq!(
            (
                forgotten[0].job_id.as_str(),
                forgotten[0].spec_hash.as_str()
            ),
            ("a", "recorded-hash")
        );
        assert!(registry.take_forgotten().is_empty(), "taken once");
        // A job the store refused is taken back.
        registry.remove(&b);
        assert!(registry.get(&key("b")).is_err() && registry.get(&key("c")).is_ok());
    }
}
