//! The segmenter client: calls balanced over every segmenter replica (SEGMENTER_URL entries, host names resolved
//! to all their addresses and re-resolved periodically), a deadline per call, a few retries while a replica is
//! starting, gone or overloaded (each retry through the balancer again), W3C trace context on every Segment call,
//! and the model id (cached) that keys mask reuse.

mod chunks;
mod failure;
mod phrases;
mod resolver;
mod targets;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use palette_proto::segmenter::v1::segmenter_client::SegmenterClient;
use palette_proto::segmenter::v1::{
    GetModelInfoRequest, Image, MaskFormat, SegmentRequest, SegmentResponse, image::Source,
};
use palette_service_kit::BearerToken;
use tokio::sync::{RwLock, mpsc, oneshot};
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tracing::Instrument;

pub use targets::{Target, TargetError, parse_targets};

use crate::config::{ConfigError, SegmenterSecurity};
use crate::telemetry;
pub use failure::SegmenterError;
use failure::{map_status, own_deadline_passed, replica_gone, retryable};
use resolver::Resolver;

/// Responses carry model-resolution masks for every instance: generous, but bounded.
const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;
/// How long a learnt model id is trusted before GetModelInfo is asked again.
const MODEL_ID_TTL: Duration = Duration::from_secs(60);
/// Inputs are sent encoded (at most MAX_INPUT_BYTES, 40 MB by default) plus a little framing.
const MAX_REQUEST_BYTES: usize = 128 * 1024 * 1024;
/// How long a retry waits for the resolver's fresh view of the replicas.
const REFRESH_WAIT: Duration = Duration::from_secs(2);
/// Longest pause between two attempts of one call.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// What the orchestrator needs to know of the segmenter's model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSummary {
    /// Keys mask reuse.
    pub model_id: String,
    /// The side of the square the model takes its image at (ModelInfo.image_size; 1008 for SAM3). Photos larger
    /// than that are sent downscaled, as raw RGB (`jobs::item::segmenter_input`); None: sent as uploaded.
    pub input_size: Option<u32>,
    /// The most concepts one Segment call may carry (ModelInfo.limits.max_concepts; 0: not said). More are sent
    /// in groups (`chunks`).
    pub max_concepts: u32,
}

/// The generated client over the balancer, adding this service's bearer token to every call.
type Client = SegmenterClient<InterceptedService<Channel, BearerToken>>;

#[derive(Debug)]
pub struct Segmenter {
    client: Client,
    attempts: u32,
    first_backoff: Duration,
    deadline: Duration,
    /// Replicas currently in the balancer.
    replicas: Arc<AtomicUsize>,
    /// Asks the resolver for a fresh round (answered when its changes are in the balancer).
    refresh: mpsc::Sender<oneshot::Sender<()>>,
    /// What GetModelInfo said of the model and when it was learnt.
    model: RwLock<Option<(ModelSummary, Instant)>>,
    /// Phrases CheckConcepts found usable (`phrases`).
    usable_phrases: phrases::Usable,
    /// The resolver task: it ends with the client (aborted on drop; idle between rounds anyway).
    resolver: tokio::task::JoinHandle<()>,
}

impl Drop for Segmenter {
    fn drop(&mut self) {
        self.resolver.abort();
    }
}

impl Segmenter {
    /// Never connects here: the first call does, so the orchestrator starts (and serves health) before the segmenter.
    /// Calls are balanced (power of two choices) over every replica the resolver task finds: the addresses of every
    /// entry of `urls`, looked up again every `resolve_every` (zero: only at start and after failed calls), and
    /// only those that accept connections and answer health SERVING (or have no health service) while at least one
    /// does. `https://` entries speak TLS as `security` says; calls carry its token. Connections are pinged every
    /// `keepalive`, closed when a ping goes unanswered as long. Needs a Tokio runtime (spawns the resolver).
    pub fn new(
        urls: &str,
        deadline: Duration,
        keepalive: Duration,
        attempts: u32,
        resolve_every: Duration,
        security: SegmenterSecurity,
    ) -> Result<Self, ConfigError> {
        let targets =
            parse_targets(urls).map_err(|e| ConfigError::invalid("SEGMENTER_URL", urls, e))?;
        let (channel, changes) = Channel::balance_channel::<SocketAddr>(64);
        let replicas = Arc::new(AtomicUsize::new(0));
        let (refresh, requests) = mpsc::channel(64);
        let resolver = Resolver {
            targets,
            deadline,
            keepalive,
            changes,
            replicas: replicas.clone(),
            current: BTreeMap::new(),
            known: BTreeMap::new(),
            tls: security.tls,
        };
        let resolver =
            crate::tasks::spawn("segmenter_resolver", resolver.run(resolve_every, requests));
        let client = SegmenterClient::with_interceptor(channel, security.token)
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
            .max_encoding_message_size(MAX_REQUEST_BYTES);
        Ok(Segmenter {
            client,
            attempts: attempts.max(1),
            first_backoff: Duration::from_millis(200),
            deadline,
            replicas,
            refresh,
            model: RwLock::new(None),
            usable_phrases: phrases::Usable::default(),
            resolver,
        })
    }

