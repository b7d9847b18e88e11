//! Startup and serving: model load, warm-up, gRPC (Segment, health, reflection), metrics, graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use palette_proto::segmenter::v1 as pb;
use palette_service_kit::Serving;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tonic_health::ServingStatus;
use tracing::Instrument;

use crate::config::Config;
use crate::engine::{self, EngineSettings, Health};
use crate::exit::{self, Failure, StalledRun};
use crate::model::manifest::{self, Manifest};
use crate::model::runtime;
use crate::model::tokenizer::PhraseTokenizer;
use crate::preprocess::Preprocessor;
use crate::service::{SegmenterService, Shared};

/// The API's name on grpc.health.v1 and in reflection: the generated server's own, so it cannot drift from the proto.
pub const SERVICE_NAME: &str = pb::segmenter_server::SERVICE_NAME;

/// Loads the model, starts the inference thread and serves on `listener` until `shutdown` resolves, or until
/// EXIT_AFTER_FAILURE_SEC after the engine broke for good (a failed warm-up, a panic: `run` then returns that reason
/// as its error). Then it reports NOT_SERVING, stops accepting, and waits up to the grace period for requests in
/// flight, and stops the inference thread: a batch still running ends before its next decoder run (its requests
/// answered UNAVAILABLE); a warm-up step or probe in progress is finished first. TLS files and tokens are checked
/// before the model loads, so a wrong setting stops startup at once.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let serving = Serving::prepare(&config.serve, &[SERVICE_NAME]).await?;
    let shared = load(&config).await?;
    serve_prepared(config, serving, shared, listener, shutdown).await
}

/// `run` after the model is loaded: for callers that watch the engine's health while the server starts (the
/// benchmark stops at once when the warm-up fails instead of polling health until a timeout).
pub async fn serve(
    config: Config,
    shared: Arc<Shared>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let serving = Serving::prepare(&config.serve, &[SERVICE_NAME]).await?;
    serve_prepared(config, serving, shared, listener, shutdown).await
}

