//! JOB_STORE=local with the orchestrator as a real process (SIGKILL leaves nothing to clean up, as an OOM kill
//! does): started again on the same store, it finishes what the killed one started. Every item ends in exactly one
//! terminal state, called back under one webhook-id per item (a resend after the kill reuses the id, so receivers
//! drop it; resends are counted).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use palette_proto::orchestrator::v1::{
    CallbackState, CancelJobRequest, GetJobRequest, ItemState, JobState,
};
use palette_testing::jobs;
use palette_testing::orchestrator::put_distinct_inputs;
use palette_testing::orchestrator::{photo_jpeg, seed_spec};
use palette_testing::process::{Process, orchestrator_env};
use palette_testing::{fake_segmenter, receiver::Receiver};

const SECRET: &str = "job-store-secret";
const USER: &str = "test-user";

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_orchestrator-svc"))
}

/// The environment of every orchestrator in these tests: one store file and one storage root under `dir`.
fn env(dir: &Path, segmenter: &str, callbacks: &str) -> Vec<(String, String)> {
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let mut env = orchestrator_env(segmenter, callbacks, SECRET);
    env.extend(
        [
            ("SEGMENTER_RESOLVE_INTERVAL_SEC", "1".into()),
            ("STORAGE_BACKEND", "local".into()),
            ("LOCAL_STORAGE_DIR", path("storage")),
            ("PRESETS_DIR", path("no-presets")),
            ("JOB_STORE", "local".into()),
            ("JOB_STORE_PATH", path("state/jobs.redb")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v)),
    );
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_orchestrator_finishes_its_job_after_a_restart() {
    const JOB: &str = "killed-mid-job";
    const IMAGES: u32 = 16;
    let dir = tempfile::tempdir().unwrap();
    let segmenter = fake_segmenter::start().await;
    segmenter.faults.delay_ms.store(150, Ordering::SeqCst);
    let hooks = Receiver::start(SECRET, vec![]).await;
    put_distinct_inputs(&dir.path().join("storage"), USER, JOB, IMAGES).await;
    let env = env(dir.path(), &segmenter.url, &hooks.url());

    let mut first = Process::start(binary(), &env, &dir.path().join("first.log")).await;
    let mut jobs = first.jobs_client();
    jobs.submit_job(seed_spec(JOB, IMAGES)).await.unwrap();
    let before = jobs::wait_for(&mut jobs, USER, JOB, |j| j.completed >= 4).await;
    first.kill();
    let calls_before = segmenter.counters.segment_calls.load(Ordering::SeqCst);
    // An item called back was recorded first (terminal state, then callback): it must never run again.
    let called_back_before = hooks.per_id().len();

    let restarted = Instant::now();
    let second = Process::start(binary(), &env, &dir.path().join("second.log")).await;
    let serving_after = restarted.elapsed();
    let mut jobs = second.jobs_client();
    let job = jobs::wait_for(&mut jobs, USER, JOB, jobs::is_settled).await;
    let finished_after = restarted.elapsed();

    assert_eq!(job.state, JobState::Done as i32, "{job:?}");
    assert_eq!(job.completed, IMAGES, "{job:?}");
    for item in &job.items {
        assert_eq!(item.state, ItemState::Completed as i32, "{item:?}");
        assert_eq!(
            item.callback_state,
            CallbackState::Delivered as i32,
            "{item:?}"
        );
    }
    // One terminal state per item: one webhook-id per idx, every delivery signed and saying "completed".
    let deliveries = hooks.deliveries();
    let mut ids: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for d in &deliveries {
        assert!(d.verified, "{d:?}");
        assert_eq!(d.body["status"], "completed", "{d:?}");
        ids.entry(d.body["idx"].as_u64().unwrap())
            .or_default()
            .insert(d.webhook_id.clone());
    }
    assert_eq!(ids.len(), IMAGES as usize, "{ids:?}");
    assert!(ids.values().all(|set| set.len() == 1), "{ids:?}");
    let duplicates = deliveries.len() - IMAGES as usize;
    // Only items the killed process had started and not yet called back may have run twice.
    let calls = segmenter.counters.segment_calls.load(Ordering::SeqCst);
    let reruns = calls - IMAGES as usize;
    assert!(
        reruns <= calls_before - called_back_before,
        "{calls} Segment calls; {calls_before} before the kill, {called_back_before} items called back by then"
    );
    assert!(
        second.log().contains("jobs resumed from the job store"),
        "{}",
        second.log()
    );
    eprintln!(
        "killed with {} of {IMAGES} items completed ({calls_before} Segment calls); restarted process SERVING after \
         {serving_after:?}, job done and called back {finished_after:?} after the restart; {reruns} items ran twice; \
         {} deliveries, {duplicates} duplicate webhook-ids",
        before.completed,
        deliveries.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_a_cancelled_job_stays_cancelled_and_its_id_stays_taken() {
    const JOB: &str = "cancelled-then-killed";
    const IMAGES: u32 = 6;
    let dir = tempfile::tempdir().unwrap();
    let segmenter = fake_segmenter::start().await;
    segmenter.faults.delay_ms.store(400, Ordering::SeqCst);
    let hooks = Receiver::start(SECRET, vec![]).await;
    put_distinct_inputs(&dir.path().join("storage"), USER, JOB, IMAGES).await;
    let env = env(dir.path(), &segmenter.url, &hooks.url());

    let mut first = Process::start(binary(), &env, &dir.path().join("first.log")).await;
    let mut jobs = first.jobs_client();
    jobs.submit_job(seed_spec(JOB, IMAGES)).await.unwrap();
    jobs::wait_for(&mut jobs, USER, JOB, |j| {
        j.state == JobState::Running as i32
    })
    .await;
    jobs.cancel_job(CancelJobRequest {
        user_id: USER.into(),
        job_id: JOB.into(),
    })
    .await
    .unwrap();
    let cancelled = jobs::wait_for(&mut jobs, USER, JOB, jobs::is_settled).await;
    // SIGTERM, as a rolling update sends: the drain commits each settled callback, so none is sent twice. (After a
    // SIGKILL, one whose settled state was not yet committed would be resent under its webhook-id.)
    first
        .terminate(Duration::from_secs(30))
        .await
        .expect("exited on SIGTERM");

    let second = Process::start(binary(), &env, &dir.path().join("second.log")).await;
    let mut jobs = second.jobs_client();
    let job = jobs::get(&mut jobs, USER, JOB).await;
    assert_eq!(job.state, JobState::Cancelled as i32, "{job:?}");
    assert_eq!(
        job.items, cancelled.items,
        "items come back as they were recorded"
    );
    // The same spec is the same job; another spec under its id is refused, across the restart.
    let again = jobs
        .submit_job(seed_spec(JOB, IMAGES))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.state, JobState::Cancelled as i32);
    let other = jobs
        .submit_job(seed_spec(JOB, IMAGES + 1))
        .await
        .unwrap_err();
    assert_eq!(other.code(), tonic::Code::AlreadyExists, "{other:?}");
    // Nothing was called back twice.
    let per_id = hooks.per_id();
    assert_eq!(per_id.len(), IMAGES as usize, "{per_id:?}");
    assert!(per_id.values().all(|&n| n == 1), "{per_id:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_forgets_what_retention_forgets_and_a_restart_keeps_it_forgotten() {
    use orchestrator_svc::config::JobStoreKind;
    use palette_testing::orchestrator;

    let state = tempfile::tempdir().unwrap();
    let segmenter = fake_segmenter::start().await;
    let tweak = |c: &mut orchestrator_svc::Config| {
        c.jobs.job_store = JobStoreKind::Local;
        c.jobs.job_store_path = state.path().join("jobs.redb");
        c.limits.max_retained_jobs = 2;
    };
    let mut first = orchestrator::start(&segmenter.url, tweak).await;
    for job in ["oldest", "middle", "newest"] {
        first.put_input(USER, job, 0, photo_jpeg(32, 24)).await;
        first.client.submit_job(seed_spec(job, 1)).await.unwrap();
        first.wait_for(job, orchestrator::is_terminal).await;
    }
    first.shutdown().await;

    let mut second = orchestrator::start(&segmenter.url, tweak).await;
    let missing = second
        .client
        .get_job(GetJobRequest {
            user_id: USER.into(),
            job_id: "oldest".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    for job in ["middle", "newest"] {
        let kept = second.wait_for(job, orchestrator::is_terminal).await;
        assert_eq!(kept.state, JobState::Done as i32, "{kept:?}");
    }
    // Forgotten means free: the id takes another spec (its old record and items are gone from the store).
    second
        .client
        .submit_job(seed_spec("oldest", 2))
        .await
        .expect("a forgotten job id is free again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_job_that_no_longer_validates_fails_its_open_items_once() {
    const JOB: &str = "too-big-now";
    const IMAGES: u32 = 4;
    let dir = tempfile::tempdir().unwrap();
    let segmenter = fake_segmenter::start().await;
    segmenter.faults.delay_ms.store(60_000, Ordering::SeqCst);
    let hooks = Receiver::start(SECRET, vec![]).await;
    put_distinct_inputs(&dir.path().join("storage"), USER, JOB, IMAGES).await;
    let env = env(dir.path(), &segmenter.url, &hooks.url());

    let mut first = Process::start(binary(), &env, &dir.path().join("first.log")).await;
    let mut jobs = first.jobs_client();
    jobs.submit_job(seed_spec(JOB, IMAGES)).await.unwrap();
    jobs::wait_for(&mut jobs, USER, JOB, |j| {
        j.state == JobState::Running as i32
    })
    .await;
    first.kill();

    // Restarted with a limit the job now exceeds: it cannot be planned again.
    let mut smaller = env.clone();
    smaller.push(("MAX_IMAGES_PER_JOB".into(), "2".into()));
    let log = dir.path().join("second.log");
    let mut second = Process::start(binary(), &smaller, &log).await;
    let job = jobs::wait_for(&mut second.jobs_client(), USER, JOB, jobs::is_settled).await;
    assert_eq!(job.failed, IMAGES, "{job:?}");
    for item in &job.items {
        assert_eq!(item.error_code, "job_not_resumable", "{item:?}");
    }
    let per_id = hooks.per_id();
    assert_eq!(per_id.len(), IMAGES as usize, "{per_id:?}");
    // Stopped, not killed: GetJob shows a callback delivered a moment before its settled state is committed, and a
    // SIGKILL in between would (rightly) resend it under its webhook-id on the next start.
    assert!(
        second.terminate(Duration::from_secs(20)).await.is_some(),
        "the drain did not end"
    );
    // Recorded as failed: a third start neither runs nor calls them back again.
    let third = Process::start(binary(), &smaller, &dir.path().join("third.log")).await;
    let again = jobs::get(&mut third.jobs_client(), USER, JOB).await;
    assert_eq!(again.items, job.items);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hooks.deliveries().len(), IMAGES as usize);
}

/// A job runs to the end with its preset as it was at submission: the record keeps it, so a restart after the
/// preset file was removed (or edited: the unit tests of `jobs::resume` check the defaults it plans with) finishes
/// the job instead of failing its open items `job_not_resumable` (or rendering them with other defaults).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_job_keeps_the_preset_it_was_submitted_with() {
    const JOB: &str = "preset-removed";
    const IMAGES: u32 = 3;
    let dir = tempfile::tempdir().unwrap();
    let presets = dir.path().join("presets");
    std::fs::create_dir_all(&presets).unwrap();
    std::fs::write(
        presets.join("house.json"),
        r#"{"name": "house", "concepts": ["wall", "floor", "furniture"], "priorities": {"furniture": 1},
            "rule_defaults": {"recolor": {"finish": "matte"}}}"#,
    )
    .unwrap();
    let segmenter = fake_segmenter::start().await;
    segmenter.faults.delay_ms.store(60_000, Ordering::SeqCst);
    let hooks = Receiver::start(SECRET, vec![]).await;
    put_distinct_inputs(&dir.path().join("storage"), USER, JOB, IMAGES).await;
    let mut env = env(dir.path(), &segmenter.url, &hooks.url());
    env.push(("PRESETS_DIR".into(), presets.to_string_lossy().into_owned()));

    let mut first = Process::start(binary(), &env, &dir.path().join("first.log")).await;
    let mut jobs = first.jobs_client();
    let spec = palette_proto::orchestrator::v1::JobSpec {
        preset: "house".into(),
        ..seed_spec(JOB, IMAGES)
    };
    jobs.submit_job(spec.clone()).await.unwrap();
    jobs::wait_for(&mut jobs, USER, JOB, |j| {
        j.state == JobState::Running as i32
    })
    .await;
    first.kill();

    std::fs::remove_file(presets.join("house.json")).unwrap();
    segmenter.faults.delay_ms.store(0, Ordering::SeqCst);
    let second = Process::start(binary(), &env, &dir.path().join("second.log")).await;
    // The client's retry of its submission (the answer lost in the crash) is the job, planned with the preset it
    // kept: not "unknown preset", nor ALREADY_EXISTS "use a new job id" (which would run it twice).
    let retried = second
        .jobs_client()
        .submit_job(spec)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.job_id, JOB);
    let job = jobs::wait_for(&mut second.jobs_client(), USER, JOB, jobs::is_settled).await;
    assert_eq!(job.state, JobState::Done as i32, "{job:?}");
    assert_eq!(job.completed, IMAGES, "{job:?}");
    assert_eq!(
        job.effective_spec.as_ref().map(|s| s.preset.as_str()),
        Some("house")
    );
    hooks.assert_one_id_per_item(JOB, IMAGES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_sigkills_across_a_50_image_job_lose_nothing() {
    const JOB: &str = "killed-five-times";
    const IMAGES: u32 = 50;
    const KILLS: usize = 5;
    let dir = tempfile::tempdir().unwrap();
    let segmenter = fake_segmenter::start().await;
    segmenter.faults.delay_ms.store(100, Ordering::SeqCst);
    let hooks = Receiver::start(SECRET, vec![]).await;
    put_distinct_inputs(&dir.path().join("storage"), USER, JOB, IMAGES).await;
    let env = env(dir.path(), &segmenter.url, &hooks.url());

    let mut submitted = false;
    let mut restarts = Vec::new();
    let mut completed_at_kill = Vec::new();
    for kill in 0..KILLS {
        let log = dir.path().join(format!("run-{kill}.log"));
        let started = Instant::now();
        let mut process = Process::start(binary(), &env, &log).await;
        restarts.push(started.elapsed());
        let mut jobs = process.jobs_client();
        if !submitted {
            jobs.submit_job(seed_spec(JOB, IMAGES)).await.unwrap();
            submitted = true;
        }
        let before = jobs::get(&mut jobs, USER, JOB).await.completed;
        let at_kill = jobs::wait_for(&mut jobs, USER, JOB, |j| j.completed >= before + 6).await;
        process.kill();
        completed_at_kill.push(at_kill.completed);
    }
    let last_start = Instant::now();
    let last = Process::start(binary(), &env, &dir.path().join("last.log")).await;
    let job = jobs::wait_for(&mut last.jobs_client(), USER, JOB, jobs::is_settled).await;
    let finished_after = last_start.elapsed();

    assert_eq!(job.completed, IMAGES, "{job:?}");
    let deliveries = hooks.deliveries();
    let mut ids: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for d in &deliveries {
        assert_eq!(d.body["status"], "completed", "{d:?}");
        ids.entry(d.body["idx"].as_u64().unwrap())
            .or_default()
            .insert(d.webhook_id.clone());
    }
    assert_eq!(ids.len(), IMAGES as usize, "items lost: {ids:?}");
    assert!(ids.values().all(|set| set.len() == 1), "{ids:?}");
    let calls = segmenter.counters.segment_calls.load(Ordering::SeqCst);
    eprintln!(
        "{KILLS} SIGKILLs at {completed_at_kill:?} completed items; restarts SERVING after {restarts:?}; the last \
         process finished the job in {finished_after:?}; 0 items lost, {} duplicate deliveries (same webhook-id), \
         {} items ran twice",
        deliveries.len() - IMAGES as usize,
        calls - IMAGES as usize
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_is_kept_and_resumed_like_a_submitted_job() {
    use palette_proto::orchestrator::v1::{EditJobRequest, Rule};
    use palette_testing::orchestrator::string_struct;
    const JOB: &str = "edit-source";
    const EDIT: &str = "edit-kept";
    const IMAGES: u32 = 12;
    let dir = tempfile::tempdir().unwrap();
    let segmenter = fake_segmenter::start().await;
    let hooks = Receiver::start(SECRET, vec![]).await;
    put_distinct_inputs(&dir.path().join("storage"), USER, JOB, IMAGES).await;
    let env = env(dir.path(), &segmenter.url, &hooks.url());
    let mut first = Process::start(binary(), &env, &dir.path().join("first.log")).await;
    let mut jobs = first.jobs_client();
    jobs.submit_job(seed_spec(JOB, IMAGES)).await.unwrap();
    jobs::wait_for(&mut jobs, USER, JOB, jobs::is_settled).await;
    let edit = EditJobRequest {
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
    jobs.edit_job(edit.clone()).await.unwrap();
    // Killed the moment the edit is accepted: some of its items may have ended, the others resume.
    first.kill();
    let second = Process::start(binary(), &env, &dir.path().join("second.log")).await;
    let mut jobs = second.jobs_client();
    let done = jobs::wait_for(&mut jobs, USER, EDIT, jobs::is_settled).await;
    assert_eq!(done.completed, IMAGES, "{done:?}");
    assert_eq!(done.source_job_id, JOB, "restored with its source");
    // Restored as the same job: the same request is idempotent, not ALREADY_EXISTS.
    jobs.edit_job(edit).await.expect("the same edit");
    let mut ids: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for d in hooks.deliveries().iter().filter(|d| d.job_id == EDIT) {
        ids.entry(d.body["idx"].as_u64().unwrap())
            .or_default()
            .insert(d.webhook_id.clone());
    }
    assert_eq!(
        ids.len(),
        IMAGES as usize,
        "every edit item called back: {ids:?}"
    );
    assert!(ids.values().all(|set| set.len() == 1), "{ids:?}");
}

/// A cancelled 1,000-image job on one process with the local store (`MASS_CANCEL_IMAGES=10000` for the figure in
/// docs/operations.md): two items running (their Segment calls never answer), the rest queued. Every item ends
/// CANCELLED once and is called back once; the records of the items ended together share transactions (the store's
/// group commit). Prints the time and the process's CPU and memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_cancelled_job_is_called_back_once_per_item() {
    const JOB: &str = "mass-cancel-local";
    let images: u32 = std::env::var("MASS_CANCEL_IMAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000);
    let dir = tempfile::tempdir().unwrap();
    let segmenter = fake_segmenter::start().await;
    segmenter.faults.delay_ms.store(60_000, Ordering::SeqCst);
    let hooks = Receiver::start(SECRET, vec![]).await;
    // Photos for the items that start; the others never do.
    put_distinct_inputs(&dir.path().join("storage"), USER, JOB, 4).await;
    let mut env = env(dir.path(), &segmenter.url, &hooks.url());
    env.push(("MAX_IMAGES_PER_JOB".into(), images.to_string()));
    env.push(("BATCH_CONCURRENCY".into(), "2".into()));
    let process = Process::start(binary(), &env, &dir.path().join("orchestrator.log")).await;
    let mut jobs = process.jobs_client();
    jobs.submit_job(seed_spec(JOB, images)).await.unwrap();
    jobs::wait_for(&mut jobs, USER, JOB, |j| jobs::running(j) >= 2).await;
    let before = process.usage();
    let cancelled_at = Instant::now();
    jobs.cancel_job(CancelJobRequest {
        user_id: USER.into(),
        job_id: JOB.into(),
    })
    .await
    .unwrap();
    hooks
        .wait_until("every item's callback", |d| d.len() >= images as usize)
        .await;
    let called_back = cancelled_at.elapsed();
    let job = jobs::wait_for(&mut jobs, USER, JOB, jobs::is_settled).await;
    let settled = cancelled_at.elapsed();
    assert_eq!(job.state, JobState::Cancelled as i32);
    assert_eq!(job.cancelled, images, "{job:?}");
    assert_eq!(hooks.assert_one_id_per_item(JOB, images), images as usize);
    eprintln!(
        "{images}-image job cancelled, local store: every item called back {called_back:?} after CancelJob, every \
         callback recorded settled after {settled:?}; {} ({before} before the cancel)",
        process.usage()
    );
}
