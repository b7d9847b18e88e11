//! A JobService in-process over a job store the test provides (often one that waits for the test at a chosen
//! step): local object storage under `root`, a segmenter that is never reached (nothing listens on port 1; the
//! tests' items fail `input_missing`, are cancelled or have ended), BATCH_CONCURRENCY 1, limits of 10.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use orchestrator_svc::callback::CallbackSender;
use orchestrator_svc::config::SegmenterSecurity;
use orchestrator_svc::jobs::store::SharedJobStore;
use orchestrator_svc::jobs::{
    InputLimits, ItemRunner, JobLimits, JobService, Pipeline, PreviewSettings, Retention,
};
use orchestrator_svc::segmenter::Segmenter;
use orchestrator_svc::storage::LocalStore;
use palette_rules::preset::Preset;
use palette_service_kit::BearerToken;

/// The service and its pipeline (whose task tracker tests wait on); at most `max_jobs` jobs retained.
#[allow(dead_code)] // Not every test file that includes this module uses both builders.
pub fn in_process(
    job_store: SharedJobStore,
    callbacks: Option<Arc<CallbackSender>>,
    root: &Path,
    max_jobs: usize,
) -> (Arc<Pipeline>, Arc<JobService>) {
    with_cluster(job_store, callbacks, root, max_jobs, None)
}

/// `in_process` sharing jobs through `cluster` (JOB_STORE=nats), without the store's watch or the work stream's
/// worker running: only what a call does itself.
#[allow(dead_code)]
pub fn with_cluster(
    job_store: SharedJobStore,
    callbacks: Option<Arc<CallbackSender>>,
    root: &Path,
    max_jobs: usize,
    cluster: Option<Arc<orchestrator_svc::jobs::cluster::Cluster>>,
) -> (Arc<Pipeline>, Arc<JobService>) {
    with_presets(
        job_store,
        callbacks,
        root,
        max_jobs,
        cluster,
        BTreeMap::new(),
    )
}

/// `with_cluster` with these presets (PRESETS_DIR).
#[allow(dead_code)]
pub fn with_presets(
    job_store: SharedJobStore,
    callbacks: Option<Arc<CallbackSender>>,
    root: &Path,
    max_jobs: usize,
    cluster: Option<Arc<orchestrator_svc::jobs::cluster::Cluster>>,
    presets: BTreeMap<String, Arc<Preset>>,
) -> (Arc<Pipeline>, Arc<JobService>) {
    let segmenter = segmenter_at("http://127.0.0.1:1", Duration::from_secs(1));
    let runner = ItemRunner::new(
        Arc::new(LocalStore::new(root).unwrap()),
        Arc::new(segmenter),
        INPUTS,
        0,
    );
    let pipeline = Arc::new(Pipeline::new(runner, callbacks, 1).with_job_store(Some(job_store)));
    let service = service_of(pipeline.clone(), presets, max_jobs).with_cluster(cluster);
    (pipeline, Arc::new(service))
}

/// The limits on one input these services use.
#[allow(dead_code)]
pub const INPUTS: InputLimits = InputLimits {
    max_bytes: 1 << 20,
    max_pixels: 1 << 20,
};

/// A segmenter client of `url` without TLS or token, one attempt per call.
#[allow(dead_code)]
pub fn segmenter_at(url: &str, timeout: Duration) -> Segmenter {
    let security = SegmenterSecurity {
        tls: None,
        token: BearerToken::new(None).unwrap(),
    };
    Segmenter::new(
        url,
        timeout,
        Duration::from_secs(20),
        1,
        Duration::ZERO,
        security,
    )
    .unwrap()
}

/// The JobService over `pipeline`: limits of 10, at most `max_jobs` jobs retained.
#[allow(dead_code)]
pub fn service_of(
    pipeline: Arc<Pipeline>,
    presets: BTreeMap<String, Arc<Preset>>,
    max_jobs: usize,
) -> JobService {
    JobService::new(
        pipeline,
        presets,
        JobLimits {
            max_images: 10,
            max_rules: 10,
            max_concepts: 10,
        },
        Retention {
            max_jobs,
            max_bytes: 1 << 30,
        },
        PreviewSettings {
            cache_bytes: 1 << 20,
            inputs: INPUTS,
        },
    )
}
