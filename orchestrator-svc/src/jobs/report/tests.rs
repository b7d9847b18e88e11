use super::*;
use crate::jobs::job::ItemOutcome;
use crate::jobs::validate::JobPlan;

/// Counters as this thread's recorder counts them: "name{labels}" -> total.
#[derive(Default)]
struct Counted(Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>);

struct CountedCounter(
    String,
    Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>,
);

impl metrics::CounterFn for CountedCounter {
    fn increment(&self, value: u64) {
        *self.1.lock().unwrap().entry(self.0.clone()).or_default() += value;
    }
    fn absolute(&self, value: u64) {
        self.1.lock().unwrap().insert(self.0.clone(), value);
    }
}

impl Counted {
    fn counted(&self) -> Vec<(String, u64)> {
        self.0.lock().unwrap().clone().into_iter().collect()
    }
}

impl metrics::Recorder for Counted {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = if labels.is_empty() {
            key.name().to_string()
        } else {
            format!("{}{{{}}}", key.name(), labels.join(","))
        };
        metrics::Counter::from_arc(Arc::new(CountedCounter(name, self.0.clone())))
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

/// A real callback receiver, and a reporter to it over `store`.
async fn reporting_to_a_receiver(
    store: &SharedStore,
) -> (palette_testing::receiver::Receiver, Reporter) {
    let receiver = palette_testing::receiver::Receiver::start("s", vec![]).await;
    let policy = crate::callback::RetryPolicy {
        max_attempts: 2,
        base_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(100),
        attempt_timeout: Duration::from_secs(5),
    };
    let sender = Arc::new(CallbackSender::new(&receiver.url(), "s", policy).unwrap());
    let reporter = Reporter::new(store.clone(), Some(sender), TaskTracker::new(), None);
    (receiver, reporter)
}

/// What ADAPTER=queue_pull acknowledges its message after (`adapters::queue_pull::follow`): a durable item is
/// counted written only once its record is in storage, callbacks off included (settled at once).
#[tokio::test]
async fn a_durable_item_counts_as_written_once_its_record_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store: SharedStore = Arc::new(crate::storage::LocalStore::new(dir.path()).unwrap());
    let reporter = Reporter::new(store.clone(), None, TaskTracker::new(), None);
    let job = Arc::new(JobHandle::new(JobPlan::durable_for_tests("j", 1), 1));
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

/// A durable job cancelled before an item read its record (items read it only when they start): the earlier run's
/// COMPLETED stands, taken into the view, and is neither overwritten with CANCELLED nor called back otherwise.
#[tokio::test]
async fn a_cancel_does_not_overwrite_an_earlier_runs_recorded_end() {
    let dir = tempfile::tempdir().unwrap();
    let store: SharedStore = Arc::new(crate::storage::LocalStore::new(dir.path()).unwrap());
    let reporter = Reporter::new(store.clone(), None, TaskTracker::new(), None);
    let plan = || JobPlan::durable_for_tests("j", 2);
    // The earlier run: item 0 COMPLETED, recorded with its callback pending (it died sending it); callbacks are off
    // now, so none will be sent: settled NOT_CONFIGURED, not left pending (the job would never settle).
    let earlier = Arc::new(JobHandle::new(plan(), 1));
    assert!(earlier.start_item(0));
    let done = earlier
        .finish_item(0, ItemOutcome::Completed(Default::default()), true)
        .unwrap();
    drop(done);
    assert!(durable::write(&store, &earlier, 0).await);
    // This run: cancelled with both items still pending.
    let job = Arc::new(JobHandle::new(plan(), 2));
    let mut written = job.durable_written.watch();
    let ended = job.cancel_pending(false);
    assert_eq!(ended.len(), 2);
    reporter.items_ended(&job, ended);
    tokio::time::timeout(Duration::from_secs(10), written.wait_for(|n| *n >= 2))
        .await
        .expect("both counted")
        .unwrap();
    let state = |record: Option<Item>| record.unwrap().state;
    assert_eq!(
        state(durable::read(&store, &plan(), 0).await),
        ItemState::Completed as i32,
        "not overwritten"
    );
    assert_eq!(
        state(durable::read(&store, &plan(), 1).await),
        ItemState::Cancelled as i32
    );
    assert_eq!(
        job.item(0).unwrap().state,
        ItemState::Completed as i32,
        "the view follows the record"
    );
    assert_eq!(job.progress().callbacks_pending, 0);
    assert!(job.is_settled());
}

/// Two runs of one queue job at once (a worker cut off from NATS past its lease keeps running the job while the
/// redelivery runs it elsewhere): the first end recorded is the item's, this run's other end is neither recorded nor
/// called back, and the earlier run's end (its callback pending: that worker may die before sending it) is sent
/// from here, once.
#[tokio::test]
async fn an_end_another_run_recorded_first_is_the_only_one_called_back() {
    // This thread's metrics (the test's runtime runs every task on it).
    let recorder = Counted::default();
    let _recording = metrics::set_default_local_recorder(&recorder);
    let dir = tempfile::tempdir().unwrap();
    let store: SharedStore = Arc::new(crate::storage::LocalStore::new(dir.path()).unwrap());
    let (receiver, reporter) = reporting_to_a_receiver(&store).await;
    // The other worker: item 0 COMPLETED and recorded first, its callback not sent yet.
    let other = Arc::new(JobHandle::new(JobPlan::durable_for_tests("j", 1), 1));
    assert!(other.start_item(0));
    drop(other.finish_item(0, ItemOutcome::Completed(Default::default()), true));
    assert!(matches!(
        durable::claim(&store, &other, 0, &CancellationToken::new()).await,
        durable::Claim::Ours { written: true }
    ));
    // This worker started the item before that record existed, and ends it FAILED.
    let job = Arc::new(JobHandle::new(JobPlan::durable_for_tests("j", 1), 2));
    let mut written = job.durable_written.watch();
    assert!(job.start_item(0));
    let failed = ItemOutcome::Failed {
        code: "segmenter_unavailable",
        message: "down".into(),
    };
    let item = job.finish_item(0, failed, true).unwrap();
    reporter.item_ended(&job, item);
    tokio::time::timeout(Duration::from_secs(10), written.wait_for(|n| *n >= 1))
        .await
        .expect("counted")
        .unwrap();
    let states: Vec<String> = receiver
        .deliveries()
        .iter()
        .map(|d| d.body["status"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(states, ["completed"], "the recorded end, once");
    let recorded = durable::read(&store, &job.plan, 0).await.unwrap();
    assert_eq!(
        recorded.state,
        ItemState::Completed as i32,
        "not overwritten"
    );
    assert_eq!(
        recorded.callback_state,
        palette_proto::orchestrator::v1::CallbackState::Delivered as i32
    );
    assert_eq!(job.item(0).unwrap().state, ItemState::Completed as i32);
    assert!(job.is_settled());
    // Not counted here: this process's end did not stand (the other run's was counted where it happened).
    let counted = recorder.counted();
    assert!(
        !counted
            .iter()
            .any(|(name, _)| name.starts_with("orchestrator_items_total")),
        "{counted:?}"
    );
    assert!(
        counted.contains(&("orchestrator_jobs_finished_total".to_string(), 1)),
        "{counted:?}"
    );
}

/// An item whose record this release cannot read (a newer release's, racing this run): nothing is sent from here and
/// the record is left alone, yet the item counts settled, so queue_pull can acknowledge or put back the job.
#[tokio::test]
async fn an_item_whose_record_this_release_cannot_read_is_left_to_its_writer() {
    let dir = tempfile::tempdir().unwrap();
    let store: SharedStore = Arc::new(crate::storage::LocalStore::new(dir.path()).unwrap());
    let (receiver, reporter) = reporting_to_a_receiver(&store).await;
    let job = Arc::new(JobHandle::new(JobPlan::durable_for_tests("j", 1), 1));
    let newer = bytes::Bytes::from_static(br#"{"idx": 0, "state": "ITEM_STATE_NEWER"}"#);
    let key = crate::keys::item_marker("u", "j", &job.spec_hash, 0);
    store
        .put(&key, newer.clone(), "application/json")
        .await
        .unwrap();
    let mut written = job.durable_written.watch();
    assert!(job.start_item(0));
    let item = job
        .finish_item(0, ItemOutcome::Completed(Default::default()), true)
        .unwrap();
    reporter.item_ended(&job, item);
    tokio::time::timeout(Duration::from_secs(10), written.wait_for(|n| *n >= 1))
        .await
        .expect("counted")
        .unwrap();
    assert!(receiver.deliveries().is_empty());
    assert_eq!(store.get(&key).await.unwrap(), newer);
    assert!(job.is_settled());
}

/// A CancelJob of a redelivered queue job reads the records of its unstarted items first (they read theirs only
/// when they start): an earlier run's end is in the view before the cancel ends the rest, so the cancel's answer and
/// WatchJob never show it CANCELLED first.
#[tokio::test]
async fn a_cancel_reads_the_unstarted_items_records_first() {
    let dir = tempfile::tempdir().unwrap();
    let store: SharedStore = Arc::new(crate::storage::LocalStore::new(dir.path()).unwrap());
    let reporter = Reporter::new(store.clone(), None, TaskTracker::new(), None);
    let earlier = Arc::new(JobHandle::new(JobPlan::durable_for_tests("j", 3), 1));
    assert!(earlier.start_item(2));
    drop(earlier.finish_item(2, ItemOutcome::Completed(Default::default()), true));
    assert!(durable::write(&store, &earlier, 2).await);
    let job = Arc::new(JobHandle::new(JobPlan::durable_for_tests("j", 3), 2));
    assert!(job.start_item(0));
    reporter
        .take_recorded_before_cancel(&job, Duration::from_secs(5))
        .await;
    assert_eq!(job.item(2).unwrap().state, ItemState::Completed as i32);
    let ended: Vec<u32> = job
        .cancel_pending(false)
        .iter()
        .map(|e| e.item.idx)
        .collect();
    assert_eq!(ended, [0, 1], "the recorded item is not cancelled");
}
