//! grpc.health.v1 as both servers serve it: tonic-health's service, except that Watch streams end when the server
//! starts shutting down. tonic's graceful shutdown waits for every open stream, and tonic-health ends a Watch only
//! when its reporter is dropped, which the services keep to the end: one client watching health on the API port
//! (client-side health checking) held every drain for the whole grace period.
//!
//! Open Watch streams are capped as well (MAX_HEALTH_WATCHES): health needs no token, and each Watch stays open until
//! shutdown, so one unauthenticated connection opening 100,000 of them grew the orchestrator from 116 MB to 658 MB
//! (~5 KB a stream), without bound. Past the cap Watch answers RESOURCE_EXHAUSTED; a slot frees when its stream
//! ends (the client cancels or goes away, or shutdown). One connection may hold at most WATCHES_PER_CONNECTION of
//! them, so one client cannot take every slot and lock other clients' health checking out (a client-side health
//! check treats a refused Watch as an unhealthy backend).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt, stream};
use tokio::sync::{Semaphore, watch};
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

/// The reporter the service sets statuses with, and the health service to hand to `Serving::serve`.
pub fn reporter() -> (HealthReporter, HealthService) {
    let reporter = HealthReporter::new();
    let service = HealthService::from_health_reporter(reporter.clone());
    (reporter, service)
}

/// `inner`, whose Watch streams send a last NOT_SERVING and end once `stopping` turns true, at most `max_watches`
/// of them open at once.
pub struct EndingHealth {
    inner: HealthService,
    stopping: watch::Receiver<bool>,
    watches: Arc<Semaphore>,
    max_watches: usize,
    /// Open Watch streams per connection (its peer address), removed at zero.
    per_connection: Arc<Mutex<HashMap<SocketAddr, usize>>>,
}

/// Watch streams one connection may hold open (a client checking health needs one per service name it watches).
pub const WATCHES_PER_CONNECTION: usize = 8;

/// A connection's count of open Watch streams, given back when the stream is dropped.
struct ConnectionSlot {
    counts: Arc<Mutex<HashMap<SocketAddr, usize>>>,
    peer: Option<SocketAddr>,
}

impl ConnectionSlot {
    fn take(
        counts: &Arc<Mutex<HashMap<SocketAddr, usize>>>,
        peer: Option<SocketAddr>,
    ) -> Option<Self> {
        if let Some(peer) = peer {
            let mut map = counts.lock().unwrap_or_else(|e| e.into_inner());
            let open = map.entry(peer).or_insert(0);
            if *open >= WATCHES_PER_CONNECTION {
                return None;
            }
            *open += 1;
        }
        Some(Self {
            counts: counts.clone(),
            peer,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Some(peer) = self.peer {
            let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(open) = map.get_mut(&peer) {
                *open -= 1;
                if *open == 0 {
                    map.remove(&peer);
                }
            }
        }
    }
}

impl EndingHealth {
    pub fn new(inner: HealthService, stopping: watch::Receiver<bool>, max_watches: usize) -> Self {
        Self {
            inner,
            stopping,
            watches: Arc::new(Semaphore::new(max_watches)),
            max_watches,
            per_connection: Arc::default(),
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for EndingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // Both held by the stream: released when it is dropped, however it ends.
        let Some(connection) = ConnectionSlot::take(&self.per_connection, request.remote_addr())
        else {
            return Err(Status::resource_exhausted(format!(
                "{WATCHES_PER_CONNECTION} health Watch streams are open on this connection, the most one connection \
                 may hold; use Check, or retry once one ends"
            )));
        };
        let Ok(slot) = self.watches.clone().try_acquire_owned() else {
            return Err(Status::resource_exhausted(format!(
                "{} health Watch streams are open, the most this server keeps (MAX_HEALTH_WATCHES); use Check, or \
                 retry once one ends",
                self.max_watches
            )));
        };
        let statuses = self.inner.watch(request).await?.into_inner();
        let mut stopping = self.stopping.clone();
        let stopped = async move {
            // A dropped sender (the server gone) ends the stream as well.
            let _ = stopping.wait_for(|stop| *stop).await;
        };
        let last = HealthCheckResponse {
            status: ServingStatus::NotServing as i32,
        };
        let stream = statuses
            .take_until(stopped)
            .chain(stream::once(async move { Ok(last) }))
            .map(move |item| {
                let _held = (&slot, &connection);
                item
            });
        Ok(Response::new(Box::pin(stream)))
    }
}
