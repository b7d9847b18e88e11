//! The segmenter client: calls balanced over every segmenter replica (SEGMENTER_URL entries, host names resolved
//! to all their addresses and re-resolved periodically), a deadline per call, a few retries while a replica is
//! starting, gone or overloaded (each retry through the balancer again), W3C trace context on every Segment call,
//! and the model id (cached) that keys mask reuse.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::Uri;
use palette_proto::segmenter::v1::segmenter_client::SegmenterClient;
use palette_proto::segmenter::v1::{
    GetModelInfoRequest, Image, MaskFormat, SegmentRequest, SegmentResponse, image::Source,
};
use tokio::sync::{RwLock, mpsc, oneshot};
use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::Instrument;

use crate::error::Error;
use crate::telemetry;

/// Responses carry model-resolution masks for every instance: generous, but bounded.
const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;
/// How long a learnt model id is trusted before GetModelInfo is asked again.
const MODEL_ID_TTL: Duration = Duration::from_secs(60);
/// Inputs are sent encoded (at most MAX_INPUT_BYTES, 40 MB by default) plus a little framing.
const MAX_REQUEST_BYTES: usize = 128 * 1024 * 1024;
/// How long a replica gets to accept a TCP connection before the resolver leaves it out for a round.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a retry waits for the resolver's fresh view of the replicas.
const REFRESH_WAIT: Duration = Duration::from_secs(2);

/// One entry of SEGMENTER_URL: where to resolve and what to call the replicas (`:authority`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub scheme: String,
    pub host: String,
    pub port: u16,
}

impl Target {
    fn origin(&self) -> String {
        if self.host.contains(':') {
            format!("{}://[{}]:{}", self.scheme, self.host, self.port)
        } else {
            format!("{}://{}:{}", self.scheme, self.host, self.port)
        }
    }
}

/// SEGMENTER_URL: one or more comma-separated `http://host:port` or `dns:///host:port` (gRPC naming; an authority
/// between `dns://` and the third slash is ignored). A host name is resolved to all its addresses (a Kubernetes
/// headless Service: one per ready Pod), and every address is a replica.
pub fn parse_targets(urls: &str) -> Result<Vec<Target>, String> {
    let mut targets = Vec::new();
    for entry in urls.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let target = if let Some(rest) = entry.strip_prefix("dns:") {
            let rest = match rest.strip_prefix("//") {
                Some(after) => after
                    .split_once('/')
                    .map(|(_, name)| name)
                    .ok_or_else(|| format!("{entry:?}: expected dns:///host:port"))?,
                None => rest,
            };
            let uri: Uri = format!("http://{rest}")
                .parse()
                .map_err(|e| format!("{entry:?}: {e}"))?;
            let port = uri
                .port_u16()
                .ok_or_else(|| format!("{entry:?}: a port is required"))?;
            Target {
                scheme: "http".into(),
                host: host_of(&uri, entry)?,
                port,
            }
        } else {
            let uri: Uri = entry.parse().map_err(|e| format!("{entry:?}: {e}"))?;
            let scheme = match uri.scheme_str() {
                Some(s @ ("http" | "https")) => s.to_string(),
                _ => {
                    return Err(format!(
                        "{entry:?}: expected http://host:port or dns:///host:port"
                    ));
                }
            };
            let port = uri
                .port_u16()
                .unwrap_or(if scheme == "https" { 443 } else { 80 });
            Target {
                host: host_of(&uri, entry)?,
                scheme,
                port,
            }
        };
        targets.push(target);
    }
    if targets.is_empty() {
        return Err("no URL given".into());
    }
    Ok(targets)
}

fn host_of(uri: &Uri, entry: &str) -> Result<String, String> {
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("{entry:?}: no host"))?;
    Ok(host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string())
}

#[derive(Debug)]
pub struct Segmenter {
    client: SegmenterClient<Channel>,
    attempts: u32,
    first_backoff: Duration,
    deadline: Duration,
    /// Replicas currently in the balancer.
    replicas: Arc<AtomicUsize>,
    /// Asks the resolver for a fresh round (answered when its changes are in the balancer).
    refresh: mpsc::Sender<oneshot::Sender<()>>,
    /// The model id and when it was learnt.
    model_id: RwLock<Option<(String, Instant)>>,
}