    /// The wait before the first retry (doubled for each further one). Default 200 ms.
    pub fn with_first_backoff(mut self, first: Duration) -> Self {
        self.first_backoff = first;
        self
    }

    /// Replicas the balancer currently holds.
    pub fn replicas(&self) -> usize {
        self.replicas.load(Ordering::SeqCst)
    }

    /// The loaded model's id (`model`).
    pub async fn model_id(&self) -> Result<String, SegmenterError> {
        Ok(self.model().await?.model_id)
    }

    /// The loaded model's id and input size (GetModelInfo, remembered for MODEL_ID_TTL; asked again sooner when a
    /// Segment reply names another model). The id keys mask reuse, so a segmenter upgraded in place is noticed
    /// within the TTL.
    pub async fn model(&self) -> Result<ModelSummary, SegmenterError> {
        if let Some((model, learnt)) = self.model.read().await.clone()
            && learnt.elapsed() < MODEL_ID_TTL
        {
            return Ok(model);
        }
        let info = self
            .with_retries("GetModelInfo", |mut client| {
                let request = self.with_deadline(GetModelInfoRequest {});
                async move { client.get_model_info(request).await.map(|r| r.into_inner()) }
            })
            .await?;
        self.usable_phrases.seen_model(&info.model_id);
        let model = ModelSummary {
            model_id: info.model_id,
            // 0: a segmenter from before the field, or one that does not say; images go as uploaded.
            input_size: (info.image_size > 0).then_some(info.image_size),
            max_concepts: info.limits.map_or(0, |l| l.max_concepts),
        };
        *self.model.write().await = Some((model.clone(), Instant::now()));
        Ok(model)
    }

    /// All `concepts` of one image segmented (the upload's bytes, or raw RGB: `Source`), masks as 8-bit
    /// probabilities at model resolution: one Segment call, or, for more concepts than the segmenter takes in one
    /// call (learnt with the model), one call per group. Each attempt carries the W3C trace context of a `segment`
    /// span (a child of the caller's span).
    pub async fn segment(
        &self,
        image: Source,
        concepts: &[String],
        request_id: &str,
    ) -> Result<SegmentResponse, SegmenterError> {
        let max = self.model().await?.max_concepts;
        let groups = chunks::split(concepts, max);
        if groups.len() == 1 {
            return self.segment_once(image, concepts, request_id).await;
        }
        tracing::info!(
            concepts = concepts.len(),
            max_concepts = max,
            calls = groups.len(),
            "more concepts than the segmenter takes at once (its MAX_CONCEPTS): sent in groups"
        );
        let mut answers = Vec::with_capacity(groups.len());
        for group in &groups {
            answers.push(self.segment_once(image.clone(), group, request_id).await?);
        }
        let asked: Vec<usize> = groups.iter().map(|g| g.len()).collect();
        chunks::join(answers, &asked)
    }

    async fn segment_once(
        &self,
        image: Source,
        concepts: &[String],
        request_id: &str,
    ) -> Result<SegmentResponse, SegmenterError> {
        let request = SegmentRequest {
            image: Some(Image {
                source: Some(image),
            }),
            concepts: concepts.to_vec(),
            score_threshold: None,
            max_instances_per_concept: 0,
            mask_format: MaskFormat::ProbabilityU8 as i32,
            include_rle: false,
            include_semantic: false,
            request_id: request_id.to_string(),
        };
        let span = tracing::info_span!("segment", request_id, concepts = concepts.len());
        let response = self
            .with_retries("Segment", |mut client| {
                let mut request = self.with_deadline(request.clone());
                telemetry::inject_context(&tracing::Span::current(), request.metadata_mut());
                async move { client.segment(request).await.map(|r| r.into_inner()) }
            })
            .instrument(span)
            .await?;
        self.usable_phrases.seen_model(&response.model_id);
        let mut model = self.model.write().await;
        if !response.model_id.is_empty()
            && model
                .as_ref()
                .is_none_or(|(known, _)| known.model_id != response.model_id)
        {
            // Another model answered (a segmenter upgraded in place): its input size is asked for again.
            *model = None;
        }
        Ok(response)
    }

