//! Jobs: validation, the in-memory registry and the per-item pipeline, behind one service the gRPC layer and the
//! adapters call.
//!
//! Imports point one way: `JobService` -> `validate` (spec to plan) and `registry` (plans to `job::JobHandle`s) ->
//! `pipeline` (schedules items) -> `item` (one item's work, `ItemRunner`) and `report` (callbacks and records after
//! an item ends); `stage` (metrics) and `job` (state) are used by those and use none of them. `store` keeps job and
//! item records across restarts; `resume` brings them back at start.

pub mod durable;
pub mod edit;
mod give_up;
mod item;
pub mod job;
mod pipeline;
pub mod preview;
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
pub use item::{InputLimits, ItemError, ItemRunner, set_single_threaded_items};
pub use job::JobHandle;
pub use pipeline::Pipeline;
pub use registry::{JobRegistry, Retention, Submitted};
pub use report::callback_body;
pub use validate::{JobKey, JobLimits, JobPlan, job_key};

use crate::error::ApiError;
use store::{Created, JobRecord, RecordKey};

#[derive(Debug)]
pub struct JobService {
    registry: Arc<JobRegistry>,
    pipeline: Arc<Pipeline>,
    presets: BTreeMap<String, Arc<Preset>>,
    limits: JobLimits,
    previews: preview::PreviewService,
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
                previews.cache_bytes,
                previews.inputs,
                limits,
                presets.clone(),
            ),
            pipeline,
            presets,
            limits,
        }
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
        let job = match self.registry.submit(plan)? {
            Submitted::Existing(job) => return Ok(job.snapshot()),
            Submitted::Created(job) => job,
        };
        self.forget_in_store().await;
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
            seq: job.seq,
            cancelled: false,
        };
        match job_store.create(&record).await {
            Ok(Created::New) => Ok(()),
            Ok(Created::Existing(existing)) if existing.spec_hash == record.spec_hash => Ok(()),
            Ok(Created::Existing(_)) => Err(ApiError::JobExists {
                job_id: record.job_id,
            }),
            Err(e) => {
                tracing::error!(job_id = %record.job_id, error = %crate::error::Report(&e), "job not recorded");
                Err(ApiError::StoreUnavailable(e.into()))
            }
        }
    }

    /// An edit of a job that ran before (EditJob): its photos and masks are read back from storage, so any replica
    /// serves it; registered and run like a submitted job, without the segmenter.
    pub async fn edit(&self, request: &EditJobRequest) -> Result<Job, ApiError> {
        edit::check_ids(request)?;
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

    pub fn get(&self, key: &JobKey) -> Result<Arc<JobHandle>, ApiError> {
        self.registry.get(key)
    }

    /// Cancels the job: recorded first (a resumed job stays cancelled), then its open items end CANCELLED.
    pub async fn cancel(&self, key: &JobKey) -> Result<Job, ApiError> {
        let job = self.registry.get(key)?;
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

    pub fn pipeline(&self) -> &Arc<Pipeline> {
        &self.pipeline
    }
}

/// Deletes forgotten jobs from the job store; a failure leaves them to the next start, which forgets them again.
async fn forget(job_store: &dyn store::JobStore, forgotten: &[RecordKey]) {
    if let Err(e) = job_store.forget(forgotten).await {
        metrics::counter!("orchestrator_job_store_errors_total").increment(1);
        tracing::warn!(jobs = forgotten.len(), error = %crate::error::Report(&e), "forgotten jobs not deleted from the job store");
    }
}
