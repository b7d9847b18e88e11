//! Jobs: validation, the in-memory registry and the per-item pipeline, behind one service the gRPC layer and the
//! adapters call.
//!
//! Imports point one way: `JobService` -> `validate` (spec to plan) and `registry` (plans to `job::JobHandle`s) ->
//! `pipeline` (schedules items) -> `item` (one item's work, `ItemRunner`) and `report` (callbacks and records after
//! an item ends); `stage` (metrics) and `job` (state) are used by those and use none of them. `store` keeps job and
//! item records across restarts; `resume` brings them back at start. `cluster` (JOB_STORE=nats) shares jobs between
//! replicas: the store's watch as every replica's view, and items handed out as work.

pub mod cluster;
pub mod durable;
pub mod edit;
mod give_up;
mod item;
pub mod job;
mod pipeline;
pub mod preview;
mod recorded;
pub mod registry;
mod report;
mod resume;
mod stage;
pub mod store;
pub mod validate;

use std::collections::BTreeMap;
use std::sync::Arc;

use palette_proto::orchestrator::v1::{
    EditJobRequest, Job, JobSpec, PreviewEditRequest, PreviewEditResponse,
};
use palette_rules::preset::Preset;

pub use give_up::TOO_MANY_DELIVERIES;
pub use item::{InputLimits, ItemError, ItemRunner};
pub use job::JobHandle;
pub use pipeline::Pipeline;
pub use registry::{JobRegistry, Retention, Submitted};
pub use report::callback_body;
pub use validate::{JobKey, JobLimits, JobPlan, job_key};

use crate::error::ApiError;
use store::{Created, JobRecord, JobStore, RecordKey};

#[derive(Debug)]
pub struct JobService {
    registry: Arc<JobRegistry>,
    pipeline: Arc<Pipeline>,
    presets: BTreeMap<String, Arc<Preset>>,
    limits: JobLimits,
    previews: preview::PreviewService,
    /// JOB_STORE=nats: the state shared with the other replicas; jobs are recorded there and run as item tasks.
    cluster: Option<Arc<cluster::Cluster>>,
}

/// What PreviewEdit may hold and read.
#[derive(Debug, Clone, Copy)]
pub struct PreviewSettings {
    /// PREVIEW_CACHE_MB, in bytes.
    pub cache_bytes: usize,
    /// The same limits as a job's inputs.
    pub inputs: InputLimits,
}

impl JobService {
    pub fn new(
        pipeline: Arc<Pipeline>,
        presets: BTreeMap<String, Arc<Preset>>,
        limits: JobLimits,
        retention: Retention,
        previews: PreviewSettings,
    ) -> Self {
        JobService {
            registry: Arc::new(JobRegistry::new(retention)),
            previews: preview::PreviewService::new(
                pipeline.store().clone(),
                pipeline.pixel_budget().clone(),
                previews.cache_bytes,
                previews.inputs,
                limits,
                presets.clone(),
            ),
            pipeline,
            presets,
            limits,
            cluster: None,
        }
    }

    /// JOB_STORE=nats: jobs are shared with the other replicas through `cluster` (see `cluster`).
    pub fn with_cluster(mut self, cluster: Option<Arc<cluster::Cluster>>) -> Self {
        self.cluster = cluster;
        self
    }

    /// PreviewEdit: rules on one photo of a job at preview size, from its stored masks (`preview`).
    pub async fn preview(
        &self,
        request: &PreviewEditRequest,
    ) -> Result<PreviewEditResponse, ApiError> {
        self.previews.preview(request).await
    }

    /// Validates, registers (idempotent on job id), records (with a job store) and starts the job; returns its
    /// current state. With a job store the answer comes once the job is recorded: an accepted job survives a crash.
    pub async fn submit(&self, spec: &JobSpec) -> Result<Job, ApiError> {
        let plan = validate::validate(spec, &self.presets, self.limits)?;
        self.register(spec, plan).await
    }