    /// A request carrying this call's deadline as `grpc-timeout`: the channel's timeout (SEGMENTER_TIMEOUT_SEC)
    /// only bounds the wait here and sends nothing, and a segmenter without the header applies its own default
    /// (DEFAULT_DEADLINE_SEC), cutting a longer SEGMENTER_TIMEOUT_SEC short and a shorter one not at all.
    fn with_deadline<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.deadline);
        request
    }

    /// Retries UNAVAILABLE, RESOURCE_EXHAUSTED and CANCELLED (a replica going away mid-call; this call's own
    /// deadline is DEADLINE_EXCEEDED, `failure::own_deadline_passed`) with backoff. Every attempt goes through the balancer again, and
    /// after a failure the resolver first re-checks the replicas, so a retry lands on one that still answers.
    async fn with_retries<T, F, Fut>(
        &self,
        what: &'static str,
        call: F,
    ) -> Result<T, SegmenterError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut backoff = self.first_backoff;
        let mut attempt = 1;
        loop {
            if self.replicas() == 0 {
                // At start the first lookup may still be running; otherwise look again now.
                self.refresh_replicas().await;
            }
            let result = if self.replicas() == 0 {
                Err(Status::unavailable("no segmenter replica resolved"))
            } else {
                // The balancer queues a call while no replica is ready: bound the wait as well as the call.
                match tokio::time::timeout(
                    self.deadline + Duration::from_secs(5),
                    call(self.client.clone()),
                )
                .await
                {
                    Ok(result) => result,
                    Err(_) => Err(Status::deadline_exceeded("no segmenter answer in time")),
                }
                .map_err(own_deadline_passed)
            };
            match result {
                Ok(value) => return Ok(value),
                Err(status) if retryable(&status) && attempt < self.attempts => {
                    tracing::warn!(what, attempt, code = ?status.code(), message = status.message(), "segmenter call failed, retrying");
                    if replica_gone(&status) {
                        self.refresh_replicas().await;
                    }
                    tokio::time::sleep(backoff).await;
                    // Capped: 12 attempts doubling from 200 ms slept ~7 minutes, holding the item's permit.
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    attempt += 1;
                }
                Err(status) => return Err(map_status(what, attempt, status)),
            }
        }
    }

    /// One resolver round now; returns when its changes are queued for the balancer (or after REFRESH_WAIT).
    async fn refresh_replicas(&self) {
        let (done, wait) = oneshot::channel();
        if self.refresh.try_send(done).is_ok() {
            let _ = tokio::time::timeout(REFRESH_WAIT, wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;

    fn client(attempts: u32) -> Segmenter {
        // Nothing listens on port 9: the resolver finds no live replica and keeps the address, so calls fail fast.
        Segmenter::new(
            "http://127.0.0.1:9",
            Duration::from_secs(1),
            Duration::from_secs(20),
            attempts,
            Duration::ZERO,
            SegmenterSecurity::default(),
        )
        .unwrap()
    }

    /// Runs one Segment call through `with_retries` whose every attempt fails with `status()`: the result and how
    /// many attempts were made.
    async fn failing(
        segmenter: &Segmenter,
        status: impl Fn() -> Status,
    ) -> (Result<(), SegmenterError>, u32) {
        let calls = AtomicU32::new(0);
        let result = segmenter
            .with_retries("Segment", |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                let status = status();
                async move { Err(status) }
            })
            .await;
        (result, calls.load(Ordering::SeqCst))
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_is_retried_with_doubling_backoff() {
        let segmenter = client(3).with_first_backoff(Duration::from_millis(200));
        let started = tokio::time::Instant::now();
        let (result, calls) = failing(&segmenter, || Status::unavailable("starting")).await;
        assert!(
            matches!(result, Err(SegmenterError::Unavailable { attempts: 3, .. })),
            "{result:?}"
        );
        assert_eq!(calls, 3);
        // 200 ms, then 400 ms, on the paused clock: the test takes no real time for them.
        assert!(
            started.elapsed() >= Duration::from_millis(600),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_pause_between_attempts_stops_doubling_at_max_backoff() {
        let segmenter = client(12).with_first_backoff(Duration::from_millis(200));
        let started = tokio::time::Instant::now();
        let (_, calls) = failing(&segmenter, || Status::unavailable("down")).await;
        assert_eq!(calls, 12);
        // Eleven pauses: 0.2 + 0.4 + ... + 6.4 = 12.6 s, then 10 s for each of the last five: 62.6 s (doubling on:
        // 409.4 s).
        assert_eq!(started.elapsed(), Duration::from_millis(62_600));
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_closing_mid_call_is_retried_but_the_calls_own_deadline_is_not() {
        let segmenter = client(3);
        let (result, calls) = failing(&segmenter, || Status::cancelled("connection closed")).await;
        assert!(
            matches!(result, Err(SegmenterError::Unavailable { attempts: 3, .. })),
            "{result:?}"
        );
        assert_eq!(calls, 3);

        // What tonic returns when the channel's timeout (SEGMENTER_TIMEOUT_SEC) passes.
        let (result, calls) = failing(&segmenter, || {
            Status::from_error(Box::new(tonic::TimeoutExpired(())))
        })
        .await;
        match result {
            Err(SegmenterError::Unavailable {
                attempts: 1,
                status,
                ..
            }) => {
                assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(calls, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_is_not_retried() {
        let segmenter = client(4);
        let (result, calls) =
            failing(&segmenter, || Status::invalid_argument("not an image")).await;
        assert!(
            matches!(result, Err(SegmenterError::Rejected { attempts: 1, .. })),
            "{result:?}"
        );
        assert_eq!(calls, 1);
    }
}
