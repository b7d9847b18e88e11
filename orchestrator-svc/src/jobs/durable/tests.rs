use palette_proto::orchestrator::v1::{CallbackState, ItemState, MaskKey, RuleOutput};

use super::*;

/// A stop that never comes.
fn never() -> tokio_util::sync::CancellationToken {
    tokio_util::sync::CancellationToken::new()
}

#[test]
fn records_round_trip() {
    let item = Item {
        idx: 3,
        state: ItemState::Completed as i32,
        input_key: "inputs/u/j/3.jpg".into(),
        output_key: "outputs/u/j/r/3.jpg".into(),
        outputs: vec![
            RuleOutput {
                rule_id: "r".into(),
                output_key: "outputs/u/j/r/3.jpg".into(),
                applied: true,
                not_applied_reason: String::new(),
            },
            RuleOutput {
                rule_id: "s".into(),
                output_key: "outputs/u/j/s/3.jpg".into(),
                applied: false,
                not_applied_reason: "concept_not_found".into(),
            },
        ],
        masks: vec![MaskKey {
            concept: "wall".into(),
            instance: 1,
            key: "masks/u/j/wall/3_1.png".into(),
            score: 0.5,
            x: 12,
            y: 7,
            width: 300,
            height: 200,
            image_width: 4032,
            image_height: 3024,
            grid_width: 288,
            grid_height: 288,
        }],
        callback_state: CallbackState::Delivered as i32,
        callback_attempts: 1,
        ..Default::default()
    };
    assert_eq!(decode(&encode(&item)), Some(item.clone()));
    let running = Item {
        state: ItemState::Running as i32,
        ..item
    };
    assert_eq!(decode(&encode(&running)), None);
    assert_eq!(decode(b"not json"), None);
}

#[test]
fn records_from_before_the_applied_flag_read_as_applied() {
    let old =
        br#"{"idx":0,"state":"ITEM_STATE_COMPLETED","inputKey":"inputs/u/j/0.jpg","outputKey":"o",
        "outputs":[{"ruleId":"r","outputKey":"o"}],"previewKey":"p","masks":[]}"#;
    let item = decode(old).expect("old record");
    assert!(item.outputs[0].applied);
    assert_eq!(item.outputs[0].not_applied_reason, "");
}

#[test]
fn records_from_before_mask_crops_read_with_no_placement() {
    let old = br#"{"idx":0,"state":"ITEM_STATE_COMPLETED","outputKey":"o","masks":[
        {"concept":"wall","instance":1,"key":"masks/u/j/wall/0_1.png","score":0.5}]}"#;
    let item = decode(old).expect("old record");
    assert_eq!(
        item.masks,
        [MaskKey {
            concept: "wall".into(),
            instance: 1,
            key: "masks/u/j/wall/0_1.png".into(),
            score: 0.5,
            ..Default::default()
        }],
        "zero placement: a full-frame PNG"
    );
}

use palette_proto::orchestrator::v1::JobSpec;

fn plan(effective_spec: JobSpec, message_hash: Option<String>) -> JobPlan {
    JobPlan {
        user_id: "u".into(),
        job_id: "j".into(),
        image_count: 1,
        concepts: vec!["wall".into()],
        rules: vec![],
        effective_spec,
        durable_items: true,
        message_hash,
        source: None,
        preset: None,
    }
}

async fn recorded(store: &SharedStore, plan: JobPlan) {
    let job = std::sync::Arc::new(JobHandle::new(plan, 1));
    drop(job.finish_item(0, super::super::job::ItemOutcome::Cancelled, false));
    write(store, &job, 0).await;
}

/// Two runs of one job ending the same item (two workers on one job): the first end recorded is the item's; the
/// other run gets it back (`Claim::Theirs`) and writes nothing, under either key.
#[tokio::test]
async fn the_first_recorded_end_of_an_item_stands() {
    let dir = tempfile::tempdir().unwrap();
    let store: SharedStore =
        std::sync::Arc::new(crate::storage::LocalStore::new(dir.path()).unwrap());
    let plan = || plan(JobSpec::default(), Some("f".repeat(64)));
    let ended = |outcome| {
        let job = std::sync::Arc::new(JobHandle::new(plan(), 1));
        assert!(job.start_item(0));
        drop(job.finish_item(0, outcome, true));
        job
    };
    let first = ended(super::super::job::ItemOutcome::Completed(Default::default()));
    let second = ended(super::super::job::ItemOutcome::Cancelled);
    assert!(matches!(
        claim(&store, &first, 0, &never()).await,
        Claim::Ours { written: true }
    ));
    match claim(&store, &second, 0, &never()).await {
        Claim::Theirs(recorded) => assert_eq!(recorded.state, ItemState::Completed as i32),
        Claim::Ours { .. } | Claim::Unread => panic!("the second end overwrote the first"),
    }
    // The first run asking again (its first answer lost, the SDK's retry finds its own record): still its own.
    assert!(matches!(
        claim(&store, &first, 0, &never()).await,
        Claim::Ours { written: true }
    ));
    // Both copies are the first end's: the message key's and the older release's.
    let older = JobPlan {
        message_hash: None,
        ..plan()
    };
    for plan in [plan(), older] {
        let found = read(&store, &plan, 0).await.expect("recorded");
        assert_eq!(found.state, ItemState::Completed as i32);
    }
}

