//! ADAPTER=runpod: the orchestrator as a Runpod serverless queue worker.
//!
//! The protocol follows runpod-python (`runpod/serverless/modules/rp_job.py` for taking jobs, `rp_http.py` for
//! posting results, `rp_ping.py` for the heartbeat):
//! - take: GET `RUNPOD_WEBHOOK_GET_JOB` (`$ID` = `RUNPOD_POD_ID`) plus `job_in_progress=0|1`; 204 (and 400, which
//!   FlashBoot answers) = no job, 200 = `{"id": "...", "input": {...}}`;
//! - progress: POST `RUNPOD_WEBHOOK_POST_OUTPUT` (`$ID` = the Runpod job id) `{"status":"IN_PROGRESS","output":{..}}`;
//! - result: POST the same URL `{"output": {...}}` or `{"error": "..."}`; the body is JSON sent as
//!   `application/x-www-form-urlencoded`, as rp_http.py does;
//! - heartbeat: GET `RUNPOD_WEBHOOK_PING` (`$RUNPOD_POD_ID` replaced) with `job_id` = the jobs in progress, every
//!   `RUNPOD_PING_INTERVAL` ms;
//! - every request carries `Authorization: <RUNPOD_AI_API_KEY>`.
//!
//! A job's `input` is the seed's job JSON (`userId`, `jobId`, `concepts`, `rules`, `imageCount`, `preset`), submitted
//! to the same `JobService` as SubmitJob, so GetJob/WatchJob/CancelJob keep working on it over gRPC. One job runs at
//! a time (its images still run BATCH_CONCURRENCY at once).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use palette_proto::orchestrator::v1::{Item, ItemState, Job, JobSpec, JobState, Rule};
use prost_types::value::Kind;
use rand::Rng;
use serde::Deserialize;
use serde_json::{Value as Json, json};
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use crate::config::Config;
use crate::error::Error;
use crate::jobs::JobService;

/// Pause after an empty answer (no job), as rp_job.py's `asyncio.sleep(1)`.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// At most one progress post per this interval per job.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// Backoff of failed Runpod requests: base and cap (full jitter).
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Attempts of the final result post.
const RESULT_ATTEMPTS: u32 = 6;
/// Timeout of one take request (Runpod may hold it open while the queue is empty).
const TAKE_TIMEOUT: Duration = Duration::from_secs(90);
/// Timeout of one post or ping.
const POST_TIMEOUT: Duration = Duration::from_secs(30);

/// The Runpod endpoints, resolved from the RUNPOD_* variables.
#[derive(Clone)]
pub struct RunpodSettings {
    pub get_job_url: String,
    pub post_output_url: String,
    pub ping_url: Option<String>,
    pub pod_id: String,
    pub api_key: String,
    pub ping_interval: Duration,
}

impl std::fmt::Debug for RunpodSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunpodSettings")
            .field("get_job_url", &self.get_job_url)
            .field("post_output_url", &self.post_output_url)
            .field("ping_url", &self.ping_url)
            .field("pod_id", &self.pod_id)
            .field("api_key", &"<redacted>")
            .field("ping_interval", &self.ping_interval)
            .finish()
    }
}

fn required(value: &Option<String>, name: &str) -> Result<String, Error> {
    value
        .as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .ok_or_else(|| Error::Config(format!("ADAPTER=runpod needs {name}")))
}

impl RunpodSettings {
    pub fn from_config(config: &Config) -> Result<Self, Error> {
        let pod_id = required(&config.runpod_pod_id, "RUNPOD_POD_ID")?;
        let get_job_url = required(&config.runpod_webhook_get_job, "RUNPOD_WEBHOOK_GET_JOB")?
            .replace("$RUNPOD_POD_ID", &pod_id)
            .replace("$ID", &pod_id);
        let post_output_url = required(
            &config.runpod_webhook_post_output,
            "RUNPOD_WEBHOOK_POST_OUTPUT",
        )?
        .replace("$RUNPOD_POD_ID", &pod_id);
        let ping_url = config
            .runpod_webhook_ping
            .as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(|v| v.replace("$RUNPOD_POD_ID", &pod_id));
        if ping_url.is_none() {
            tracing::warn!("RUNPOD_WEBHOOK_PING unset: no heartbeat");
        }
        Ok(RunpodSettings {
            get_job_url,
            post_output_url,
            ping_url,
            api_key: required(&config.runpod_ai_api_key, "RUNPOD_AI_API_KEY")?,
            pod_id,
            ping_interval: Duration::from_millis(config.runpod_ping_interval.max(100)),
        })
    }

