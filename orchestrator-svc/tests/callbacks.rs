//! Callback delivery against a real HTTP receiver.

use palette_testing as common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::receiver::Receiver;
use orchestrator_svc::callback::{
    CallbackBody, CallbackJob, CallbackSender, Clock, OutputRef, RetryPolicy, idempotency_key,
};

const SECRET: &str = "supersecret123";
const JOB: CallbackJob<'static> = CallbackJob {
    user_id: "test-user",
    job_id: "test-job",
    spec_hash: "test-spec-hash",
};

fn body(idx: u32) -> CallbackBody {
    CallbackBody {
        user_id: "test-user".into(),
        job_id: "test-job".into(),
        idx,
        status: "completed",
        output_key: Some("outputs/test-user/test-job/rule1/0.jpg".into()),
        preview_key: Some("previews/test-user/test-job/0_preview.jpg".into()),
        error: None,
        error_code: None,
        outputs: vec![OutputRef {
            rule_id: "rule1".into(),
            output_key: "outputs/test-user/test-job/rule1/0.jpg".into(),
            applied: true,
            not_applied_reason: None,
        }],
        masks: vec![],
    }
}

fn sender(url: &str, max_attempts: u32) -> CallbackSender {
    sender_with(url, max_attempts, Duration::from_millis(50))
}

fn sender_with(url: &str, max_attempts: u32, max_delay: Duration) -> CallbackSender {
    let policy = RetryPolicy {
        max_attempts,
        base_delay: Duration::from_millis(5),
        max_delay,
        attempt_timeout: Duration::from_secs(2),
    };
    CallbackSender::new(url, SECRET, policy)
        .unwrap()
        .with_rng_seed(1)
}

#[tokio::test]
async fn retries_a_500_with_the_same_id_and_a_valid_signature() {
    let receiver = Receiver::start(SECRET, vec![(500, None)]).await;
    let outcome = sender(&receiver.url(), 6).deliver(JOB, &body(0)).await;
    assert!(outcome.delivered, "{outcome:?}");
    assert_eq!(outcome.attempts, 2);
    let deliveries = receiver.deliveries();
    assert_eq!(deliveries.len(), 2);
    assert!(
        deliveries
            .iter()
            .all(|d| d.verified && d.job_id == "test-job" && d.seed_secret == SECRET)
    );
    let id = idempotency_key(JOB, 0, "completed");
    assert!(
        deliveries
            .iter()
            .all(|d| d.webhook_id == id && d.idempotency_key == id)
    );
    assert_eq!(receiver.per_id()[&id], 2);
    assert_eq!(
        deliveries[1].body["output_key"],
        "outputs/test-user/test-job/rule1/0.jpg"
    );
    assert_eq!(deliveries[1].body["status"], "completed");
}

#[tokio::test]
async fn gone_stops_at_once() {
    let receiver = Receiver::start(SECRET, vec![(410, None)]).await;
    let outcome = sender(&receiver.url(), 6).deliver(JOB, &body(0)).await;
    assert!(!outcome.delivered);
    assert_eq!(outcome.attempts, 1);
    assert!(outcome.error.unwrap().contains("410"));
}

#[tokio::test]
async fn other_4xx_is_final_but_429_is_retried_after_retry_after() {
    let receiver = Receiver::start(SECRET, vec![(422, None)]).await;
    let outcome = sender(&receiver.url(), 6).deliver(JOB, &body(0)).await;
    assert_eq!((outcome.delivered, outcome.attempts), (false, 1));

    // A real wait of 1 s, kept: Retry-After counts whole seconds, and this is the header read off a real socket.
    // (On tokio's paused clock the sender's 2 s attempt timeout would fire while loopback I/O is in flight; the
    // schedule itself is tested on the paused clock in `callback::deliver`'s unit tests.)
    let receiver = Receiver::start(SECRET, vec![(429, Some(1))]).await;
    let s = sender_with(&receiver.url(), 3, Duration::from_secs(5));
    let started = Instant::now();
    let outcome = s.deliver(JOB, &body(1)).await;
    assert!(outcome.delivered);
    assert_eq!(outcome.attempts, 2);
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "Retry-After ignored: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn attempts_are_bounded_and_unreachable_receivers_do_not_hang() {
    let receiver = Receiver::start(SECRET, vec![(503, None); 10]).await;
    let outcome = sender(&receiver.url(), 3).deliver(JOB, &body(0)).await;
    assert_eq!((outcome.delivered, outcome.attempts), (false, 3));
    assert_eq!(receiver.deliveries().len(), 3);

    // Nothing listens on port 9 of loopback.
    let outcome = sender("http://127.0.0.1:9", 2).deliver(JOB, &body(0)).await;
    assert_eq!((outcome.delivered, outcome.attempts), (false, 2));
}

struct FixedClock(u64);
impl Clock for FixedClock {
    fn now_unix(&self) -> u64 {
        self.0
    }
}

#[tokio::test]
async fn a_sender_with_a_skewed_clock_is_rejected_by_the_receiver() {
    let receiver = Receiver::start(SECRET, vec![]).await;
    let outcome = sender(&receiver.url(), 1)
        .with_clock(Arc::new(FixedClock(1_000)))
        .deliver(CallbackJob { job_id: "j", ..JOB }, &body(0))
        .await;
    assert!(!outcome.delivered);
    assert!(!receiver.deliveries()[0].verified);
}

