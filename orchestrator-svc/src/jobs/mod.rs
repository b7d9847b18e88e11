//! Jobs: validation, the in-memory registry and the per-item pipeline, behind one service the gRPC layer and the
//! adapters call.
//!
//! Imports point one way: `JobService` -> `validate` (spec to plan) and `registry` (plans to `job::JobHandle`s) ->
//! `pipeline` (schedules items) -> `item` (one item's work, `ItemRunner`) and `report` (callbacks and records after
//! an item ends); `stage` (metrics) and `job` (state) are used by those and use none of them.

pub mod durable;
pub mod edit;
mod item;
pub mod job;
mod pipeline;
pub mod preview;
pub mod registry;
mod report;
mod stage;
pub mod validate;

use std::collections::BTreeMap;
use std::sync::Arc;

use palette_proto::orchestrator::v1::{
    EditJobRequest, Job, JobSpec, PreviewEditRequest, PreviewEditResponse,
};
use palette_rules::preset::Preset;

pub use item::{InputLimits, ItemError, ItemRunner};
pub use job::JobHandle;
pub use pipeline::Pipeline;
pub use registry::{JobRegistry, Retention, Submitted};
pub use report::callback_body;
pub use validate::{JobKey, JobLimits, JobPlan, job_key};

use crate::error::ApiError;

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

    /// Validates, registers (idempotent on job id) and starts the job; returns its current state.
    pub fn submit(&self, spec: &JobSpec) -> Result<Job, ApiError> {
        let plan = validate::validate(spec, &self.presets, self.limits)?;
        self.register(plan)
    }

    fn register(&self, plan: JobPlan) -> Result<Job, ApiError> {
        match self.registry.submit(plan)? {
            Submitted::Created(job) => {
                metrics::counter!("orchestrator_jobs_submitted_total").increment(1);
                tracing::info!(job_id = %job.plan.job_id, images = job.plan.image_count, "job accepted");
                // A finished job's record is at its largest: that is when the registry may have to forget old ones.
                let registry = self.registry.clone();
                self.pipeline
                    .spawn_job(job.clone(), move || registry.trim());
                Ok(job.snapshot())
            }
            Submitted::Existing(job) => Ok(job.snapshot()),
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
        self.register(plan)
    }

    /// Like `submit`, for a job that may run again elsewhere (ADAPTER=queue_pull): items are recorded in storage
    /// when they end, and items already recorded are skipped (see `durable`).
    pub fn submit_durable(&self, spec: &JobSpec) -> Result<Job, ApiError> {
        let mut plan = validate::validate(spec, &self.presets, self.limits)?;
        plan.durable_items = true;
        self.register(plan)
    }

    pub fn get(&self, key: &JobKey) -> Result<Arc<JobHandle>, ApiError> {
        self.registry.get(key)
    }

    pub fn cancel(&self, key: &JobKey) -> Result<Job, ApiError> {
        let job = self.registry.get(key)?;
        self.pipeline.cancel(&job);
        Ok(job.snapshot())
    }

    pub fn pipeline(&self) -> &Arc<Pipeline> {
        &self.pipeline
    }
}