    fn take_url(&self, in_progress: bool) -> String {
        let sep = if self.get_job_url.contains('?') {
            '&'
        } else {
            '?'
        };
        format!(
            "{}{sep}job_in_progress={}",
            self.get_job_url,
            u8::from(in_progress)
        )
    }

    fn output_url(&self, job_id: &str) -> String {
        self.post_output_url.replace("$ID", job_id)
    }
}

/// The seed's job JSON (what SubmitJob takes), camelCase; snake_case names are accepted too.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SpecJson {
    #[serde(alias = "user_id")]
    user_id: String,
    #[serde(alias = "job_id")]
    job_id: String,
    #[serde(default)]
    concepts: Vec<String>,
    #[serde(default)]
    rules: Vec<RuleJson>,
    #[serde(alias = "image_count")]
    image_count: u32,
    #[serde(default)]
    preset: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RuleJson {
    #[serde(alias = "rule_id")]
    rule_id: String,
    concept: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    params: Option<serde_json::Map<String, Json>>,
}

fn to_prost_value(value: &Json) -> prost_types::Value {
    let kind = match value {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(to_prost_value).collect(),
        }),
        Json::Object(o) => Kind::StructValue(to_prost_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

fn to_prost_struct(map: &serde_json::Map<String, Json>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), to_prost_value(v)))
            .collect(),
    }
}

/// A Runpod job's `input` as a JobSpec; the error is a sentence for the `error` result.
pub fn spec_from_input(input: &Json) -> Result<JobSpec, String> {
    let spec: SpecJson =
        serde_json::from_value(input.clone()).map_err(|e| format!("invalid job input: {e}"))?;
    Ok(JobSpec {
        user_id: spec.user_id,
        job_id: spec.job_id,
        concepts: spec.concepts,
        rules: spec
            .rules
            .into_iter()
            .map(|r| Rule {
                rule_id: r.rule_id,
                concept: r.concept,
                r#type: r.kind,
                params: r.params.as_ref().map(to_prost_struct),
            })
            .collect(),
        image_count: spec.image_count,
        preset: spec.preset.unwrap_or_default(),
    })
}

fn job_state_name(state: i32) -> &'static str {
    match JobState::try_from(state) {
        Ok(JobState::Queued) => "QUEUED",
        Ok(JobState::Running) => "RUNNING",
        Ok(JobState::Done) => "DONE",
        Ok(JobState::Cancelled) => "CANCELLED",
        _ => "UNSPECIFIED",
    }
}

fn item_state_name(state: i32) -> &'static str {
    match ItemState::try_from(state) {
        Ok(ItemState::Pending) => "PENDING",
        Ok(ItemState::Running) => "RUNNING",
        Ok(ItemState::Completed) => "COMPLETED",
        Ok(ItemState::Failed) => "FAILED",
        Ok(ItemState::Cancelled) => "CANCELLED",
        _ => "UNSPECIFIED",
    }
}

fn item_json(item: &Item) -> Json {
    json!({
        "idx": item.idx,
        "state": item_state_name(item.state),
        "inputKey": item.input_key,
        "outputKey": item.output_key,
        "outputs": item.outputs.iter().map(|o| json!({"ruleId": o.rule_id, "outputKey": o.output_key})).collect::<Vec<_>>(),
        "previewKey": item.preview_key,
        "masks": item.masks.iter().map(|m| json!({
            "concept": m.concept, "instance": m.instance, "key": m.key, "score": m.score,
        })).collect::<Vec<_>>(),
        "error": item.error,
        "errorCode": item.error_code,
        "masksReused": item.masks_reused,
    })
}

/// The final `output`: the whole job, every item's state, outputs and error.
pub fn job_json(job: &Job) -> Json {
    json!({
        "userId": job.user_id,
        "jobId": job.job_id,
        "state": job_state_name(job.state),
        "imageCount": job.items.len(),
        "completed": job.completed,
        "failed": job.failed,
        "cancelled": job.cancelled,
        "items": job.items.iter().map(item_json).collect::<Vec<_>>(),
    })
}

/// A progress `output`: counts only (a job may have hundreds of items).
fn progress_json(job: &Job) -> Json {
    let running = job
        .items
        .iter()
        .filter(|i| i.state == ItemState::Running as i32)
        .count();
    json!({
        "jobId": job.job_id,
        "state": job_state_name(job.state),
        "imageCount": job.items.len(),
        "completed": job.completed,
        "failed": job.failed,
        "cancelled": job.cancelled,
        "running": running,
    })
}

