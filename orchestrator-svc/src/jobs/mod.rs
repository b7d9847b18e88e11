//! Jobs: validation, the in-memory registry and the per-item pipeline, behind one service the gRPC layer and the
//! adapters call.
//!
//! Imports point one way: `JobService` -> `validate` (spec to plan) and `registry` (plans to `job::JobHandle`s) ->
//! `pipeline` (schedules items) -> `item` (one item's work, `ItemRunner`) and `report` (callbacks and records after
//! an item ends); `stage` (metrics) and `job` (state) are used by those and use none of them.

pub mod durable;
mod item;
pub mod job;
mod pipeline;
pub mod registry;
mod report;
mod stage;
pub mod store;
pub mod validate;

use std::collections::BTreeMap;
use std::sync::Arc;

use palette_proto::orchestrator::v1::{Job, JobSpec};
use palette_rules::preset::Preset;

pub use item::{InputLimits, ItemError, ItemRunner};
pub use job::JobHandle;
pub use pipeline::Pipeline;
pub use registry::{JobRegistry, Retention, Submitted};
pub use report::callback_body;
pub use validate::{JobLimits, JobPlan};

use crate::error::ApiError;

#[derive(Debug)]
pub struct JobService {
    registry: Arc<JobRegistry>,
    pipeline: Arc<Pipeline>,
    presets: BTreeMap<String, Arc<Preset>>,
    limits: JobLimits,
}

impl JobService {
    pub fn new(
        pipeline: Arc<Pipeline>,
        presets: BTreeMap<String, Arc<Preset>>,
        limits: JobLimits,
        retention: Retention,
    ) -> Self {
        JobService {
            registry: Arc::new(JobRegistry::new(retention)),
            pipeline,
            presets,
            limits,
        }
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

    /// Like `submit`, for a job that may run again elsewhere (ADAPTER=queue_pull): items are recorded in storage
    /// when they end, and items already recorded are skipped (see `durable`).
    pub fn submit_durable(&self, spec: &JobSpec) -> Result<Job, ApiError> {
        let mut plan = validate::validate(spec, &self.presets, self.limits)?;
        plan.durable_items = true;
        self.register(plan)
    }

    pub fn get(&self, job_id: &str) -> Result<Arc<JobHandle>, ApiError> {
        self.registry.get(job_id)
    }

    pub fn cancel(&self, job_id: &str) -> Result<Job, ApiError> {
        let job = self.registry.get(job_id)?;
        self.pipeline.cancel(&job);
        Ok(job.snapshot())
    }

    pub fn pipeline(&self) -> &Arc<Pipeline> {
        &self.pipeline
    }
}