impl Segmenter {
    /// Never connects here: the first call does, so the orchestrator starts (and serves health) before the segmenter.
    /// Calls are balanced (power of two choices) over every replica the resolver task finds: the addresses of every
    /// entry of `urls`, looked up again every `resolve_every` (zero: only at start and after failed calls), and
    /// only those accepting TCP connections while at least one does. Needs a Tokio runtime (spawns the resolver).
    pub fn new(
        urls: &str,
        deadline: Duration,
        attempts: u32,
        resolve_every: Duration,
    ) -> Result<Self, Error> {
        let targets =
            parse_targets(urls).map_err(|e| Error::Config(format!("SEGMENTER_URL: {e}")))?;
        let (channel, changes) = Channel::balance_channel::<SocketAddr>(64);
        let replicas = Arc::new(AtomicUsize::new(0));
        let (refresh, requests) = mpsc::channel(64);
        let resolver = Resolver {
            targets,
            deadline,
            changes,
            replicas: replicas.clone(),
            current: BTreeMap::new(),
            known: BTreeMap::new(),
        };
        tokio::spawn(resolver.run(resolve_every, requests));
        let client = SegmenterClient::new(channel)
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
            .max_encoding_message_size(MAX_REQUEST_BYTES);
        Ok(Segmenter {
            client,
            attempts: attempts.max(1),
            first_backoff: Duration::from_millis(200),
            deadline,
            replicas,
            refresh,
            model_id: RwLock::new(None),
        })
    }

    /// Replicas the balancer currently holds.
    pub fn replicas(&self) -> usize {
        self.replicas.load(Ordering::SeqCst)
    }

    /// The loaded model's id (GetModelInfo, remembered for MODEL_ID_TTL; refreshed sooner when a Segment reply
    /// names another). It keys mask reuse, so a segmenter upgraded in place is noticed within the TTL.
    pub async fn model_id(&self) -> Result<String, Error> {
        if let Some((id, learnt)) = self.model_id.read().await.clone()
            && learnt.elapsed() < MODEL_ID_TTL
        {
            return Ok(id);
        }
        let info = self
            .with_retries("GetModelInfo", |mut client| async move {
                client
                    .get_model_info(GetModelInfoRequest {})
                    .await
                    .map(|r| r.into_inner())
            })
            .await?;
        *self.model_id.write().await = Some((info.model_id.clone(), Instant::now()));
        Ok(info.model_id)
    }

