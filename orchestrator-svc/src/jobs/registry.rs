//! The jobs this process knows, by (user id, job id): idempotent submission, lookups, and forgetting the oldest finished jobs
//! to stay within MAX_RETAINED_JOBS and RETAINED_JOBS_MB. What it forgets is queued for the job store to forget too
//! (`take_forgotten`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::job::JobHandle;
use super::store::{self, RunKey};
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
    forgotten: Mutex<Vec<RunKey>>,
    /// Held from `take_forgotten` until the job store has deleted what it took (see `forgetting`).
    forgetting: tokio::sync::Mutex<()>,
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
            forgetting: tokio::sync::Mutex::const_new(()),
        }
    }

    /// To hold while taking the forgotten jobs and deleting them from the job store. A submission takes it before
    /// recording its job, so it waits for a deletion in progress: it never finds, as if its own, the record of a
    /// forgotten job with its spec that is about to be deleted (the deletion would then take its record and items).
    pub async fn forgetting(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.forgetting.lock().await
    }

    /// Whether jobs are waiting for the job store to forget them.
    pub fn has_forgotten(&self) -> bool {
        !self
            .forgotten
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// The jobs forgotten since the last call, for the job store to delete.
    pub fn take_forgotten(&self) -> Vec<RunKey> {
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
                        .push(store::run_of(&job));
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
        self.insert(plan, false)
    }

    /// `submit` for a caller that records the job next (`JobService::register`): a job it creates is marked not
    /// recorded yet, under the registry's lock, so a concurrent submission of it waits for the record.
    pub fn submit_to_record(&self, plan: JobPlan) -> Result<Submitted, ApiError> {
        self.insert(plan, true)
    }

    fn insert(&self, plan: JobPlan, to_record: bool) -> Result<Submitted, ApiError> {
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
        let handle = Arc::new(JobHandle::new(plan, self.take_seq()));
        if to_record {
            handle.recorded.pending();
        }
        jobs.insert(handle.plan.key(), handle.clone());
        Ok(Submitted::Created(handle))
    }

    /// The next submission's `seq`: its submission time in Unix milliseconds, one more than the last seq handed out
    /// or restored if that is later. It orders jobs across restarts and replicas (each replica counts its own), and it
    /// tells two runs of one job id apart: a job submitted again after its first run was forgotten gets a later one,
    /// also after a restart that found no record left.
    fn take_seq(&self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.next_seq.fetch_max(now, Ordering::Relaxed);
        self.next_seq.fetch_add(1, Ordering::Relaxed)
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

    /// JOB_STORE=nats: the job as another replica recorded it. The handle already here for the same run (spec hash
    /// and seq) is kept (it may be the one this process submitted); one under another hash lost the race to record,
    /// and one of another run is an earlier run of the job whose forgetting this replica missed: both are replaced.
    pub fn adopt(&self, plan: JobPlan, seq: u64, spec_hash: String) -> Arc<JobHandle> {
        let mut jobs = self.lock();
        if let Some(existing) = jobs.get(&plan.key())
            && existing.spec_hash == spec_hash
            && existing.seq == seq
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
mod tests;
