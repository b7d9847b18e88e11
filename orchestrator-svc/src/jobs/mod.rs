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
mod handed_over;
mod item;
pub mod job;
mod phrases;
mod pipeline;
pub mod preview;
mod recorded;
mod refused;
mod register;
pub mod registry;
mod report;
mod resume;
mod stage;
pub mod store;
mod swatches;
pub mod validate;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

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
use store::JobStore;

#[derive(Debug)]
pub struct JobService {
    registry: Arc<JobRegistry>,
    pipeline: Arc<Pipeline>,
    presets: Arc<BTreeMap<String, Arc<Preset>>>,
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

/// How long a CancelJob of a queue job reads its unstarted items' records before it answers
/// (`Reporter::take_recorded_before_cancel`).
const CANCEL_READS_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

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
            presets: Arc::new(presets),
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
        let plan = self.plan_of(spec)?;
        if let Err(refused) =
            phrases::refuse_unreadable(self.pipeline.segmenter(), spec, &plan).await
        {
            // A job accepted before (unchecked: the segmenter gave no verdict then) and submitted again is the job
            // it is (idempotent, or ALREADY_EXISTS), not refused: it exists and runs.
            let key = JobKey {
                user_id: plan.user_id.clone(),
                job_id: plan.job_id.clone(),
            };
            if self.find(&key).await.is_err() {
                return Err(refused);
            }
        }
        self.register(spec, plan).await
    }

    /// `submit` without asking the segmenter whether it reads the phrases: for queue messages (ADAPTER=queue_pull),
    /// which nobody could be told of a refusal (a message is not a call) and a redelivery must not be refused while
    /// its items run; Segment judges the phrases, every item failing with its callback.
    pub async fn submit_unchecked(&self, spec: &JobSpec) -> Result<Job, ApiError> {
        let plan = self.plan_of(spec)?;
        self.register(spec, plan).await
    }

    /// `spec` planned as a submission: with today's presets, unless a job registered under its id kept a preset and
    /// `spec` planned with that one is that job's spec. A retry identical to the submission (its answer lost) is
    /// then that job even after the preset file changed or was removed since (a restart, a rolling deploy), not
    /// ALREADY_EXISTS "use a new job id", whose advice would run the job twice.
    fn plan_of(&self, spec: &JobSpec) -> Result<JobPlan, ApiError> {
        if let Ok(existing) = self.registry.get(&JobKey::of_spec(spec))
            && let Some(preset) = &existing.plan.preset
        {
            let kept =
                BTreeMap::from([(existing.plan.effective_spec.preset.clone(), preset.clone())]);
            if let Ok(plan) = validate::validate(spec, &kept, self.limits)
                && plan.effective_spec == existing.plan.effective_spec
            {
                return Ok(plan);
            }
        }
        validate::validate(spec, &self.presets, self.limits)
    }

    async fn register(&self, spec: &JobSpec, plan: JobPlan) -> Result<Job, ApiError> {
        let shared = !plan.durable_items;
        let job = match self.registry.submit_to_record(plan)? {
            // A retry while the first call still records the job: its answer once that call has one.
            Submitted::Existing(job) => {
                if job.recorded.wait().await {
                    // The registry's handle now: JOB_STORE=nats may have put the recorded run in this one's place.
                    let job = self.registry.get(&job.plan.key()).unwrap_or(job);
                    return Ok(job.snapshot());
                }
                return Err(ApiError::StoreUnavailable(
                    "the first submission of this job could not record it; retry".into(),
                ));
            }
            Submitted::Created(job) => job,
        };
        // The job is registered, recorded and started by a task of its own: tonic drops this call's future when
        // its client gives up, and the record may already be committed (the store's write runs on the blocking
        // pool). The job then ends up registered and running, or not recorded and not registered, never between.
        let registrar = self.registrar();
        let spec = spec.clone();
        let task = crate::tasks::spawn_tracked(self.pipeline.tasks(), "register_job", {
            let job = job.clone();
            async move {
                let _on_panic = register::UndoOnPanic {
                    registry: registrar.registry.clone(),
                    job: job.clone(),
                };
                let registered = registrar.register_created(&spec, shared, &job).await;
                job.recorded.set(registered.is_ok());
                registered
            }
        });
        task.await.unwrap_or_else(|e| {
            self.registry.remove(&job);
            job.recorded.set(false);
            Err(ApiError::Internal {
                what: format!("registering the job failed: {e}"),
            })
        })
    }

    fn registrar(&self) -> register::Registrar {
        register::Registrar {
            registry: self.registry.clone(),
            pipeline: self.pipeline.clone(),
            cluster: self.cluster.clone(),
            presets: self.presets.clone(),
            limits: self.limits,
        }
    }

    /// Runs the job's open items (see `register::Registrar::start`).
    fn start(&self, job: Arc<JobHandle>) {
        self.registrar().start(job);
    }

    /// Deletes from the job store what the registry forgot.
    async fn forget_in_store(&self) {
        self.registrar().forget_in_store().await;
    }

    /// An edit of a job that ran before (EditJob): its photos and masks are read back from storage, so any replica
    /// serves it; registered and run like a submitted job, without the segmenter.
    pub async fn edit(&self, request: &EditJobRequest) -> Result<Job, ApiError> {
        edit::check_request(request)?;
        // A retry of an edit already registered (its answer lost) is answered from the registry: planned again from
        // the source's records, it was NOT_FOUND once they were gone, or ALREADY_EXISTS once the source id ran again
        // with other concepts, for the very request that made the edit.
        if let Some(job) = self.registered_edit(request).await {
            return Ok(job);
        }
        self.refuse_a_running_source(request).await?;
        let store = self.pipeline.store();
        let source = edit::record::read_photos(store, &request.user_id, &request.source_job_id)
            .await
            .map_err(|e| e.of_photos(&request.source_job_id))?;
        edit::check_not_the_photos_job(request, &source)?;
        let plan = edit::plan_edit(request, &source, &self.presets, self.limits)?;
        let spec = plan.effective_spec.clone();
        self.register(&spec, plan).await
    }

    /// Like `submit`, for a job that may run again elsewhere (ADAPTER=queue_pull): items are recorded in storage
    /// when they end, and items already recorded are skipped (see `durable`).
    pub async fn submit_durable(&self, spec: &JobSpec) -> Result<Job, ApiError> {
        // No CheckConcepts here: a redelivered message of a job accepted unchecked must not be refused (its
        // open items would never be called back); Segment judges the phrases.
        let mut plan = self.plan_of(spec)?;
        plan.durable_items = true;
        plan.message_hash = Some(job::spec_hash(spec));
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

    /// `find` for GetJob, WatchJob and CancelJob: a job its SubmitJob call is still recording is answered once it is
    /// recorded, and is not found when it ended up not recorded (it was never accepted; a WatchJob that had taken
    /// its handle waited for ever, QUEUED, on a job no longer anywhere). The registry's handle then: JOB_STORE=nats
    /// may have put the recorded run in this one's place.
    pub async fn accepted(&self, key: &JobKey) -> Result<Arc<JobHandle>, ApiError> {
        let job = self.find(key).await?;
        if !job.recorded.wait().await {
            return Err(ApiError::JobNotFound {
                job_id: key.job_id.clone(),
            });
        }
        Ok(self.registry.get(key).unwrap_or(job))
    }

    /// Cancels the job: recorded first (a resumed job stays cancelled), then its open items end CANCELLED.
    pub async fn cancel(&self, key: &JobKey) -> Result<Job, ApiError> {
        // A job its SubmitJob call is still recording: cancelled now, the store finds no record to mark, and the
        // record written next says not cancelled (restarted, or on the other replicas, its items run). So the
        // cancel waits for the record (`accepted`).
        let job = self.accepted(key).await?;
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
        // A queue job run again: what an earlier run recorded for its unstarted items stands, shown as such at once.
        // In a task of its own, awaited: this call's future is dropped when its client gives up, and a cancel cut
        // between stopping the items and ending them left them PENDING for ever.
        if job.plan.durable_items && job.redelivered.load(Ordering::Relaxed) && !job.is_terminal() {
            let (pipeline, cancelled) = (self.pipeline.clone(), job.clone());
            let cancelling =
                crate::tasks::spawn_tracked(self.pipeline.tasks(), "cancel", async move {
                    cancelled.cancel.cancel();
                    let reporter = pipeline.reporter();
                    reporter
                        .take_recorded_before_cancel(&cancelled, CANCEL_READS_WITHIN)
                        .await;
                    pipeline.cancel(&cancelled);
                });
            let _ = cancelling.await;
            return Ok(job.snapshot());
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