    async fn register(&self, spec: &JobSpec, plan: JobPlan) -> Result<Job, ApiError> {
        let shared = !plan.durable_items;
        let job = match self.registry.submit_to_record(plan)? {
            // A retry while the first call still records the job: its answer once that call has one.
            Submitted::Existing(job) => {
                if job.recorded.wait().await {
                    return Ok(job.snapshot());
                }
                return Err(ApiError::StoreUnavailable(
                    "the first submission of this job could not record it; retry".into(),
                ));
            }
            Submitted::Created(job) => job,
        };
        let mut registering = Registering {
            registry: &self.registry,
            job: &job,
            done: false,
        };
        let registered = self.register_created(spec, shared, &job).await;
        registering.done = true;
        job.recorded.set(registered.is_ok());
        registered
    }

    async fn register_created(
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
    fn start(&self, job: Arc<JobHandle>) {
        let registry = self.registry.clone();
        let job_store = self.pipeline.reporter().job_store().cloned();
        let tasks = self.pipeline.tasks().clone();
        self.pipeline.spawn_job(job, move || {
            registry.trim();
            let forgotten = registry.take_forgotten();
            if let Some(job_store) = job_store.filter(|_| !forgotten.is_empty()) {
                crate::tasks::spawn_tracked(&tasks, "forget_jobs", async move {
                    forget(&*job_store, &forgotten).await;
                });
            }
        });
    }

    /// Deletes from the job store what the registry forgot.
    async fn forget_in_store(&self) {
        let forgotten = self.registry.take_forgotten();
        if let Some(job_store) = self.pipeline.reporter().job_store()
            && !forgotten.is_empty()
        {
            forget(&**job_store, &forgotten).await;
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
            // Replicas count their own submissions: the shared store orders jobs by submission time instead.
            seq: if self.cluster.is_some() {
                unix_millis()
            } else {
                job.seq
            },
            cancelled: false,
            source: job.plan.source.clone(),
        };
        match job_store.create(&record).await {
            Ok(Created::New) => Ok(()),
            Ok(Created::Existing(existing)) if existing.spec_hash == record.spec_hash => Ok(()),
            Ok(Created::Existing(_)) => Err(ApiError::JobExists {
                job_id: record.job_id,
            }),
            Err(e) => {
                tracing::error!(job_id = %record.job_id, error = %crate::error::Report(&e), "job not recorded");
                // Unreachable: worth retrying; an existing record that does not decode: not (INTERNAL).
                Err(e.into_api())
            }
        }
    }

    /// An edit of a job that ran before (EditJob): its photos and masks are read back from storage, so any replica
    /// serves it; registered and run like a submitted job, without the segmenter.
    pub async fn edit(&self, request: &EditJobRequest) -> Result<Job, ApiError> {
        edit::check_ids(request)?;
        self.refuse_a_running_source(request).await?;
        let store = self.pipeline.store();
        let source = edit::record::read_photos(store, &request.user_id, &request.source_job_id)
            .await
            .map_err(|e| match e {
                edit::record::RecordError::Missing(_) => ApiError::JobNotFound {
                    job_id: request.source_job_id.clone(),
                },
                edit::record::RecordError::Unreadable { reason, .. } => ApiError::SourceUnusable {
                    job_id: request.source_job_id.clone(),
                    reason,
                },
                edit::record::RecordError::Storage(source) => ApiError::SourceUnavailable {
                    job_id: request.source_job_id.clone(),
                    source: Box::new(source),
                },
            })?;
        let plan = edit::plan_edit(request, &source, &self.presets, self.limits)?;
        let spec = plan.effective_spec.clone();
        self.register(&spec, plan).await
    }

    /// Like `submit`, for a job that may run again elsewhere (ADAPTER=queue_pull): items are recorded in storage
    /// when they end, and items already recorded are skipped (see `durable`).
    pub async fn submit_durable(&self, spec: &JobSpec) -> Result<Job, ApiError> {
        let mut plan = validate::validate(spec, &self.presets, self.limits)?;
        plan.durable_items = true;
        self.register(spec, plan).await
    }

    /// JOB_STORE=nats: jobs are recorded in, and run from, the state every replica shares.
    pub fn shares_jobs(&self) -> bool {
        self.cluster.is_some()
    }

    pub fn get(&self, key: &JobKey) -> Result<Arc<JobHandle>, ApiError> {
        self.registry.get(key)
    }

    /// Like `get`; JOB_STORE=nats: also a job another replica recorded an instant ago, read from the store.
    pub async fn find(&self, key: &JobKey) -> Result<Arc<JobHandle>, ApiError> {
        let found = self.registry.get(key);
        let Some(cluster) = self.cluster.as_ref().filter(|_| found.is_err()) else {
            return found;
        };
        match self.fetch_recorded(cluster, key).await {
            Ok(cluster::Fetched::Job(job)) => Ok(job),
            Ok(cluster::Fetched::NotRecorded | cluster::Fetched::Unplannable { .. }) => found,
            Err(e) => Err(e.into_api()),
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
            Ok(Some(recorded)) if recorded.spec_hash == job.spec_hash => {
                // The mirror fills in what the other replicas did.
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
        if let Err(e) = edit::record::write_photos(self.pipeline.store(), &job.plan).await {
            tracing::warn!(job_id = %job.plan.job_id, error = %crate::error::Report(&e), "the job's photos record was not written: it cannot be edited");
        }
        metrics::counter!("orchestrator_jobs_submitted_total").increment(1);
        tracing::info!(job_id = %job.plan.job_id, images = job.plan.image_count, "job accepted; items queued for every replica");
        Ok(job.snapshot())
    }

    /// Cancels the job: recorded first (a resumed job stays cancelled), then its open items end CANCELLED.
    pub async fn cancel(&self, key: &JobKey) -> Result<Job, ApiError> {
        let job = self.find(key).await?;
        // A job its SubmitJob call is still recording: cancelled now, the store finds no record to mark, and the
        // record written next says not cancelled (restarted, or on the other replicas, its items run). So the
        // cancel waits for the record; a job that ended up not recorded was never accepted.
        if !job.recorded.wait().await {
            return Err(ApiError::JobNotFound {
                job_id: key.job_id.clone(),
            });
        }
        if let Some(cluster) = self.cluster.as_ref() {
            return self.cancel_shared(cluster, &job).await;
        }
        if let Some(job_store) = self.pipeline.reporter().job_store_of(&job)
            && !job.is_terminal()
            && let Err(e) = job_store.cancel(&store::key_of(&job)).await
        {
            // Cancelled here all the same; after a restart its items would run again.
            tracing::warn!(job = %key, error = %crate::error::Report(&e), "cancellation not recorded");
        }
        self.pipeline.cancel(&job);
        Ok(job.snapshot())
    }

    /// JOB_STORE=nats: records the cancel, which every replica sees on its watch and stops the job's items running
    /// there; each open item then ends CANCELLED where its task is held (by the task's holder only: see
    /// `cluster::work`), called back once.
    async fn cancel_shared(
        &self,
        cluster: &cluster::Cluster,
        job: &Arc<JobHandle>,
    ) -> Result<Job, ApiError> {
        if !job.is_terminal() {
            cluster
                .store()
                .cancel(&store::key_of(job))
                .await
                .map_err(store::StoreError::into_api)?;
            job.cancel.cancel();
        }
        Ok(job.snapshot())
    }

    pub fn pipeline(&self) -> &Arc<Pipeline> {
        &self.pipeline
    }
}

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Deletes forgotten jobs from the job store; a failure leaves them to the next start, which forgets them again.
async fn forget(job_store: &dyn store::JobStore, forgotten: &[RecordKey]) {
    if let Err(e) = job_store.forget(forgotten).await {
        metrics::counter!("orchestrator_job_store_errors_total").increment(1);
        tracing::warn!(jobs = forgotten.len(), error = %crate::error::Report(&e), "forgotten jobs not deleted from the job store");
    }
}

/// Until done: takes the job back from the registry, marked not recorded. A SubmitJob call dropped while it records
/// (its client gave up) would otherwise leave a job that is registered but never recorded nor started, and a retry
/// would be told it exists.
struct Registering<'a> {
    registry: &'a JobRegistry,
    job: &'a JobHandle,
    done: bool,
}

impl Drop for Registering<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.registry.remove(self.job);
            self.job.recorded.set(false);
        }
    }
}
