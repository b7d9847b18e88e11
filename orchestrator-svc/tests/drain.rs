//! Shutdown of a real orchestrator process with a WatchJob client attached (a rolling update's SIGTERM): no item
//! starts after the signal, the stream ends at once with UNAVAILABLE "draining" (so the client reconnects to another
//! replica instead of holding this one open), the process exits within SHUTDOWN_GRACE_SEC even when items are still
//! running, and the next start on the same job store finishes the job.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use palette_proto::orchestrator::v1::{JobState, WatchJobRequest};
use palette_testing::jobs::{running, wait_for};
use palette_testing::orchestrator::{put_distinct_inputs, seed_spec};
use palette_testing::process::{Process, orchestrator_env};
use palette_testing::{fake_segmenter, receiver::Receiver};

const SECRET: &str = "drain-secret";
const USER: &str = "test-user";

fn env(dir: &Path, segmenter: &str, callbacks: &str, grace_sec: u64) -> Vec<(String, String)> {
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let mut env = orchestrator_env(segmenter, callbacks, SECRET);
    env.extend(
        [
            ("STORAGE_BACKEND", "local".into()),
            ("LOCAL_STORAGE_DIR", path("storage")),
            ("PRESETS_DIR", path("no-presets")),
            ("JOB_STORE", "local".into()),
            ("JOB_STORE_PATH", path("jobs.redb")),
            ("SHUTDOWN_GRACE_SEC", grace_sec.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v)),
    );
    env
}

