//! Calls that arrive while the SubmitJob call is still recording the job. A CancelJob must end up in the record
//! (JOB_STORE=nats: the other replicas run the items of a record that says not cancelled; JOB_STORE=local: a
//! restart does). A retried SubmitJob (same spec) must not be told "accepted" before the job is recorded, nor at all
//! when the first call fails to record it. A job store whose `create` waits for the test makes the interleaving
//! deterministic.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use orchestrator_svc::error::ApiError;
use orchestrator_svc::jobs::store::{
    Created, JobRecord, JobStore, RecordKey, RunKey, StoreError, StoredJob, Written,
};
use orchestrator_svc::jobs::{JobKey, JobService};
use palette_proto::orchestrator::v1::Item;
use palette_testing::orchestrator::seed_spec;
use tokio::sync::Notify;

#[path = "common/job_service.rs"]
mod job_service;

/// Records one job; `create` returns only once `gate` is notified, failing when `fail`.
#[derive(Debug, Default)]
struct GatedStore {
    entered: Notify,
    gate: Notify,
    fail: bool,
    /// `create` finds a record under the key that does not decode (written by a newer binary, or damaged).
    corrupt: bool,
    record: Mutex<Option<JobRecord>>,
    /// `create` commits the record before it waits, as JOB_STORE=local's does on the blocking pool: dropping the
    /// call's future does not undo it.
    commit_first: bool,
}

#[async_trait]
impl JobStore for GatedStore {
    async fn create(&self, job: &JobRecord) -> Result<Created, StoreError> {
        if self.commit_first {
            *self.record.lock().unwrap() = Some(job.clone());
        }
        self.entered.notify_one();
        self.gate.notified().await;
        if self.fail {
            return Err(StoreError::unavailable(std::io::Error::other("down")));
        }
        if self.corrupt {
            return Err(StoreError::Corrupt {
                key: "job.test-user.job-1".into(),
            });
        }
        *self.record.lock().unwrap() = Some(job.clone());
        Ok(Created::New)
    }

    async fn put_item(&self, _: &RecordKey, _: &Item) -> Result<Written, StoreError> {
        Ok(Written::Stored)
    }

    async fn cancel(&self, job: &RecordKey) -> Result<(), StoreError> {
        // As both stores do: no record under the key, nothing to mark.
        if let Some(record) = self.record.lock().unwrap().as_mut()
            && record.spec_hash == job.spec_hash
        {
            record.cancelled = true;
        }
        Ok(())
    }

    async fn load(&self) -> Result<Vec<StoredJob>, StoreError> {
        Ok(Vec::new())
    }

    async fn forget(&self, _: &[RunKey]) -> Result<(), StoreError> {
        Ok(())
    }
}

fn service(store: Arc<GatedStore>, root: &std::path::Path) -> Arc<JobService> {
    job_service::in_process(store, None, root, 10).1
}

/// Submits a job, cancels it while `store.create` waits, then lets `create` return; both answers.
async fn cancel_while_recording(
    store: Arc<GatedStore>,
) -> (Result<(), ApiError>, Result<(), ApiError>) {
    let dir = tempfile::tempdir().unwrap();
    let service = service(store.clone(), dir.path());
    let spec = seed_spec("job-1", 2);
    let key = JobKey {
        user_id: spec.user_id.clone(),
        job_id: spec.job_id.clone(),
    };
    let submit = tokio::spawn({
        let service = service.clone();
        async move { service.submit(&spec).await.map(drop) }
    });
    store.entered.notified().await;
    let cancel = tokio::spawn({
        let service = service.clone();
        async move { service.cancel(&key).await.map(drop) }
    });
    // The clock is paused and moves only once every task waits: the cancel has gone as far as it goes before the
    // record is written (done, or waiting for the record).
    tokio::time::sleep(Duration::from_secs(1)).await;
    store.gate.notify_one();
    (submit.await.unwrap(), cancel.await.unwrap())
}

