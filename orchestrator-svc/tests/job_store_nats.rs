//! JOB_STORE=nats with orchestrators as real processes on one real nats-server: any replica answers for any job,
//! the items of one job run on several replicas, a WatchJob on any replica sees every item RUNNING and then ended,
//! a cancel from any replica ends the job everywhere, a SIGKILLed replica loses nothing (its items are leased, and go
//! to another replica when the lease runs out), and a NATS restart only pauses the work. Every item ends in exactly one terminal state, called back under one webhook-id
//! (a resend after a kill reuses it; resends are counted and printed, for docs/operations.md).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use palette_proto::orchestrator::v1::{
    CallbackState, CancelJobRequest, EditJobRequest, ItemState, Job, JobState, Rule,
    WatchJobRequest,
};
use palette_testing::jobs::{get, is_settled, running, wait_for_within};
use palette_testing::orchestrator::{put_distinct_inputs, seed_spec, string_struct};
use palette_testing::partition::Partition;
use palette_testing::process::{Process, orchestrator_env};
use palette_testing::{fake_segmenter, nats, receiver::Receiver};

const SECRET: &str = "job-store-nats-secret";
const USER: &str = "test-user";

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_orchestrator-svc"))
}

/// Every replica's environment: one NATS, one storage root under `dir` (standing for the shared bucket).
fn env(dir: &Path, nats: &str, segmenter: &str, callbacks: &str) -> Vec<(String, String)> {
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let mut env = orchestrator_env(segmenter, callbacks, SECRET);
    env.extend(
        [
            ("SEGMENTER_RESOLVE_INTERVAL_SEC", "1".into()),
            ("STORAGE_BACKEND", "local".into()),
            ("LOCAL_STORAGE_DIR", path("storage")),
            ("PRESETS_DIR", path("no-presets")),
            ("JOB_STORE", "nats".into()),
            ("NATS_URL", nats.into()),
            // Short leases, so a killed replica's items come back within seconds.
            ("NATS_ITEM_ACK_WAIT_SEC", "3".into()),
            ("SHUTDOWN_GRACE_SEC", "5".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v)),
    );
    env
}

/// Items this replica ran to completion, from its log.
fn completed_here(process: &Process) -> usize {
    process.log().matches("item completed").count()
}

/// One test's shared parts: nats-server, a storage root under `dir` standing for the bucket (the job's photos in
/// it), the fake segmenter (each Segment call takes `delay_ms`), the callback receiver, and every replica's
/// environment. None when nats-server is not installed (and not required).
struct Shared {
    nats: nats::Nats,
    dir: tempfile::TempDir,
    segmenter: fake_segmenter::FakeSegmenter,
    hooks: Receiver,
    env: Vec<(String, String)>,
}