#[tokio::test]
async fn a_redirect_is_not_followed_and_the_secret_stays_home() {
    use axum::http::{HeaderMap, StatusCode, header};
    use std::sync::atomic::{AtomicUsize, Ordering};
    // One server: the callback path answers 307 to /elsewhere, which counts whoever comes (and what they carry).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let followed = Arc::new(AtomicUsize::new(0));
    let secret_seen = Arc::new(AtomicUsize::new(0));
    let (f, s) = (followed.clone(), secret_seen.clone());
    let elsewhere = move |headers: HeaderMap| {
        let (f, s) = (f.clone(), s.clone());
        async move {
            f.fetch_add(1, Ordering::SeqCst);
            if headers.contains_key("x-gpu-callback-secret") {
                s.fetch_add(1, Ordering::SeqCst);
            }
            StatusCode::OK
        }
    };
    let location = format!("http://{addr}/elsewhere");
    let app = axum::Router::new()
        .route(
            "/jobs/{job}/callback",
            axum::routing::post(move || {
                let location = location.clone();
                async move {
                    (
                        StatusCode::TEMPORARY_REDIRECT,
                        [(header::LOCATION, location)],
                    )
                }
            }),
        )
        .route("/elsewhere", axum::routing::any(elsewhere));
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let outcome = sender(&format!("http://{addr}"), 6)
        .deliver(JOB, &body(0))
        .await;
    server.abort();
    assert!(!outcome.delivered, "{outcome:?}");
    assert_eq!(outcome.attempts, 1, "a redirect is final, not retried");
    assert!(
        outcome
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("not followed"),
        "{outcome:?}"
    );
    assert_eq!(
        followed.load(Ordering::SeqCst),
        0,
        "the redirect was followed"
    );
    assert_eq!(secret_seen.load(Ordering::SeqCst), 0);
}

/// A receiver that holds every callback for `HOLD` before answering 200, and records how many it held at once.
#[derive(Clone, Default)]
struct Holding {
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    peak: Arc<std::sync::atomic::AtomicUsize>,
    idxs: Arc<std::sync::Mutex<Vec<u64>>>,
}

impl Holding {
    const HOLD: Duration = Duration::from_millis(200);

    async fn start(&self) -> String {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let this = self.clone();
        let handle = move |body: axum::body::Bytes| async move {
            let now = this.in_flight.fetch_add(1, SeqCst) + 1;
            this.peak.fetch_max(now, SeqCst);
            tokio::time::sleep(Holding::HOLD).await;
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            this.idxs
                .lock()
                .unwrap()
                .push(body["idx"].as_u64().unwrap());
            this.in_flight.fetch_sub(1, SeqCst);
            axum::http::StatusCode::OK
        };
        let app = axum::Router::new().route("/jobs/{job_id}/callback", axum::routing::post(handle));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }
}

/// CancelJob on a large job ends every open item at once: their callbacks go out CALLBACK_CONCURRENCY at a time
/// (without the bound, all 40 reached the receiver together), and every one is still delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_calls_back_at_most_callback_concurrency_at_once() {
    use common::orchestrator::{SEED_USER, photo_jpeg, seed_spec, start};
    use palette_proto::orchestrator::v1::{CallbackState, CancelJobRequest, ItemState};
    const ITEMS: u32 = 40;
    let segmenter = common::fake_segmenter::start().await;
    segmenter
        .faults
        .delay_ms
        .store(5_000, std::sync::atomic::Ordering::SeqCst);
    let receiver = Holding::default();
    let url = receiver.start().await;
    let mut orch = start(&segmenter.url, |c| {
        c.limits.batch_concurrency = 1;
        c.callbacks.workers_api_url = Some(url.as_str().into());
        c.callbacks.gpu_callback_secret = Some(SECRET.into());
        c.callbacks.callback_concurrency = 4;
    })
    .await;
    for idx in 0..ITEMS {
        orch.put_input(SEED_USER, "many", idx, photo_jpeg(16, 16))
            .await;
    }
    orch.client
        .submit_job(seed_spec("many", ITEMS))
        .await
        .unwrap();
    orch.wait_for("many", |j| j.items[0].state == ItemState::Running as i32)
        .await;
    orch.client
        .cancel_job(CancelJobRequest {
            user_id: SEED_USER.into(),
            job_id: "many".into(),
        })
        .await
        .unwrap();
    let job = orch
        .wait_for("many", |j| {
            j.items
                .iter()
                .all(|i| i.callback_state == CallbackState::Delivered as i32)
        })
        .await;
    orch.shutdown().await;
    assert_eq!(job.cancelled, ITEMS, "{job:?}");
    let peak = receiver.peak.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=4).contains(&peak),
        "{peak} callbacks in flight at once"
    );
    let mut idxs = receiver.idxs.lock().unwrap().clone();
    idxs.sort_unstable();
    assert_eq!(idxs, (0..u64::from(ITEMS)).collect::<Vec<_>>());
}
