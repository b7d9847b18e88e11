//! ADAPTER=runpod: the orchestrator as a Runpod serverless queue worker.
//!
//! The protocol follows runpod-python (`runpod/serverless/modules/rp_job.py` for taking jobs, `rp_http.py` for
//! posting results, `rp_ping.py` for the heartbeat):
//! - take: GET `RUNPOD_WEBHOOK_GET_JOB` (`$ID` = `RUNPOD_POD_ID`) plus `job_in_progress=0|1`; 204 (and 400, which
//!   FlashBoot answers) = no job, 200 = `{"id": "...", "input": {...}}`;
//! - progress: POST `RUNPOD_WEBHOOK_POST_OUTPUT` (`$ID` = the Runpod job id) `{"status":"IN_PROGRESS","output":{..}}`;
//! - result: POST the same URL `{"output": {...}}` or `{"error": "..."}`; the body is JSON sent as
//!   `application/x-www-form-urlencoded`, with `isStream=false` in the query and `X-Request-ID: <job id>`, as
//!   rp_http.py does;
//! - heartbeat: GET `RUNPOD_WEBHOOK_PING` (`$RUNPOD_POD_ID` replaced) with `job_id` = the jobs in progress, every
//!   `RUNPOD_PING_INTERVAL` ms;
//! - every request carries `Authorization: <RUNPOD_AI_API_KEY>`.
//!
//! A job's `input` is the seed's job JSON (`userId`, `jobId`, `concepts`, `rules`, `imageCount`, `preset`), submitted
//! to the same `JobService` as SubmitJob, so GetJob/WatchJob/CancelJob keep working on it over gRPC. One job runs at
//! a time (its images still run BATCH_CONCURRENCY at once).

mod backoff;
mod output;
mod post;
mod submit;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::{Value as Json, json};
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

pub use crate::config::RunpodSettings;
pub use backoff::{Jitter, full_jitter};
pub use output::job_json;

use crate::error::Report;
use crate::jobs::{JobKey, JobService};
use crate::spec_json::spec_from_input;
use backoff::{TakePacer, Took};
use submit::submit_patiently;

