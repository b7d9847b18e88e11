//! JOB_STORE=nats with every part real: three orchestrator processes on one nats-server, SeaweedFS as the shared
//! bucket, the segmenter on the committed tiny model (real ONNX Runtime, in-process) and the callback receiver.
//! Submitted on A, watched on B (which sees items RUNNING wherever they run, then ended), A SIGKILLed mid-job: the
//! job finishes on B and C with every item in one terminal state, called back under one webhook-id, its outputs in
//! the bucket; then a second job is cancelled from C. (`job_store_nats.rs` runs the same shapes with the fake
//! segmenter, for fault injection and exact timing.) The kill test (five SIGKILLs across a 50-image job) and
//! a NATS restart mid-job run here on real parts too.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use orchestrator_svc::storage::{ObjectStore, S3Settings, S3Store};
use palette_proto::orchestrator::v1::{CancelJobRequest, ItemState, JobState, WatchJobRequest};
use palette_testing::jobs::{get, is_settled, wait_for_within};
use palette_testing::orchestrator::{SEED_USER, photo_jpeg, seed_spec};
use palette_testing::process::{Process, orchestrator_env};
use palette_testing::{nats, receiver::Receiver, seaweed, segmenter};

const SECRET: &str = "replicas-real-secret";
/// A job on the real model, debug build, 2 cores shared by three replicas and the segmenter.
const LIMIT: Duration = Duration::from_secs(120);

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_orchestrator-svc"))
}

fn env(weed: &seaweed::Seaweed, nats: &str, segmenter: &str, hooks: &str) -> Vec<(String, String)> {
    let mut env = orchestrator_env(segmenter, hooks, SECRET);
    env.extend(
        [
            ("STORAGE_BACKEND", "s3".into()),
            ("AWS_ENDPOINT_URL_S3", weed.endpoint.clone()),
            ("R2_BUCKET_NAME", weed.bucket.clone()),
            ("R2_ACCESS_KEY_ID", seaweed::ACCESS_KEY.into()),
            ("R2_SECRET_ACCESS_KEY", seaweed::SECRET_KEY.into()),
            ("PRESETS_DIR", "/nonexistent-presets".into()),
            ("JOB_STORE", "nats".into()),
            ("NATS_URL", nats.into()),
            // Short leases: the killed replica's items come back within seconds.
            ("NATS_ITEM_ACK_WAIT_SEC", "3".into()),
            ("SHUTDOWN_GRACE_SEC", "5".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v)),
    );
    env
}

fn s3(weed: &seaweed::Seaweed) -> S3Store {
    S3Store::new(S3Settings {
        endpoint_url: Some(weed.endpoint.clone()),
        region: "us-east-1".into(),
        bucket: weed.bucket.clone(),
        access_key_id: seaweed::ACCESS_KEY.into(),
        secret_access_key: seaweed::SECRET_KEY.into(),
        attempt_timeout: Duration::from_secs(10),
        max_attempts: 3,
    })
}

