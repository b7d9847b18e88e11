//! A created job (SubmitJob, EditJob) registered, recorded and started, in a task of its own (`JobService::register`
//! spawns it): what `Registrar` needs is owned, so the work goes on when the RPC's future is dropped.

use std::collections::BTreeMap;
use std::sync::Arc;

use palette_proto::orchestrator::v1::{Job, JobSpec};
use palette_rules::preset::Preset;

use super::job::JobHandle;
use super::store::{self, Created, JobRecord};
use super::{JobLimits, JobRegistry, Pipeline, cluster, edit, resume};
use crate::error::ApiError;

/// Takes a job whose registration panicked back out of the registry and marks it not recorded, inside the task:
/// when the call that spawned it is gone, nothing else would, and every retry of the submission would wait for its
/// record for ever.
pub(super) struct UndoOnPanic {
    pub(super) registry: Arc<JobRegistry>,
    pub(super) job: Arc<JobHandle>,
}

impl Drop for UndoOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.registry.remove(&self.job);
            self.job.recorded.set(false);
        }
    }
}

/// The parts of `JobService` that register a job.
#[derive(Debug, Clone)]
pub(super) struct Registrar {
    pub(super) registry: Arc<JobRegistry>,
    pub(super) pipeline: Arc<Pipeline>,
    pub(super) cluster: Option<Arc<cluster::Cluster>>,
    /// What a job recorded by another replica is planned with (`resume::replan_record`).
    pub(super) presets: Arc<BTreeMap<String, Arc<Preset>>>,
    pub(super) limits: JobLimits,
}

impl Registrar {
    pub(super) async fn register_created(
        &self,
        spec: &JobSpec,
        shared: bool,
        job: &Arc<JobHandle>,
    ) -> Result<Job, ApiError> {
        let job = job.clone();
        self.forget_in_store().await;
        if let Some(cluster) = self.cluster.clone().filter(|_| shared) {
            return self.register_shared(&cluster, spec, job).await;
        }
        if let Err(e) = self.record(spec, &job).await {
            self.registry.remove(&job);
            return Err(e);
        }
        metrics::counter!("orchestrator_jobs_submitted_total").increment(1);
        tracing::info!(job_id = %job.plan.job_id, images = job.plan.image_count, "job accepted");
        self.start(job.clone());
        Ok(job.snapshot())
    }

    /// Runs the job's open items; when it ends, the registry forgets what it must (a finished job's record is at
    /// its largest), in the job store too (whatever this job is: the jobs forgotten are others).
    pub(super) fn start(&self, job: Arc<JobHandle>) {
        let registry = self.registry.clone();
        let job_store = self.pipeline.reporter().job_store().cloned();
        let tasks = self.pipeline.tasks().clone();
        self.pipeline.spawn_job(job, move || {
            registry.trim();
            if let Some(job_store) = job_store.filter(|_| registry.has_forgotten()) {
                crate::tasks::spawn_tracked(&tasks, "forget_jobs", async move {
                    forget(&registry, &*job_store).await;
                });
            }
        });
    }

    /// Deletes from the job store what the registry forgot; waits for a deletion in progress.
    pub(super) async fn forget_in_store(&self) {
        if let Some(job_store) = self.pipeline.reporter().job_store() {
            forget(&self.registry, &**job_store).await;
        }
    }

    /// Writes the job's record, unless no job store keeps it. Another spec already recorded under the job id is
    /// ALREADY_EXISTS, as in the registry.
    async fn record(&self, spec: &JobSpec, job: &JobHandle) -> Result<(), ApiError> {
        let Some(job_store) = self.pipeline.reporter().job_store_of(job) else {
            return Ok(());
        };
        let record = JobRecord {
            user_id: job.plan.user_id.clone(),
            job_id: job.plan.job_id.clone(),
            spec_hash: job.spec_hash.clone(),
            spec: spec.clone(),
            seq: job.seq,
            cancelled: false,
            source: job.plan.source.clone(),
            preset: job.plan.preset.clone(),
        };
        let not_recorded = |e: store::StoreError| {
            tracing::error!(job_id = %record.job_id, error = %crate::error::Report(&e), "job not recorded");
            // Unreachable: worth retrying; an existing record that does not decode: not (INTERNAL).
            e.into_api()
        };
        match job_store.create(&record).await.map_err(not_recorded)? {
            Created::New => Ok(()),
            // JOB_STORE=local: the registry, which answered before this for every job it holds, has no such job:
            // this is the record of a run it forgot whose deletion failed (`forget` leaves it to the next start).
            // Taken as this job, its item records stood against this run's (a first report finds one: no record,
            // no callback, the item's callback PENDING for ever); another spec's made the id look taken.
            Created::Existing(leftover) if self.cluster.is_none() => {
                tracing::warn!(job_id = %record.job_id, "a forgotten run's record was left in the job store; deleted");
                let run = store::RunKey {
                    job: leftover.key(),
                    seq: leftover.seq,
                };
                job_store.forget(&[run]).await.map_err(not_recorded)?;
                match job_store.create(&record).await.map_err(not_recorded)? {
                    Created::New => Ok(()),
                    Created::Existing(_) => Err(ApiError::StoreUnavailable(
                        "the job store kept a forgotten run's record of this job id; retry".into(),
                    )),
                }
            }
            Created::Existing(existing) if existing.spec_hash == record.spec_hash => Ok(()),
            Created::Existing(_) => Err(ApiError::JobExists {
                job_id: record.job_id,
            }),
        }
    }

