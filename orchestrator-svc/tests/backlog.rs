//! The backlog gauges the autoscaler adds to the items running, read from real orchestrator processes' /metrics:
//! `orchestrator_items_waiting` (items a replica accepted and has not started: JOB_STORE=local) and
//! `orchestrator_item_queue_pending` (item tasks in the shared NATS stream not yet handed to any replica:
//! JOB_STORE=nats). Each shows the work waiting while it waits and goes back to exactly 0 whatever ends it: items
//! starting, a cancel, a restart that resumes the job, a shutdown that leaves it to the next start.
//!
//! The fake segmenter holds every call for a minute, so with BATCH_CONCURRENCY=1 the counts stand still until the
//! test moves them (a cancel, a kill): every wait is for an exact value, with a generous limit.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use palette_proto::orchestrator::v1::{CancelJobRequest, JobState};
use palette_testing::jobs;
use palette_testing::orchestrator::{put_distinct_inputs, seed_spec};
use palette_testing::ports::free_port;
use palette_testing::process::{Process, orchestrator_env};
use palette_testing::{fake_segmenter, nats, receiver::Receiver};

const SECRET: &str = "backlog-secret";
const USER: &str = "test-user";
/// A Segment call that does not end while the test looks: the item stays in flight until it is cancelled.
const HELD_MS: u32 = 60_000;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_orchestrator-svc"))
}

/// One permit (BATCH_CONCURRENCY=1), storage under `dir`, the job store `store` names.
fn env(
    dir: &Path,
    segmenter: &str,
    callbacks: &str,
    store: &[(&str, String)],
) -> Vec<(String, String)> {
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let mut env = orchestrator_env(segmenter, callbacks, SECRET);
    env.extend(
        [
            ("BATCH_CONCURRENCY", "1".to_string()),
            ("SEGMENTER_RESOLVE_INTERVAL_SEC", "1".into()),
            ("STORAGE_BACKEND", "local".into()),
            ("LOCAL_STORAGE_DIR", path("storage")),
            ("PRESETS_DIR", path("no-presets")),
        ]
        .into_iter()
        .chain(store.iter().cloned())
        .map(|(k, v)| (k.to_string(), v)),
    );
    env
}

/// `env` with METRICS_ADDR on a port of its own (a restarted process gets another: no lingering socket to meet).
fn with_metrics(env: &[(String, String)]) -> (Vec<(String, String)>, u16) {
    let port = free_port();
    let mut env = env.to_vec();
    env.push(("METRICS_ADDR".into(), format!("127.0.0.1:{port}")));
    (env, port)
}

/// The gauges of one replica, as its /metrics showed them (None: not exported).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Gauges {
    in_flight: Option<f64>,
    waiting: Option<f64>,
    pending: Option<f64>,
    ack_pending: Option<f64>,
}

async fn scrape(port: u16) -> Option<Gauges> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let value = |name: &str| {
        text.lines().find_map(|line| {
            let (metric, value) = line.split_once(' ')?;
            (metric == name).then(|| value.trim().parse::<f64>().ok())?
        })
    };
    Some(Gauges {
        in_flight: value("orchestrator_items_in_flight"),
        waiting: value("orchestrator_items_waiting"),
        pending: value("orchestrator_item_queue_pending"),
        ack_pending: value("orchestrator_item_queue_ack_pending"),
    })
}