    /// One Segment call for all `concepts` of one image, masks as 8-bit probabilities at model resolution. Each
    /// attempt carries the W3C trace context of a `segment` span (a child of the caller's span).
    pub async fn segment(
        &self,
        encoded: &[u8],
        concepts: &[String],
        request_id: &str,
    ) -> Result<SegmentResponse, Error> {
        let request = SegmentRequest {
            image: Some(Image {
                source: Some(Source::Encoded(encoded.to_vec())),
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
                let mut request = tonic::Request::new(request.clone());
                telemetry::inject_context(&tracing::Span::current(), request.metadata_mut());
                async move { client.segment(request).await.map(|r| r.into_inner()) }
            })
            .instrument(span)
            .await?;
        if !response.model_id.is_empty() {
            *self.model_id.write().await = Some((response.model_id.clone(), Instant::now()));
        }
        Ok(response)
    }

    /// Retries UNAVAILABLE and RESOURCE_EXHAUSTED with backoff. Every attempt goes through the balancer again, and
    /// after a failure the resolver first re-checks the replicas, so a retry lands on one that still answers.
    async fn with_retries<T, F, Fut>(&self, what: &str, call: F) -> Result<T, Error>
    where
        F: Fn(SegmenterClient<Channel>) -> Fut,
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
            };
            match result {
                Ok(value) => return Ok(value),
                Err(status) if retryable(status.code()) && attempt < self.attempts => {
                    tracing::warn!(what, attempt, code = ?status.code(), message = status.message(), "segmenter call failed, retrying");
                    if status.code() == Code::Unavailable {
                        self.refresh_replicas().await;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
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

/// Keeps the balancer's replica set equal to the resolved addresses that accept connections (all of them when
/// none does, so that calls fail fast rather than wait).
struct Resolver {
    targets: Vec<Target>,
    deadline: Duration,
    changes: mpsc::Sender<Change<SocketAddr, Endpoint>>,
    replicas: Arc<AtomicUsize>,
    /// In the balancer now.
    current: BTreeMap<SocketAddr, ()>,
    /// The last addresses each target resolved to (kept when a lookup fails).
    known: BTreeMap<usize, BTreeSet<SocketAddr>>,
}

impl Resolver {
    async fn run(mut self, every: Duration, mut requests: mpsc::Receiver<oneshot::Sender<()>>) {
        let mut tick = (!every.is_zero()).then(|| {
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        if !self.round().await {
            return;
        }
        loop {
            let waiter = tokio::select! {
                request = requests.recv() => match request {
                    Some(done) => Some(done),
                    // The Segmenter is gone.
                    None => return,
                },
                _ = async {
                    match tick.as_mut() {
                        Some(t) => { t.tick().await; }
                        None => std::future::pending::<()>().await,
                    }
                } => None,
            };
            // Requests queued meanwhile are answered by this same round.
            let mut waiters: Vec<_> = waiter.into_iter().collect();
            while let Ok(done) = requests.try_recv() {
                waiters.push(done);
            }
            if !self.round().await {
                return;
            }
            for done in waiters {
                let _ = done.send(());
            }
        }
    }

    /// Resolves, probes and updates the balancer. False when the balancer is gone.
    async fn round(&mut self) -> bool {
        let mut resolved = BTreeSet::new();
        for (i, target) in self.targets.iter().enumerate() {
            let addrs: Option<BTreeSet<SocketAddr>> = match target.host.parse::<IpAddr>() {
                Ok(ip) => Some([SocketAddr::new(ip, target.port)].into()),
                Err(_) => {
                    match tokio::net::lookup_host((target.host.as_str(), target.port)).await {
                        Ok(addrs) => Some(addrs.collect()),
                        Err(e) => {
                            tracing::warn!(host = %target.host, error = %e, "segmenter lookup failed; keeping the last addresses");
                            None
                        }
                    }
                }
            };
            if let Some(addrs) = addrs {
                self.known.insert(i, addrs);
            }
            if let Some(addrs) = self.known.get(&i) {
                resolved.extend(addrs.iter().map(|a| (*a, i)));
            }
        }
        let probes = resolved.iter().map(|(addr, _)| async move {
            let up = matches!(
                tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await,
                Ok(Ok(_))
            );
            (*addr, up)
        });
        let up: BTreeSet<SocketAddr> = futures::future::join_all(probes)
            .await
            .into_iter()
            .filter_map(|(addr, up)| up.then_some(addr))
            .collect();
        let wanted: BTreeMap<SocketAddr, usize> = resolved
            .iter()
            .filter(|(addr, _)| up.is_empty() || up.contains(addr))
            .map(|(addr, i)| (*addr, *i))
            .collect();
        let removed: Vec<SocketAddr> = self
            .current
            .keys()
            .filter(|a| !wanted.contains_key(a))
            .copied()
            .collect();
        for addr in removed {
            tracing::info!(%addr, "segmenter replica removed");
            if self.changes.send(Change::Remove(addr)).await.is_err() {
                return false;
            }
            self.current.remove(&addr);
        }
        for (addr, i) in wanted {
            if self.current.contains_key(&addr) {
                continue;
            }
            let target = &self.targets[i];
            let endpoint = match endpoint(target, addr, self.deadline) {
                Ok(endpoint) => endpoint,
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "segmenter replica skipped");
                    continue;
                }
            };
            tracing::info!(%addr, host = %target.host, "segmenter replica added");
            if self
                .changes
                .send(Change::Insert(addr, endpoint))
                .await
                .is_err()
            {
                return false;
            }
            self.current.insert(addr, ());
        }
        self.replicas.store(self.current.len(), Ordering::SeqCst);
        metrics::gauge!("orchestrator_segmenter_replicas").set(self.current.len() as f64);
        true
    }
}

/// A replica: connects to `addr`, but calls it by the configured name (`:authority`).
fn endpoint(target: &Target, addr: SocketAddr, deadline: Duration) -> Result<Endpoint, Error> {
    let origin: Uri = target
        .origin()
        .parse()
        .map_err(|e| Error::Config(format!("SEGMENTER_URL: {e}")))?;
    Ok(Endpoint::from_shared(format!("{}://{addr}", target.scheme))
        .map_err(|e| Error::Config(format!("SEGMENTER_URL: {e}")))?
        .origin(origin)
        .connect_timeout(Duration::from_secs(5))
        .timeout(deadline)
        .tcp_nodelay(true))
}

/// Starting, restarting or a full queue: worth another try shortly.
fn retryable(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::ResourceExhausted)
}

fn map_status(what: &str, attempts: u32, status: Status) -> Error {
    let text = format!(
        "{what} after {attempts} attempt(s): {:?}: {}",
        status.code(),
        status.message()
    );
    match status.code() {
        Code::Unavailable
        | Code::ResourceExhausted
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Unknown => Error::SegmenterUnavailable(text),
        Code::Ok
        | Code::InvalidArgument
        | Code::OutOfRange
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::Aborted
        | Code::Unimplemented
        | Code::Internal
        | Code::DataLoss
        | Code::Unauthenticated => Error::SegmenterRejected(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_into_targets() {
        let t = parse_targets("http://seg:50051").unwrap();
        assert_eq!(
            t,
            vec![Target {
                scheme: "http".into(),
                host: "seg".into(),
                port: 50051
            }]
        );
        let t = parse_targets(
            " http://10.0.0.1:1, dns:///seg.ns.svc:50051 ,dns://8.8.8.8/x:2,http://[::1]:3",
        )
        .unwrap();
        let hosts: Vec<(&str, u16)> = t.iter().map(|t| (t.host.as_str(), t.port)).collect();
        assert_eq!(
            hosts,
            vec![("10.0.0.1", 1), ("seg.ns.svc", 50051), ("x", 2), ("::1", 3)]
        );
        assert_eq!(t[3].origin(), "http://[::1]:3");
        assert_eq!(parse_targets("http://seg").unwrap()[0].port, 80);
        assert!(parse_targets("dns:///seg").is_err(), "dns needs a port");
        assert!(parse_targets("ftp://seg:1").is_err());
        assert!(parse_targets(" , ").is_err());
    }
}