/// At most one progress post per this interval per job.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// Attempts of the final result post.
const RESULT_ATTEMPTS: u32 = 6;
/// Timeout of one take request (Runpod may hold it open while the queue is empty).
const TAKE_TIMEOUT: Duration = Duration::from_secs(90);
/// Timeout of one post (a result or progress; a ping's is twice RUNPOD_PING_INTERVAL).
const POST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a take in flight at the stop signal may still finish: Runpod may have handed it a job already (as
/// runpod-python does, the take is not dropped), and such a job gets an error result instead of staying IN_PROGRESS.
const TAKE_AFTER_STOP: Duration = Duration::from_secs(2);
/// The result of a job taken after the stop signal: no image starts any more during the drain.
const NOT_STARTED: &str =
    "the worker was shutting down when it took the job: not started; submit it again";

/// A Runpod request that failed.
#[derive(Debug, thiserror::Error)]
enum RunpodError {
    #[error("{request}")]
    Http {
        request: &'static str,
        #[source]
        source: reqwest::Error,
    },
    #[error("{request}: status {status}")]
    Status { request: &'static str, status: u16 },
}

struct Worker {
    settings: RunpodSettings,
    http: reqwest::Client,
    service: Arc<JobService>,
    /// Runpod job ids in progress (reported by the heartbeat).
    current: Arc<Mutex<Vec<String>>>,
    jitter: Jitter,
    /// When the stop signal came (`stop_clock`, or whoever sees it first).
    stopped_at: OnceLock<Instant>,
}

enum Taken {
    Job { id: String, input: Json },
    Bad { id: String, error: String },
    Nothing,
}

impl Worker {
    async fn take(&self) -> Result<Taken, RunpodError> {
        let http = |source| RunpodError::Http {
            request: "take",
            source,
        };
        let in_progress = !self.current.lock().expect("lock").is_empty();
        let response = self
            .http
            .get(self.settings.take_url(in_progress))
            .header("Authorization", self.settings.api_key.expose())
            .timeout(TAKE_TIMEOUT)
            .send()
            .await
            .map_err(http)?;
        let status = response.status().as_u16();
        if status == 204 || status == 400 {
            return Ok(Taken::Nothing);
        }
        if status != 200 {
            return Err(RunpodError::Status {
                request: "take",
                status,
            });
        }
        let body = response.bytes().await.map_err(http)?;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Taken::Nothing);
        }
        let value: Json = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "runpod: job is not JSON; skipped");
                return Ok(Taken::Nothing);
            }
        };
        let Some(id) = value.get("id").and_then(Json::as_str).map(str::to_string) else {
            tracing::error!("runpod: job has no id; skipped");
            return Ok(Taken::Nothing);
        };
        match value.get("input") {
            Some(input) if !input.is_null() => Ok(Taken::Job {
                id,
                input: input.clone(),
            }),
            _ => Ok(Taken::Bad {
                id,
                error: "job has no input".into(),
            }),
        }
    }

    /// Records when `stop` turns true (or its sender goes), whatever the worker is awaiting then.
    async fn stop_clock(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let _ = stop.wait_for(|stopped| *stopped).await;
        self.stopped_at.get_or_init(Instant::now);
    }

    /// When the result of the job in progress must go out, running images or not: `result_within` after the stop
    /// signal (not after whatever await the worker was in when it came), so it stays within the drain's grace.
    /// Only to be asked once stopping: the first call fixes the stop time if `stop_clock` has not yet.
    fn result_by(&self) -> Instant {
        *self.stopped_at.get_or_init(Instant::now) + self.settings.result_within
    }

    /// Runs one Runpod job to its end and posts its result. At `stop` (shutdown) no item starts any more: once none
    /// is running either, a job that is still not finished (its unstarted items left to the job store's resume) gets
    /// an error result at once, rather than none at all after the grace period.
    async fn run_job(&self, runpod_id: &str, input: &Json, mut stop: watch::Receiver<bool>) {
        let spec = match spec_from_input(input) {
            Ok(spec) => spec,
            Err(e) => {
                let error = Report(&e).to_string();
                tracing::warn!(runpod_job = %runpod_id, %error, "runpod: job rejected");
                self.post_result(runpod_id, &json!({ "error": error }))
                    .await;
                return;
            }
        };
        if let Err(error) = submit_patiently(&self.service, runpod_id, &spec, &mut stop).await {
            self.post_result(runpod_id, &json!({ "error": error }))
                .await;
            return;
        }
        let handle = match self.service.get(&JobKey::of_spec(&spec)) {
            Ok(h) => h,
            Err(e) => {
                self.post_result(runpod_id, &json!({"error": e.to_string()}))
                    .await;
                return;
            }
        };
        // Followed by its counts (`JobHandle::progress`, O(1)), not a snapshot of every item at every change; the
        // whole job is read once, for the result. Subscribed first: a change after it is an event.
        let mut events = handle.subscribe().1;
        let mut job = handle.progress();
        let mut dirty = true;
        let mut next_post = Instant::now();
        let mut stopping = *stop.borrow();
        while !job.is_terminal() {
            // Asked only once stopping: `select!` below evaluates every branch's expression, disabled or not, and
            // asking before the signal would take the job's start for the stop time (every SIGTERM more than
            // `result_within` into a job then cut its running images off at once).
            let result_by = stopping.then(|| self.result_by());
            let out_of_time = result_by.is_some_and(|by| Instant::now() >= by);
            if stopping && (out_of_time || job.running == 0) {
                let error = format!(
                    "the worker shut down before the job finished: {} of {} images done; the rest were not \
                     finished (GetJob on the orchestrator, or the per-image callbacks, tell their state)",
                    job.ended(),
                    job.items
                );
                tracing::warn!(runpod_job = %runpod_id, %error, "runpod: job left unfinished at shutdown");
                self.post_result(runpod_id, &json!({ "error": error }))
                    .await;
                return;
            }
            tokio::select! {
                _ = stop.changed(), if !stopping => {
                    stopping = true;
                    job = handle.progress();
                }
                _ = tokio::time::sleep_until(result_by.unwrap_or_else(far_future)), if stopping => {
                    job = handle.progress();
                }
                event = events.recv() => match event {
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        job = handle.progress();
                        dirty = true;
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                // No progress after the stop signal, and a post in flight at the signal is dropped: a slow post (up to
                // POST_TIMEOUT) would push the result past the grace period.
                _ = tokio::time::sleep_until(next_post), if dirty && !stopping => {
                    tokio::select! {
                        () = self.post_progress(runpod_id, &handle.plan.job_id, &job) => {}
                        _ = stop.changed() => stopping = true,
                    }
                    job = handle.progress();
                    dirty = false;
                    next_post = Instant::now() + PROGRESS_EVERY;
                }
            }
        }
        let job = handle.snapshot();
        self.post_result(runpod_id, &json!({"output": output::result_json(&job)}))
            .await;
    }

    async fn ping_loop(self: Arc<Self>, url: String, mut stop: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(self.settings.ping_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // After the stop signal, beats go on while a job is in progress (its result is still to come): Runpod
            // takes a silent worker for a dead one.
            tokio::select! {
                _ = ticker.tick() => {}
                changed = stop.changed(), if !*stop.borrow() => if changed.is_err() {
                    return;
                }
            }
            let jobs = self.current.lock().expect("lock").clone();
            if *stop.borrow() && jobs.is_empty() {
                return;
            }
            let mut query: Vec<(&str, &str)> =
                jobs.iter().map(|j| ("job_id", j.as_str())).collect();
            query.push((
                "runpod_version",
                concat!("orchestrator-svc/", env!("CARGO_PKG_VERSION")),
            ));
            let sent = self
                .http
                .get(&url)
                .header("Authorization", self.settings.api_key.expose())
                .query(&query)
                .timeout(self.settings.ping_interval.saturating_mul(2))
                .send()
                .await;
            if let Err(e) = sent {
                tracing::warn!(error = %Report(&e), "runpod: ping failed");
            }
        }
    }
}