/// Scrapes `port` until `done` (at most jobs::WAIT_LIMIT), and returns what it saw then.
async fn wait_gauges(port: u16, what: &str, done: impl Fn(&Gauges) -> bool) -> Gauges {
    let deadline = tokio::time::Instant::now() + jobs::WAIT_LIMIT;
    let mut last = None;
    loop {
        if let Some(gauges) = scrape(port).await {
            if done(&gauges) {
                return gauges;
            }
            last = Some(gauges);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: never seen; last scrape {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Running `running` items, `waiting` more accepted here and not started.
fn local(running: f64, waiting: f64) -> impl Fn(&Gauges) -> bool {
    move |g| g.in_flight.unwrap_or(0.0) == running && g.waiting == Some(waiting)
}

fn cancel(job_id: &str) -> CancelJobRequest {
    CancelJobRequest {
        user_id: USER.into(),
        job_id: job_id.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_waiting_for_a_permit_count_until_they_start_or_are_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let segmenter = fake_segmenter::start().await;
    segmenter.faults.delay_ms.store(HELD_MS, Ordering::SeqCst);
    let hooks = Receiver::start(SECRET, vec![]).await;
    let storage = dir.path().join("storage");
    for (job, images) in [("first", 4), ("second", 2), ("third", 3)] {
        put_distinct_inputs(&storage, USER, job, images).await;
    }
    let store = [("JOB_STORE", "memory".to_string())];
    let (env, port) = with_metrics(&env(dir.path(), &segmenter.url, &hooks.url(), &store));
    let orch = Process::start(binary(), &env, &dir.path().join("orch.log")).await;
    let mut client = orch.jobs_client();

    wait_gauges(port, "0 waiting before any job", |g| g.waiting == Some(0.0)).await;
    client.submit_job(seed_spec("first", 4)).await.unwrap();
    wait_gauges(port, "first: 1 running, 3 waiting", local(1.0, 3.0)).await;
    // Per replica, across jobs: the second job's items wait behind the first's.
    client.submit_job(seed_spec("second", 2)).await.unwrap();
    wait_gauges(port, "second: 5 waiting", local(1.0, 5.0)).await;
    // Cancelled, the first job's waiting items go; the second's first item takes the permit.
    client.cancel_job(cancel("first")).await.unwrap();
    wait_gauges(
        port,
        "first cancelled: 1 running, 1 waiting",
        local(1.0, 1.0),
    )
    .await;
    client.cancel_job(cancel("second")).await.unwrap();
    wait_gauges(port, "both cancelled: nothing", local(0.0, 0.0)).await;

    // A job that runs to its end leaves nothing behind either.
    segmenter.faults.delay_ms.store(0, Ordering::SeqCst);
    client.submit_job(seed_spec("third", 3)).await.unwrap();
    let done = jobs::wait_for(&mut client, USER, "third", jobs::is_terminal).await;
    assert_eq!(done.state, JobState::Done as i32, "{done:?}");
    wait_gauges(port, "third done: nothing", local(0.0, 0.0)).await;
}

/// JOB_STORE=local: a job resumed at start counts its open items as waiting again; a shutdown that leaves them to
/// the next start stops counting them at once (while the item in flight finishes), and the job that then ends
/// leaves 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_job_counts_its_waiting_items_and_a_shutdown_leaves_none() {
    const JOB: &str = "resumed";
    let dir = tempfile::tempdir().unwrap();
    let segmenter = fake_segmenter::start().await;
    segmenter.faults.delay_ms.store(HELD_MS, Ordering::SeqCst);
    let hooks = Receiver::start(SECRET, vec![]).await;
    put_distinct_inputs(&dir.path().join("storage"), USER, JOB, 3).await;
    let store = [
        ("JOB_STORE", "local".to_string()),
        (
            "JOB_STORE_PATH",
            dir.path().join("state/jobs.redb").to_string_lossy().into(),
        ),
        // Long enough to look at the drain; the held item keeps it going until then.
        ("SHUTDOWN_GRACE_SEC", "10".into()),
    ];
    let base = env(dir.path(), &segmenter.url, &hooks.url(), &store);

    let (env, port) = with_metrics(&base);
    let mut first = Process::start(binary(), &env, &dir.path().join("first.log")).await;
    first
        .jobs_client()
        .submit_job(seed_spec(JOB, 3))
        .await
        .unwrap();
    wait_gauges(port, "first: 1 running, 2 waiting", local(1.0, 2.0)).await;
    first.kill();

    let (env, port) = with_metrics(&base);
    let mut second = Process::start(binary(), &env, &dir.path().join("second.log")).await;
    // Nothing of the job had ended: the item killed in flight runs again, the other two wait again.
    wait_gauges(port, "resumed: 1 running, 2 waiting", local(1.0, 2.0)).await;
    let (exited, draining) = tokio::join!(
        second.terminate(Duration::from_secs(60)),
        wait_gauges(port, "draining: 1 running, 0 waiting", local(1.0, 0.0)),
    );
    assert!(exited.is_some(), "the drain did not end:\n{}", second.log());
    assert_eq!(draining.waiting, Some(0.0));

    segmenter.faults.delay_ms.store(0, Ordering::SeqCst);
    let (env, port) = with_metrics(&base);
    let third = Process::start(binary(), &env, &dir.path().join("third.log")).await;
    let done = jobs::wait_for(&mut third.jobs_client(), USER, JOB, jobs::is_terminal).await;
    assert_eq!(done.state, JobState::Done as i32, "{done:?}");
    wait_gauges(port, "resumed job done: nothing", local(0.0, 0.0)).await;
}

/// JOB_STORE=nats: the tasks no replica has taken yet are the shared consumer's num_pending, which every replica
/// exports (the same number: the autoscaler takes its max); tasks being run are ack-pending, not pending. Nothing
/// waits inside a replica (it takes a task per free permit), and a cancel drains the stream to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_exports_the_shared_item_queues_backlog() {
    const JOB: &str = "queued";
    const IMAGES: u32 = 6;
    let Some(nats) = nats::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let segmenter = fake_segmenter::start().await;
    segmenter.faults.delay_ms.store(HELD_MS, Ordering::SeqCst);
    let hooks = Receiver::start(SECRET, vec![]).await;
    put_distinct_inputs(&dir.path().join("storage"), USER, JOB, IMAGES).await;
    let store = [
        ("JOB_STORE", "nats".to_string()),
        ("NATS_URL", nats.url.clone()),
        ("NATS_ITEM_BACKLOG_SEC", "1".into()),
    ];
    let base = env(dir.path(), &segmenter.url, &hooks.url(), &store);
    let (env_a, port_a) = with_metrics(&base);
    let (env_b, port_b) = with_metrics(&base);
    let a = Process::start(binary(), &env_a, &dir.path().join("a.log")).await;
    let b = Process::start(binary(), &env_b, &dir.path().join("b.log")).await;
    for port in [port_a, port_b] {
        wait_gauges(port, "an empty queue read", |g| g.pending == Some(0.0)).await;
    }

    a.jobs_client()
        .submit_job(seed_spec(JOB, IMAGES))
        .await
        .unwrap();
    // Each replica runs one item (its one permit); the other four wait in the stream, seen alike by both.
    let queued = |g: &Gauges| {
        g.pending == Some(4.0)
            && g.ack_pending == Some(2.0)
            && g.in_flight == Some(1.0)
            && g.waiting == Some(0.0)
    };
    for port in [port_a, port_b] {
        wait_gauges(port, "4 pending, 2 taken, 1 running here", queued).await;
    }

    b.jobs_client().cancel_job(cancel(JOB)).await.unwrap();
    let job = jobs::wait_for(&mut a.jobs_client(), USER, JOB, jobs::is_settled).await;
    assert_eq!(job.cancelled, IMAGES, "{job:?}");
    let drained = |g: &Gauges| {
        g.pending == Some(0.0)
            && g.ack_pending == Some(0.0)
            && g.in_flight == Some(0.0)
            && g.waiting == Some(0.0)
    };
    for port in [port_a, port_b] {
        wait_gauges(port, "the stream drained", drained).await;
    }
}
