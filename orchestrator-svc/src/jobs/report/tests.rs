use palette_proto::orchestrator::v1::JobSpec;

use super::*;
use crate::jobs::job::ItemOutcome;
use crate::jobs::validate::JobPlan;

/// What ADAPTER=queue_pull acknowledges its message after (`adapters::queue_pull::follow`): a durable item is
/// counted written only once its record is in storage, callbacks off included (settled at once).
#[tokio::test]
async fn a_durable_item_counts_as_written_once_its_record_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store: SharedStore = Arc::new(crate::storage::LocalStore::new(dir.path()).unwrap());
    let reporter = Reporter::new(store.clone(), None, TaskTracker::new(), None);
    let plan = JobPlan {
        user_id: "u".into(),
        job_id: "j".into(),
        image_count: 1,
        concepts: vec!["wall".into()],
        rules: vec![],
        effective_spec: JobSpec::default(),
        durable_items: true,
        message_hash: None,
        source: None,
        preset: None,
    };
    let job = Arc::new(JobHandle::new(plan, 1));
    let mut written = job.durable_written.watch();
    let item = job.finish_item(0, ItemOutcome::Cancelled, false).unwrap();
    reporter.item_ended(&job, item);
    tokio::time::timeout(Duration::from_secs(10), written.changed())
        .await
        .expect("counted")
        .unwrap();
    assert_eq!(*written.borrow(), 1);
    assert!(
        durable::read(&store, &job.plan, 0).await.is_some(),
        "recorded before it is counted"
    );
}