async fn serve_prepared(
    config: Config,
    serving: Serving,
    shared: Arc<Shared>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let engine = shared.engine.clone();
    let engine_thread = shared
        .engine_thread
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();

    let (reporter, health_service) = palette_service_kit::health::reporter();
    report(&reporter, ServingStatus::NotServing).await;
    // Fired at the shutdown signal: from then on health says NOT_SERVING whatever the engine does (a warm-up that
    // ends, or a re-probe that passes, during the drain must not bring traffic back).
    let draining = tokio_util::sync::CancellationToken::new();
    let stall_limit = shared.stall_limit;
    let watchdog = Watchdog {
        busy: engine.busy(),
        limit: stall_limit,
    };
    let health_task = tokio::spawn(
        follow_health(
            engine.health(),
            watchdog,
            reporter.clone(),
            draining.clone(),
        )
        .instrument(tracing::info_span!("task", task = "follow_health")),
    );

    let segmenter = tonic::service::interceptor::InterceptedService::new(
        pb::segmenter_server::SegmenterServer::new(SegmenterService::new(shared))
            .max_decoding_message_size(config.max_message_bytes)
            .max_encoding_message_size(config.max_message_bytes),
        crate::service::stamp_arrival,
    );

    let addr = listener.local_addr()?;
    tracing::info!(%addr, model_dir = %config.model_dir().display(), "segmenter listening");
    let grace = Duration::from_secs(config.shutdown_grace_sec);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let signal_reporter = reporter.clone();
    let give_up = exit::failure(
        engine.health(),
        engine.busy(),
        stall_limit,
        config.exit_after_failure(),
    );
    // Set before the drain starts: a stalled run's requests are not waited for (nothing will answer them).
    let failure_slot = Arc::new(std::sync::OnceLock::<Failure>::new());
    let failed = failure_slot.clone();
    // The shutdown signal, or giving up (`exit`): the same drain, and the latter is `run`'s error.
    let signal_task = tokio::spawn(
        async move {
            tokio::select! {
                () = shutdown => {
                    tracing::info!("shutdown requested: NOT_SERVING, draining in-flight requests");
                }
                failure = give_up => {
                    let _ = failed.set(failure);
                }
            };
            draining.cancel();
            report(&signal_reporter, ServingStatus::NotServing).await;
            let _ = stop_tx.send(());
        }
        .instrument(tracing::info_span!("task", task = "shutdown_signal")),
    );
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let server = serving.serve(
        health_service,
        tonic::service::Routes::new(segmenter),
        listener,
        async move {
            let _ = stop_rx.await;
            let _ = drained_tx.send(());
        },
    );
    tokio::pin!(server);
    // A run hung past RUN_STALL_SEC is not waited for, whatever ended the server: with ENGINE_INSTANCES > 1 one
    // instance can turn Broken while another's run hangs, and joining that one would keep the process up for ever.
    let hung = engine.busy();
    let stalled = || {
        matches!(failure_slot.get(), Some(Failure::Stalled(_)))
            || hung.running_for().is_some_and(|t| t > stall_limit)
    };
    tokio::select! {
        result = &mut server => result?,
        _ = async {
            let _ = drained_rx.await;
            tokio::time::sleep(if stalled() { Duration::ZERO } else { grace }).await
        } => {
            tracing::warn!(grace_sec = grace.as_secs(), "grace period over; closing with requests still in flight");
        }
    }
    drop(engine);
    if stalled() {
        // Its run never returns: joining would hang this task as well. Told to stop, left behind.
        if let Some(thread) = engine_thread {
            thread.detach();
        }
    } else {
        // Stop and join the inference thread (off the async threads: it ends the batch in progress before its
        // next decoder chunk, answering what is left NOT_SERVING).
        tokio::task::spawn_blocking(move || drop(engine_thread)).await?;
    }
    // The signal has fired; the engine's health channel closed with the thread (not after a stall).
    signal_task.await?;
    if tokio::time::timeout(Duration::from_secs(5), health_task)
        .await
        .is_err()
    {
        tracing::warn!("the health task did not end with the inference thread");
    }
    match failure_slot.get() {
        Some(Failure::Broken(reason)) => anyhow::bail!(
            "the model cannot serve ({reason}): exiting so that the segmenter is started again \
             (EXIT_AFTER_FAILURE_SEC)"
        ),
        Some(Failure::Stalled(running)) => return Err(StalledRun(*running).into()),
        None => {}
    }
    tracing::info!("segmenter stopped");
    Ok(())
}

/// Everything up to a warm engine. Blocking work (checksums, session builds) runs off the async runtime.
pub async fn load(config: &Config) -> anyhow::Result<Arc<Shared>> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || load_blocking(&config))
        .await
        .context("model loading task")?
}

