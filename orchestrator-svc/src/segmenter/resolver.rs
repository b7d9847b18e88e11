//! The replica set: resolves every SEGMENTER_URL entry, probes the addresses and keeps the balancer's endpoints
//! equal to the ones that accept connections.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::Uri;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::channel::Change;
use tonic::transport::{ClientTlsConfig, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::targets::Target;
use crate::error::{BoxError, Report};

/// How long a replica gets to accept a connection (TCP, TLS with its client certificate, HTTP/2) and answer its
/// health check before the resolver leaves it out for a round: several round trips, so room for a replica across a
/// WAN (a Runpod pod's public address) and not only in the same cluster.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The service a segmenter reports on grpc.health.v1: NOT_SERVING while it warms up, after a provider failure, or
/// while it drains.
const SEGMENTER_SERVICE: &str = palette_proto::segmenter::v1::segmenter_server::SERVICE_NAME;

/// Keeps the balancer's replica set equal to the resolved addresses that are up (all of them when none is, so that
/// calls fail fast rather than wait). Up: accepts a connection and reports the Segmenter SERVING on grpc.health.v1
/// (a replica without a health service is judged by the connection alone). A replica that reports NOT_SERVING
/// leaves the rotation until a later round finds it SERVING again.
pub(super) struct Resolver {
    pub(super) targets: Vec<Target>,
    pub(super) deadline: Duration,
    /// HTTP/2 ping interval of every connection, and how long a ping may go unanswered (SEGMENTER_KEEPALIVE_SEC).
    pub(super) keepalive: Duration,
    pub(super) changes: mpsc::Sender<Change<SocketAddr, Endpoint>>,
    pub(super) replicas: Arc<AtomicUsize>,
    /// In the balancer now.
    pub(super) current: BTreeMap<SocketAddr, ()>,
    /// The last addresses each target resolved to (kept when a lookup fails).
    pub(super) known: BTreeMap<usize, BTreeSet<SocketAddr>>,
    /// TLS for `https://` targets (probes included: a replica is judged over the connection calls will use).
    pub(super) tls: Option<ClientTlsConfig>,
}

impl Resolver {
    pub(super) async fn run(
        mut self,
        every: Duration,
        mut requests: mpsc::Receiver<oneshot::Sender<()>>,
    ) {
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
        let (targets, tls) = (&self.targets, self.tls.as_ref());
        let probes = resolved.iter().map(|(addr, i)| async move {
            let up = match endpoint(&targets[*i], *addr, PROBE_TIMEOUT, PROBE_TIMEOUT, tls) {
                Ok(endpoint) => probe(endpoint, *addr).await,
                Err(_) => false,
            };
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
            let endpoint = match endpoint(
                target,
                addr,
                self.deadline,
                self.keepalive,
                self.tls.as_ref(),
            ) {
                Ok(endpoint) => endpoint,
                Err(e) => {
                    tracing::warn!(%addr, error = %Report(e.as_ref()), "segmenter replica skipped");
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
        // The balancer keeps every address when none answers (calls then fail fast) and the last addresses when a
        // lookup fails, so its size cannot show an outage: this can (0 = no replica SERVING at the last round).
        metrics::gauge!("orchestrator_segmenter_replicas_serving").set(up.len() as f64);
        true
    }
}

/// Whether a replica is up: connects, then asks grpc.health.v1 about the Segmenter service.
async fn probe(endpoint: Endpoint, addr: SocketAddr) -> bool {
    let check = async {
        let channel = endpoint.connect_timeout(PROBE_TIMEOUT).connect().await?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: SEGMENTER_SERVICE.into(),
            })
            .await;
        Ok::<_, tonic::transport::Error>(reply)
    };
    match tokio::time::timeout(PROBE_TIMEOUT, check).await {
        Ok(Ok(Ok(reply))) => {
            let serving = reply.into_inner().status == ServingStatus::Serving as i32;
            if !serving {
                tracing::debug!(%addr, "segmenter replica is not serving");
            }
            serving
        }
        // No health service there: the connection is all we can judge by.
        Ok(Ok(Err(status))) => status.code() == tonic::Code::Unimplemented,
        _ => false,
    }
}

/// A replica: connects to `addr`, but calls it by the configured name (`:authority`) and, over TLS, checks the
/// certificate against that name (not the address it resolved to). Pings every `keepalive`, idle or not: a replica
/// gone without closing its connections (no FIN or RST ever comes) would otherwise hold its calls until their
/// deadline; an unanswered ping closes the connection, its calls fail UNAVAILABLE and are retried elsewhere.
fn endpoint(
    target: &Target,
    addr: SocketAddr,
    deadline: Duration,
    keepalive: Duration,
    tls: Option<&ClientTlsConfig>,
) -> Result<Endpoint, BoxError> {
    let origin: Uri = target.origin().parse()?;
    let mut endpoint = palette_service_kit::http2::client(Endpoint::from_shared(format!(
        "{}://{addr}",
        target.scheme
    ))?)
    .origin(origin)
    .connect_timeout(Duration::from_secs(5))
    .timeout(deadline)
    .tcp_nodelay(true)
    .http2_keep_alive_interval(keepalive)
    .keep_alive_timeout(keepalive)
    .keep_alive_while_idle(true)
    .tcp_keepalive(Some(keepalive));
    if target.scheme == "https" {
        let tls = tls
            .cloned()
            .ok_or("an https:// target without TLS settings")?;
        endpoint = endpoint.tls_config(tls.domain_name(target.host.clone()))?;
    }
    Ok(endpoint)
}
