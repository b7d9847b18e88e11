//! A job resumed from the job store with an item whose callback was still pending, by an orchestrator whose
//! callbacks are off now (WORKERS_API_URL unset since): no callback will be sent, so the item is settled as
//! NOT_CONFIGURED, in memory and in the record, and its job can be forgotten (MAX_RETAINED_JOBS).

use std::collections::BTreeMap;

use orchestrator_svc::jobs::store::{self, JobRecord, RecordKey};
use orchestrator_svc::jobs::{JobKey, JobLimits, validate};
use palette_proto::orchestrator::v1::{CallbackState, Item, ItemState};
use palette_testing::orchestrator::seed_spec;

#[path = "common/job_service.rs"]
mod job_service;

const LIMITS: JobLimits = JobLimits {
    max_images: 10,
    max_rules: 10,
    max_concepts: 10,
};

#[tokio::test]
async fn a_pending_callback_resumed_without_callbacks_is_settled_not_configured() {
    let dir = tempfile::tempdir().unwrap();
    let job_store = store::open_local(&dir.path().join("jobs.redb")).unwrap();
    let spec = seed_spec("job-1", 1);
    let plan = validate::validate(&spec, &BTreeMap::new(), LIMITS).unwrap();
    let record = JobRecord {
        user_id: spec.user_id.clone(),
        job_id: spec.job_id.clone(),
        spec_hash: store::plan_hash(&plan),
        spec: spec.clone(),
        seq: 1,
        cancelled: false,
        source: None,
        preset: None,
    };
    job_store.create(&record).await.unwrap();
    let key = RecordKey {
        user_id: record.user_id.clone(),
        job_id: record.job_id.clone(),
        spec_hash: record.spec_hash.clone(),
    };
    // Ended before the restart, its callback not sent yet (callbacks were on then).
    let item = Item {
        idx: 0,
        state: ItemState::Failed as i32,
        callback_state: CallbackState::Pending as i32,
        error_code: "input_missing".into(),
        ..Default::default()
    };
    job_store.put_item(&key, &item).await.unwrap();

    let (pipeline, service) =
        job_service::in_process(job_store.clone(), None, &dir.path().join("storage"), 10);
    let resumed = service.resume().await.unwrap();
    assert_eq!(resumed.jobs, 1);
    assert_eq!(resumed.callbacks_resent, 0, "no callback is sent");
    let job = service
        .get(&JobKey {
            user_id: spec.user_id.clone(),
            job_id: spec.job_id.clone(),
        })
        .unwrap();
    assert_eq!(
        job.snapshot().items[0].callback_state,
        CallbackState::NotConfigured as i32
    );
    // The record says so too (the next start finds nothing pending either); once it is written, and not before
    // (retention would delete the job's records under that write), the job can be forgotten.
    pipeline.tasks().close();
    pipeline.tasks().wait().await;
    assert!(job.is_settled(), "the job can be forgotten");
    let stored = job_store.load().await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0].items[0].callback_state,
        CallbackState::NotConfigured as i32,
        "{:?}",
        stored[0].items
    );
}