fn load_blocking(config: &Config) -> anyhow::Result<Arc<Shared>> {
    // Resolved once: MODEL_DIR is usually a symlink the exporter switches to a new export (FORCE_EXPORT), and every
    // file read through the link could come from either side of a switch during the load (a vision graph from the
    // old export, the decoder from the new one, under the old manifest's model id). The resolved folder stays
    // whole: the exporter keeps old exports.
    let named = config.model_dir();
    let dir = std::fs::canonicalize(&named)
        .with_context(|| format!("MODEL_DIR {}: cannot resolve the folder", named.display()))?;
    if dir != named {
        tracing::info!(model_dir = %named.display(), resolved = %dir.display(), "model folder resolved");
    }
    let manifest = Manifest::load(&dir)?;
    manifest.verify_files(&dir, config.verify_checksums)?;
    let tokenizer = PhraseTokenizer::load(
        &manifest::safe_join(&dir, &manifest.tokenizer.file)?,
        &manifest.tokenizer,
        manifest.text_context_length as usize,
    )?;
    // One set of sessions per inference thread (ENGINE_INSTANCES), built one after the other.
    let sessions = (0..config.engine_instances)
        .map(|instance| runtime::build_sessions(config, &manifest, &dir, instance))
        .collect::<Result<Vec<_>, _>>()?;
    let provider = sessions[0].provider.clone();
    tracing::info!(
        provider = %provider,
        instances = config.engine_instances,
        model = %manifest.model_id(),
        random_init = manifest.random_init.as_deref().unwrap_or("none"),
        attention = manifest.attention.as_deref().unwrap_or("eager"),
        "sessions ready"
    );
    if manifest.random_init.is_some() {
        tracing::warn!(
            "this model has RANDOM weights: shapes and speed are real, masks are meaningless"
        );
    }
    // A top-k decoder cannot return more than K instances per phrase: the configured limit is capped there (and the
    // capped value is what GetModelInfo reports and requests are validated against).
    let max_instances = match manifest.decoder_topk {
        0 => config.max_instances_per_concept,
        k if config.max_instances_per_concept > k => {
            tracing::info!(
                configured = config.max_instances_per_concept,
                decoder_topk = k,
                "MAX_INSTANCES_PER_CONCEPT capped at what this export's decoder returns (re-export with a larger --topk to raise it)"
            );
            k
        }
        _ => config.max_instances_per_concept,
    };
    let decoder_chunk = match config.decoder_chunk {
        0 => provider.default_decoder_chunk(),
        n => n,
    };
    let max_batch_images = provider.max_batch_images(config.max_batch_images);
    // One batch needs every distinct phrase of its requests cached at once: a smaller cache would evict features
    // the same batch still has to decode (the inference thread used to panic on it).
    let batch_phrases = config.max_concepts.saturating_mul(max_batch_images);
    if config.text_cache_entries < batch_phrases {
        anyhow::bail!(
            "TEXT_CACHE_ENTRIES={} is smaller than the distinct phrases one batch can hold (MAX_CONCEPTS {} x \
             MAX_BATCH_IMAGES {} = {batch_phrases}): raise it, or lower those",
            config.text_cache_entries,
            config.max_concepts,
            max_batch_images
        );
    }
    tracing::info!(
        provider = %provider,
        max_batch_images,
        decoder_chunk,
        intra_threads = provider.intra_threads(config.intra_threads).unwrap_or(0),
        cudnn_conv_search = ?config.cudnn_conv_search,
        cuda_prefer_nhwc = config.cuda_prefer_nhwc,
        cuda_attention_kernels = ?config.cuda_attention_kernels,
        "serving settings (0 intra threads: ONNX Runtime's default)"
    );
    let probe_tokens = tokenizer
        .encode("object")
        .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
    let (engine, engine_thread) = engine::spawn(
        sessions,
        EngineSettings {
            image_size: manifest.image_size as usize,
            image_input: manifest.image_input(),
            mask_size: manifest.mask_size as usize,
            context: manifest.text_context_length as usize,
            feature_dim: manifest.text_feature_dim as usize,
            max_batch_images,
            max_queue_delay: config.max_queue_delay(),
            queue_capacity: config.queue_capacity,
            decoder_chunk,
            max_concepts: config.max_concepts,
            text_cache_entries: config.text_cache_entries,
            probe_tokens,
            reprobe_interval: config.reprobe_interval(),
            faults: config.faults.clone(),
            decoder_topk: manifest.decoder_topk as usize,
            mask_output: manifest.mask_output(),
            busy: engine::Busy::with_instances(config.engine_instances as usize),
        },
    )?;
    let stall_limit = Duration::from_secs(match config.run_stall_sec {
        0 if matches!(provider, runtime::Provider::Cuda(_)) => 60,
        0 => 1800,
        seconds => seconds,
    });
    let info = pb::ModelInfo {
        model_id: manifest.model_id(),
        source_model: manifest.source_model.clone(),
        source_revision: manifest.source_revision.clone(),
        random_init: manifest.random_init.clone().unwrap_or_default(),
        precision: manifest.precision.clone(),
        image_size: manifest.image_size,
        mask_size: manifest.mask_size,
        num_queries: manifest.num_queries,
        max_text_tokens: manifest.text_context_length,
        execution_provider: provider.to_string(),
        limits: Some(pb::Limits {
            max_concepts: config.max_concepts as u32,
            max_image_pixels: config.max_image_pixels,
            max_message_bytes: config.max_message_bytes as u64,
            max_batch_images: max_batch_images as u32,
            // What admission compares with (QUEUE_CAPACITY 0 is taken as 1; one queue per ENGINE_INSTANCES thread),
            // as max_batch_images is the effective value.
            queue_capacity: (config.queue_capacity.max(1) * config.engine_instances as usize)
                as u32,
            max_instances_per_concept: max_instances,
        }),
    };
    Ok(Arc::new(Shared {
        engine,
        engine_thread: std::sync::Mutex::new(Some(engine_thread)),
        preprocessor: Preprocessor {
            size: manifest.image_size,
            mean: manifest.image_mean,
            std: manifest.image_std,
            max_pixels: config.max_image_pixels,
            input: manifest.image_input(),
        },
        tokenizer,
        info,
        mask_size: manifest.mask_size as usize,
        max_concepts: config.max_concepts,
        max_concept_chars: config.max_concept_chars,
        default_threshold: config.default_score_threshold,
        max_instances,
        default_deadline: config.default_deadline(),
        preprocess_permits: Arc::new(Semaphore::new(config.preprocess_concurrency.max(1))),
        preprocess_waiting: Default::default(),
        max_preprocess_waiting: config.queue_capacity.max(1),
        max_reply_bytes: config.max_message_bytes,
        stall_limit,
    }))
}