/// A record this release cannot read (a newer release's) is left alone and nothing is claimed (`Unread`); so is one
/// that storage will not give back before the stop (left to the job's next delivery).
#[tokio::test(start_paused = true)]
async fn a_record_that_cannot_be_read_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let local: SharedStore =
        std::sync::Arc::new(crate::storage::LocalStore::new(dir.path()).unwrap());
    let job = std::sync::Arc::new(JobHandle::new(plan(JobSpec::default(), None), 1));
    drop(job.finish_item(0, super::super::job::ItemOutcome::Cancelled, true));
    let key = keys::item_marker("u", "j", &job.spec_hash, 0);
    local
        .put(
            &key,
            Bytes::from_static(b"{\"state\": \"ITEM_STATE_NEWER\"}"),
            "application/json",
        )
        .await
        .unwrap();
    assert!(matches!(
        claim(&local, &job, 0, &never()).await,
        Claim::Unread
    ));
    assert_eq!(
        local.get(&key).await.unwrap(),
        Bytes::from_static(b"{\"state\": \"ITEM_STATE_NEWER\"}")
    );
    // Storage down for reads: the read waits, until the stop.
    let down: SharedStore = std::sync::Arc::new(Flaky {
        inner: crate::storage::LocalStore::new(dir.path()).unwrap(),
        failures: std::sync::atomic::AtomicUsize::new(usize::MAX),
    });
    let stop = tokio_util::sync::CancellationToken::new();
    let stopping = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        stopping.cancel();
    });
    let started = tokio::time::Instant::now();
    assert!(matches!(claim(&down, &job, 0, &stop).await, Claim::Unread));
    assert_eq!(started.elapsed(), Duration::from_secs(60));
}

/// Records are keyed by the message's spec: a redelivery planned with other presets (another effective spec)
/// finds them; and records an older release keyed by the effective spec are found too.
#[tokio::test]
async fn records_are_found_by_the_messages_spec_and_the_older_key() {
    let dir = tempfile::tempdir().unwrap();
    let store: SharedStore =
        std::sync::Arc::new(crate::storage::LocalStore::new(dir.path()).unwrap());
    let message = Some(super::super::job::spec_hash(&JobSpec {
        job_id: "as the message said it".into(),
        ..Default::default()
    }));
    let png = JobSpec {
        output_format: "png".into(),
        ..Default::default()
    };
    recorded(&store, plan(JobSpec::default(), message.clone())).await;
    assert!(read(&store, &plan(png.clone(), message), 0).await.is_some());
    assert!(read(&store, &plan(png.clone(), None), 0).await.is_none());
    // Also under the effective spec's hash, where an older release taking the redelivery looks.
    assert!(
        read(&store, &plan(JobSpec::default(), None), 0)
            .await
            .is_some()
    );
    // Written by an older release: under the effective spec's hash.
    recorded(&store, plan(png.clone(), None)).await;
    assert!(
        read(&store, &plan(png, Some("0".repeat(64))), 0)
            .await
            .is_some()
    );
}

/// A store whose reads fail (`Unavailable`) a number of times before they reach the folder.
#[derive(Debug)]
struct Flaky {
    inner: crate::storage::LocalStore,
    failures: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl crate::storage::ObjectStore for Flaky {
    async fn get_at_most(&self, key: &str, max: u64) -> Result<Bytes, StorageError> {
        use std::sync::atomic::Ordering;
        if self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StorageError::unavailable(key, "injected 503"));
        }
        self.inner.get_at_most(key, max).await
    }
    async fn put(&self, key: &str, body: Bytes, ct: &str) -> Result<(), StorageError> {
        self.inner.put(key, body, ct).await
    }
    async fn head(&self, key: &str) -> Result<Option<crate::storage::ObjectMeta>, StorageError> {
        self.inner.head(key).await
    }
}

