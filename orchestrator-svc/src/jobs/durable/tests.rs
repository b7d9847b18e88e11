use super::*;

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

/// A redelivered item whose record reads fail for a moment is found recorded, not run again (with storage down
/// for that run too, it would have ended FAILED after its COMPLETED callback); an outage past the waits still
/// runs it, as `read` always does.
#[tokio::test(start_paused = true)]
async fn a_record_unreadable_for_a_moment_is_read_again_before_the_item_runs() {
    let dir = tempfile::tempdir().unwrap();
    let flaky = |failures| -> SharedStore {
        std::sync::Arc::new(Flaky {
            inner: crate::storage::LocalStore::new(dir.path()).unwrap(),
            failures: std::sync::atomic::AtomicUsize::new(failures),
        })
    };
    recorded(&flaky(0), plan(JobSpec::default(), None)).await;
    let job = plan(JobSpec::default(), None);
    let all_waits: Duration = READ_AGAIN_AFTER.iter().sum();
    assert!(
        read(&flaky(1), &job, 0).await.is_none(),
        "read: one failure is none"
    );
    let failing = AtomicBool::new(false);
    let started = tokio::time::Instant::now();
    let found = read_patiently(&flaky(READ_AGAIN_AFTER.len()), &job, 0, &failing).await;
    assert!(found.is_some(), "found after the waits");
    assert_eq!(started.elapsed(), all_waits, "every wait taken");
    assert!(!failing.load(Ordering::Relaxed));
    // Storage down past the waits: none (the item runs again), and the job's next reads do not wait ...
    let started = tokio::time::Instant::now();
    let store = flaky(READ_AGAIN_AFTER.len() + 2);
    assert!(read_patiently(&store, &job, 0, &failing).await.is_none());
    assert_eq!(started.elapsed(), all_waits);
    assert!(failing.load(Ordering::Relaxed));
    let started = tokio::time::Instant::now();
    assert!(
        read_patiently(&store, &job, 0, &failing).await.is_none(),
        "one read, failed"
    );
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "no waits while the job's reads fail"
    );
    // ... until one succeeds: the waits are back.
    assert!(read_patiently(&store, &job, 0, &failing).await.is_some());
    assert!(!failing.load(Ordering::Relaxed));
}