#[tokio::test(start_paused = true)]
async fn a_cancel_during_the_submission_is_in_the_record() {
    let store = Arc::new(GatedStore::default());
    let (submitted, cancelled) = cancel_while_recording(store.clone()).await;
    submitted.unwrap();
    cancelled.unwrap();
    let record = store.record.lock().unwrap().clone().expect("recorded");
    assert!(record.cancelled, "the record says cancelled");
}

#[tokio::test(start_paused = true)]
async fn a_cancel_during_a_submission_that_fails_finds_no_job() {
    let store = Arc::new(GatedStore {
        fail: true,
        ..Default::default()
    });
    let (submitted, cancelled) = cancel_while_recording(store).await;
    assert!(matches!(submitted, Err(ApiError::StoreUnavailable(_))));
    assert!(
        matches!(cancelled, Err(ApiError::JobNotFound { .. })),
        "{cancelled:?}"
    );
}

/// GetJob and WatchJob during a submission whose record fails: not found (the job was never accepted), not the
/// handle the registry then drops, which a watcher followed for ever, QUEUED.
#[tokio::test(start_paused = true)]
async fn a_get_during_a_submission_that_fails_finds_no_job() {
    let store = Arc::new(GatedStore {
        fail: true,
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let service = service(store.clone(), dir.path());
    let spec = seed_spec("job-1", 2);
    let key = JobKey {
        user_id: spec.user_id.clone(),
        job_id: spec.job_id.clone(),
    };
    let submit = tokio::spawn({
        let service = service.clone();
        async move { service.submit(&spec).await.map(drop) }
    });
    store.entered.notified().await;
    let get = tokio::spawn({
        let service = service.clone();
        async move { service.accepted(&key).await.map(drop) }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !get.is_finished(),
        "answered once the record is written or not"
    );
    store.gate.notify_one();
    assert!(matches!(
        submit.await.unwrap(),
        Err(ApiError::StoreUnavailable(_))
    ));
    let got = get.await.unwrap();
    assert!(matches!(got, Err(ApiError::JobNotFound { .. })), "{got:?}");
}

/// A record that does not decode is not an outage: INTERNAL, which queue_pull terminates, not UNAVAILABLE, which it
/// submits again every 2 s for ever (holding its one job slot).
#[tokio::test(start_paused = true)]
async fn a_record_that_does_not_decode_is_internal_not_unavailable() {
    let store = Arc::new(GatedStore {
        corrupt: true,
        ..Default::default()
    });
    let (submitted, cancelled) = cancel_while_recording(store).await;
    assert!(
        matches!(submitted, Err(ApiError::Internal { .. })),
        "{submitted:?}"
    );
    assert!(
        matches!(cancelled, Err(ApiError::JobNotFound { .. })),
        "{cancelled:?}"
    );
}

/// Submits a job, submits the same spec again (a client retry) while `store.create` waits, then lets `create`
/// return; both answers, and whether the retry had answered before the record was written.
async fn retry_while_recording(
    store: Arc<GatedStore>,
) -> (Result<(), ApiError>, Result<(), ApiError>, bool) {
    let dir = tempfile::tempdir().unwrap();
    let service = service(store.clone(), dir.path());
    let spec = seed_spec("job-1", 2);
    let submit = |service: Arc<JobService>, spec: palette_proto::orchestrator::v1::JobSpec| {
        tokio::spawn(async move { service.submit(&spec).await.map(drop) })
    };
    let first = submit(service.clone(), spec.clone());
    store.entered.notified().await;
    let retry = submit(service, spec);
    // The paused clock moves only once every task waits: the retry has gone as far as it goes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let answered_early = retry.is_finished();
    store.gate.notify_one();
    (first.await.unwrap(), retry.await.unwrap(), answered_early)
}

#[tokio::test(start_paused = true)]
async fn a_retried_submission_is_answered_once_the_first_call_recorded_the_job() {
    let store = Arc::new(GatedStore::default());
    let (first, retry, answered_early) = retry_while_recording(store.clone()).await;
    assert!(!answered_early, "the retry waited for the record");
    first.unwrap();
    retry.unwrap();
    assert!(store.record.lock().unwrap().is_some(), "recorded once");
}

#[tokio::test(start_paused = true)]
async fn a_retried_submission_is_not_accepted_when_the_first_call_failed_to_record_it() {
    let store = Arc::new(GatedStore {
        fail: true,
        ..Default::default()
    });
    let (first, retry, answered_early) = retry_while_recording(store).await;
    assert!(!answered_early, "the retry waited for the record");
    assert!(
        matches!(first, Err(ApiError::StoreUnavailable(_))),
        "{first:?}"
    );
    assert!(
        matches!(retry, Err(ApiError::StoreUnavailable(_))),
        "a retry is not told accepted for a job nobody recorded: {retry:?}"
    );
}

/// Submits a job and drops the call (its client gave up: tonic drops the handler's future) while `store.create`
/// waits, then lets `create` return; the service and the job's key.
async fn drop_while_recording(
    store: Arc<GatedStore>,
    root: &std::path::Path,
) -> (Arc<JobService>, JobKey) {
    let service = service(store.clone(), root);
    let spec = seed_spec("job-1", 2);
    let key = JobKey {
        user_id: spec.user_id.clone(),
        job_id: spec.job_id.clone(),
    };
    let submit = tokio::spawn({
        let service = service.clone();
        async move { service.submit(&spec).await.map(drop) }
    });
    store.entered.notified().await;
    submit.abort();
    assert!(
        submit.await.unwrap_err().is_cancelled(),
        "the call was dropped"
    );
    store.gate.notify_one();
    // The paused clock moves only once every task waits: whatever goes on after the record has gone as far as it goes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    (service, key)
}

/// The store committed the record the dropped call asked for: the job is registered and runs (GetJob finds it,
/// it ends), as it would after a restart, rather than a record nobody serves.
#[tokio::test(start_paused = true)]
async fn a_dropped_submission_whose_record_was_written_runs_its_job() {
    let store = Arc::new(GatedStore {
        commit_first: true,
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let (service, key) = drop_while_recording(store.clone(), dir.path()).await;
    assert!(store.record.lock().unwrap().is_some(), "recorded");
    let job = service.get(&key).expect("the recorded job is registered");
    assert!(job.recorded.wait().await, "and marked recorded");
    for _ in 0..600 {
        if job.is_terminal() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(job.is_terminal(), "the job ran to its end");
}

/// A dropped call whose record was not written leaves nothing behind: a retry records the job anew.
#[tokio::test(start_paused = true)]
async fn a_dropped_submission_whose_record_failed_leaves_no_job() {
    let store = Arc::new(GatedStore {
        fail: true,
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let (service, key) = drop_while_recording(store, dir.path()).await;
    assert!(
        matches!(service.get(&key), Err(ApiError::JobNotFound { .. })),
        "not registered"
    );
}

/// JOB_STORE=nats: a job recorded (by another replica, or by an earlier try of this submission that failed here
/// after the record was committed) with items that already ended, which this replica's registry does not hold: its
/// watch passed those updates by. Submitted again here with the same spec, the answer is the job as recorded, not a
/// fresh copy whose ended items stay PENDING on this replica for ever (its WatchJob never ending).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_spec_submission_reads_the_recorded_items_this_replica_missed() {
    use orchestrator_svc::jobs::store::spec_hash;
    use palette_proto::orchestrator::v1::{CallbackState, ItemState};
    let Some((_nats, dir, cluster)) = nats_cluster().await else {
        return;
    };
    let spec = seed_spec("missed", 2);
    let record = JobRecord {
        user_id: spec.user_id.clone(),
        job_id: spec.job_id.clone(),
        spec_hash: spec_hash(&spec),
        spec: spec.clone(),
        seq: 1,
        cancelled: false,
        source: None,
        preset: None,
    };
    let store = cluster.store().clone();
    assert!(matches!(store.create(&record).await.unwrap(), Created::New));
    let done = Item {
        idx: 0,
        state: ItemState::Completed as i32,
        input_key: "inputs/test-user/missed/0.jpg".into(),
        output_key: "outputs/test-user/missed/rule1/0.jpg".into(),
        callback_state: CallbackState::Delivered as i32,
        ..Default::default()
    };
    store.put_item(&record.key(), &done).await.unwrap();

    let (_pipeline, service) =
        job_service::with_cluster(store, None, &dir.path().join("storage"), 10, Some(cluster));
    let job = service.submit(&spec).await.expect("the same job");
    assert_eq!(job.items[0].state, ItemState::Completed as i32, "{job:?}");
    assert_eq!(job.items[0].output_key, done.output_key);
    assert_eq!(job.items[1].state, ItemState::Pending as i32);
    assert_eq!(job.completed, 1);
}

/// JOB_STORE=nats: the same-spec submission above on a replica whose preset file differs from the one the job was
/// recorded with (edited since, or a rolling config change): the job it answers for, and whose tasks it runs, is
/// planned with the recorded copy of the preset, as on every other replica, not with this replica's file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_spec_submission_takes_the_recorded_run_with_its_preset() {
    use orchestrator_svc::jobs::store::spec_hash;
    use palette_rules::preset::Preset;
    let Some((_nats, dir, cluster)) = nats_cluster().await else {
        return;
    };
    let house = |finish: &str| -> Arc<Preset> {
        Arc::new(
            serde_json::from_str(&format!(
                r#"{{"name": "house", "concepts": ["wall", "floor"], "rule_defaults": {{"recolor": {{"finish": "{finish}"}}}}}}"#
            ))
            .unwrap(),
        )
    };
    let spec = palette_proto::orchestrator::v1::JobSpec {
        preset: "house".into(),
        ..seed_spec("preset-run", 2)
    };
    let record = JobRecord {
        user_id: spec.user_id.clone(),
        job_id: spec.job_id.clone(),
        spec_hash: spec_hash(&spec),
        spec: spec.clone(),
        seq: 1,
        cancelled: false,
        source: None,
        preset: Some(house("matte")),
    };
    let store = cluster.store().clone();
    assert!(matches!(store.create(&record).await.unwrap(), Created::New));

    let today = std::collections::BTreeMap::from([("house".to_string(), house("gloss"))]);
    let (_pipeline, service) = job_service::with_presets(
        store,
        None,
        &dir.path().join("storage"),
        10,
        Some(cluster),
        today,
    );
    service.submit(&spec).await.expect("the same job");
    let key = JobKey {
        user_id: spec.user_id.clone(),
        job_id: spec.job_id.clone(),
    };
    let job = service.get(&key).unwrap();
    assert_eq!(
        job.plan.preset, record.preset,
        "planned with the recorded preset"
    );
    // A retry of the submission answers from the same handle.
    service.submit(&spec).await.expect("the same job again");
    assert!(Arc::ptr_eq(&job, &service.get(&key).unwrap()));
}

/// A nats-server, a temporary directory and a connection to the cluster state on it (JOB_STORE=nats); None where
/// nats-server is not installed (outside CI).
async fn nats_cluster() -> Option<(
    palette_testing::nats::Nats,
    tempfile::TempDir,
    Arc<orchestrator_svc::jobs::cluster::Cluster>,
)> {
    let nats = palette_testing::nats::start()?;
    let dir = tempfile::tempdir().unwrap();
    let mut config = orchestrator_svc::Config::for_tests(dir.path(), "http://127.0.0.1:9");
    config.nats.nats_url = Some(nats.url.clone().into());
    let cluster = orchestrator_svc::jobs::cluster::Cluster::connect(
        config.jobs.cluster_settings(&config.nats).unwrap(),
    )
    .await
    .unwrap();
    Some((nats, dir, Arc::new(cluster)))
}