async fn shared(job_id: &str, images: u32, delay_ms: u32) -> Option<Shared> {
    let nats = nats::start()?;
    let dir = tempfile::tempdir().unwrap();
    let segmenter = fake_segmenter::start().await;
    segmenter.faults.delay_ms.store(delay_ms, Ordering::SeqCst);
    let hooks = Receiver::start(SECRET, vec![]).await;
    put_distinct_inputs(&dir.path().join("storage"), USER, job_id, images).await;
    let env = env(dir.path(), &nats.url, &segmenter.url, &hooks.url());
    Some(Shared {
        nats,
        dir,
        segmenter,
        hooks,
        env,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_on_one_replica_watch_on_another_cancel_on_a_third() {
    const JOB: &str = "shared-job";
    const IMAGES: u32 = 30;
    let Some(Shared {
        nats: _nats,
        dir,
        segmenter,
        hooks,
        env,
    }) = shared(JOB, IMAGES, 150).await
    else {
        return;
    };
    let log = |name: &str| dir.path().join(format!("{name}.log"));
    let a = Process::start(binary(), &env, &log("a")).await;
    let b = Process::start(binary(), &env, &log("b")).await;
    let c = Process::start(binary(), &env, &log("c")).await;

    let submitted = a
        .jobs_client()
        .submit_job(seed_spec(JOB, IMAGES))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(submitted.items.len(), IMAGES as usize);
    // The same submission on another replica is the same job; another spec under the id is refused there.
    b.jobs_client()
        .submit_job(seed_spec(JOB, IMAGES))
        .await
        .expect("idempotent across replicas");
    let other = c
        .jobs_client()
        .submit_job(seed_spec(JOB, IMAGES + 1))
        .await
        .unwrap_err();
    assert_eq!(other.code(), tonic::Code::AlreadyExists, "{other:?}");

    let mut watch = b
        .jobs_client()
        .watch_job(WatchJobRequest {
            user_id: USER.into(),
            job_id: JOB.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen_completed = 0;
    while seen_completed < 10 {
        let event = watch.message().await.unwrap().expect("stream open");
        seen_completed = event.job.unwrap().completed;
    }
    let cancelled_at = Instant::now();
    c.jobs_client()
        .cancel_job(CancelJobRequest {
            user_id: USER.into(),
            job_id: JOB.into(),
        })
        .await
        .unwrap();
    // B's stream sees the job end; every replica answers CANCELLED within a second or two.
    let last = loop {
        let event = watch.message().await.unwrap().expect("stream open");
        let job = event.job.unwrap();
        if job.state == JobState::Cancelled as i32 {
            break job;
        }
    };
    for replica in [&a, &b, &c] {
        wait_for_within(
            Duration::from_secs(2),
            &mut replica.jobs_client(),
            USER,
            JOB,
            |j| j.state == JobState::Cancelled as i32,
        )
        .await;
    }
    let ended_after = cancelled_at.elapsed();
    assert!(ended_after < Duration::from_secs(3), "{ended_after:?}");
    let calls_at_end = segmenter.counters.segment_calls.load(Ordering::SeqCst);
    let job = wait_for_within(
        Duration::from_secs(20),
        &mut a.jobs_client(),
        USER,
        JOB,
        is_settled,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        segmenter.counters.segment_calls.load(Ordering::SeqCst),
        calls_at_end,
        "nothing runs after the cancel"
    );
    assert_eq!(job.completed + job.cancelled, IMAGES, "{job:?}");
    assert!(job.cancelled > 0 && last.cancelled > 0);
    let deliveries = hooks.assert_one_id_per_item(JOB, IMAGES);
    assert_eq!(deliveries, IMAGES as usize, "no resends without a crash");
    let per_replica = [completed_here(&a), completed_here(&b), completed_here(&c)];
    assert_eq!(per_replica.iter().sum::<usize>(), job.completed as usize);
    assert!(
        per_replica.iter().filter(|&&n| n > 0).count() >= 2,
        "the items ran on more than one replica: {per_replica:?}"
    );
    // A replica started afterwards rebuilds the job from the bucket's history as the others hold it.
    let d = Process::start(binary(), &env, &log("d")).await;
    let late = wait_for_within(
        Duration::from_secs(5),
        &mut d.jobs_client(),
        USER,
        JOB,
        is_settled,
    )
    .await;
    let states = |j: &Job| {
        j.items
            .iter()
            .map(|i| (i.state, i.callback_state))
            .collect::<Vec<_>>()
    };
    assert_eq!(states(&late), states(&job));
    eprintln!(
        "completed per replica {per_replica:?}; every replica CANCELLED {ended_after:?} after CancelJob on a third"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_one_replica_sees_the_items_running_on_another() {
    const JOB: &str = "progress-shared";
    const IMAGES: u32 = 8;
    // Long enough that a RUNNING state outlives the time an event takes to reach the stream on a loaded machine.
    let Some(Shared {
        nats: _nats,
        dir,
        segmenter: _segmenter,
        hooks: _hooks,
        env,
    }) = shared(JOB, IMAGES, 1_000).await
    else {
        return;
    };
    let with_concurrency = |n: &str| {
        let mut env = env.clone();
        env.push(("BATCH_CONCURRENCY".into(), n.into()));
        env
    };
    // A runs most items (4 at a time), B (the watcher) one at a time: B sees most items RUNNING only through
    // A's claims.
    let a = Process::start(binary(), &with_concurrency("4"), &dir.path().join("a.log")).await;
    let b = Process::start(binary(), &with_concurrency("1"), &dir.path().join("b.log")).await;
    a.jobs_client()
        .submit_job(seed_spec(JOB, IMAGES))
        .await
        .unwrap();
    let mut watch = b
        .jobs_client()
        .watch_job(WatchJobRequest {
            user_id: USER.into(),
            job_id: JOB.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let running = ItemState::Running as i32;
    let mut seen_running = BTreeSet::new();
    let mut ended_after_running = BTreeSet::new();
    let last = loop {
        let event = watch.message().await.unwrap().expect("stream open");
        // Each event carries the job as it stands when the event is sent, which may be a few changes later than the
        // change it announces: every item of every snapshot is looked at.
        let job = event.job.unwrap();
        for item in &job.items {
            if item.state == running {
                seen_running.insert(item.idx);
            } else if item.state == ItemState::Completed as i32 && seen_running.contains(&item.idx)
            {
                ended_after_running.insert(item.idx);
            }
        }
        if job.state == JobState::Done as i32 {
            break job;
        }
    };
    assert_eq!(last.completed, IMAGES, "{last:?}");
    let on_a = completed_here(&a);
    assert!(on_a >= 1, "A ran items: {on_a}");
    assert_eq!(
        seen_running.len(),
        IMAGES as usize,
        "B's stream showed every item RUNNING, those A ran ({on_a}) too: {seen_running:?}"
    );
    assert_eq!(ended_after_running, seen_running, "RUNNING, then COMPLETED");
    eprintln!(
        "B's WatchJob saw all {IMAGES} items RUNNING then COMPLETED; {on_a} ran on A, {} on B",
        completed_here(&b)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_taken_by_one_replica_is_answered_and_run_by_every_replica() {
    const JOB: &str = "edited-source";
    const EDIT: &str = "edit-shared";
    const IMAGES: u32 = 6;
    let Some(Shared {
        nats: _nats,
        dir,
        segmenter,
        hooks,
        env,
    }) = shared(JOB, IMAGES, 50).await
    else {
        return;
    };
    let a = Process::start(binary(), &env, &dir.path().join("a.log")).await;
    let b = Process::start(binary(), &env, &dir.path().join("b.log")).await;
    a.jobs_client()
        .submit_job(seed_spec(JOB, IMAGES))
        .await
        .unwrap();
    wait_for_within(
        Duration::from_secs(30),
        &mut b.jobs_client(),
        USER,
        JOB,
        is_settled,
    )
    .await;
    let request = EditJobRequest {
        user_id: USER.into(),
        job_id: EDIT.into(),
        source_job_id: JOB.into(),
        rules: vec![Rule {
            rule_id: "repaint".into(),
            concept: "wall".into(),
            r#type: "recolor".into(),
            params: Some(string_struct(&[("color", "#3366AA")])),
        }],
        preset: String::new(),
        output_format: String::new(),
    };
    // The source's photos record was written by the replica that took SubmitJob; the edit is taken by the other.
    let calls_before = segmenter.counters.segment_calls.load(Ordering::SeqCst);
    b.jobs_client().edit_job(request.clone()).await.unwrap();
    // The same edit on the other replica is the same job.
    a.jobs_client()
        .edit_job(request.clone())
        .await
        .expect("idempotent across replicas");
    let edit = wait_for_within(
        Duration::from_secs(30),
        &mut a.jobs_client(),
        USER,
        EDIT,
        is_settled,
    )
    .await;
    assert_eq!(edit.completed, IMAGES, "{edit:?}");
    assert_eq!(edit.source_job_id, JOB);
    assert_eq!(
        segmenter.counters.segment_calls.load(Ordering::SeqCst),
        calls_before,
        "an edit reads the stored masks"
    );
    let (source_ids, source_deliveries) = hooks.ids_per_item(JOB);
    let (edit_ids, edit_deliveries) = hooks.ids_per_item(EDIT);
    assert_eq!(
        (source_deliveries, edit_deliveries),
        (IMAGES as usize, IMAGES as usize),
        "each item of both jobs called back once"
    );
    assert!(
        source_ids
            .iter()
            .all(|(idx, ids)| edit_ids[idx].is_disjoint(ids)),
        "the edit's webhook-ids are its own: {source_ids:?} {edit_ids:?}"
    );
    eprintln!(
        "edit on B, answered on A; items completed (source and edit) on A {}, on B {}",
        completed_here(&a),
        completed_here(&b)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_sigkilled_replicas_across_a_50_image_job_lose_nothing() {
    const JOB: &str = "replicas-killed";
    const IMAGES: u32 = 50;
    const KILLS: usize = 5;
    let Some(Shared {
        nats: _nats,
        dir,
        segmenter,
        hooks,
        env,
    }) = shared(JOB, IMAGES, 100).await
    else {
        return;
    };
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
    let mut completed_at_kill = Vec::new();
    let mut last_kill = Instant::now();
    for kill in 0..KILLS {
        let victim = kill % replicas.len();
        let watcher = (victim + 1) % replicas.len();
        let mut jobs = replicas[watcher].jobs_client();
        let before = get(&mut jobs, USER, JOB).await.completed;
        let at_kill = wait_for_within(Duration::from_secs(60), &mut jobs, USER, JOB, |j| {
            j.completed >= before + 6
        })
        .await;
        replicas[victim].kill();
        last_kill = Instant::now();
        completed_at_kill.push(at_kill.completed);
        replicas[victim] =
            Process::start(binary(), &env, &log(format!("r{victim}-{}", kill + 1))).await;
    }
    let job = wait_for_within(
        Duration::from_secs(90),
        &mut replicas[0].jobs_client(),
        USER,
        JOB,
        is_settled,
    )
    .await;
    let finished_after = last_kill.elapsed();
    assert_eq!(job.completed, IMAGES, "{job:?}");
    let deliveries = hooks.assert_one_id_per_item(JOB, IMAGES);
    let calls = segmenter.counters.segment_calls.load(Ordering::SeqCst);
    eprintln!(
        "3 replicas, {KILLS} SIGKILLs at {completed_at_kill:?} completed items; the job finished {finished_after:?} \
         after the last kill; 0 items lost, {} duplicate deliveries (same webhook-id), {} items ran twice",
        deliveries - IMAGES as usize,
        calls.saturating_sub(IMAGES as usize)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_mid_job_pauses_the_work_and_loses_nothing() {
    const JOB: &str = "nats-restarted";
    const IMAGES: u32 = 24;
    let Some(Shared {
        mut nats,
        dir,
        segmenter: _segmenter,
        hooks,
        env,
    }) = shared(JOB, IMAGES, 100).await
    else {
        return;
    };
    let a = Process::start(binary(), &env, &dir.path().join("a.log")).await;
    let b = Process::start(binary(), &env, &dir.path().join("b.log")).await;
    a.jobs_client()
        .submit_job(seed_spec(JOB, IMAGES))
        .await
        .unwrap();
    let at_restart = wait_for_within(
        Duration::from_secs(60),
        &mut b.jobs_client(),
        USER,
        JOB,
        |j| j.completed >= 6,
    )
    .await;
    let restarted = Instant::now();
    nats.restart(Duration::from_secs(2));
    let job = wait_for_within(
        Duration::from_secs(90),
        &mut b.jobs_client(),
        USER,
        JOB,
        is_settled,
    )
    .await;
    let finished_after = restarted.elapsed();
    assert_eq!(job.completed, IMAGES, "{job:?}");
    let again = get(&mut a.jobs_client(), USER, JOB).await;
    assert_eq!(
        again.completed, IMAGES,
        "both replicas see the end: {again:?}"
    );
    let deliveries = hooks.assert_one_id_per_item(JOB, IMAGES);
    eprintln!(
        "NATS down 2 s at {} of {IMAGES} completed; the job finished {finished_after:?} after; 0 items lost, {} \
         duplicate deliveries",
        at_restart.completed,
        deliveries - IMAGES as usize
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_pull_job_is_recorded_in_the_shared_store_and_runs_on_every_replica() {
    use async_nats::jetstream;
    const JOB: &str = "queued-shared";
    const IMAGES: u32 = 12;
    let Some(Shared {
        nats,
        dir,
        segmenter: _segmenter,
        hooks,
        mut env,
    }) = shared(JOB, IMAGES, 100).await
    else {
        return;
    };
    env.push(("ADAPTER".into(), "queue_pull".into()));
    let a = Process::start(binary(), &env, &dir.path().join("a.log")).await;
    let b = Process::start(binary(), &env, &dir.path().join("b.log")).await;

    let js = jetstream::new(async_nats::connect(nats.url.as_str()).await.unwrap());
    let job = serde_json::to_vec(&serde_json::json!({
        "userId": USER,
        "jobId": JOB,
        "concepts": ["wall", "floor", "furniture"],
        "rules": [{"ruleId": "rule1", "concept": "wall", "type": "recolor", "params": {"color": "#FF5733"}}],
        "imageCount": IMAGES,
    }))
    .unwrap();
    // The orchestrators create the stream at start (both are SERVING, so it exists).
    js.publish("palette.jobs", job.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let done = wait_for_within(
        Duration::from_secs(60),
        &mut b.jobs_client(),
        USER,
        JOB,
        is_settled,
    )
    .await;
    assert_eq!(done.completed, IMAGES, "{done:?}");
    let (ids, deliveries) = hooks.ids_per_item(JOB);
    assert_eq!((ids.len(), deliveries), (IMAGES as usize, IMAGES as usize));
    let per_replica = [completed_here(&a), completed_here(&b)];
    assert!(per_replica.iter().all(|&n| n > 0), "{per_replica:?}");
    // The job message was acknowledged once the job was recorded: nothing left in the job queue.
    let mut stream = js.get_stream("palette-jobs").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_whose_holders_keep_dying_is_given_up_with_one_failed_callback() {
    const JOB: &str = "poison-item";
    // Long enough to be killed while holding the item.
    let Some(Shared {
        nats: _nats,
        dir,
        segmenter,
        hooks,
        mut env,
    }) = shared(JOB, 1, 30_000).await
    else {
        return;
    };
    env.push(("NATS_MAX_DELIVERIES".into(), "1".into()));
    let mut a = Process::start(binary(), &env, &dir.path().join("a.log")).await;
    a.jobs_client().submit_job(seed_spec(JOB, 1)).await.unwrap();
    item_started(&segmenter).await;
    a.kill();
    // The second delivery (after the 3 s lease) is past NATS_MAX_DELIVERIES=1: not run, failed and called back.
    let b = Process::start(binary(), &env, &dir.path().join("b.log")).await;
    let job = wait_for_within(
        Duration::from_secs(30),
        &mut b.jobs_client(),
        USER,
        JOB,
        is_settled,
    )
    .await;
    assert_eq!(job.failed, 1, "{job:?}");
    assert_eq!(job.items[0].error_code, "too_many_deliveries");
    let deliveries = hooks.deliveries();
    assert_eq!(deliveries.len(), 1, "{deliveries:?}");
    assert_eq!(deliveries[0].body["error_code"], "too_many_deliveries");
    assert_eq!(segmenter.counters.segment_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_drains_one_replica_and_its_watcher_moves_to_another() {
    const JOB: &str = "rolled";
    const IMAGES: u32 = 20;
    let Some(Shared {
        nats: _nats,
        dir,
        segmenter: _segmenter,
        hooks,
        env,
    }) = shared(JOB, IMAGES, 100).await
    else {
        return;
    };
    let mut a = Process::start(binary(), &env, &dir.path().join("a.log")).await;
    let b = Process::start(binary(), &env, &dir.path().join("b.log")).await;
    a.jobs_client()
        .submit_job(seed_spec(JOB, IMAGES))
        .await
        .unwrap();
    let watch_on = |process: &Process| {
        let mut jobs = process.jobs_client();
        async move {
            jobs.watch_job(WatchJobRequest {
                user_id: USER.into(),
                job_id: JOB.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let mut watch = watch_on(&a).await;
    while watch
        .message()
        .await
        .unwrap()
        .unwrap()
        .job
        .unwrap()
        .completed
        < 4
    {}
    let took = a.terminate(Duration::from_secs(10)).await;
    let ended = loop {
        match watch.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("draining"), "{ended:?}");
    let took = took.expect("exited within SHUTDOWN_GRACE_SEC");
    // The client reconnects to the other replica, which finishes the job.
    let mut watch = watch_on(&b).await;
    loop {
        let job = watch.message().await.unwrap().expect("open").job.unwrap();
        if job.state == JobState::Done as i32 {
            break;
        }
    }
    let last = wait_for_within(
        Duration::from_secs(10),
        &mut b.jobs_client(),
        USER,
        JOB,
        is_settled,
    )
    .await;
    assert_eq!(last.completed, IMAGES, "{last:?}");
    let deliveries = hooks.assert_one_id_per_item(JOB, IMAGES);
    eprintln!(
        "SIGTERM with 4 of {IMAGES} done: the replica exited after {took:?}; the job finished on the other; {} \
         duplicate deliveries",
        deliveries - IMAGES as usize
    );
}

/// A job recorded by a replica that could plan it, whose tasks reach a replica that cannot (limits differ between
/// replicas during a rolling config change): there its items end FAILED `job_not_resumable`, recorded and called
/// back, as a resumed job that no longer plans does. Taken for a job never recorded, they were dropped after 60 s,
/// and the job never ended anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_job_a_replica_cannot_plan_fails_its_items_there() {
    const JOB: &str = "too-big-here";
    const IMAGES: u32 = 3;
    let Some(Shared {
        nats: _nats,
        dir,
        segmenter,
        hooks,
        env,
    }) = shared(JOB, IMAGES, 0).await
    else {
        return;
    };
    // A takes the tasks (BATCH_CONCURRENCY 4), its items never answered, until it is killed: they come back to B.
    segmenter.faults.delay_ms.store(60_000, Ordering::SeqCst);
    let mut a = Process::start(binary(), &env, &dir.path().join("a.log")).await;
    let mut jobs = a.jobs_client();
    jobs.submit_job(seed_spec(JOB, IMAGES)).await.unwrap();
    wait_for_within(Duration::from_secs(30), &mut jobs, USER, JOB, |j| {
        j.state == JobState::Running as i32
    })
    .await;
    a.kill();

    // B allows fewer images than the job has: the record stands, but B cannot plan it.
    let mut smaller = env.clone();
    smaller.push(("MAX_IMAGES_PER_JOB".into(), "2".into()));
    let _b = Process::start(binary(), &smaller, &dir.path().join("b.log")).await;
    let deliveries = hooks
        .wait_until("every item called back", |d| d.len() >= IMAGES as usize)
        .await;
    for d in &deliveries {
        assert_eq!(d.body["status"], "failed", "{d:?}");
        assert_eq!(d.body["error_code"], "job_not_resumable", "{d:?}");
    }
    assert_eq!(hooks.assert_one_id_per_item(JOB, IMAGES), IMAGES as usize);
}

/// A replica without the job's preset (removed from its PRESETS_DIR, or not yet rolled out to it) runs the job's
/// tasks with the preset the record carries, as the submitting replica would have, instead of failing them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_the_jobs_preset_runs_it_with_the_recorded_one() {
    const JOB: &str = "preset-elsewhere";
    const IMAGES: u32 = 3;
    let Some(Shared {
        nats: _nats,
        dir,
        segmenter,
        hooks,
        env,
    }) = shared(JOB, IMAGES, 0).await
    else {
        return;
    };
    let presets = dir.path().join("presets-a");
    std::fs::create_dir_all(&presets).unwrap();
    std::fs::write(
        presets.join("house.json"),
        r#"{"name": "house", "concepts": ["wall", "floor"], "rule_defaults": {"recolor": {"finish": "matte"}}}"#,
    )
    .unwrap();
    let mut with_preset = env.clone();
    with_preset.push(("PRESETS_DIR".into(), presets.to_string_lossy().into_owned()));
    // A takes the tasks, its items never answered, until it is killed: they come back to B.
    segmenter.faults.delay_ms.store(60_000, Ordering::SeqCst);
    let mut a = Process::start(binary(), &with_preset, &dir.path().join("a.log")).await;
    let mut jobs = a.jobs_client();
    let spec = palette_proto::orchestrator::v1::JobSpec {
        preset: "house".into(),
        ..seed_spec(JOB, IMAGES)
    };
    jobs.submit_job(spec).await.unwrap();
    wait_for_within(Duration::from_secs(30), &mut jobs, USER, JOB, |j| {
        j.state == JobState::Running as i32
    })
    .await;
    a.kill();

    segmenter.faults.delay_ms.store(0, Ordering::SeqCst);
    let _b = Process::start(binary(), &env, &dir.path().join("b.log")).await;
    let deliveries = hooks
        .wait_until("every item called back", |d| d.len() >= IMAGES as usize)
        .await;
    for d in &deliveries {
        assert_eq!(d.body["status"], "completed", "{d:?}");
    }
    assert_eq!(hooks.assert_one_id_per_item(JOB, IMAGES), IMAGES as usize);
}

/// The work stream's consumer keeps the limits it was created with: a replica started later with another
/// NATS_ITEM_ACK_WAIT_SEC / NATS_MAX_DELIVERIES renews leases and gives items up by the consumer's, not its own
/// (renewing every 100 s against a 1 s lease would deliver every item again while it runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_uses_the_consumers_limits_not_its_own_settings() {
    use orchestrator_svc::jobs::cluster::Cluster;
    let Some(nats) = nats::start() else {
        return;
    };
    let settings = |ack_wait_sec: u64, max_deliveries: u64| {
        let mut c = orchestrator_svc::Config::for_tests("/tmp/unused", "http://127.0.0.1:9");
        c.nats.nats_url = Some(nats.url.clone().into());
        c.jobs.nats_item_ack_wait_sec = ack_wait_sec;
        c.nats.nats_max_deliveries = max_deliveries;
        c.jobs.cluster_settings(&c.nats).unwrap()
    };
    let first = Cluster::connect(settings(1, 3)).await.unwrap();
    assert_eq!(first.settings().ack_wait, Duration::from_secs(1));
    let later = Cluster::connect(settings(300, 9)).await.unwrap();
    assert_eq!(
        later.settings().ack_wait,
        Duration::from_secs(1),
        "the consumer's lease"
    );
    assert_eq!(later.settings().max_deliveries, 3, "the consumer's limit");
    assert!(later.settings().progress_every() <= Duration::from_millis(334));
}

/// A replica holding tasks of a job that was never recorded (its submission failed after publishing them) waits up
/// to a minute for the record. A drain does not wait with it: the tasks go back at once and the replica exits long
/// before its grace period ends (it waited out the whole grace before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_puts_back_tasks_waiting_for_their_jobs_record() {
    use orchestrator_svc::jobs::cluster::Cluster;
    use orchestrator_svc::jobs::store::RecordKey;
    const JOB: &str = "never-recorded";
    let Some(Shared {
        nats,
        dir,
        segmenter: _segmenter,
        hooks,
        mut env,
    }) = shared(JOB, 2, 0).await
    else {
        return;
    };
    env.push(("SHUTDOWN_GRACE_SEC".into(), "30".into()));
    let mut a = Process::start(binary(), &env, &dir.path().join("a.log")).await;

    let mut config = orchestrator_svc::Config::for_tests("/tmp/unused", "http://127.0.0.1:9");
    config.nats.nats_url = Some(nats.url.clone().into());
    let cluster = Cluster::connect(config.jobs.cluster_settings(&config.nats).unwrap())
        .await
        .unwrap();
    let job = RecordKey {
        user_id: USER.into(),
        job_id: JOB.into(),
        spec_hash: "0".repeat(64),
    };
    cluster.publish_items(&job, 2).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !a.log().contains("waiting for its record") {
        assert!(
            Instant::now() < deadline,
            "A never took the tasks:\n{}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let took = a.terminate(Duration::from_secs(40)).await.expect("A exits");
    assert!(
        took < Duration::from_secs(10),
        "the drain waited {took:?} for tasks of a job never recorded"
    );
    assert!(hooks.deliveries().is_empty(), "nothing to call back");
}

/// A task on its last delivery (the consumer's `max_deliver`, one past NATS_MAX_DELIVERIES) whose holder starts
/// draining while it waits for its job's record is not put back: JetStream never delivers it again, so the item never
/// ended, even once the job was recorded. The holder waits on within its grace, and when the record comes the item
/// ends FAILED `too_many_deliveries`, recorded and called back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_ends_a_task_on_its_last_delivery_instead_of_putting_it_back() {
    use async_nats::jetstream::{AckKind, consumer::PullConsumer};
    use futures::StreamExt;
    use orchestrator_svc::jobs::store::JobStore;
    const JOB: &str = "last-delivery";
    let Some(Shared {
        nats,
        dir,
        segmenter: _segmenter,
        hooks,
        mut env,
    }) = shared(JOB, 1, 0).await
    else {
        return;
    };
    env.push(("NATS_MAX_DELIVERIES".into(), "1".into()));
    env.push(("SHUTDOWN_GRACE_SEC".into(), "30".into()));
    // Deliveries 1 and 2 (the one that gives the item up).
    let cluster = as_the_replicas(&nats.url, 1).await;
    let (job, record) = recorded_job(JOB);
    // The item's task, published before its job's record (as SubmitJob does), taken once and put back (a replica
    // that drained): the next delivery is the last.
    cluster.publish_items(&job, 1).await.unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    let consumer: PullConsumer = js
        .get_stream(&cluster.settings().stream)
        .await
        .unwrap()
        .get_consumer(&cluster.settings().consumer)
        .await
        .unwrap();
    let mut batch = consumer.fetch().max_messages(1).messages().await.unwrap();
    let first = batch.next().await.expect("the task").unwrap();
    first.ack_with(AckKind::Nak(None)).await.unwrap();

    let log = dir.path().join("b.log");
    let mut b = Process::start(binary(), &env, &log).await;
    let wait_for_log = |what: &'static str| {
        let log = log.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !std::fs::read_to_string(&log).unwrap().contains(what) {
                assert!(Instant::now() < deadline, "never logged {what:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_for_log("waiting for its record").await;
    // SIGTERM; once B drains (and, before the fix, had put the task back), the job is recorded.
    let (took, ()) = tokio::join!(b.terminate(Duration::from_secs(40)), async {
        wait_for_log("shutting down").await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        cluster.store().create(&record).await.unwrap();
    });
    let took = took.expect("B exits within its grace");
    let deliveries = tokio::time::timeout(
        Duration::from_secs(15),
        hooks.wait_until("the item called back", |d| !d.is_empty()),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the item never ended (B exited after {took:?}):\n{}",
            std::fs::read_to_string(&log).unwrap()
        )
    });
    assert_eq!(deliveries.len(), 1, "{deliveries:?}");
    assert_eq!(deliveries[0].body["status"], "failed");
    assert_eq!(deliveries[0].body["error_code"], "too_many_deliveries");
    let recorded = cluster
        .store()
        .item(&job, 0)
        .await
        .unwrap()
        .expect("recorded");
    assert_eq!(recorded.state, ItemState::Failed as i32);
}

/// A CancelJob taken by another replica while this one drains still stops the items running here: the watch that
/// brings the cancel runs until they have ended. It stopped when the server did, so the item ran on and was recorded
/// COMPLETED after CancelJob had answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_on_another_replica_stops_the_items_of_a_draining_one() {
    const JOB: &str = "cancelled-while-draining";
    // Longer than the steps below take, well within the grace: without the cancel the item completes during the drain.
    let Some(Shared {
        nats: _nats,
        dir,
        segmenter,
        hooks,
        mut env,
    }) = shared(JOB, 1, 5_000).await
    else {
        return;
    };
    env.push(("SHUTDOWN_GRACE_SEC".into(), "30".into()));
    let log = dir.path().join("a.log");
    let mut a = Process::start(binary(), &env, &log).await;
    // Only A runs, so A holds the item's task.
    a.jobs_client().submit_job(seed_spec(JOB, 1)).await.unwrap();
    item_started(&segmenter).await;
    let b = Process::start(binary(), &env, &dir.path().join("b.log")).await;
    let mut on_b = b.jobs_client();
    wait_for_within(Duration::from_secs(10), &mut on_b, USER, JOB, |j| {
        j.items[0].state == ItemState::Running as i32
    })
    .await;

    let (took, ()) = tokio::join!(a.terminate(Duration::from_secs(40)), async {
        // The server has stopped (no connection is open to A): A is waiting for its item.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string(&log)
            .unwrap()
            .contains("waiting for items in flight")
        {
            assert!(Instant::now() < deadline, "A never drained");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let answered = on_b
            .clone()
            .cancel_job(CancelJobRequest {
                user_id: USER.into(),
                job_id: JOB.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answered.completed, 0, "the item still runs: {answered:?}");
    });
    took.expect("A exits within its grace");
    let job = wait_for_within(Duration::from_secs(20), &mut on_b, USER, JOB, is_settled).await;
    assert_eq!(job.items[0].state, ItemState::Cancelled as i32, "{job:?}");
    let deliveries = hooks.deliveries();
    assert_eq!(deliveries.len(), 1, "{deliveries:?}");
    assert_eq!(deliveries[0].body["status"], "cancelled");
}

/// A cancelled job's items end where their tasks are taken, each a few job-store round trips and a callback; each
/// task trades its BATCH_CONCURRENCY permit for one of the cheaper ENDING_SLOTS, and each replica's counts move per
/// item instead of being counted over the job. Every item ends CANCELLED once, called back once. Prints the time and
/// each replica's CPU and memory, for docs/operations.md (`MASS_CANCEL_IMAGES=10000` for the documented figure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_cancelled_job_is_called_back_once_per_item_on_two_replicas() {
    const JOB: &str = "mass-cancel";
    let images: u32 = std::env::var("MASS_CANCEL_IMAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000);
    // Photos for the two items each replica starts; the others never start. Each Segment call takes a minute.
    let Some(Shared {
        nats: _nats,
        dir,
        segmenter: _segmenter,
        hooks,
        mut env,
    }) = shared(JOB, 4, 60_000).await
    else {
        return;
    };
    env.push(("MAX_IMAGES_PER_JOB".into(), images.to_string()));
    let log = |name: &str| dir.path().join(format!("{name}.log"));
    let a = Process::start(binary(), &env, &log("a")).await;
    let b = Process::start(binary(), &env, &log("b")).await;
    a.jobs_client()
        .submit_job(seed_spec(JOB, images))
        .await
        .unwrap();
    wait_for_within(
        Duration::from_secs(60),
        &mut a.jobs_client(),
        USER,
        JOB,
        |j| running(j) >= 2,
    )
    .await;
    let cancelled_at = Instant::now();
    b.jobs_client()
        .cancel_job(CancelJobRequest {
            user_id: USER.into(),
            job_id: JOB.into(),
        })
        .await
        .unwrap();
    hooks
        .wait_until("every item's callback", |d| d.len() >= images as usize)
        .await;
    let called_back = cancelled_at.elapsed();
    for replica in [&a, &b] {
        let job = wait_for_within(
            Duration::from_secs(60),
            &mut replica.jobs_client(),
            USER,
            JOB,
            is_settled,
        )
        .await;
        assert_eq!(job.state, JobState::Cancelled as i32);
        assert_eq!(job.cancelled, images, "{job:?}");
    }
    assert_eq!(hooks.assert_one_id_per_item(JOB, images), images as usize);
    eprintln!(
        "{images}-image job cancelled on two replicas: every item called back {called_back:?} after CancelJob; \
         replica A {}, replica B {}",
        a.usage(),
        b.usage()
    );
}

/// Waits until an item's Segment call began.
async fn item_started(segmenter: &fake_segmenter::FakeSegmenter) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while segmenter.counters.segment_calls.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the item never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `process` has logged `what` `times` times.
async fn logged(process: &Process, what: &str, times: usize, within: Duration) {
    let deadline = Instant::now() + within;
    while process.log().matches(what).count() < times {
        assert!(
            Instant::now() < deadline,
            "never logged {what:?} {times} times:\n{}",
            process.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Item 0 of `job` as the bucket holds it, once `done` says it is as expected (None: it never was within `within`).
async fn recorded_item(
    nats: &str,
    job: &str,
    within: Duration,
    done: impl Fn(&palette_proto::orchestrator::v1::Item) -> bool,
) -> Option<palette_proto::orchestrator::v1::Item> {
    let store = orchestrator_svc::jobs::store::NatsJobStore::open(nats, "palette_jobs")
        .await
        .unwrap();
    let (key, _) = recorded_job(job);
    let deadline = Instant::now() + within;
    loop {
        let item = store.item(&key, 0).await.unwrap();
        if item.as_ref().is_some_and(&done) || Instant::now() >= deadline {
            return item.filter(done);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The environment of a replica that gives up on an unanswered item record after 1 s (NATS_STORE_PATIENCE_SEC),
/// with a lease long enough that NATS frozen for ~15 s does not hand its task to anyone else.
fn impatient(mut env: Vec<(String, String)>) -> Vec<(String, String)> {
    env.push(("NATS_STORE_PATIENCE_SEC".into(), "1".into()));
    env.push(("NATS_ITEM_ACK_WAIT_SEC".into(), "90".into()));
    env
}

/// NATS does not answer (SIGSTOP) from the moment the item runs until well after it ended: its first record gives up
/// after NATS_STORE_PATIENCE_SEC, and the item is not called back without it. The holder keeps the task, and once
/// NATS answers writes the item's record itself and only then calls it back: the item is not run again, called back
/// once, and the bucket shows it COMPLETED with its callback delivered. (Before, the holder found no record, or its
/// own first record written late, callback pending: it put the task back, and the item ran a second time, or
/// acknowledged it, and the record said "callback pending" for ever; later, it called back without the record,
/// which told the receiver a second end of the item when another replica had ended it meanwhile: see
/// `a_replica_cut_off_from_nats_does_not_call_back_an_end_another_replica_overruled`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_that_ended_while_nats_was_down_past_the_patience_is_recorded_once_it_answers() {
    const JOB: &str = "late-record";
    let Some(Shared {
        nats,
        dir,
        segmenter,
        hooks,
        env,
    }) = shared(JOB, 1, 3_000).await
    else {
        return;
    };
    let a = Process::start(binary(), &impatient(env), &dir.path().join("a.log")).await;
    a.jobs_client().submit_job(seed_spec(JOB, 1)).await.unwrap();
    item_started(&segmenter).await;
    nats.freeze();
    // Its first record given up, and then retried by the task's holder.
    logged(
        &a,
        "item not recorded in the job store",
        1,
        Duration::from_secs(40),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        hooks.deliveries().len(),
        0,
        "called back before its end was recorded"
    );
    nats.thaw();
    let delivered = CallbackState::Delivered as i32;
    let item = recorded_item(&nats.url, JOB, Duration::from_secs(30), |i| {
        i.callback_state == delivered
    })
    .await
    .unwrap_or_else(|| panic!("never recorded with its callback settled:\n{}", a.log()));
    assert_eq!(item.state, ItemState::Completed as i32, "{item:?}");
    logged(&a, "item recorded late", 1, Duration::from_secs(10)).await;
    // Its task is released: nothing runs or calls it back again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(segmenter.counters.segment_calls.load(Ordering::SeqCst), 1);
    hooks.assert_one_id_per_item(JOB, 1);
    assert_eq!(hooks.deliveries().len(), 1, "{:?}", hooks.deliveries());
    assert_eq!(hooks.deliveries()[0].body["status"], "completed");
}

/// Replica A runs the item and is cut off from NATS (a partition: no FIN, no RST) while B still reaches it. The job
/// is cancelled on B; A never hears of it, and its item ends COMPLETED there, its record unwritten. A's lease runs
/// out, B takes the task and ends the item CANCELLED, recorded and called back. A does not call its end back without
/// the record, and once it reaches NATS again finds B's end standing: the receiver is told one end of the item,
/// CANCELLED. (Before, A called back COMPLETED after NATS_STORE_PATIENCE_SEC: two different ends of one item.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_from_nats_does_not_call_back_an_end_another_replica_overruled() {
    const JOB: &str = "partitioned";
    let Some(Shared {
        nats,
        dir,
        segmenter,
        hooks,
        env,
    }) = shared(JOB, 1, 8_000).await
    else {
        return;
    };
    let to_nats = Partition::start(&nats.url).await;
    let with_patience = |mut env: Vec<(String, String)>| {
        env.push(("NATS_STORE_PATIENCE_SEC".into(), "1".into()));
        env
    };
    let mut a_env = with_patience(env.clone());
    a_env.push(("NATS_URL".into(), to_nats.url.clone()));
    let a = Process::start(binary(), &a_env, &dir.path().join("a.log")).await;
    a.jobs_client().submit_job(seed_spec(JOB, 1)).await.unwrap();
    item_started(&segmenter).await;
    // Started only now, so the task is A's.
    let b = Process::start(binary(), &with_patience(env), &dir.path().join("b.log")).await;
    to_nats.cut();
    b.jobs_client()
        .cancel_job(CancelJobRequest {
            user_id: USER.into(),
            job_id: JOB.into(),
        })
        .await
        .unwrap();
    // B ends the item once A's 3 s lease has run out.
    let cancelled = ItemState::Cancelled as i32;
    recorded_item(&nats.url, JOB, Duration::from_secs(30), |i| {
        i.state == cancelled
    })
    .await
    .unwrap_or_else(|| panic!("B never ended the item:\n{}", b.log()));
    // A's item ends COMPLETED (8 s Segment call), and its first record gives up.
    logged(
        &a,
        "item not recorded in the job store",
        1,
        Duration::from_secs(40),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    to_nats.heal();
    logged(
        &a,
        "item recorded meanwhile with another end; that one stands",
        1,
        Duration::from_secs(40),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deliveries = hooks.deliveries();
    assert!(!deliveries.is_empty(), "never called back");
    for d in &deliveries {
        assert_eq!(d.body["status"], "cancelled", "{d:?}\nA:\n{}", a.log());
    }
    hooks.assert_one_id_per_item(JOB, 1);
    assert_eq!(segmenter.counters.segment_calls.load(Ordering::SeqCst), 1);
}

/// NATS stops answering while the item's callback is retried (its first record written): the settled record gives
/// up after NATS_STORE_PATIENCE_SEC. Once NATS answers, the holder writes it, and the bucket no longer says the
/// callback is pending (before: it did for ever, on every replica, the task acknowledged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settled_callback_not_recorded_while_nats_was_down_is_recorded_once_it_answers() {
    const JOB: &str = "late-settled";
    let Some(Shared {
        nats,
        dir,
        segmenter,
        hooks: _unscripted,
        env,
    }) = shared(JOB, 1, 0).await
    else {
        return;
    };
    // The first attempt is answered 503, Retry-After 2 s: NATS is frozen in between.
    let hooks = Receiver::start(SECRET, vec![(503, Some(2))]).await;
    let mut env = impatient(env);
    env.push(("WORKERS_API_URL".into(), hooks.url()));
    env.push(("CALLBACK_MAX_DELAY_SEC".into(), "3".into()));
    let a = Process::start(binary(), &env, &dir.path().join("a.log")).await;
    a.jobs_client().submit_job(seed_spec(JOB, 1)).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(30),
        hooks.wait_until("the first attempt", |d| !d.is_empty()),
    )
    .await
    .expect("called back");
    nats.freeze();
    logged(
        &a,
        "item not recorded in the job store",
        1,
        Duration::from_secs(40),
    )
    .await;
    nats.thaw();
    let pending = CallbackState::Pending as i32;
    let item = recorded_item(&nats.url, JOB, Duration::from_secs(30), |i| {
        i.callback_state != pending
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the record still says the callback is pending:\n{}",
            a.log()
        )
    });
    assert_eq!(
        item.callback_state,
        CallbackState::Delivered as i32,
        "{item:?}"
    );
    assert_eq!(item.callback_attempts, 2, "{item:?}");
    assert_eq!(segmenter.counters.segment_calls.load(Ordering::SeqCst), 1);
    hooks.assert_one_id_per_item(JOB, 1);
}

/// The shared bucket, stream and consumer, the consumer created as the replicas have it (3 s lease,
/// `max_deliveries`): how a test sets up what the replicas find.
async fn as_the_replicas(
    nats: &str,
    max_deliveries: u64,
) -> orchestrator_svc::jobs::cluster::Cluster {
    let mut config = orchestrator_svc::Config::for_tests("/tmp/unused", "http://127.0.0.1:9");
    config.nats.nats_url = Some(nats.to_string().into());
    config.jobs.nats_item_ack_wait_sec = 3;
    config.nats.nats_max_deliveries = max_deliveries;
    orchestrator_svc::jobs::cluster::Cluster::connect(
        config.jobs.cluster_settings(&config.nats).unwrap(),
    )
    .await
    .unwrap()
}

/// The key and the record SubmitJob writes for `seed_spec(job, 1)`.
fn recorded_job(
    job: &str,
) -> (
    orchestrator_svc::jobs::store::RecordKey,
    orchestrator_svc::jobs::store::JobRecord,
) {
    use orchestrator_svc::jobs::store::{JobRecord, RecordKey, spec_hash};
    let spec = seed_spec(job, 1);
    let key = RecordKey {
        user_id: USER.into(),
        job_id: job.into(),
        spec_hash: spec_hash(&spec),
    };
    let record = JobRecord {
        user_id: USER.into(),
        job_id: job.into(),
        spec_hash: key.spec_hash.clone(),
        spec,
        seq: 1,
        cancelled: false,
        source: None,
        preset: None,
    };
    (key, record)
}

/// The bucket and stream as a replica that died mid-callback leaves them: `job`'s one item recorded COMPLETED with
/// its callback pending, its task still in the stream.
async fn a_pending_callback_in_the_stream(
    nats: &str,
    job: &str,
    max_deliveries: u64,
) -> orchestrator_svc::jobs::cluster::Cluster {
    let cluster = a_recorded_job_and_its_task(nats, job, max_deliveries).await;
    record_completed_callback_pending(&cluster, job).await;
    cluster
}

/// `job` (`seed_spec(job, 1)`) recorded as SubmitJob records it, its one item's task in the stream.
async fn a_recorded_job_and_its_task(
    nats: &str,
    job: &str,
    max_deliveries: u64,
) -> orchestrator_svc::jobs::cluster::Cluster {
    use orchestrator_svc::jobs::store::JobStore;
    let cluster = as_the_replicas(nats, max_deliveries).await;
    let (key, record) = recorded_job(job);
    cluster.publish_items(&key, 1).await.unwrap();
    cluster.store().create(&record).await.unwrap();
    cluster
}

/// `job`'s one item recorded COMPLETED with its callback pending, as a holder that died before calling it back
/// leaves it.
async fn record_completed_callback_pending(
    cluster: &orchestrator_svc::jobs::cluster::Cluster,
    job: &str,
) {
    use orchestrator_svc::jobs::store::JobStore;
    let item = palette_proto::orchestrator::v1::Item {
        idx: 0,
        state: ItemState::Completed as i32,
        callback_state: CallbackState::Pending as i32,
        output_key: format!("outputs/{USER}/{job}/paint/0.jpg"),
        ..Default::default()
    };
    let (key, _) = recorded_job(job);
    cluster
        .store()
        .put_first_item(&key, &item, false)
        .await
        .unwrap();
}

/// The holder of a task whose item another holder recorded meanwhile (one whose lease this one's overlapped), that
/// one's callback still pending, acknowledged the task: should the other holder die before its callback settled,
/// nobody ever sent it. The task is put back now, and its next holder finds the callback settled, or sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_another_holder_recorded_is_called_back_should_that_holder_die_before_it() {
    const JOB: &str = "pending-overruled";
    let Some(Shared {
        nats,
        dir,
        segmenter,
        hooks,
        env,
    }) = shared(JOB, 1, 3_000).await
    else {
        return;
    };
    let cluster = a_recorded_job_and_its_task(&nats.url, JOB, 5).await;
    let a = Process::start(binary(), &env, &dir.path().join("a.log")).await;
    item_started(&segmenter).await;
    // The other holder records its end while A's run is at the segmenter, and dies before calling it back.
    record_completed_callback_pending(&cluster, JOB).await;
    let deliveries = tokio::time::timeout(
        Duration::from_secs(30),
        hooks.wait_until("the recorded end called back", |d| !d.is_empty()),
    )
    .await
    .unwrap_or_else(|_| panic!("never called back:\n{}", a.log()));
    assert_eq!(deliveries.len(), 1, "{deliveries:?}");
    assert_eq!(deliveries[0].body["status"], "completed");
    let delivered = CallbackState::Delivered as i32;
    recorded_item(&nats.url, JOB, Duration::from_secs(30), |i| {
        i.callback_state == delivered
    })
    .await
    .expect("recorded delivered");
    assert_eq!(segmenter.counters.segment_calls.load(Ordering::SeqCst), 1);
}

/// A replica with callbacks off (WORKERS_API_URL unset there, during a rolling change of it) takes the task of an
/// item recorded with its callback pending: it puts the task back, and a replica that sends callbacks resends it.
/// (It acknowledged it, and the callback stayed PENDING on every replica, never sent.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_callback_taken_by_a_replica_without_callbacks_goes_to_one_with_them() {
    const JOB: &str = "pending-elsewhere";
    let Some(Shared {
        nats,
        dir,
        segmenter,
        hooks,
        env,
    }) = shared(JOB, 1, 0).await
    else {
        return;
    };
    let _cluster = a_pending_callback_in_the_stream(&nats.url, JOB, 5).await;
    let mut off = env.clone();
    off.push(("WORKERS_API_URL".into(), String::new()));
    let mut b = Process::start(binary(), &off, &dir.path().join("b.log")).await;
    logged(
        &b,
        "callbacks off here: put back",
        1,
        Duration::from_secs(30),
    )
    .await;
    b.terminate(Duration::from_secs(20)).await;
    let _a = Process::start(binary(), &env, &dir.path().join("a.log")).await;
    let deliveries = tokio::time::timeout(
        Duration::from_secs(30),
        hooks.wait_until("the callback resent", |d| !d.is_empty()),
    )
    .await
    .expect("a replica with callbacks resent it");
    assert_eq!(deliveries.len(), 1, "{deliveries:?}");
    assert_eq!(deliveries[0].body["status"], "completed");
    let delivered = CallbackState::Delivered as i32;
    recorded_item(&nats.url, JOB, Duration::from_secs(30), |i| {
        i.callback_state == delivered
    })
    .await
    .expect("recorded delivered");
    assert_eq!(
        segmenter.counters.segment_calls.load(Ordering::SeqCst),
        0,
        "not run again"
    );
}

/// Only replicas with callbacks off ever take it: on its last delivery the record is settled NOT_CONFIGURED (as a
/// resumed job's item is on one orchestrator), not left PENDING for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_callback_no_replica_can_send_is_settled_not_configured_on_its_last_delivery() {
    const JOB: &str = "pending-nowhere";
    let Some(Shared {
        nats,
        dir,
        segmenter: _segmenter,
        hooks,
        mut env,
    }) = shared(JOB, 1, 0).await
    else {
        return;
    };
    let _cluster = a_pending_callback_in_the_stream(&nats.url, JOB, 1).await;
    env.push(("WORKERS_API_URL".into(), String::new()));
    env.push(("NATS_MAX_DELIVERIES".into(), "1".into()));
    let b = Process::start(binary(), &env, &dir.path().join("b.log")).await;
    let not_configured = CallbackState::NotConfigured as i32;
    let item = recorded_item(&nats.url, JOB, Duration::from_secs(30), |i| {
        i.callback_state == not_configured
    })
    .await
    .unwrap_or_else(|| panic!("still pending:\n{}", b.log()));
    assert_eq!(item.state, ItemState::Completed as i32);
    assert!(
        b.log().contains("callbacks off here: put back"),
        "{}",
        b.log()
    );
    assert!(hooks.deliveries().is_empty());
}

/// A task delivered again to the replica that still holds it (its lease ran out under a live holder whose renewals
/// came too late: here the consumer's ack wait is cut to 1 s after the replica adopted 30 s, so it renews every
/// 10 s) waits for the first delivery to end, and then finds the item recorded. (Before: it ran the item a second
/// time beside the first, taking the RUNNING item for a dead holder's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_delivered_again_to_its_holder_waits_for_the_first_delivery() {
    use async_nats::jetstream::consumer::PullConsumer;
    const JOB: &str = "held-twice";
    let Some(Shared {
        nats,
        dir,
        segmenter,
        hooks,
        mut env,
    }) = shared(JOB, 1, 4_000).await
    else {
        return;
    };
    env.push(("NATS_ITEM_ACK_WAIT_SEC".into(), "30".into()));
    env.push(("BATCH_CONCURRENCY".into(), "2".into()));
    let a = Process::start(binary(), &env, &dir.path().join("a.log")).await;
    logged(&a, "taking item tasks", 1, Duration::from_secs(30)).await;
    let cluster = as_the_replicas(&nats.url, 5).await;
    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    let stream = js.get_stream(&cluster.settings().stream).await.unwrap();
    let mut consumer: PullConsumer = stream
        .get_consumer(&cluster.settings().consumer)
        .await
        .unwrap();
    let mut config = consumer.info().await.unwrap().config.clone();
    config.ack_wait = Duration::from_secs(1);
    stream.update_consumer(config).await.unwrap();

    a.jobs_client().submit_job(seed_spec(JOB, 1)).await.unwrap();
    // Both deliveries acknowledged: nothing comes back.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = consumer.info().await.unwrap().clone();
        if info.num_ack_pending == 0 && info.num_pending == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the task stays out: {info:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    run_once_after_a_wait(&nats.url, JOB, &a, &segmenter, &hooks).await;
}

/// The item of `job` recorded COMPLETED with its callback delivered, run once by `a`, called back once, and a task
/// of it waited there for another.
async fn run_once_after_a_wait(
    nats: &str,
    job: &str,
    a: &Process,
    segmenter: &fake_segmenter::FakeSegmenter,
    hooks: &Receiver,
) {
    let delivered = CallbackState::Delivered as i32;
    let item = recorded_item(nats, job, Duration::from_secs(30), |i| {
        i.callback_state == delivered
    })
    .await
    .unwrap_or_else(|| panic!("never recorded:\n{}", a.log()));
    assert_eq!(item.state, ItemState::Completed as i32, "{item:?}");
    // Time for a second run to show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        segmenter.counters.segment_calls.load(Ordering::SeqCst),
        1,
        "run once:\n{}",
        a.log()
    );
    hooks.assert_one_id_per_item(job, 1);
    assert_eq!(hooks.deliveries().len(), 1, "{:?}", hooks.deliveries());
    logged(
        a,
        "waiting for the first to end",
        1,
        Duration::from_secs(10),
    )
    .await;
}

/// One item with two tasks in the stream (a resubmission after a failed record publishes a job's tasks again), both
/// taken by one replica: the second waits for the first and finds the item recorded. (Before: both ran it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tasks_of_one_item_on_one_replica_run_it_once() {
    use orchestrator_svc::jobs::store::JobStore;
    const JOB: &str = "published-twice";
    let Some(Shared {
        nats,
        dir,
        segmenter,
        hooks,
        mut env,
    }) = shared(JOB, 1, 3_000).await
    else {
        return;
    };
    env.push(("BATCH_CONCURRENCY".into(), "2".into()));
    let cluster = as_the_replicas(&nats.url, 5).await;
    let (job, record) = recorded_job(JOB);
    cluster.publish_items(&job, 1).await.unwrap();
    cluster.publish_items(&job, 1).await.unwrap();
    cluster.store().create(&record).await.unwrap();
    let a = Process::start(binary(), &env, &dir.path().join("a.log")).await;
    run_once_after_a_wait(&nats.url, JOB, &a, &segmenter, &hooks).await;
}

/// Queue jobs are not refused for phrases the segmenter says it cannot read (orchestrator.md: a message is not a
/// call, so nobody would be told, and a redelivery must not be refused while its items run): with JOB_STORE=nats
/// the shared path asked CheckConcepts and terminated the message, with no callback at all. The same spec over gRPC
/// is refused, as documented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_job_is_not_refused_for_its_phrases() {
    use async_nats::jetstream;
    const JOB: &str = "queued-unreadable";
    const IMAGES: u32 = 2;
    let Some(Shared {
        nats,
        dir,
        segmenter,
        hooks,
        mut env,
    }) = shared(JOB, IMAGES, 0).await
    else {
        return;
    };
    *segmenter.faults.unreadable.lock().unwrap() = vec!["furniture".into()];
    env.push(("ADAPTER".into(), "queue_pull".into()));
    let a = Process::start(binary(), &env, &dir.path().join("a.log")).await;
    let refused = a
        .jobs_client()
        .submit_job(seed_spec("over-grpc", 1))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("furniture"), "{refused:?}");

    let js = jetstream::new(async_nats::connect(nats.url.as_str()).await.unwrap());
    let job = serde_json::to_vec(&serde_json::json!({
        "userId": USER,
        "jobId": JOB,
        "concepts": ["wall", "floor", "furniture"],
        "rules": [{"ruleId": "rule1", "concept": "wall", "type": "recolor", "params": {"color": "#FF5733"}}],
        "imageCount": IMAGES,
    }))
    .unwrap();
    js.publish("palette.jobs", job.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let done = wait_for_within(
        Duration::from_secs(30),
        &mut a.jobs_client(),
        USER,
        JOB,
        is_settled,
    )
    .await;
    assert_eq!(done.completed, IMAGES, "{done:?}");
    let (ids, deliveries) = hooks.ids_per_item(JOB);
    assert_eq!((ids.len(), deliveries), (IMAGES as usize, IMAGES as usize));
}

/// A retry of a submission (its answer lost) on a replica whose preset file differs from the one the job was
/// recorded with (a rolling deploy changed it) is the recorded job, planned with the preset it kept: not
/// ALREADY_EXISTS "use a new job id", whose advice would run the job twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_on_a_replica_with_a_changed_preset_is_the_recorded_job() {
    const JOB: &str = "preset-changed";
    let Some(Shared {
        nats: _nats,
        dir,
        segmenter: _segmenter,
        hooks: _hooks,
        env,
    }) = shared(JOB, 1, 0).await
    else {
        return;
    };
    let presets = |name: &str, format: &str| {
        let path = dir.path().join(name);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(
            path.join("house.json"),
            format!(r#"{{"name": "house", "concepts": ["wall"], "output_format": "{format}"}}"#),
        )
        .unwrap();
        path.to_string_lossy().into_owned()
    };
    let with_presets = |dir: String| {
        let mut env = env.clone();
        env.retain(|(k, _)| k != "PRESETS_DIR");
        env.push(("PRESETS_DIR".into(), dir));
        env
    };
    let before = with_presets(presets("presets-before", "jpeg"));
    let after = with_presets(presets("presets-after", "png"));
    let a = Process::start(binary(), &before, &dir.path().join("a.log")).await;
    let spec = palette_proto::orchestrator::v1::JobSpec {
        preset: "house".into(),
        ..seed_spec(JOB, 1)
    };
    a.jobs_client().submit_job(spec.clone()).await.unwrap();
    let b = Process::start(binary(), &after, &dir.path().join("b.log")).await;
    let retried = b.jobs_client().submit_job(spec).await.unwrap().into_inner();
    assert_eq!(retried.job_id, JOB);
    assert_eq!(
        retried.effective_spec.map(|s| s.output_format),
        Some(String::new()),
        "planned with the preset it was recorded with (JPEG)"
    );
}