/// Finished, with every item COMPLETED and one webhook-id per item.
async fn finishes_on_a_new_process(
    binary: &Path,
    env: &[(String, String)],
    log: &Path,
    job_id: &str,
    images: u32,
    hooks: &Receiver,
) {
    let next = Process::start(binary, env, log).await;
    let job = wait_for(&mut next.jobs_client(), USER, job_id, |j| {
        j.state == JobState::Done as i32
    })
    .await;
    assert_eq!(job.completed, images, "{job:?}");
    hooks
        .wait_until("a callback per item", |_| {
            hooks.per_id().len() >= images as usize
        })
        .await;
    assert_eq!(hooks.per_id().len(), images as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_watch_streams_with_draining_and_starts_no_item() {
    const JOB: &str = "drained";
    const IMAGES: u32 = 6;
    let binary = Path::new(env!("CARGO_BIN_EXE_orchestrator-svc"));
    let dir = tempfile::tempdir().unwrap();
    let segmenter = fake_segmenter::start().await;
    segmenter.faults.delay_ms.store(1500, Ordering::SeqCst);
    let hooks = Receiver::start(SECRET, vec![]).await;
    put_distinct_inputs(&dir.path().join("storage"), USER, JOB, IMAGES).await;
    let env = env(dir.path(), &segmenter.url, &hooks.url(), 10);

    let mut first = Process::start(binary, &env, &dir.path().join("first.log")).await;
    let mut jobs = first.jobs_client();
    jobs.submit_job(seed_spec(JOB, IMAGES)).await.unwrap();
    let mut stream = jobs
        .watch_job(WatchJobRequest {
            user_id: USER.into(),
            job_id: JOB.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("the first snapshot");
    let before = wait_for(&mut jobs, USER, JOB, |j| running(j) == 2).await;
    assert_eq!(before.completed, 0, "{before:?}");

    let signalled = Instant::now();
    let exited = tokio::spawn(async move {
        let took = first.terminate(Duration::from_secs(15)).await;
        (took, first)
    });
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("the stream ended without a status"),
            Ok(Err(status)) => break status,
            Err(_) => panic!("the stream stayed open after SIGTERM"),
        }
    };
    let stream_ended = signalled.elapsed();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("draining"), "{status:?}");
    assert!(stream_ended < Duration::from_secs(1), "{stream_ended:?}");
    let (took, first) = exited.await.unwrap();
    let took = took.unwrap_or_else(|| panic!("no exit within 15 s:\n{}", first.log()));
    // The two items in flight finished (1.5 s each); none started after the signal.
    assert_eq!(segmenter.counters.segment_calls.load(Ordering::SeqCst), 2);
    eprintln!("WatchJob ended {stream_ended:?} after SIGTERM; the process exited after {took:?}");

    segmenter.faults.delay_ms.store(0, Ordering::SeqCst);
    let log = dir.path().join("second.log");
    finishes_on_a_new_process(binary, &env, &log, JOB, IMAGES, &hooks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_ends_within_the_grace_period_and_unfinished_items_resume() {
    const JOB: &str = "grace-bounded";
    const IMAGES: u32 = 2;
    let binary = Path::new(env!("CARGO_BIN_EXE_orchestrator-svc"));
    let dir = tempfile::tempdir().unwrap();
    let segmenter = fake_segmenter::start().await;
    // Far longer than the grace period: the items cannot finish in time.
    segmenter.faults.delay_ms.store(60_000, Ordering::SeqCst);
    let hooks = Receiver::start(SECRET, vec![]).await;
    put_distinct_inputs(&dir.path().join("storage"), USER, JOB, IMAGES).await;
    let env = env(dir.path(), &segmenter.url, &hooks.url(), 2);

    let mut first = Process::start(binary, &env, &dir.path().join("first.log")).await;
    let mut jobs = first.jobs_client();
    jobs.submit_job(seed_spec(JOB, IMAGES)).await.unwrap();
    wait_for(&mut jobs, USER, JOB, |j| running(j) == 2).await;
    let took = first
        .terminate(Duration::from_secs(15))
        .await
        .unwrap_or_else(|| panic!("no exit within 15 s:\n{}", first.log()));
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(4),
        "exited after {took:?} with SHUTDOWN_GRACE_SEC=2"
    );
    assert!(
        hooks.deliveries().is_empty(),
        "nothing ended, nothing called back"
    );
    eprintln!("with items still running, exited {took:?} after SIGTERM (SHUTDOWN_GRACE_SEC=2)");

    segmenter.faults.delay_ms.store(0, Ordering::SeqCst);
    let log = dir.path().join("second.log");
    finishes_on_a_new_process(binary, &env, &log, JOB, IMAGES, &hooks).await;
}

/// JOB_STORE=memory keeps nothing for a next start: items still running near the end of the grace period used to be
/// cut off at exit with no terminal state and no callback (the upstream record stayed "processing" for ever). They
/// end FAILED `internal` a margin before it (a quarter of the grace, at most 10 s), each with its callback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_job_store_items_cut_off_by_the_shutdown_are_failed_and_called_back() {
    const JOB: &str = "memory-cut";
    const IMAGES: u32 = 2;
    let binary = Path::new(env!("CARGO_BIN_EXE_orchestrator-svc"));
    let dir = tempfile::tempdir().unwrap();
    let segmenter = fake_segmenter::start().await;
    segmenter.faults.delay_ms.store(60_000, Ordering::SeqCst);
    let hooks = Receiver::start(SECRET, vec![]).await;
    put_distinct_inputs(&dir.path().join("storage"), USER, JOB, IMAGES).await;
    let mut env = env(dir.path(), &segmenter.url, &hooks.url(), 4);
    env.retain(|(k, _)| k != "JOB_STORE" && k != "JOB_STORE_PATH");
    env.push(("JOB_STORE".into(), "memory".into()));

    let mut first = Process::start(binary, &env, &dir.path().join("first.log")).await;
    let mut jobs = first.jobs_client();
    jobs.submit_job(seed_spec(JOB, IMAGES)).await.unwrap();
    wait_for(&mut jobs, USER, JOB, |j| running(j) == 2).await;
    let took = first
        .terminate(Duration::from_secs(15))
        .await
        .unwrap_or_else(|| panic!("no exit within 15 s:\n{}", first.log()));
    assert!(
        took < Duration::from_secs(5),
        "exited after {took:?} with SHUTDOWN_GRACE_SEC=4"
    );
    let deliveries = hooks.deliveries();
    assert_eq!(
        deliveries.len(),
        IMAGES as usize,
        "{:?}",
        deliveries.iter().map(|d| &d.body).collect::<Vec<_>>()
    );
    for d in &deliveries {
        assert_eq!(d.body["status"], "failed", "{}", d.body);
        assert_eq!(d.body["error_code"], "internal", "{}", d.body);
        assert!(
            d.body["error"].as_str().unwrap().contains("shut down"),
            "{}",
            d.body
        );
    }
}