/// The server as a whole (`""`, what most probes ask) and the Segmenter service always say the same.
async fn report(reporter: &tonic_health::server::HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter.set_service_status(SERVICE_NAME, status).await;
}

/// Mirrors the engine's health into grpc.health.v1: NOT_SERVING until warm, and again after a provider failure.
/// A run in progress longer than `limit` (RUN_STALL_SEC) reads as NOT_SERVING until it ends.
struct Watchdog {
    busy: engine::Busy,
    limit: Duration,
}

impl Watchdog {
    fn stalled(&self) -> Option<Duration> {
        self.busy.running_for().filter(|&t| t > self.limit)
    }
}

/// How often the watchdog looks at the run in progress.
const WATCHDOG_EVERY: Duration = Duration::from_millis(500);

async fn follow_health(
    mut health: tokio::sync::watch::Receiver<Health>,
    watchdog: Watchdog,
    reporter: tonic_health::server::HealthReporter,
    draining: tokio_util::sync::CancellationToken,
) {
    let not_serving = || report(&reporter, ServingStatus::NotServing);
    let mut stalled_before = false;
    // Written only when it changes: tonic-health sends every write to each Watch stream, and the health protocol
    // sends a Watch a message only on a change (a write every tick sent each watcher SERVING twice a second).
    let mut reported = None;
    let mut tick = tokio::time::interval(WATCHDOG_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stalled = watchdog.stalled();
        if let Some(running) = stalled.filter(|_| !stalled_before) {
            tracing::error!(
                running_s = running.as_secs(),
                limit_s = watchdog.limit.as_secs(),
                "a model run has not returned (RUN_STALL_SEC): NOT_SERVING until it does"
            );
        } else if stalled.is_none() && stalled_before {
            tracing::warn!("the stalled model run returned");
        }
        stalled_before = stalled.is_some();
        let status = match &*health.borrow_and_update() {
            Health::Serving if stalled.is_none() => ServingStatus::Serving,
            _ => ServingStatus::NotServing,
        };
        if reported != Some(status) {
            report(&reporter, status).await;
            reported = Some(status);
        }
        // Checked after writing: a SERVING written while the signal's NOT_SERVING went out is overwritten here.
        if draining.is_cancelled() {
            return not_serving().await;
        }
        tokio::select! {
            _ = draining.cancelled() => return not_serving().await,
            changed = health.changed() => if changed.is_err() {
                return not_serving().await;
            },
            _ = tick.tick() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus as Reported;
    use tonic_health::pb::health_server::Health as _;
    use tonic_health::server::{HealthReporter, HealthService};

    async fn status(service: &HealthService, name: &str) -> Reported {
        let reply = service
            .check(tonic::Request::new(HealthCheckRequest {
                service: name.into(),
            }))
            .await
            .unwrap();
        Reported::try_from(reply.into_inner().status).unwrap()
    }

    /// A Watch stream hears of a change only (the health protocol): the follower wrote the status on every tick,
    /// and each watcher received SERVING twice a second.
    #[tokio::test(start_paused = true)]
    async fn a_health_watch_hears_each_change_once() {
        use futures::StreamExt;
        use tonic_health::pb::health_server::Health as _;
        let (engine, health) = tokio::sync::watch::channel(Health::Serving);
        let reporter = HealthReporter::new();
        let service = HealthService::from_health_reporter(reporter.clone());
        let draining = tokio_util::sync::CancellationToken::new();
        let watchdog = Watchdog {
            busy: Default::default(),
            limit: Duration::from_secs(60),
        };
        let follower = tokio::spawn(follow_health(health, watchdog, reporter, draining.clone()));
        // Registered by the follower's first write.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let mut watch = service
            .watch(tonic::Request::new(HealthCheckRequest {
                service: SERVICE_NAME.into(),
            }))
            .await
            .unwrap()
            .into_inner();
        let mut heard = Vec::new();
        let mut listen = async |heard: &mut Vec<i32>, for_how_long: Duration| {
            let until = tokio::time::Instant::now() + for_how_long;
            while let Ok(Some(reply)) = tokio::time::timeout_at(until, watch.next()).await {
                heard.push(reply.unwrap().status);
            }
        };
        listen(&mut heard, WATCHDOG_EVERY * 10).await;
        engine.send_replace(Health::Failed("probe".into()));
        listen(&mut heard, WATCHDOG_EVERY * 10).await;
        let (serving, not_serving) = (Reported::Serving as i32, Reported::NotServing as i32);
        assert_eq!(heard, [serving, not_serving]);
        draining.cancel();
        follower.await.unwrap();
    }

    /// The engine turning SERVING at the moment the drain begins (a warm-up that ends, a re-probe that passes) must
    /// not bring traffic back: whichever the follower sees first, it ends on NOT_SERVING and stops following.
    #[tokio::test]
    async fn health_stays_not_serving_once_the_drain_began_whatever_the_engine_says() {
        let (engine, health) = tokio::sync::watch::channel(Health::WarmingUp);
        let reporter = HealthReporter::new();
        let service = HealthService::from_health_reporter(reporter.clone());
        let draining = tokio_util::sync::CancellationToken::new();
        let watchdog = Watchdog {
            busy: Default::default(),
            limit: Duration::from_secs(60),
        };
        let follower = tokio::spawn(follow_health(health, watchdog, reporter, draining.clone()));
        tokio::task::yield_now().await;
        engine.send_replace(Health::Serving);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(status(&service, "").await, Reported::Serving);

        engine.send_replace(Health::Failed("probe".into()));
        draining.cancel();
        engine.send_replace(Health::Serving);
        tokio::time::timeout(Duration::from_secs(5), follower)
            .await
            .expect("the follower stops at the drain")
            .unwrap();
        engine.send_replace(Health::Serving);
        for name in ["", SERVICE_NAME] {
            assert_eq!(
                status(&service, name).await,
                Reported::NotServing,
                "{name:?}"
            );
        }
    }
}
