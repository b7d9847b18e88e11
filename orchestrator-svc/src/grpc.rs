//! The `palette.orchestrator.v1.Jobs` service: a thin layer over `jobs::JobService`.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use palette_proto::orchestrator::v1::jobs_server::Jobs;
use palette_proto::orchestrator::v1::{
    CancelJobRequest, EditJobRequest, GetJobRequest, Job, JobEvent, JobSpec, PreviewEditRequest,
    PreviewEditResponse, WatchJobRequest,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use crate::error::ApiError;
use crate::jobs::job::job_is_terminal;
use crate::jobs::{JobService, job_key};
use crate::tasks::spawn_tracked;

/// Events queued for one slow WatchJob client (each the whole job, or with `changes_only` mostly one item): small,
/// so a watcher costs at most a few snapshots of memory; a client that falls further behind skips ahead to the
/// present.
const WATCH_BUFFER: usize = 4;
/// How long a draining stream waits to queue its UNAVAILABLE for a client that reads nothing.
const DRAIN_NOTICE: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct JobsApi {
    service: Arc<JobService>,
    /// The WatchJob streams' forwarding tasks.
    watchers: TaskTracker,
    /// Fired at shutdown: every WatchJob stream ends with UNAVAILABLE, new SubmitJob, EditJob and WatchJob calls are
    /// refused.
    stopping: CancellationToken,
}

impl JobsApi {
    pub fn new(service: Arc<JobService>) -> Self {
        JobsApi {
            service,
            watchers: TaskTracker::new(),
            stopping: CancellationToken::new(),
        }
    }

    /// Shutdown, at the signal: new SubmitJob, EditJob and WatchJob calls are refused and every open WatchJob stream
    /// ends, all with UNAVAILABLE "draining", so clients reconnect to another replica. (tonic's graceful shutdown waits
    /// for open streams: left open, they would hold the drain until the platform kills the process.)
    pub fn drain(&self) {
        self.stopping.cancel();
        self.watchers.close();
    }

    /// Waits (at most `timeout`) for the WatchJob streams to have ended.
    pub async fn watchers_ended(&self, timeout: std::time::Duration) {
        let _ = tokio::time::timeout(timeout, self.watchers.wait()).await;
    }

    fn refuse_when_draining(&self) -> Result<(), Status> {
        if self.stopping.is_cancelled() {
            return Err(ApiError::Draining.into());
        }
        Ok(())
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Jobs for JobsApi {
    async fn submit_job(&self, request: Request<JobSpec>) -> Result<Response<Job>, Status> {
        self.refuse_when_draining()?;
        Ok(Response::new(self.service.submit(request.get_ref()).await?))
    }

    async fn edit_job(&self, request: Request<EditJobRequest>) -> Result<Response<Job>, Status> {
        // An edit is a new job: refused like SubmitJob, so the client retries on another replica instead of having
        // its items abandoned by this one's drain.
        self.refuse_when_draining()?;
        Ok(Response::new(self.service.edit(request.get_ref()).await?))
    }

    async fn preview_edit(
        &self,
        request: Request<PreviewEditRequest>,
    ) -> Result<Response<PreviewEditResponse>, Status> {
        Ok(Response::new(
            self.service.preview(request.get_ref()).await?,
        ))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let key = job_key(request.get_ref())?;
        Ok(Response::new(self.service.accepted(&key).await?.snapshot()))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(
        &self,
        request: Request<WatchJobRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.refuse_when_draining()?;
        let changes_only = request.get_ref().changes_only;
        let job = self.service.accepted(&job_key(request.get_ref())?).await?;
        let (snapshot, mut events) = job.subscribe();
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let drained = tx.clone();
        let stopping = self.stopping.clone();
        let forward = async move {
            let done = job_is_terminal(&snapshot);
            if tx
                .send(Ok(JobEvent {
                    job: Some(snapshot),
                    changed_idx: None,
                    item: None,
                }))
                .await
                .is_err()
                || done
            {
                return;
            }
            loop {
                let event = match events.recv().await {
                    Ok(idx) if changes_only => {
                        let (header, item) = job.change(idx);
                        if job_is_terminal(&header) {
                            // The last event is the whole job: items that ended while this one was on its way
                            // (a cancel ends them all at once) have events still queued, which the stream, ending
                            // here, would never send.
                            let whole = job.snapshot();
                            JobEvent {
                                item: whole.items.get(idx as usize).cloned(),
                                job: Some(whole),
                                changed_idx: Some(idx),
                            }
                        } else {
                            JobEvent {
                                job: Some(header),
                                changed_idx: Some(idx),
                                item,
                            }
                        }
                    }
                    Ok(idx) => {
                        let whole = job.snapshot();
                        JobEvent {
                            item: whole.items.get(idx as usize).cloned(),
                            job: Some(whole),
                            changed_idx: Some(idx),
                        }
                    }
                    // Too slow for the buffer: skip ahead to the present, the whole job.
                    Err(broadcast::error::RecvError::Lagged(_)) => JobEvent {
                        job: Some(job.snapshot()),
                        changed_idx: None,
                        item: None,
                    },
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let done = event.job.as_ref().is_some_and(job_is_terminal);
                if tx.send(Ok(event)).await.is_err() || done {
                    return;
                }
            }
        };
        spawn_tracked(&self.watchers, "watch_job", async move {
            tokio::select! {
                () = forward => {}
                () = stopping.cancelled() => {
                    let notice = drained.send(Err(ApiError::Draining.into()));
                    let _ = tokio::time::timeout(DRAIN_NOTICE, notice).await;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_job(
        &self,
        request: Request<CancelJobRequest>,
    ) -> Result<Response<Job>, Status> {
        let key = job_key(request.get_ref())?;
        Ok(Response::new(self.service.cancel(&key).await?))
    }
}
