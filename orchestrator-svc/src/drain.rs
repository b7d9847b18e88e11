//! Shutdown, from the signal to exit, bounded by SHUTDOWN_GRACE_SEC: at the signal no item starts any more, health
//! turns NOT_SERVING, new SubmitJob/EditJob/WatchJob calls and open WatchJob streams get UNAVAILABLE "draining"
//! (clients reconnect to another replica) and the queue worker stops taking jobs; then the server closes its
//! connections, and items in flight and their callbacks get what is left of the grace period. With a job store, what
//! did not finish resumes at the next start.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use palette_proto::orchestrator::v1::jobs_server::JobsServer;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic_health::server::HealthReporter;

use crate::grpc::JobsApi;
use crate::jobs::Pipeline;

/// One process's drain: when it began, and how long it may take.
#[derive(Debug, Clone)]
pub struct Drain {
    grace: Duration,
    began: Arc<OnceLock<Instant>>,
    notify: Arc<tokio::sync::Notify>,
}

/// What the drain stops at the signal.
pub struct Parts {
    pub pipeline: Arc<Pipeline>,
    pub api: JobsApi,
    pub health: HealthReporter,
    /// Tells the queue worker (ADAPTER=runpod|queue_pull) to stop taking jobs.
    pub stop_adapter: tokio::sync::watch::Sender<bool>,
}

impl Drain {
    pub fn new(grace: Duration) -> Self {
        Drain {
            grace,
            began: Arc::default(),
            notify: Arc::default(),
        }
    }

    /// The server's shutdown future: waits for `signal`, then stops new work at once.
    pub fn on(&self, signal: impl Future<Output = ()>, parts: Parts) -> impl Future<Output = ()> {
        let this = self.clone();
        async move {
            signal.await;
            let _ = this.began.set(Instant::now());
            this.notify.notify_waiters();
            // Items nothing resumes end FAILED, each with its callback: `finish` ends them a margin before the grace
            // ends, once the queue worker has stopped (a Runpod worker posts its job's result at that margin first),
            // and this clock at the latest half a margin before: the worker (a result post slow to be answered) or
            // the server (connections still open) could hold `finish` up to the end of the grace, and the process
            // exited with them unended, never called back.
            // Weak: held, the pipeline (and its job store, a locked file) outlived a drain that ended before the timer.
            let out_of_time = this.last_call();
            let pipeline = Arc::downgrade(&parts.pipeline);
            tokio::spawn(async move {
                tokio::time::sleep_until(out_of_time).await;
                if let Some(pipeline) = pipeline.upgrade() {
                    pipeline.out_of_time();
                }
            });
            tracing::info!(grace = ?this.grace, "shutting down: no new items; WatchJob streams end (UNAVAILABLE, draining)");
            parts.pipeline.stop_starting();
            parts.api.drain();
            not_serving(&parts.health).await;
            let _ = parts.stop_adapter.send(true);
        }
    }

    /// When the grace period ends (far in the future until the signal came).
    fn deadline(&self) -> Instant {
        self.began
            .get()
            .map_or_else(|| Instant::now() + self.grace, |began| *began + self.grace)
    }

    /// When items nothing resumes are ended FAILED (`Pipeline::out_of_time`): a margin before the deadline, for their
    /// callbacks.
    fn give_up_at(&self) -> Instant {
        let deadline = self.deadline();
        deadline
            .checked_sub(crate::config::results_margin(self.grace))
            .unwrap_or(deadline)
    }

    /// When items nothing resumes are ended FAILED whatever else the drain still waits for: half a margin before the
    /// deadline.
    fn last_call(&self) -> Instant {
        let deadline = self.deadline();
        deadline
            .checked_sub(crate::config::results_margin(self.grace) / 2)
            .unwrap_or(deadline)
    }

    /// Runs the server until it stops by itself, or until the grace period is over (its connections are then
    /// dropped).
    pub async fn serve<E>(&self, server: impl Future<Output = Result<(), E>>) -> Result<(), E> {
        let grace_over = async {
            let notified = self.notify.notified();
            if self.began.get().is_none() {
                notified.await;
            }
            tokio::time::sleep_until(self.deadline()).await;
        };
        tokio::select! {
            result = server => result,
            () = grace_over => {
                tracing::warn!("connections still open at the end of SHUTDOWN_GRACE_SEC; closed");
                Ok(())
            }
        }
    }

    /// After the server stopped: the queue worker, the streams and the items in flight, all within the grace period.
    pub async fn finish(&self, worker: Option<JoinHandle<()>>, api: &JobsApi, pipeline: &Pipeline) {
        let deadline = self.deadline();
        if let Some(worker) = worker
            && tokio::time::timeout_at(deadline, worker).await.is_err()
        {
            tracing::warn!("queue worker still busy at the end of SHUTDOWN_GRACE_SEC; leaving it");
        }
        api.watchers_ended(deadline.saturating_duration_since(Instant::now()))
            .await;
        tracing::info!("shutting down: waiting for items in flight");
        pipeline.tasks().close();
        let in_flight = pipeline.tasks().wait();
        tokio::pin!(in_flight);
        if tokio::time::timeout_at(self.give_up_at(), &mut in_flight)
            .await
            .is_err()
        {
            tracing::warn!(
                "items still in flight near the end of SHUTDOWN_GRACE_SEC: those nothing resumes end FAILED"
            );
            pipeline.out_of_time();
            if tokio::time::timeout_at(deadline, &mut in_flight)
                .await
                .is_err()
            {
                tracing::warn!(
                    "items still in flight at the end of SHUTDOWN_GRACE_SEC; leaving them"
                );
            }
        }
    }
}

/// Health at the signal: the Jobs service and the server as a whole (`""`, what Kubernetes' gRPC probes and most
/// load balancers ask for) both NOT_SERVING, so traffic moves away while the drain lasts.
async fn not_serving(health: &HealthReporter) {
    health.set_not_serving::<JobsServer<JobsApi>>().await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
}

#[cfg(test)]
mod tests {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_server::Health;

    #[tokio::test]
    async fn at_the_signal_the_jobs_service_and_the_server_both_say_not_serving() {
        let health = tonic_health::server::HealthReporter::new();
        let service = tonic_health::server::HealthService::from_health_reporter(health.clone());
        health
            .set_serving::<super::JobsServer<super::JobsApi>>()
            .await;
        let service = &service;
        let status = |name: &'static str| async move {
            let request = tonic::Request::new(HealthCheckRequest {
                service: name.into(),
            });
            service.check(request).await.unwrap().into_inner().status
        };
        let jobs = <super::JobsServer<super::JobsApi> as tonic::server::NamedService>::NAME;
        assert_eq!(status("").await, 1, "SERVING before");
        assert_eq!(status(jobs).await, 1);
        super::not_serving(&health).await;
        assert_eq!(status("").await, 2, "NOT_SERVING");
        assert_eq!(status(jobs).await, 2);
    }
}
