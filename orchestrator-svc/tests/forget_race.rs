//! Retention deletes forgotten jobs from the job store while submissions go on. A job submitted again with the same
//! spec while the deletion of its forgotten record is in progress must not take that record as its own: the
//! deletion would then remove the new job's record (and items), and the new job would not survive a restart. A job
//! store whose first `forget` waits for the test makes the interleaving deterministic.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use orchestrator_svc::callback::{Answer, CallbackSender, RetryPolicy, Transport};
use orchestrator_svc::error::BoxError;
use orchestrator_svc::jobs::store::{
    Created, JobRecord, JobStore, RecordKey, RunKey, StoreError, StoredJob, Written,
};
use orchestrator_svc::jobs::{JobKey, JobService};
use palette_proto::orchestrator::v1::{CallbackState, Item, ItemState};
use palette_testing::orchestrator::seed_spec;
use tokio::sync::Notify;

#[path = "common/job_service.rs"]
mod job_service;

/// Job records by job id, as JOB_STORE=local keeps them; the first `forget` waits for `gate` before it deletes.
#[derive(Debug, Default)]
struct GatedForget {
    records: Mutex<HashMap<String, JobRecord>>,
    forgets: Mutex<u32>,
    entered: Notify,
    gate: Notify,
}

#[async_trait]
impl JobStore for GatedForget {
    async fn create(&self, job: &JobRecord) -> Result<Created, StoreError> {
        let mut records = self.records.lock().unwrap();
        if let Some(existing) = records.get(&job.job_id) {
            return Ok(Created::Existing(Box::new(existing.clone())));
        }
        records.insert(job.job_id.clone(), job.clone());
        Ok(Created::New)
    }

    async fn put_item(&self, _: &RecordKey, _: &Item) -> Result<Written, StoreError> {
        Ok(Written::Stored)
    }

    async fn cancel(&self, _: &RecordKey) -> Result<(), StoreError> {
        Ok(())
    }

    async fn load(&self) -> Result<Vec<StoredJob>, StoreError> {
        Ok(Vec::new())
    }

    /// As JOB_STORE=local's: deletes each record of the run (spec hash and seq).
    async fn forget(&self, runs: &[RunKey]) -> Result<(), StoreError> {
        let first = {
            let mut forgets = self.forgets.lock().unwrap();
            *forgets += 1;
            *forgets == 1
        };
        if first {
            self.entered.notify_one();
            self.gate.notified().await;
        }
        let mut records = self.records.lock().unwrap();
        for run in runs {
            if records
                .get(&run.job.job_id)
                .is_some_and(|r| r.spec_hash == run.job.spec_hash && r.seq == run.seq)
            {
                records.remove(&run.job.job_id);
            }
        }
        Ok(())
    }
}

fn service(
    store: Arc<dyn JobStore>,
    callbacks: Option<Arc<CallbackSender>>,
    root: &std::path::Path,
) -> Arc<JobService> {
    job_service::in_process(store, callbacks, root, 2).1
}