fn backoff(attempt: u32) -> Duration {
    let cap = BACKOFF_BASE
        .saturating_mul(1u32 << attempt.min(10))
        .min(BACKOFF_MAX);
    Duration::from_millis(rand::rng().random_range(0..=cap.as_millis() as u64))
}

struct Worker {
    settings: RunpodSettings,
    http: reqwest::Client,
    service: Arc<JobService>,
    /// Runpod job ids in progress (reported by the heartbeat).
    current: Arc<Mutex<Vec<String>>>,
}

enum Taken {
    Job { id: String, input: Json },
    Bad { id: String, error: String },
    Nothing,
}

impl Worker {
    async fn take(&self) -> Result<Taken, String> {
        let in_progress = !self.current.lock().expect("lock").is_empty();
        let response = self
            .http
            .get(self.settings.take_url(in_progress))
            .header("Authorization", &self.settings.api_key)
            .timeout(TAKE_TIMEOUT)
            .send()
            .await
            .map_err(|e| format!("take: {e}"))?;
        let status = response.status().as_u16();
        if status == 204 || status == 400 {
            return Ok(Taken::Nothing);
        }
        if status != 200 {
            return Err(format!("take: status {status}"));
        }
        let body = response.bytes().await.map_err(|e| format!("take: {e}"))?;
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

    async fn post_once(&self, job_id: &str, body: &Json) -> Result<(), String> {
        let response = self
            .http
            .post(self.settings.output_url(job_id))
            .header("Authorization", &self.settings.api_key)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .header("charset", "utf-8")
            .timeout(POST_TIMEOUT)
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("status {}", response.status().as_u16()))
        }
    }

    /// The final result, retried with backoff; a result that cannot be delivered is logged.
    async fn post_result(&self, job_id: &str, body: &Json) {
        for attempt in 0..RESULT_ATTEMPTS {
            match self.post_once(job_id, body).await {
                Ok(()) => {
                    tracing::info!(runpod_job = %job_id, "runpod: result sent");
                    return;
                }
                Err(e) => {
                    tracing::warn!(runpod_job = %job_id, attempt, error = %e, "runpod: result post failed");
                    if attempt + 1 < RESULT_ATTEMPTS {
                        tokio::time::sleep(backoff(attempt)).await;
                    }
                }
            }
        }
        tracing::error!(runpod_job = %job_id, "runpod: result not delivered");
    }

    /// Progress is best effort: one attempt, logged on failure.
    async fn post_progress(&self, job_id: &str, job: &Job) {
        let body = json!({"status": "IN_PROGRESS", "output": progress_json(job)});
        if let Err(e) = self.post_once(job_id, &body).await {
            tracing::warn!(runpod_job = %job_id, error = %e, "runpod: progress post failed");
        }
    }

    /// Runs one Runpod job to its end and posts its result.
    async fn run_job(&self, runpod_id: &str, input: &Json) {
        let spec = match spec_from_input(input) {
            Ok(spec) => spec,
            Err(e) => {
                tracing::warn!(runpod_job = %runpod_id, error = %e, "runpod: job rejected");
                self.post_result(runpod_id, &json!({"error": e})).await;
                return;
            }
        };
        if let Err(e) = self.service.submit(&spec) {
            tracing::warn!(runpod_job = %runpod_id, error = %e, "runpod: job rejected");
            self.post_result(runpod_id, &json!({"error": e.to_string()}))
                .await;
            return;
        }
        let handle = match self.service.get(&spec.job_id) {
            Ok(h) => h,
            Err(e) => {
                self.post_result(runpod_id, &json!({"error": e.to_string()}))
                    .await;
                return;
            }
        };
        let (mut job, mut events) = handle.subscribe();
        let mut dirty = true;
        let mut next_post = Instant::now();
        while !crate::jobs::registry::job_is_terminal(&job) {
            tokio::select! {
                event = events.recv() => match event {
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        job = handle.snapshot();
                        dirty = true;
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                _ = tokio::time::sleep_until(next_post), if dirty => {
                    self.post_progress(runpod_id, &job).await;
                    dirty = false;
                    next_post = Instant::now() + PROGRESS_EVERY;
                }
            }
        }
        let job = handle.snapshot();
        self.post_result(runpod_id, &json!({"output": job_json(&job)}))
            .await;
    }

    async fn ping_loop(self: Arc<Self>, url: String, mut stop: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(self.settings.ping_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.changed() => return,
            }
            let jobs = self.current.lock().expect("lock").clone();
            let mut query: Vec<(&str, &str)> =
                jobs.iter().map(|j| ("job_id", j.as_str())).collect();
            query.push((
                "runpod_version",
                concat!("orchestrator-svc/", env!("CARGO_PKG_VERSION")),
            ));
            let sent = self
                .http
                .get(&url)
                .header("Authorization", &self.settings.api_key)
                .query(&query)
                .timeout(self.settings.ping_interval.saturating_mul(2))
                .send()
                .await;
            if let Err(e) = sent {
                tracing::warn!(error = %e, "runpod: ping failed");
            }
        }
    }
}