/// A redelivered item whose record reads fail is found recorded once storage answers, however long that takes: it
/// is never run again for want of its record (with storage down, that run ended FAILED after the COMPLETED callback
/// an earlier run sent). `read`, for what is not about to run, reads once.
#[tokio::test(start_paused = true)]
async fn a_record_unreadable_for_a_while_is_read_again_until_storage_answers() {
    let dir = tempfile::tempdir().unwrap();
    let flaky = |failures| -> SharedStore {
        std::sync::Arc::new(Flaky {
            inner: crate::storage::LocalStore::new(dir.path()).unwrap(),
            failures: std::sync::atomic::AtomicUsize::new(failures),
        })
    };
    recorded(&flaky(0), plan(JobSpec::default(), None)).await;
    let job = plan(JobSpec::default(), None);
    assert!(
        read(&flaky(1), &job, 0).await.is_none(),
        "read: one failure is none"
    );
    for failures in [1, 3, 40] {
        let started = tokio::time::Instant::now();
        let found = read_patiently(&flaky(failures), &job, 0).await;
        assert!(found.is_some(), "found after {failures} failures");
        let waited: Duration = (0..failures)
            .map(|n| AGAIN_AFTER[n.min(AGAIN_AFTER.len() - 1)])
            .sum();
        assert_eq!(
            started.elapsed(),
            waited,
            "{failures} waits, the last repeating"
        );
    }
    // A record never written: none, at once.
    let other = plan(
        JobSpec {
            job_id: "another".into(),
            ..Default::default()
        },
        None,
    );
    let other = JobPlan {
        job_id: "another".into(),
        ..other
    };
    let started = tokio::time::Instant::now();
    assert!(read_patiently(&flaky(0), &other, 0).await.is_none());
    assert_eq!(started.elapsed(), Duration::ZERO);
}

/// A record that cannot be written before the callback is written again after the waits, then given up (the
/// callback goes out all the same).
#[tokio::test(start_paused = true)]
async fn a_record_before_the_callback_is_written_again_after_a_storage_error() {
    let (dir, empty) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let store_in = |dir: &tempfile::TempDir, failures| {
        crate::storage::failing::FailingPuts::shared(dir.path(), failures)
    };
    let store = |failures| store_in(&dir, failures);
    let job = std::sync::Arc::new(JobHandle::new(plan(JobSpec::default(), None), 1));
    drop(job.finish_item(0, super::super::job::ItemOutcome::Cancelled, true));
    // One copy (no message hash): two failed puts, then written.
    let started = tokio::time::Instant::now();
    assert!(matches!(
        claim(&store(2), &job, 0, &never()).await,
        Claim::Ours { written: true }
    ));
    assert_eq!(started.elapsed(), AGAIN_AFTER[0] + AGAIN_AFTER[1]);
    let found = read(&store(0), &job.plan, 0).await.expect("recorded");
    assert_eq!(found.callback_state, CallbackState::Pending as i32);
    // Storage down throughout (nothing recorded yet): every wait, then given up.
    let started = tokio::time::Instant::now();
    assert!(matches!(
        claim(&store_in(&empty, 100), &job, 0, &never()).await,
        Claim::Ours { written: false }
    ));
    assert_eq!(started.elapsed(), AGAIN_AFTER.iter().sum::<Duration>());
}

/// A refusal (403: a policy without s3:ListBucket answers a missing key so; a local permission error) is an answer,
/// not an outage: never waited for, read as no record under that key, and the next key (an older release's, under
/// the effective spec's hash) is still asked.
#[tokio::test(start_paused = true)]
async fn a_refused_read_is_not_waited_for_and_the_next_key_is_asked() {
    /// A bucket policy without s3:ListBucket: a missing key answers 403, not 404.
    #[derive(Debug)]
    struct NoListBucket(crate::storage::LocalStore);
    #[async_trait::async_trait]
    impl crate::storage::ObjectStore for NoListBucket {
        async fn get_at_most(&self, key: &str, max: u64) -> Result<Bytes, StorageError> {
            match self.0.get_at_most(key, max).await {
                Err(StorageError::NotFound(_)) => Err(StorageError::refused(
                    format!("GET {key}: AccessDenied: Access Denied"),
                    "403",
                )),
                other => other,
            }
        }
        async fn put(&self, key: &str, body: Bytes, ct: &str) -> Result<(), StorageError> {
            self.0.put(key, body, ct).await
        }
        async fn head(
            &self,
            key: &str,
        ) -> Result<Option<crate::storage::ObjectMeta>, StorageError> {
            self.0.head(key).await
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let store: SharedStore = std::sync::Arc::new(NoListBucket(
        crate::storage::LocalStore::new(dir.path()).unwrap(),
    ));
    let started = tokio::time::Instant::now();
    // Nothing recorded: none, at once.
    assert!(
        read_patiently(&store, &plan(JobSpec::default(), None), 0)
            .await
            .is_none()
    );
    assert_eq!(
        read_key_patiently(&store, "jobs-state/u/j/h/0.json").await,
        None
    );
    // Recorded by an older release, under the effective spec's hash only: found behind the refused message key.
    recorded(&store, plan(JobSpec::default(), None)).await;
    let message = Some("f".repeat(64));
    assert!(
        read_patiently(&store, &plan(JobSpec::default(), message), 0)
            .await
            .is_some()
    );
    assert_eq!(started.elapsed(), Duration::ZERO);
}