/// Takes Runpod jobs one at a time until `stop` turns true; the job in progress is finished (and its result
/// posted) before returning.
pub async fn run(settings: RunpodSettings, service: Arc<JobService>, stop: watch::Receiver<bool>) {
    run_with(settings, service, stop, full_jitter).await;
}

/// `run` with the backoff's jitter chosen by the caller.
pub async fn run_with(
    settings: RunpodSettings,
    service: Arc<JobService>,
    stop: watch::Receiver<bool>,
    jitter: Jitter,
) {
    tracing::info!(settings = ?settings, "runpod worker started");
    let worker = Arc::new(Worker {
        http: reqwest::Client::new(),
        settings,
        service,
        current: Arc::new(Mutex::new(Vec::new())),
        jitter,
        stopped_at: OnceLock::new(),
    });
    let stop_clock =
        crate::tasks::spawn("runpod_stop_clock", worker.clone().stop_clock(stop.clone()));
    let pinger =
        worker.settings.ping_url.clone().map(|url| {
            crate::tasks::spawn("runpod_ping", worker.clone().ping_loop(url, stop.clone()))
        });
    let mut stop_take = stop.clone();
    let mut pacer = TakePacer::new(worker.jitter);
    while !*stop.borrow() {
        let take = worker.take();
        tokio::pin!(take);
        let taken = tokio::select! {
            taken = &mut take => taken,
            _ = stop_take.changed() => {
                let by = worker.result_by().min(Instant::now() + TAKE_AFTER_STOP);
                if let Ok(Ok(Taken::Job { id, .. } | Taken::Bad { id, .. })) = tokio::time::timeout_at(by, take).await {
                    tracing::warn!(runpod_job = %id, "runpod: job taken at shutdown; not started");
                    worker.post_result(&id, &json!({ "error": NOT_STARTED })).await;
                }
                break;
            }
        };
        let took = match taken {
            Ok(Taken::Job { id, input }) => {
                tracing::info!(runpod_job = %id, "runpod: job taken");
                worker.current.lock().expect("lock").push(id.clone());
                worker.run_job(&id, &input, stop.clone()).await;
                worker.current.lock().expect("lock").retain(|j| j != &id);
                Took::Job
            }
            Ok(Taken::Bad { id, error }) => {
                worker.post_result(&id, &json!({"error": error})).await;
                Took::Job
            }
            Ok(Taken::Nothing) => Took::Nothing,
            Err(e) => {
                tracing::warn!(error = %Report(&e), failures = pacer.failures(), "runpod: take failed");
                Took::Failed
            }
        };
        if let Some(pause) = pacer.after(took) {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop_take.changed() => break,
            }
        }
    }
    stop_clock.abort();
    if let Some(pinger) = pinger {
        pinger.abort();
    }
    tracing::info!("runpod worker stopped");
}

/// A deadline that never comes, for a `select!` branch that is disabled (its expression is evaluated anyway).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(365 * 86_400)
}