async fn finished(service: &JobService, job_id: &str) {
    let key = JobKey {
        user_id: "test-user".into(),
        job_id: job_id.into(),
    };
    for _ in 0..1000 {
        if service.get(&key).is_ok_and(|j| j.is_settled()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{job_id} never finished");
}

#[tokio::test(start_paused = true)]
async fn a_job_submitted_again_while_its_forgotten_record_is_deleted_keeps_its_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(GatedForget::default());
    let service = service(store.clone(), None, dir.path());
    for job in ["first", "second"] {
        service.submit(&seed_spec(job, 1)).await.unwrap();
        finished(&service, job).await;
    }
    // A third job: retention (2 jobs) forgets "first", and this submission deletes it from the store, held there.
    let third = tokio::spawn({
        let service = service.clone();
        async move { service.submit(&seed_spec("third", 1)).await.map(drop) }
    });
    store.entered.notified().await;
    // "first" again, same spec: retention forgets "second" to make room, and the submission records "first".
    let again = tokio::spawn({
        let service = service.clone();
        async move { service.submit(&seed_spec("first", 1)).await.map(drop) }
    });
    // The paused clock moves only once every task waits: the resubmission has gone as far as it goes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    store.gate.notify_one();
    third.await.unwrap().unwrap();
    again.await.unwrap().unwrap();
    let records = store.records.lock().unwrap().clone();
    assert!(
        records.contains_key("first"),
        "the resubmitted job lost its record to the deletion of the forgotten one: {:?}",
        records.keys().collect::<Vec<_>>()
    );
    assert!(!records.contains_key("second"), "forgotten");
}

/// Job records and item records as JOB_STORE=local keeps them; the write of job "slow"'s settled item (its callback
/// no longer pending) waits for `gate`.
#[derive(Debug, Default)]
struct SlowSettled {
    records: Mutex<HashMap<String, JobRecord>>,
    items: Mutex<HashMap<(String, String, u32), Item>>,
    entered: Notify,
    gate: Notify,
}

#[async_trait]
impl JobStore for SlowSettled {
    async fn create(&self, job: &JobRecord) -> Result<Created, StoreError> {
        self.records
            .lock()
            .unwrap()
            .insert(job.job_id.clone(), job.clone());
        Ok(Created::New)
    }

    async fn put_item(&self, job: &RecordKey, item: &Item) -> Result<Written, StoreError> {
        if job.job_id == "slow" && item.callback_state != CallbackState::Pending as i32 {
            self.entered.notify_one();
            self.gate.notified().await;
        }
        let key = (job.job_id.clone(), job.spec_hash.clone(), item.idx);
        self.items.lock().unwrap().insert(key, item.clone());
        Ok(Written::Stored)
    }

    async fn cancel(&self, _: &RecordKey) -> Result<(), StoreError> {
        Ok(())
    }

    async fn load(&self) -> Result<Vec<StoredJob>, StoreError> {
        Ok(Vec::new())
    }

    async fn forget(&self, runs: &[RunKey]) -> Result<(), StoreError> {
        let mut records = self.records.lock().unwrap();
        let mut items = self.items.lock().unwrap();
        for job in runs.iter().map(|run| &run.job) {
            records.remove(&job.job_id);
            items.retain(|(id, hash, _), _| (id, hash) != (&job.job_id, &job.spec_hash));
        }
        Ok(())
    }
}

impl SlowSettled {
    /// No item record without its job, and retention took "next", not "slow" (whose record was being written).
    fn assert_slow_kept_without_orphans(&self) {
        let records = self.records.lock().unwrap().clone();
        let orphans: Vec<_> = self
            .items
            .lock()
            .unwrap()
            .keys()
            .filter(|(id, _, _)| !records.contains_key(id))
            .cloned()
            .collect();
        assert!(orphans.is_empty(), "item records of no job: {orphans:?}");
        assert!(records.contains_key("slow") && !records.contains_key("next"));
    }
}

/// Every callback accepted at once.
struct Accepting;

#[async_trait]
impl Transport for Accepting {
    async fn post(
        &self,
        _: &str,
        _: &[(&'static str, String)],
        _: Vec<u8>,
    ) -> Result<Answer, BoxError> {
        Ok(Answer {
            status: 200,
            retry_after: None,
        })
    }
}

/// A job whose last callback was delivered but whose settled record is not written yet is not forgotten: deleting
/// its records then left the settled item record behind with no job, for a later job with its spec to load.
#[tokio::test(start_paused = true)]
async fn a_job_is_not_forgotten_while_its_settled_item_is_being_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SlowSettled::default());
    let policy = RetryPolicy {
        max_attempts: 1,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(1),
        attempt_timeout: Duration::from_secs(1),
    };
    let sender = CallbackSender::new("http://127.0.0.1:1", "s3cret", policy)
        .unwrap()
        .with_transport(Arc::new(Accepting));
    let service = service(store.clone(), Some(Arc::new(sender)), dir.path());
    service.submit(&seed_spec("slow", 1)).await.unwrap();
    store.entered.notified().await;
    service.submit(&seed_spec("next", 1)).await.unwrap();
    finished(&service, "next").await;
    // Retention (2 jobs) forgets the oldest settled job to make room: not "slow", whose record is being written.
    service.submit(&seed_spec("last", 1)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    store.gate.notify_one();
    // The paused clock moves only once every task waits: the settled record is written.
    tokio::time::sleep(Duration::from_secs(1)).await;
    store.assert_slow_kept_without_orphans();
}

/// The same with callbacks off: the item is settled (NOT_CONFIGURED) the moment it ends, but its record is written
/// after; the job is not forgotten before that write, or the write would leave an item record with no job.
#[tokio::test(start_paused = true)]
async fn with_callbacks_off_a_job_is_not_forgotten_before_its_item_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SlowSettled::default());
    let service = service(store.clone(), None, dir.path());
    service.submit(&seed_spec("slow", 1)).await.unwrap();
    store.entered.notified().await;
    service.submit(&seed_spec("next", 1)).await.unwrap();
    finished(&service, "next").await;
    service.submit(&seed_spec("last", 1)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    store.gate.notify_one();
    tokio::time::sleep(Duration::from_secs(1)).await;
    store.assert_slow_kept_without_orphans();
}

/// Counts the callbacks per job id (the body's `job_id`).
#[derive(Default)]
struct Counting(Mutex<HashMap<String, usize>>);

#[async_trait]
impl Transport for Counting {
    async fn post(
        &self,
        _: &str,
        _: &[(&'static str, String)],
        body: Vec<u8>,
    ) -> Result<Answer, BoxError> {
        let body: serde_json::Value = serde_json::from_slice(&body)?;
        let job = body["job_id"].as_str().unwrap_or_default().to_string();
        *self.0.lock().unwrap().entry(job).or_default() += 1;
        Ok(Answer {
            status: 200,
            retry_after: None,
        })
    }
}

/// A job forgotten while its deletion failed (retention logs it and leaves the run's records to the next start)
/// and submitted again with the same spec: the new run took the leftover record as its own, and its items' first
/// reports found the old run's item records with another end: not recorded, never called back, the job never
/// settled (and, the leftover being cancelled, cancelled after a restart). The leftover is deleted and the job
/// recorded anew.
#[tokio::test(start_paused = true)]
async fn a_job_submitted_again_over_its_forgotten_runs_leftover_records_runs_and_calls_back() {
    let dir = tempfile::tempdir().unwrap();
    let local = orchestrator_svc::jobs::store::open_local(&dir.path().join("jobs.redb")).unwrap();
    let spec = seed_spec("first", 3);
    let leftover = JobRecord {
        user_id: spec.user_id.clone(),
        job_id: spec.job_id.clone(),
        spec_hash: orchestrator_svc::jobs::store::spec_hash(&spec),
        spec: spec.clone(),
        seq: 1,
        cancelled: true,
        source: None,
        preset: None,
    };
    local.create(&leftover).await.unwrap();
    for idx in 0..3 {
        let cancelled = Item {
            idx,
            state: ItemState::Cancelled as i32,
            callback_state: CallbackState::Delivered as i32,
            ..Default::default()
        };
        local.put_item(&leftover.key(), &cancelled).await.unwrap();
    }
    let calls = Arc::new(Counting::default());
    let policy = RetryPolicy {
        max_attempts: 1,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(1),
        attempt_timeout: Duration::from_secs(1),
    };
    let sender = CallbackSender::new("http://127.0.0.1:1", "s3cret", policy)
        .unwrap()
        .with_transport(calls.clone());
    let service = service(local.clone(), Some(Arc::new(sender)), dir.path());
    service.submit(&spec).await.unwrap();
    finished(&service, "first").await;
    assert_eq!(calls.0.lock().unwrap()["first"], 3, "one callback per item");
    let stored = local.load().await.unwrap();
    assert_eq!(stored.len(), 1);
    let (record, items) = (&stored[0].record, &stored[0].items);
    assert!(record.seq != 1 && !record.cancelled, "{record:?}");
    assert!(
        items.iter().all(|i| i.state == ItemState::Failed as i32),
        "this run's ends: {items:?}"
    );
}

/// The same with another spec: the id is free (the registry forgot its job), not ALREADY_EXISTS.
#[tokio::test(start_paused = true)]
async fn a_job_id_whose_forgotten_run_left_a_record_of_another_spec_is_free() {
    let dir = tempfile::tempdir().unwrap();
    let local = orchestrator_svc::jobs::store::open_local(&dir.path().join("jobs.redb")).unwrap();
    let old = seed_spec("first", 2);
    let leftover = JobRecord {
        user_id: old.user_id.clone(),
        job_id: old.job_id.clone(),
        spec_hash: orchestrator_svc::jobs::store::spec_hash(&old),
        spec: old,
        seq: 1,
        cancelled: false,
        source: None,
        preset: None,
    };
    local.create(&leftover).await.unwrap();
    let service = service(local.clone(), None, dir.path());
    service.submit(&seed_spec("first", 1)).await.unwrap();
    finished(&service, "first").await;
    let stored = local.load().await.unwrap();
    assert_eq!(
        stored[0].record.spec.image_count, 1,
        "the new spec's record"
    );
}
