//! grpc.health.v1 as both servers serve it: tonic-health's service, except that Watch streams end when the server
//! starts shutting down. tonic's graceful shutdown waits for every open stream, and tonic-health ends a Watch only
//! when its reporter is dropped, which the services keep to the end: one client watching health on the API port
//! (client-side health checking) held every drain for the whole grace period.
//!
//! Open Watch streams are capped as well (MAX_HEALTH_WATCHES): health needs no token, and each Watch stays open until
//! shutdown, so one unauthenticated connection opening 100,000 of them grew the orchestrator from 116 MB to 658 MB
//! (~5 KB a stream), without bound. Past the cap Watch answers RESOURCE_EXHAUSTED; a slot frees when its stream
//! ends (the client cancels or goes away, or shutdown).

use std::pin::Pin;
use std::sync::Arc;

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
}

impl EndingHealth {
    pub fn new(inner: HealthService, stopping: watch::Receiver<bool>, max_watches: usize) -> Self {
        Self {
            inner,
            stopping,
            watches: Arc::new(Semaphore::new(max_watches)),
            max_watches,
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
        // Held by the stream: released when it is dropped, however it ends.
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
                let _held = &slot;
                item
            });
        Ok(Response::new(Box::pin(stream)))
    }
}
