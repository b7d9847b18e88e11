//! ADAPTER=runpod against a local HTTP server that speaks the Runpod serverless queue protocol (runpod-python's
//! rp_job.py / rp_http.py / rp_ping.py): job-take serves scripted jobs then 204, progress and results are recorded,
//! pings are counted, and every request must carry the API key in `Authorization`.

use palette_testing as common;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use common::fake_segmenter;
use common::orchestrator::{SEED_USER, photo_jpeg, seed_spec, start};
use palette_proto::orchestrator::v1::{GetJobRequest, JobState};
use serde_json::{Value, json};

const API_KEY: &str = "rpa_test_key_123";
const POD: &str = "pod-7";

#[derive(Default)]
struct Inner {
    /// Jobs are served only once open (the inputs are in place).
    open: bool,
    /// Answer 500 to this many take requests first (once open).
    fail_takes: usize,
    failed_takes: usize,
    jobs: VecDeque<Value>,
    takes: usize,
    take_queries: Vec<HashMap<String, String>>,
    posts: Vec<(String, Value)>,
    pings: usize,
    /// Each ping's query (its `job_id`s name the jobs in progress).
    ping_queries: Vec<String>,
    unauthorized: usize,
    wrong_pod: usize,
    /// Result/progress posts without runpod-python's `isStream=false` or `X-Request-ID: {job id}`.
    unlike_the_sdk: usize,
    /// Progress posts are answered only after this long (a slow Runpod API), recorded at once.
    hold_progress: Duration,
    /// A job is answered only this long after it was handed out (counted in `takes` at once).
    hold_takes: Duration,
    /// Result posts are answered 400 (as Runpod answers an output too large), recorded all the same.
    refuse_results: bool,
    /// Result posts are answered only after this long (a slow Runpod API), recorded at once.
    hold_results: Duration,
}

#[derive(Clone)]
struct FakeRunpod {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

impl FakeRunpod {
    async fn start(jobs: Vec<Value>) -> FakeRunpod {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = FakeRunpod {
            addr: listener.local_addr().unwrap(),
            inner: Arc::new(Mutex::new(Inner {
                jobs: jobs.into(),
                ..Inner::default()
            })),
        };
        let app = Router::new()
            .route("/v2/take/{pod}", get(take))
            .route("/v2/done/{pod}/{job}", post(done))
            .route("/v2/ping/{pod}", get(ping))
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        fake
    }

    fn base(&self) -> String {
        format!("http://{}/v2", self.addr)
    }

    fn posts_for(&self, job: &str) -> Vec<Value> {
        self.inner
            .lock()
            .unwrap()
            .posts
            .iter()
            .filter(|(j, _)| j == job)
            .map(|(_, b)| b.clone())
            .collect()
    }

    fn results_for(&self, job: &str) -> Vec<Value> {
        self.posts_for(job)
            .into_iter()
            .filter(|b| b.get("status").is_none())
            .collect()
    }
}

impl FakeRunpod {
    fn check(&self, headers: &HeaderMap, pod: &str) -> bool {
        let mut inner = self.inner.lock().unwrap();
        if pod != POD {
            inner.wrong_pod += 1;
        }
        let ok = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == API_KEY);
        if !ok {
            inner.unauthorized += 1;
        }
        ok
    }
}