/// Takes Runpod jobs one at a time until `stop` turns true; the job in progress is finished (and its result
/// posted) before returning.
pub async fn run(settings: RunpodSettings, service: Arc<JobService>, stop: watch::Receiver<bool>) {
    tracing::info!(settings = ?settings, "runpod worker started");
    let worker = Arc::new(Worker {
        http: reqwest::Client::new(),
        settings,
        service,
        current: Arc::new(Mutex::new(Vec::new())),
    });
    let pinger = worker
        .settings
        .ping_url
        .clone()
        .map(|url| tokio::spawn(worker.clone().ping_loop(url, stop.clone())));
    let mut stop_take = stop.clone();
    let mut failures = 0u32;
    while !*stop.borrow() {
        let taken = tokio::select! {
            taken = worker.take() => taken,
            _ = stop_take.changed() => break,
        };
        let pause = match taken {
            Ok(Taken::Job { id, input }) => {
                failures = 0;
                tracing::info!(runpod_job = %id, "runpod: job taken");
                worker.current.lock().expect("lock").push(id.clone());
                worker.run_job(&id, &input).await;
                worker.current.lock().expect("lock").retain(|j| j != &id);
                None
            }
            Ok(Taken::Bad { id, error }) => {
                failures = 0;
                worker.post_result(&id, &json!({"error": error})).await;
                None
            }
            Ok(Taken::Nothing) => {
                failures = 0;
                Some(IDLE_POLL)
            }
            Err(e) => {
                tracing::warn!(error = %e, failures, "runpod: take failed");
                failures = failures.saturating_add(1);
                Some(backoff(failures))
            }
        };
        if let Some(pause) = pause {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop_take.changed() => break,
            }
        }
    }
    if let Some(pinger) = pinger {
        pinger.abort();
    }
    tracing::info!("runpod worker stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_input_maps_onto_the_spec() {
        let spec = spec_from_input(&json!({
            "userId": "u", "jobId": "j", "concepts": ["wall"], "imageCount": 2,
            "rules": [{"ruleId": "r", "concept": "wall", "type": "recolor", "params": {"color": "#FF5733", "strength": 0.5}}],
        }))
        .unwrap();
        assert_eq!(spec.user_id, "u");
        assert_eq!(spec.image_count, 2);
        let params = spec.rules[0].params.as_ref().unwrap();
        assert_eq!(
            params.fields["color"].kind,
            Some(Kind::StringValue("#FF5733".into()))
        );
        assert_eq!(params.fields["strength"].kind, Some(Kind::NumberValue(0.5)));
        assert!(spec_from_input(&json!({"jobId": 3})).is_err());
        assert!(spec_from_input(&json!("nope")).is_err());
    }

    #[test]
    fn urls_substitute_ids() {
        let mut c = Config::for_tests("/tmp/x", "http://127.0.0.1:1");
        c.runpod_pod_id = Some("pod1".into());
        c.runpod_ai_api_key = Some("k".into());
        c.runpod_webhook_get_job = Some("http://h/take/$ID?gpu=x".into());
        c.runpod_webhook_post_output = Some("http://h/done/$RUNPOD_POD_ID/$ID".into());
        c.runpod_webhook_ping = Some("http://h/ping/$RUNPOD_POD_ID".into());
        let s = RunpodSettings::from_config(&c).unwrap();
        assert_eq!(
            s.take_url(false),
            "http://h/take/pod1?gpu=x&job_in_progress=0"
        );
        assert_eq!(s.output_url("job9"), "http://h/done/pod1/job9");
        assert_eq!(s.ping_url.as_deref(), Some("http://h/ping/pod1"));
        assert!(!format!("{s:?}").contains("\"k\""));
        c.runpod_ai_api_key = None;
        assert!(RunpodSettings::from_config(&c).is_err());
    }
}
