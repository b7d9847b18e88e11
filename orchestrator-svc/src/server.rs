//! Wiring: storage, segmenter client, callbacks, pipeline, gRPC (jobs, health, reflection), metrics, shutdown.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use palette_proto::orchestrator::v1::jobs_server::JobsServer;
use palette_rules::preset::Preset;
use palette_service_kit::{Serving, SetupError};
use tokio::net::TcpListener;

use crate::adapters::queue_pull;
use crate::adapters::runpod;
use crate::callback::{CallbackSender, RetryPolicy};
use crate::config::{
    Adapter, CallbackSettings, Config, ConfigError, JobStoreArgs, JobStoreKind, LimitArgs,
};
use crate::drain::{self, Drain};
use crate::grpc::JobsApi;
use crate::jobs::cluster::Cluster;
use crate::jobs::store::{self, SharedJobStore};
use crate::jobs::{
    InputLimits, ItemRunner, JobLimits, JobService, Pipeline, PreviewSettings, Retention,
};
use crate::segmenter::Segmenter;
use crate::{storage, tasks, telemetry};

/// Why the orchestrator did not start, or stopped serving. Only `run` and `main` see it.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("local storage")]
    Storage(#[source] crate::storage::StorageError),
    /// The object store answered that the credentials or the bucket are wrong (R2_* / AWS_* variables).
    #[error(
        "object storage refused this service's credentials or bucket (check R2_ACCESS_KEY_ID, R2_SECRET_ACCESS_KEY, R2_BUCKET_NAME and the endpoint: R2_ACCOUNT_ID or AWS_ENDPOINT_URL_S3): {0}"
    )]
    StorageAccess(String),
    #[error("job store (JOB_STORE, JOB_STORE_PATH)")]
    JobStore(#[source] crate::jobs::store::StoreError),
    #[error("callback HTTP client")]
    CallbackClient(#[source] reqwest::Error),
    /// TLS, tokens, reflection or the health-only port (the error names the variable).
    #[error(transparent)]
    Serving(#[from] SetupError),
    #[error("the listener's address")]
    Listener(#[source] std::io::Error),
    /// METRICS_ADDR could not be listened on (in use, not this host's).
    #[error("METRICS_ADDR {addr}: the metrics exporter cannot listen there: {reason}")]
    Metrics {
        addr: std::net::SocketAddr,
        reason: String,
    },
    #[error("gRPC server")]
    Serve(#[source] tonic::transport::Error),
}

/// The API's name on grpc.health.v1 and in reflection: the generated server's own, so it cannot drift from the proto.
pub const JOBS_SERVICE: &str = palette_proto::orchestrator::v1::jobs_server::SERVICE_NAME;
/// Requests are small (photos are read from storage, never sent in); replies may be up to 64 times this: a PNG
/// preview near its 4096 px limit, a large job's GetJob (docs/api.md tells clients to raise their receive limit).
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Refuses to start with credentials or a bucket the store says are wrong (every item would fail with a storage
/// error, long after a deploy looked healthy). A refusal or no answer is asked again for `wait` (STORAGE_CHECK_SEC),
/// as a store starting beside this service (compose's SeaweedFS creating its bucket) answers so for a moment; a store
/// still unreachable then, or a refusal that may concern only the probe, is a warning: items retry and report their
/// own errors, and a short outage of the store must not keep the service down.
async fn check_storage_access(
    store: &dyn storage::ObjectStore,
    wait: Duration,
) -> Result<(), StartupError> {
    use storage::AccessCheck;
    if wait.is_zero() {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + wait;
    // The latest answer that was not final: what decides when the time is up.
    let mut last: Option<AccessCheck> = None;
    loop {
        let answer = match tokio::time::timeout_at(deadline, store.check_access()).await {
            Ok(answer) => answer,
            Err(_) => last.take().unwrap_or_else(|| {
                AccessCheck::Unreachable(format!("no answer in {} s", wait.as_secs()))
            }),
        };
        let time_up = tokio::time::Instant::now() + Duration::from_secs(1) >= deadline;
        match answer {
            AccessCheck::Usable => return Ok(()),
            AccessCheck::Doubtful(why) => {
                tracing::warn!(error = %why, "object storage: access not confirmed at start-up; starting anyway");
                return Ok(());
            }
            AccessCheck::Refused(why) if time_up => return Err(StartupError::StorageAccess(why)),
            AccessCheck::Unreachable(why) if time_up => {
                tracing::warn!(error = %why, "object storage: unreachable at start-up; starting anyway");
                return Ok(());
            }
            again @ (AccessCheck::Refused(_) | AccessCheck::Unreachable(_)) => {
                if last.is_none() {
                    tracing::info!(answer = ?again, wait_sec = wait.as_secs(),
                        "object storage: not usable yet; asking again");
                }
                last = Some(again);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn load_presets(config: &LimitArgs) -> Result<BTreeMap<String, Arc<Preset>>, ConfigError> {
    if !config.presets_dir.is_dir() {
        tracing::warn!(dir = %config.presets_dir.display(), "presets directory missing: no presets");
        return Ok(BTreeMap::new());
    }
    let presets = palette_rules::preset::load_dir(&config.presets_dir).map_err(|e| {
        ConfigError::invalid("PRESETS_DIR", config.presets_dir.display().to_string(), e)
    })?;
    for preset in presets.values() {
        // A preset's concepts become mask key segments and are matched against requests as normalised phrases:
        // the same rules as a request's concepts, and written in their normalised form (a "Sofa" would never
        // match its own priorities once a request's "sofa" is lowercased).
        for c in &preset.concepts {
            let normal = crate::jobs::validate::normalize_concept(c);
            let problem = crate::jobs::validate::concept_problem(&normal)
                .or_else(|| (normal != *c).then(|| format!("write it as {normal:?}")));
            if let Some(problem) = problem {
                return Err(ConfigError::invalid(
                    "PRESETS_DIR",
                    config.presets_dir.display().to_string(),
                    format!("preset {:?}: concept {c:?}: {problem}", preset.name),
                ));
            }
        }
        if preset.concepts.len() > config.max_concepts_per_job {
            tracing::warn!(
                preset = %preset.name,
                concepts = preset.concepts.len(),
                limit = config.max_concepts_per_job,
                "preset lists more concepts than MAX_CONCEPTS_PER_JOB: its jobs must name their concepts"
            );
        }
    }
    Ok(presets
        .into_iter()
        .map(|(name, p)| (name, Arc::new(p)))
        .collect())
}

fn callback_sender(
    settings: Option<CallbackSettings>,
) -> Result<Option<Arc<CallbackSender>>, StartupError> {
    let Some(settings) = settings else {
        tracing::warn!("WORKERS_API_URL unset: items are reported through GetJob/WatchJob only");
        return Ok(None);
    };
    let policy = RetryPolicy {
        max_attempts: settings.max_attempts,
        base_delay: settings.base_delay,
        max_delay: settings.max_delay,
        attempt_timeout: settings.attempt_timeout,
    };
    let signing = settings.signing_secret.expose();
    let header = settings.header_secret.as_ref().map(|s| s.expose());
    let sender = CallbackSender::new(&settings.base_url, header.unwrap_or(signing), policy)
        .map_err(StartupError::CallbackClient)?
        .signing_with(signing)
        .with_concurrency(settings.concurrency);
    let sender = if header.is_some() {
        sender
    } else {
        sender.without_secret_header()
    };
    let sender = match &settings.previous_signing_secret {
        Some(previous) => sender.also_signing_with(previous.expose()),
        None => sender,
    };
    Ok(Some(Arc::new(sender)))
}

/// The job store JOB_STORE names, opened (None for `memory`), and for `nats` the state shared with other replicas.
async fn job_store(
    args: &JobStoreArgs,
    nats: &crate::config::NatsArgs,
) -> Result<(Option<SharedJobStore>, Option<Arc<Cluster>>), StartupError> {
    match args.job_store {
        JobStoreKind::Memory => {
            tracing::warn!("JOB_STORE=memory: jobs are lost when the process stops");
            Ok((None, None))
        }
        JobStoreKind::Local => {
            let store = store::open_local(&args.job_store_path).map_err(StartupError::JobStore)?;
            tracing::info!(path = %args.job_store_path.display(), "job store: local");
            Ok((Some(store), None))
        }
        JobStoreKind::Nats => {
            let settings = args.cluster_settings(nats)?;
            tracing::info!(bucket = %settings.bucket, stream = %settings.stream, "job store: nats (shared by every replica)");
            let cluster = Arc::new(
                Cluster::connect(settings)
                    .await
                    .map_err(StartupError::JobStore)?,
            );
            let store: SharedJobStore = cluster.store().clone();
            Ok((Some(store), Some(cluster)))
        }
    }
}

/// Serves until `shutdown` resolves, then stops taking requests and waits (bounded) for items in flight.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartupError> {
    let serving = Serving::prepare(&config.serve, &[JOBS_SERVICE]).await?;
    let (runpod, queue) = match config.adapter {
        Adapter::Grpc => (None, None),
        Adapter::Runpod => (
            Some(
                config
                    .runpod
                    .settings()?
                    .within_grace(Duration::from_secs(config.shutdown_grace_sec)),
            ),
            None,
        ),
        Adapter::QueuePull => (None, Some(config.nats.settings()?)),
    };
    if let Some(addr) = config.metrics_socket()? {
        telemetry::install_metrics(addr)
            .map_err(|reason| StartupError::Metrics { addr, reason })?;
    }
    let store =
        storage::from_settings(config.storage.settings()?).map_err(StartupError::Storage)?;
    check_storage_access(
        store.as_ref(),
        Duration::from_secs(config.storage.storage_check_sec),
    )
    .await?;
    let callbacks = callback_sender(config.callbacks.settings()?)?;
    let args = &config.limits;
    let segmenter = Arc::new(Segmenter::new(
        &config.segmenter.segmenter_url,
        Duration::from_secs(config.segmenter.segmenter_timeout_sec.max(1)),
        Duration::from_secs(config.segmenter.segmenter_keepalive_sec.max(1)),
        config.segmenter.segmenter_attempts,
        Duration::from_secs(config.segmenter.segmenter_resolve_interval_sec),
        config.segmenter.security()?,
    )?);
    let runner = ItemRunner::new(
        store,
        segmenter,
        InputLimits {
            max_bytes: args.max_input_bytes,
            max_pixels: args.max_input_pixels,
        },
        config.segmenter.mask_cache_mb.saturating_mul(1024 * 1024),
    )
    .with_pixel_budget(args.inflight_megapixels())
    .with_item_threads(args.item_threads)
    .with_mask_layout(config.storage.mask_layout);
    let (job_store, cluster) = job_store(&config.jobs, &config.nats).await?;
    // JOB_STORE=nats: a NATS restart shorter than NATS_STORE_PATIENCE_SEC does not make an item run twice.
    let patience = cluster
        .as_ref()
        .map_or(Duration::ZERO, |cluster| cluster.settings().store_patience);
    let pipeline = Arc::new(
        Pipeline::new(runner, callbacks, args.batch_concurrency as usize)
            .with_job_store(job_store)
            .with_store_patience(patience),
    );
    let limits = JobLimits {
        max_images: args.max_images_per_job,
        max_rules: args.max_rules_per_job,
        max_concepts: args.max_concepts_per_job,
    };
    let service = Arc::new(
        JobService::new(
            pipeline.clone(),
            load_presets(args)?,
            limits,
            Retention {
                max_jobs: args.max_retained_jobs,
                max_bytes: args.retained_jobs_mb.saturating_mul(1024 * 1024),
            },
            PreviewSettings {
                cache_bytes: args.preview_cache_mb.saturating_mul(1024 * 1024),
                inputs: InputLimits {
                    max_bytes: args.max_input_bytes,
                    max_pixels: args.max_input_pixels,
                },
            },
        )
        .with_cluster(cluster.clone()),
    );

    // Before serving: a resumed job answers GetJob from the first request on.
    service.resume().await.map_err(StartupError::JobStore)?;
    // JOB_STORE=nats: every job's state follows the shared bucket, items come from the shared work stream, and its
    // backlog is exported for the autoscaler.
    // Taking tasks stops once the server has; the watch only once the items in flight have ended (`following`,
    // dropped on any return): a cancel recorded by another replica during the drain still stops them here, instead
    // of their ending COMPLETED after CancelJob answered.
    let stop_taking = tokio_util::sync::CancellationToken::new();
    let stop_following = tokio_util::sync::CancellationToken::new();
    let following = stop_following.clone().drop_guard();
    if let Some(cluster) = &cluster {
        tasks::spawn(
            "follow_job_store",
            service
                .clone()
                .follow_store(cluster.clone(), stop_following),
        );
        tasks::spawn(
            "take_items",
            service
                .clone()
                .take_items(cluster.clone(), stop_taking.clone()),
        );
        tasks::spawn(
            "item_backlog",
            cluster.clone().report_backlog(stop_taking.clone()),
        );
    }

    let (health, health_service) = palette_service_kit::health::reporter();
    health.set_serving::<JobsServer<JobsApi>>().await;
    let api = JobsApi::new(service.clone());
    let jobs = JobsServer::new(api.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(64 * MAX_MESSAGE_BYTES);

    let local = listener.local_addr().map_err(StartupError::Listener)?;
    tracing::info!(addr = %local, config = ?config, "orchestrator listening");
    // ADAPTER=runpod|queue_pull: the queue worker runs beside the gRPC server (operators keep
    // GetJob/WatchJob/CancelJob).
    let (stop_adapter, adapter_stopped) = tokio::sync::watch::channel(false);
    let worker = match (runpod, queue) {
        (Some(settings), _) => Some(tasks::spawn(
            "runpod_worker",
            runpod::run(settings, service, adapter_stopped),
        )),
        (None, Some(settings)) => Some(tasks::spawn(
            "queue_pull_worker",
            queue_pull::run(settings, service, adapter_stopped),
        )),
        (None, None) => None,
    };
    let drain = Drain::new(Duration::from_secs(config.shutdown_grace_sec));
    let shutdown = drain.on(
        shutdown,
        drain::Parts {
            pipeline: pipeline.clone(),
            api: api.clone(),
            health,
            stop_adapter,
        },
    );
    let server = serving.serve(
        health_service,
        tonic::service::Routes::new(jobs),
        listener,
        shutdown,
    );
    let served = drain.serve(server).await.map_err(StartupError::Serve);
    stop_taking.cancel();
    served?;
    drain.finish(worker, &api, &pipeline).await;
    drop(following);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits_with(dir: &std::path::Path) -> LimitArgs {
        let mut c = Config::for_tests(dir, "http://127.0.0.1:1");
        c.limits.presets_dir = dir.to_path_buf();
        c.limits
    }

    #[test]
    fn preset_concepts_follow_the_rules_of_request_concepts() {
        let dir = tempfile::tempdir().unwrap();
        let write = |concepts: &str| {
            std::fs::write(
                dir.path().join("p.json"),
                format!(r#"{{"name": "p", "concepts": {concepts}}}"#),
            )
            .unwrap()
        };
        write(r#"["sofa", "coffee table"]"#);
        assert_eq!(load_presets(&limits_with(dir.path())).unwrap().len(), 1);
        for (bad, says) in [
            (r#"["sofa", "TV/Monitor"]"#, "letters, digits"),
            (r#"["Sofa"]"#, "write it as \"sofa\""),
        ] {
            write(bad);
            let err = load_presets(&limits_with(dir.path())).unwrap_err();
            let shown = crate::error::report(&err);
            assert!(shown.contains(says), "{bad}: {shown}");
        }
    }
}