/// Distinct photos (no mask reuse between them), once the freshly started SeaweedFS takes writes.
async fn put_inputs(store: &S3Store, job_id: &str, images: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for idx in 0..images {
        let key = format!("inputs/{SEED_USER}/{job_id}/{idx}.jpg");
        let photo = Bytes::from(photo_jpeg(160 + 8 * idx, 120));
        while let Err(e) = store.put(&key, photo.clone(), "image/jpeg").await {
            assert!(Instant::now() < deadline, "SeaweedFS never took {key}: {e}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_with_the_real_segmenter_and_seaweedfs_survive_a_sigkill_and_cancel_from_any()
 {
    let Some(nats) = nats::start() else { return };
    let Some(weed) = seaweed::start("palette-replicas") else {
        return;
    };
    const JOB: &str = "replicas-real";
    const CANCELLED: &str = "replicas-real-cancelled";
    const IMAGES: u32 = 10;
    let store = s3(&weed);
    put_inputs(&store, JOB, IMAGES).await;
    put_inputs(&store, CANCELLED, IMAGES).await;
    let segmenter = segmenter::start_default().await;
    let hooks = Receiver::start(SECRET, vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let env = env(&weed, &nats.url, &segmenter.url(), &hooks.url());
    let log = |name: &str| dir.path().join(format!("{name}.log"));
    let mut a = Process::start(binary(), &env, &log("a")).await;
    let b = Process::start(binary(), &env, &log("b")).await;
    let c = Process::start(binary(), &env, &log("c")).await;

    a.jobs_client()
        .submit_job(seed_spec(JOB, IMAGES))
        .await
        .unwrap();
    let mut watch = b
        .jobs_client()
        .watch_job(WatchJobRequest {
            user_id: SEED_USER.into(),
            job_id: JOB.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen_running = BTreeSet::new();
    let mut killed_at = None;
    let started = Instant::now();
    let last = loop {
        let event = tokio::time::timeout(LIMIT, watch.message())
            .await
            .expect("the job went quiet")
            .unwrap()
            .expect("stream open");
        let job = event.job.unwrap();
        for item in job
            .items
            .iter()
            .filter(|i| i.state == ItemState::Running as i32)
        {
            seen_running.insert(item.idx);
        }
        if killed_at.is_none() && job.completed >= 3 {
            // The submitter dies mid-job, holding items: they come back to B and C after the lease.
            a.kill();
            killed_at = Some((Instant::now(), job.completed));
        }
        if job.state == JobState::Done as i32 {
            break job;
        }
    };
    let (killed_at, completed_at_kill) = killed_at.expect("killed mid-job");
    let finished_after = killed_at.elapsed();
    assert_eq!(last.completed, IMAGES, "{last:?}");
    assert!(
        seen_running.len() >= IMAGES as usize / 2,
        "B's stream showed items RUNNING on every replica: {seen_running:?}"
    );
    let done = wait_for_within(LIMIT, &mut c.jobs_client(), SEED_USER, JOB, is_settled).await;
    let deliveries = hooks.assert_one_id_per_item(JOB, IMAGES);
    for item in &done.items {
        assert_eq!(item.state, ItemState::Completed as i32, "{item:?}");
        assert!(
            store.exists(&item.output_key).await.unwrap(),
            "{} is not in the bucket",
            item.output_key
        );
    }

    // A second job, cancelled from C while B and C run it: every replica ends it, each item called back once.
    b.jobs_client()
        .submit_job(seed_spec(CANCELLED, IMAGES))
        .await
        .unwrap();
    wait_for_within(LIMIT, &mut c.jobs_client(), SEED_USER, CANCELLED, |j| {
        j.completed >= 1
    })
    .await;
    let cancelled_at = Instant::now();
    c.jobs_client()
        .cancel_job(CancelJobRequest {
            user_id: SEED_USER.into(),
            job_id: CANCELLED.into(),
        })
        .await
        .unwrap();
    let on_b = wait_for_within(LIMIT, &mut b.jobs_client(), SEED_USER, CANCELLED, |j| {
        j.state == JobState::Cancelled as i32
    })
    .await;
    let cancel_took = cancelled_at.elapsed();
    let settled = wait_for_within(
        LIMIT,
        &mut c.jobs_client(),
        SEED_USER,
        CANCELLED,
        is_settled,
    )
    .await;
    assert_eq!(settled.completed + settled.cancelled, IMAGES, "{settled:?}");
    assert!(on_b.cancelled > 0, "{on_b:?}");
    hooks.assert_one_id_per_item(CANCELLED, IMAGES);
    assert_eq!(
        get(&mut b.jobs_client(), SEED_USER, CANCELLED).await.state,
        JobState::Cancelled as i32
    );
    eprintln!(
        "real segmenter + SeaweedFS, 3 replicas: {IMAGES} images in {:?}, A SIGKILLed at {completed_at_kill} \
         completed, the job finished {finished_after:?} after; B saw {} items RUNNING; 0 items lost, {} duplicate \
         deliveries; a cancel on C reached B in {cancel_took:?} ({} of {IMAGES} completed before it)",
        started.elapsed(),
        seen_running.len(),
        deliveries - IMAGES as usize,
        settled.completed
    );
}

/// The kill test on real parts: three replicas, five SIGKILLs in a row (each a different replica than the
/// one watched, restarted at once) across a 50-image job; every item ends once, called back under one webhook-id,
/// with its output in the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_sigkills_across_a_50_image_job_on_real_parts_lose_nothing() {
    let Some(nats) = nats::start() else { return };
    let Some(weed) = seaweed::start("palette-replicas-killed") else {
        return;
    };
    const JOB: &str = "replicas-real-killed";
    const IMAGES: u32 = 50;
    const KILLS: usize = 5;
    let store = s3(&weed);
    put_inputs(&store, JOB, IMAGES).await;
    let segmenter = segmenter::start_default().await;
    let hooks = Receiver::start(SECRET, vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let env = env(&weed, &nats.url, &segmenter.url(), &hooks.url());
    let log = |name: String| dir.path().join(format!("{name}.log"));
    let mut replicas = Vec::new();
    for r in 0..3 {
        replicas.push(Process::start(binary(), &env, &log(format!("r{r}-0"))).await);
    }
    replicas[0]
        .jobs_client()
        .submit_job(seed_spec(JOB, IMAGES))
        .await
        .unwrap();
    let started = Instant::now();
    let mut completed_at_kill = Vec::new();
    let mut last_kill = Instant::now();
    for kill in 0..KILLS {
        let victim = kill % replicas.len();
        let mut jobs = replicas[(victim + 1) % replicas.len()].jobs_client();
        let before = get(&mut jobs, SEED_USER, JOB).await.completed;
        let at_kill = wait_for_within(LIMIT, &mut jobs, SEED_USER, JOB, |j| {
            j.completed >= before + 4
        })
        .await;
        replicas[victim].kill();
        last_kill = Instant::now();
        completed_at_kill.push(at_kill.completed);
        replicas[victim] =
            Process::start(binary(), &env, &log(format!("r{victim}-{}", kill + 1))).await;
    }
    let done = wait_for_within(
        LIMIT,
        &mut replicas[0].jobs_client(),
        SEED_USER,
        JOB,
        is_settled,
    )
    .await;
    let finished_after = last_kill.elapsed();
    assert_eq!(done.completed, IMAGES, "{done:?}");
    let deliveries = hooks.assert_one_id_per_item(JOB, IMAGES);
    for item in &done.items {
        assert!(
            store.exists(&item.output_key).await.unwrap(),
            "{} is not in the bucket",
            item.output_key
        );
    }
    eprintln!(
        "real segmenter + SeaweedFS, 3 replicas: {KILLS} SIGKILLs at {completed_at_kill:?} completed items; \
         {IMAGES} images in {:?}, the job finished {finished_after:?} after the last kill; 0 items lost, {} \
         duplicate deliveries (same webhook-id)",
        started.elapsed(),
        deliveries - IMAGES as usize
    );
}

/// NATS SIGKILLed mid-job and started again 2 s later, every other part real: the work pauses and resumes; every
/// item ends once, called back under one webhook-id, and both replicas see the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_mid_job_on_real_parts_pauses_the_work_and_loses_nothing() {
    let Some(mut nats) = nats::start() else {
        return;
    };
    let Some(weed) = seaweed::start("palette-replicas-nats-restart") else {
        return;
    };
    const JOB: &str = "replicas-real-nats-restart";
    const IMAGES: u32 = 24;
    let store = s3(&weed);
    put_inputs(&store, JOB, IMAGES).await;
    let segmenter = segmenter::start_default().await;
    let hooks = Receiver::start(SECRET, vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let env = env(&weed, &nats.url, &segmenter.url(), &hooks.url());
    let a = Process::start(binary(), &env, &dir.path().join("a.log")).await;
    let b = Process::start(binary(), &env, &dir.path().join("b.log")).await;
    a.jobs_client()
        .submit_job(seed_spec(JOB, IMAGES))
        .await
        .unwrap();
    let at_restart = wait_for_within(LIMIT, &mut b.jobs_client(), SEED_USER, JOB, |j| {
        j.completed >= 4
    })
    .await;
    let restarted = Instant::now();
    tokio::task::block_in_place(|| nats.restart(Duration::from_secs(2)));
    let done = wait_for_within(LIMIT, &mut b.jobs_client(), SEED_USER, JOB, is_settled).await;
    let finished_after = restarted.elapsed();
    assert_eq!(done.completed, IMAGES, "{done:?}");
    let on_a = wait_for_within(LIMIT, &mut a.jobs_client(), SEED_USER, JOB, is_settled).await;
    assert_eq!(
        on_a.completed, IMAGES,
        "both replicas see the end: {on_a:?}"
    );
    let deliveries = hooks.assert_one_id_per_item(JOB, IMAGES);
    for item in &done.items {
        assert!(
            store.exists(&item.output_key).await.unwrap(),
            "{}",
            item.output_key
        );
    }
    eprintln!(
        "real segmenter + SeaweedFS, 2 replicas: NATS down 2 s at {} of {IMAGES} completed; the job finished \
         {finished_after:?} after the restart began; 0 items lost, {} duplicate deliveries",
        at_restart.completed,
        deliveries - IMAGES as usize
    );
}