    /// JOB_STORE=nats: records the job (its item tasks queued first, so a recorded job always has them) unless
    /// another replica (or an earlier try of this submission) recorded it: then its record stands, and this is the
    /// same job when the spec is the same, ALREADY_EXISTS otherwise.
    async fn register_shared(
        &self,
        cluster: &cluster::Cluster,
        spec: &JobSpec,
        job: Arc<JobHandle>,
    ) -> Result<Job, ApiError> {
        // A store that cannot be reached is worth retrying (UNAVAILABLE); a record that does not decode is not
        // (INTERNAL): queue_pull resubmits the former in place, and would do so for ever with the latter.
        let unavailable = |e: store::StoreError| {
            self.registry.remove(&job);
            e.into_api()
        };
        match cluster
            .store()
            .job(&job.plan.user_id, &job.plan.job_id)
            .await
        {
            Ok(Some(recorded))
                if recorded.spec_hash == job.spec_hash
                    || resume::plans_as_recorded(spec, &recorded, self.limits) =>
            {
                // The recorded run takes this handle's place: planned as recorded (the preset as it was then, as
                // every other replica plans it) and under the record's seq, so retention here forgets that run and
                // no other. Unplannable here (limits lowered since): this handle stands in, as planned now.
                let job = match resume::replan_record(&recorded, &self.presets, self.limits) {
                    Ok(plan) => self
                        .registry
                        .adopt(plan, recorded.seq, recorded.spec_hash.clone()),
                    Err(why) => {
                        tracing::warn!(job_id = %recorded.job_id, reason = %why, "recorded job planned as submitted here");
                        job.clone()
                    }
                };
                // The mirror fills in what the other replicas do from now on. What they did before this handle
                // was registered is read now: the watch passed those updates by while the job was not in this
                // replica's registry (an earlier try of this submission that failed here after the record was
                // committed; a job forgotten here whose deletion failed), and the handle would show those items
                // PENDING for ever.
                if recorded.cancelled && !job.cancel.is_cancelled() {
                    job.cancel.cancel();
                }
                cluster::read_items(cluster, &job, &recorded.key(), recorded.spec.image_count)
                    .await
                    .map_err(unavailable)?;
                return Ok(job.snapshot());
            }
            Ok(Some(_)) => {
                self.registry.remove(&job);
                return Err(ApiError::JobExists {
                    job_id: job.plan.job_id.clone(),
                });
            }
            Ok(None) => {}
            Err(e) => return Err(unavailable(e)),
        }
        // Tasks before the record: a crash in between leaves tasks without a job (dropped after a while, and the
        // client, told nothing, submits again), never a recorded job without tasks. A resubmission publishes them
        // again; a task whose item already ended is acknowledged without running it.
        cluster
            .publish_items(&store::key_of(&job), job.plan.image_count)
            .await
            .map_err(unavailable)?;
        if let Err(e) = self.record(spec, &job).await {
            self.registry.remove(&job);
            return Err(e);
        }
        // What a later edit of this job reads back (`Pipeline::run_job` writes it for jobs run in one process).
        // Awaited, so the record is there before the job can finish (its item tasks are published already): an edit
        // accepted then reads it. Storage failing holds SubmitJob for the retries (~8 s and the SDK's attempts).
        if let Err(e) = edit::record::write_photos_patiently(self.pipeline.store(), &job.plan).await
        {
            tracing::error!(job_id = %job.plan.job_id, error = %crate::error::Report(&e), "the job's photos record was not written: edits of it are refused (or read an earlier run's record of this job id)");
        }
        metrics::counter!("orchestrator_jobs_submitted_total").increment(1);
        tracing::info!(job_id = %job.plan.job_id, images = job.plan.image_count, "job accepted; items queued for every replica");
        Ok(job.snapshot())
    }
}

/// Deletes forgotten jobs from the job store, under the registry's `forgetting` lock; a failure leaves them to the
/// next start, which forgets them again.
async fn forget(registry: &JobRegistry, job_store: &dyn store::JobStore) {
    let _deleting = registry.forgetting().await;
    let forgotten = registry.take_forgotten();
    if forgotten.is_empty() {
        return;
    }
    if let Err(e) = job_store.forget(&forgotten).await {
        metrics::counter!("orchestrator_job_store_errors_total").increment(1);
        tracing::warn!(jobs = forgotten.len(), error = %crate::error::Report(&e), "forgotten jobs not deleted from the job store");
    }
}