async fn take(
    State(fake): State<FakeRunpod>,
    Path(pod): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if !fake.check(&headers, &pod) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let (job, hold) = {
        let mut inner = fake.inner.lock().unwrap();
        inner.take_queries.push(query);
        if inner.open && inner.fail_takes > 0 {
            inner.fail_takes -= 1;
            inner.failed_takes += 1;
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
        let next = if inner.open {
            inner.jobs.pop_front()
        } else {
            None
        };
        let Some(job) = next else {
            return StatusCode::NO_CONTENT.into_response();
        };
        inner.takes += 1;
        (job, inner.hold_takes)
    };
    tokio::time::sleep(hold).await;
    axum::Json(job).into_response()
}

async fn done(
    State(fake): State<FakeRunpod>,
    Path((pod, job)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    if !fake.check(&headers, &pod) {
        return StatusCode::UNAUTHORIZED;
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let hold = {
        let mut inner = fake.inner.lock().unwrap();
        let request_id = headers.get("x-request-id").and_then(|v| v.to_str().ok());
        if query.get("isStream").map(String::as_str) != Some("false")
            || request_id != Some(job.as_str())
        {
            inner.unlike_the_sdk += 1;
        }
        let progress = body.get("status").is_some();
        inner.posts.push((job, body));
        if !progress && inner.refuse_results {
            return StatusCode::BAD_REQUEST;
        }
        if progress {
            inner.hold_progress
        } else {
            inner.hold_results
        }
    };
    tokio::time::sleep(hold).await;
    StatusCode::OK
}

async fn ping(
    State(fake): State<FakeRunpod>,
    Path(pod): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> StatusCode {
    if !fake.check(&headers, &pod) {
        return StatusCode::UNAUTHORIZED;
    }
    let mut inner = fake.inner.lock().unwrap();
    inner.pings += 1;
    inner.ping_queries.push(query.unwrap_or_default());
    StatusCode::OK
}

fn seed_input(job_id: &str, image_count: u32) -> Value {
    json!({
        "userId": "test-user",
        "jobId": job_id,
        "concepts": ["wall", "floor", "furniture"],
        "rules": [{"ruleId": "rule1", "concept": "wall", "type": "recolor", "params": {"color": "#FF5733"}}],
        "imageCount": image_count,
    })
}

async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runpod_worker_runs_the_seed_job_and_survives_a_malformed_one() {
    let segmenter = fake_segmenter::start().await;
    let fake = FakeRunpod::start(vec![
        json!({"id": "rp-bad", "input": {"userId": "test-user", "jobId": 42}}),
        json!({"id": "rp-invalid", "input": seed_input("zero-images", 0)}),
        json!({"id": "rp-empty"}),
        json!({"id": "rp-1", "input": seed_input("test-job", 2)}),
    ])
    .await;
    let base = fake.base();
    let mut orch = start(&segmenter.url, |c| {
        c.adapter = orchestrator_svc::config::Adapter::Runpod;
        c.runpod.runpod_pod_id = Some(POD.into());
        c.runpod.runpod_ai_api_key = Some(API_KEY.into());
        c.runpod.runpod_webhook_get_job = Some(format!("{base}/take/$ID?gpu=test"));
        c.runpod.runpod_webhook_post_output = Some(format!("{base}/done/$RUNPOD_POD_ID/$ID"));
        c.runpod.runpod_webhook_ping = Some(format!("{base}/ping/$RUNPOD_POD_ID"));
        c.runpod.runpod_ping_interval = 100;
    })
    .await;
    orch.put_input("test-user", "test-job", 0, photo_jpeg(96, 64))
        .await;
    orch.put_input("test-user", "test-job", 1, photo_jpeg(64, 48))
        .await;
    fake.inner.lock().unwrap().open = true;

    wait_until("the seed job's result", || {
        !fake.results_for("rp-1").is_empty()
    })
    .await;

    // The malformed job got an error result and the worker went on to the next job.
    let bad = fake.results_for("rp-bad");
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(
        bad[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("invalid job input")),
        "{bad:?}"
    );
    assert!(bad[0].get("output").is_none(), "{bad:?}");
    // Readable but refused by validation (as SubmitJob would): an error result too.
    let invalid = fake.results_for("rp-invalid");
    assert_eq!(invalid.len(), 1, "{invalid:?}");
    assert!(
        invalid[0]["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{invalid:?}"
    );
    let empty = fake.results_for("rp-empty");
    assert_eq!(empty.len(), 1, "{empty:?}");
    assert_eq!(empty[0]["error"], "job has no input");

    // Progress at least once, then exactly one final output.
    let posts = fake.posts_for("rp-1");
    assert!(
        posts
            .iter()
            .any(|b| b["status"] == "IN_PROGRESS" && b["output"]["jobId"] == "test-job"),
        "{posts:?}"
    );
    let results = fake.results_for("rp-1");
    assert_eq!(results.len(), 1, "{results:?}");
    let output = &results[0]["output"];
    assert_eq!(output["jobId"], "test-job");
    assert_eq!(output["state"], "DONE");
    assert_eq!(output["completed"], 2);
    let items = output["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    for (idx, item) in items.iter().enumerate() {
        assert_eq!(item["state"], "COMPLETED", "{item}");
        assert_eq!(
            item["outputKey"],
            format!("outputs/test-user/test-job/rule1/{idx}.jpg")
        );
        assert_eq!(
            item["previewKey"],
            format!("previews/test-user/test-job/{idx}_preview.jpg")
        );
        for mask in item["masks"].as_array().unwrap() {
            // Placed as the callbacks place it (docs/orchestrator.md): inside the photo, on a known layout.
            let n = |name: &str| {
                mask[name]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{name} in {mask}"))
            };
            assert!(n("imageWidth") > 0 && n("imageHeight") > 0, "{mask}");
            assert!(n("x") + n("width") <= n("imageWidth"), "{mask}");
            assert!(n("y") + n("height") <= n("imageHeight"), "{mask}");
            let _ = (n("gridWidth"), n("gridHeight"));
        }
        let masks: Vec<&str> = item["masks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["key"].as_str().unwrap())
            .collect();
        assert!(
            masks.contains(&format!("masks/test-user/test-job/wall/{idx}_1.png").as_str()),
            "{masks:?}"
        );
        assert_eq!(item["error"], "");
    }

    // The same job is visible over gRPC.
    let job = orch
        .client
        .get_job(GetJobRequest {
            job_id: "test-job".into(),
            user_id: common::orchestrator::SEED_USER.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.state, JobState::Done as i32);

    wait_until("pings", || fake.inner.lock().unwrap().pings >= 2).await;
    // The worker keeps polling after the scripted jobs.
    let polls = fake.inner.lock().unwrap().take_queries.len();
    wait_until("another poll", || {
        fake.inner.lock().unwrap().take_queries.len() > polls
    })
    .await;
    orch.shutdown().await;

    let inner = fake.inner.lock().unwrap();
    assert_eq!(inner.takes, 4);
    assert_eq!(inner.unauthorized, 0);
    assert_eq!(inner.wrong_pod, 0);
    assert_eq!(inner.unlike_the_sdk, 0, "posts as runpod-python makes them");
    assert!(inner.take_queries.iter().all(|q| {
        q.get("gpu").is_some_and(|v| v == "test")
            && q.get("job_in_progress")
                .is_some_and(|v| v == "0" || v == "1")
    }));
    drop(inner);
    assert_eq!(fake.results_for("rp-1").len(), 1, "no second result");
}

/// ADAPTER=runpod against `base` (the fake Runpod), no heartbeat.
/// `runpod_without_ping` with the job store a Runpod worker has by default (memory: its disk goes with it) and item
/// callbacks to `hooks` (secret "supersecret123").
fn runpod_calling_back(c: &mut orchestrator_svc::Config, base: &str, hooks: String) {
    runpod_without_ping(c, base);
    c.jobs.job_store = orchestrator_svc::config::JobStoreKind::Memory;
    c.callbacks.workers_api_url = Some(hooks.into());
    c.callbacks.gpu_callback_secret = Some("supersecret123".into());
}

fn runpod_without_ping(c: &mut orchestrator_svc::Config, base: &str) {
    c.adapter = orchestrator_svc::config::Adapter::Runpod;
    c.runpod.runpod_pod_id = Some(POD.into());
    c.runpod.runpod_ai_api_key = Some(API_KEY.into());
    c.runpod.runpod_webhook_get_job = Some(format!("{base}/take/$ID"));
    c.runpod.runpod_webhook_post_output = Some(format!("{base}/done/$RUNPOD_POD_ID/$ID"));
    c.runpod.runpod_webhook_ping = None;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runpod_worker_backs_off_take_errors_and_finishes_its_job_on_shutdown() {
    use std::sync::atomic::Ordering;
    let segmenter = fake_segmenter::start().await;
    segmenter.faults.delay_ms.store(600, Ordering::SeqCst);
    let fake = FakeRunpod::start(vec![
        json!({"id": "rp-slow", "input": seed_input("slow-job", 2)}),
    ])
    .await;
    let base = fake.base();
    let mut orch = start(&segmenter.url, |c| {
        runpod_without_ping(c, &base);
    })
    .await;
    orch.put_input("test-user", "slow-job", 0, photo_jpeg(96, 64))
        .await;
    orch.put_input("test-user", "slow-job", 1, photo_jpeg(96, 64))
        .await;
    {
        let mut inner = fake.inner.lock().unwrap();
        inner.fail_takes = 2;
        inner.open = true;
    }

    // Two failed takes, then the job; shut down while its images are at the segmenter.
    wait_until("segmentation started", || {
        segmenter.counters.segment_calls.load(Ordering::SeqCst) > 0
    })
    .await;
    assert!(fake.results_for("rp-slow").is_empty());
    let takes_before = fake.inner.lock().unwrap().take_queries.len();
    orch.shutdown().await;

    let inner = fake.inner.lock().unwrap();
    assert_eq!(inner.failed_takes, 2);
    assert_eq!(inner.takes, 1);
    assert_eq!(
        inner.take_queries.len(),
        takes_before,
        "no job taken during shutdown"
    );
    assert_eq!(inner.pings, 0, "no ping URL, no heartbeat");
    drop(inner);
    let results = fake.results_for("rp-slow");
    assert_eq!(results.len(), 1, "{results:?}");
    let items = results[0]["output"]["items"].as_array().unwrap();
    assert!(items.iter().all(|i| i["state"] == "COMPLETED"), "{items:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runpod_adapter_without_its_variables_refuses_to_start() {
    let segmenter = fake_segmenter::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = orchestrator_svc::Config::for_tests(dir.path(), &segmenter.url);
    config.adapter = orchestrator_svc::config::Adapter::Runpod;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = orchestrator_svc::run(config, listener, std::future::pending())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("RUNPOD_POD_ID"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_left_unfinished_at_shutdown_gets_an_error_result_at_once() {
    use std::sync::atomic::Ordering;
    let segmenter = fake_segmenter::start().await;
    segmenter.faults.delay_ms.store(600, Ordering::SeqCst);
    let fake = FakeRunpod::start(vec![
        json!({"id": "rp-long", "input": seed_input("long-job", 4)}),
    ])
    .await;
    let base = fake.base();
    let store_dir = tempfile::tempdir().unwrap();
    let store_path = store_dir.path().join("jobs.redb");
    let mut orch = start(&segmenter.url, move |c| {
        runpod_without_ping(c, &base);
        // A job store that keeps unstarted items for the next start: the job cannot finish in this process.
        c.jobs.job_store = orchestrator_svc::config::JobStoreKind::Local;
        c.jobs.job_store_path = store_path;
        c.limits.batch_concurrency = 1;
        c.shutdown_grace_sec = 30;
    })
    .await;
    for idx in 0..4 {
        orch.put_input("test-user", "long-job", idx, photo_jpeg(96, 64))
            .await;
    }
    fake.inner.lock().unwrap().open = true;
    wait_until("segmentation started", || {
        segmenter.counters.segment_calls.load(Ordering::SeqCst) > 0
    })
    .await;
    let signalled = std::time::Instant::now();
    orch.shutdown().await;
    // Well within the grace period: the image in flight finished, the three unstarted ones stay for the resume.
    assert!(
        signalled.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        signalled.elapsed()
    );
    let results = fake.results_for("rp-long");
    assert_eq!(results.len(), 1, "{results:?}");
    let error = results[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("shut down before the job finished") && error.contains(" of 4 images done"),
        "{results:?}"
    );
}

/// The same job with the job store a Runpod worker has by default (memory: its disk goes with it): the images not
/// started at the signal end FAILED with their callbacks, so every image of the job is called back exactly once and
/// Runpod gets the whole job as its result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runpod_workers_unstarted_images_are_called_back_failed_at_shutdown() {
    use std::sync::atomic::Ordering;
    let segmenter = fake_segmenter::start().await;
    segmenter.faults.delay_ms.store(600, Ordering::SeqCst);
    let receiver = common::receiver::Receiver::start("supersecret123", vec![]).await;
    let fake = FakeRunpod::start(vec![
        json!({"id": "rp-cut", "input": seed_input("cut-job", 4)}),
    ])
    .await;
    let base = fake.base();
    let url = receiver.url();
    let mut orch = start(&segmenter.url, move |c| {
        runpod_calling_back(c, &base, url);
        c.limits.batch_concurrency = 1;
        c.shutdown_grace_sec = 30;
    })
    .await;
    for idx in 0..4 {
        orch.put_input("test-user", "cut-job", idx, photo_jpeg(96, 64))
            .await;
    }
    fake.inner.lock().unwrap().open = true;
    wait_until("segmentation started", || {
        segmenter.counters.segment_calls.load(Ordering::SeqCst) > 0
    })
    .await;
    orch.shutdown().await;
    let results = fake.results_for("rp-cut");
    assert_eq!(results.len(), 1, "{results:?}");
    // The job ended (its unstarted images FAILED), so its result is the whole job rather than an error.
    let output = &results[0]["output"];
    assert_eq!(
        (output["completed"].as_u64(), output["failed"].as_u64()),
        (Some(1), Some(3)),
        "{results:?}"
    );
    assert!(output["items"].as_array().unwrap().iter().all(|item| {
        item["state"] == "COMPLETED" || item["error"].as_str().unwrap().contains("submit it again")
    }));
    assert_eq!(receiver.assert_one_id_per_item("cut-job", 4), 4);
    let mut statuses: Vec<String> = receiver
        .deliveries()
        .iter()
        .map(|d| d.body["status"].as_str().unwrap_or_default().to_string())
        .collect();
    statuses.sort();
    assert_eq!(statuses, ["completed", "failed", "failed", "failed"]);
}

/// JOB_STORE=memory: an image still at the segmenter near the end of the grace ends FAILED with its callback, however
/// long Runpod takes to answer the job's result (posted at the same time). That end waited for the queue worker,
/// which a result post held to the end of the grace: the process exited with the image unended, never called back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_result_post_does_not_cost_the_running_image_its_callback() {
    use std::sync::atomic::Ordering;
    let segmenter = fake_segmenter::start().await;
    segmenter.faults.delay_ms.store(30_000, Ordering::SeqCst);
    let receiver = common::receiver::Receiver::start("supersecret123", vec![]).await;
    let fake = FakeRunpod::start(vec![
        json!({"id": "rp-held", "input": seed_input("held-job", 1)}),
    ])
    .await;
    let base = fake.base();
    let url = receiver.url();
    let mut orch = start(&segmenter.url, move |c| {
        runpod_calling_back(c, &base, url);
        c.shutdown_grace_sec = 4;
    })
    .await;
    orch.put_input("test-user", "held-job", 0, photo_jpeg(96, 64))
        .await;
    {
        let mut inner = fake.inner.lock().unwrap();
        inner.hold_results = Duration::from_secs(20);
        inner.open = true;
    }
    wait_until("segmentation started", || {
        segmenter.counters.segment_calls.load(Ordering::SeqCst) > 0
    })
    .await;
    let signalled = std::time::Instant::now();
    orch.shutdown().await;
    assert!(
        signalled.elapsed() < Duration::from_secs(6),
        "{:?}",
        signalled.elapsed()
    );
    assert_eq!(fake.results_for("rp-held").len(), 1);
    let deliveries = receiver.deliveries();
    assert_eq!(deliveries.len(), 1, "{deliveries:?}");
    assert_eq!(
        deliveries[0].body["status"], "failed",
        "{}",
        deliveries[0].body
    );
}

/// An image still at the segmenter when the drain's grace period is nearly over does not cost the job its result:
/// the error result goes out before the grace ends (a job without one stays IN_PROGRESS at Runpod).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_still_running_near_the_end_of_the_grace_period_gets_its_result() {
    result_within_the_grace_period(Duration::ZERO).await;
}

/// The same with a slow Runpod API: a progress post held open (up to the post timeout, 30 s) at the signal neither
/// delays the worker's noticing it nor the deadline of the result, which counts from the signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_progress_post_in_flight_at_the_signal_does_not_hold_the_result_back() {
    result_within_the_grace_period(Duration::from_secs(20)).await;
}

/// A job at the segmenter at the signal, grace 4 s: its error result is sent before the drain ends. Progress posts
/// are answered after `hold_progress`; the signal comes once one is in flight.
async fn result_within_the_grace_period(hold_progress: Duration) {
    use std::sync::atomic::Ordering;
    let segmenter = fake_segmenter::start().await;
    segmenter.faults.delay_ms.store(15_000, Ordering::SeqCst);
    let fake = FakeRunpod::start(vec![
        json!({"id": "rp-slow", "input": seed_input("slow-job", 2)}),
    ])
    .await;
    let base = fake.base();
    let mut orch = start(&segmenter.url, move |c| {
        runpod_without_ping(c, &base);
        c.limits.batch_concurrency = 1;
        c.shutdown_grace_sec = 4;
    })
    .await;
    for idx in 0..2 {
        orch.put_input("test-user", "slow-job", idx, photo_jpeg(96, 64))
            .await;
    }
    {
        let mut inner = fake.inner.lock().unwrap();
        inner.hold_progress = hold_progress;
        inner.open = true;
    }
    wait_until("segmentation started, a progress post sent", || {
        segmenter.counters.segment_calls.load(Ordering::SeqCst) > 0
            && !fake.posts_for("rp-slow").is_empty()
    })
    .await;
    let signalled = std::time::Instant::now();
    orch.shutdown().await;
    assert!(
        signalled.elapsed() < Duration::from_secs(6),
        "{:?}",
        signalled.elapsed()
    );
    let results = fake.results_for("rp-slow");
    assert_eq!(results.len(), 1, "{results:?}");
    let error = results[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("shut down before the job finished") && error.contains(" of 2 images done"),
        "{results:?}"
    );
}

/// The window the running images get after the signal counts from the signal, however long the job ran before:
/// a SIGTERM 3.5 s into an image that needs 6 s (grace 4 s: the result is due 3 s after the signal) lets it finish,
/// and the job's result is its output, not "shut down before the job finished".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_late_in_a_job_still_gives_its_running_image_the_window() {
    use std::sync::atomic::Ordering;
    let segmenter = fake_segmenter::start().await;
    segmenter.faults.delay_ms.store(6_000, Ordering::SeqCst);
    let fake = FakeRunpod::start(vec![
        json!({"id": "rp-late", "input": seed_input("late-job", 1)}),
    ])
    .await;
    let base = fake.base();
    let mut orch = start(&segmenter.url, move |c| {
        runpod_without_ping(c, &base);
        c.shutdown_grace_sec = 4;
    })
    .await;
    orch.put_input("test-user", "late-job", 0, photo_jpeg(96, 64))
        .await;
    fake.inner.lock().unwrap().open = true;
    wait_until("segmentation started", || {
        segmenter.counters.segment_calls.load(Ordering::SeqCst) > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    orch.shutdown().await;
    let results = fake.results_for("rp-late");
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0]["output"]["state"], "DONE", "{results:?}");
}

/// A job the orchestrator cannot take now (MAX_RETAINED_JOBS=1, held by a running gRPC job) is submitted again
/// until it can be, under heartbeats naming it, and then runs: not failed at once, as a refusal for good would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_refused_for_now_runs_once_the_orchestrator_can_take_it() {
    use std::sync::atomic::Ordering;
    let segmenter = fake_segmenter::start().await;
    segmenter.faults.delay_ms.store(3_000, Ordering::SeqCst);
    let fake = FakeRunpod::start(vec![
        json!({"id": "rp-later", "input": seed_input("later-job", 1)}),
    ])
    .await;
    let base = fake.base();
    let mut orch = start(&segmenter.url, move |c| {
        runpod_without_ping(c, &base);
        c.runpod.runpod_webhook_ping = Some(format!("{base}/ping/$RUNPOD_POD_ID"));
        c.runpod.runpod_ping_interval = 100;
        c.limits.max_retained_jobs = 1;
    })
    .await;
    orch.put_input(SEED_USER, "first-job", 0, photo_jpeg(96, 64))
        .await;
    orch.put_input(SEED_USER, "later-job", 0, photo_jpeg(96, 64))
        .await;
    orch.client
        .submit_job(seed_spec("first-job", 1))
        .await
        .unwrap();
    wait_until("the gRPC job at the segmenter", || {
        segmenter.counters.segment_calls.load(Ordering::SeqCst) > 0
    })
    .await;
    fake.inner.lock().unwrap().open = true;
    wait_until("the Runpod job's result", || {
        !fake.results_for("rp-later").is_empty()
    })
    .await;

    let results = fake.results_for("rp-later");
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0]["output"]["state"], "DONE", "{results:?}");
    assert_eq!(results[0]["output"]["completed"], 1, "{results:?}");
    let first = orch
        .client
        .get_job(GetJobRequest {
            job_id: "first-job".into(),
            user_id: SEED_USER.into(),
        })
        .await;
    // The first job ended before the Runpod one was taken in, and was forgotten to make room for it.
    assert_eq!(
        first.unwrap_err().code(),
        tonic::Code::NotFound,
        "only one job retained"
    );
    // The registry's retry hint is 5 s: beats every 100 ms named the job while it waited.
    let pings = fake.inner.lock().unwrap().ping_queries.clone();
    let naming = pings
        .iter()
        .filter(|q| q.contains("job_id=rp-later"))
        .count();
    assert!(naming > 10, "{pings:?}");
    orch.shutdown().await;
}

/// Shutdown while a refused job waits to be submitted again: the job never started, and its result says so at once
/// (none at all would leave it IN_PROGRESS at Runpod).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_refused_for_now_at_shutdown_gets_an_error_result() {
    use std::sync::atomic::Ordering;
    let segmenter = fake_segmenter::start().await;
    segmenter.faults.delay_ms.store(30_000, Ordering::SeqCst);
    let fake = FakeRunpod::start(vec![
        json!({"id": "rp-later", "input": seed_input("later-job", 1)}),
    ])
    .await;
    let base = fake.base();
    let mut orch = start(&segmenter.url, move |c| {
        runpod_without_ping(c, &base);
        c.limits.max_retained_jobs = 1;
        c.shutdown_grace_sec = 4;
    })
    .await;
    orch.put_input(SEED_USER, "first-job", 0, photo_jpeg(96, 64))
        .await;
    orch.client
        .submit_job(seed_spec("first-job", 1))
        .await
        .unwrap();
    fake.inner.lock().unwrap().open = true;
    wait_until("the Runpod job taken", || {
        fake.inner.lock().unwrap().takes == 1
    })
    .await;
    // The take is counted when its request arrives; its answer, and the submission refused for now (at once), come
    // after. A signal before the answer is read is another case (`a_job_handed_out_while_stopping...`): 1 s is well
    // past both and well before the refusal's 5 s retry.
    tokio::time::sleep(Duration::from_secs(1)).await;
    orch.shutdown().await;
    let results = fake.results_for("rp-later");
    assert_eq!(results.len(), 1, "{results:?}");
    let error = results[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("shut down before the job could start") && error.contains("overloaded"),
        "{results:?}"
    );
}

/// The stop signal while a take is in flight, the job already handed out by Runpod: the take is let finish, and the
/// job (which cannot start during the drain) gets an error result rather than staying IN_PROGRESS at Runpod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_handed_out_while_stopping_gets_an_error_result() {
    let segmenter = fake_segmenter::start().await;
    let fake = FakeRunpod::start(vec![
        json!({"id": "rp-late", "input": seed_input("late-job", 1)}),
    ])
    .await;
    let base = fake.base();
    let mut orch = start(&segmenter.url, move |c| {
        runpod_without_ping(c, &base);
        c.shutdown_grace_sec = 10;
    })
    .await;
    {
        let mut inner = fake.inner.lock().unwrap();
        inner.hold_takes = Duration::from_secs(1);
        inner.open = true;
    }
    wait_until("the job handed out", || {
        fake.inner.lock().unwrap().takes == 1
    })
    .await;
    orch.shutdown().await;
    let results = fake.results_for("rp-late");
    assert_eq!(results.len(), 1, "{results:?}");
    let error = results[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("shutting down") && error.contains("not started"),
        "{results:?}"
    );
    assert_eq!(
        segmenter
            .counters
            .segment_calls
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

/// A result Runpod refuses (400, as for an output over its size limit) is not posted again: the same body is refused
/// each time, and six attempts with backoff only held the worker (and the next job) for half a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_result_is_not_posted_again() {
    let segmenter = fake_segmenter::start().await;
    let fake = FakeRunpod::start(vec![
        json!({"id": "rp-refused", "input": seed_input("refused-job", 1)}),
        json!({"id": "rp-next", "input": seed_input("next-job", 1)}),
    ])
    .await;
    let base = fake.base();
    let mut orch = start(&segmenter.url, |c| {
        runpod_without_ping(c, &base);
    })
    .await;
    for job in ["refused-job", "next-job"] {
        orch.put_input("test-user", job, 0, photo_jpeg(96, 64))
            .await;
    }
    {
        let mut inner = fake.inner.lock().unwrap();
        inner.refuse_results = true;
        inner.open = true;
    }
    wait_until("the next job's result", || {
        !fake.results_for("rp-next").is_empty()
    })
    .await;
    assert_eq!(fake.results_for("rp-refused").len(), 1, "posted once");
    orch.shutdown().await;
}
