//! grpc.health.v1 as both servers serve it: tonic-health's service, except that Watch streams end when the server
//! starts shutting down. tonic's graceful shutdown waits for every open stream, and tonic-health ends a Watch only
//! when its reporter is dropped, which the services keep to the end: one client watching health on the API port
//! (client-side health checking) held every drain for the whole grace period.

use std::pin::Pin;

use futures::{Stream, StreamExt, stream};
use tokio::sync::watch;
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

/// `inner`, whose Watch streams send a last NOT_SERVING and end once `stopping` turns true.
pub struct EndingHealth {
    inner: HealthService,
    stopping: watch::Receiver<bool>,
}

impl EndingHealth {
    pub fn new(inner: HealthService, stopping: watch::Receiver<bool>) -> Self {
        Self { inner, stopping }
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
            .chain(stream::once(async move { Ok(last) }));
        Ok(Response::new(Box::pin(stream)))
    }
}
