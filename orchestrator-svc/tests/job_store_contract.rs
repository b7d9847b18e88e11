//! The `JobStore` contract, run against both implementations: the embedded redb file and a NATS JetStream
//! key-value bucket on a real nats-server (two connections standing for two replicas, racing on one job and one
//! item: exactly one wins each race).

use std::sync::Arc;
use std::time::Duration;

use orchestrator_svc::jobs::store::{
    Created, JobRecord, JobStore, LocalJobStore, NatsJobStore, RunKey, Written,
};
use palette_proto::orchestrator::v1::{CallbackState, Item, ItemState, JobSpec};
use palette_testing::nats;

fn record(user_id: &str, job_id: &str, spec_hash: &str, seq: u64) -> JobRecord {
    JobRecord {
        user_id: user_id.into(),
        job_id: job_id.into(),
        spec_hash: spec_hash.into(),
        spec: JobSpec {
            user_id: user_id.into(),
            job_id: job_id.into(),
            image_count: 3,
            ..Default::default()
        },
        seq,
        cancelled: false,
        source: None,
        preset: None,
    }
}

fn item(idx: u32, state: ItemState, callback: CallbackState) -> Item {
    Item {
        idx,
        state: state as i32,
        callback_state: callback as i32,
        ..Default::default()
    }
}

/// What every store must do, on an empty store.
async fn contract(store: &dyn JobStore) {
    let a = record("u", "j.1", "h1", 2);
    assert!(matches!(store.create(&a).await.unwrap(), Created::New));
    match store.create(&record("u", "j.1", "h2", 9)).await.unwrap() {
        Created::Existing(existing) => assert_eq!(*existing, a),
        Created::New => panic!("created twice"),
    }
    // Another user's job of the same id is another job.
    let other_user = record("v", "j.1", "h3", 1);
    assert!(matches!(
        store.create(&other_user).await.unwrap(),
        Created::New
    ));

    let done = item(1, ItemState::Completed, CallbackState::Pending);
    let settled = item(1, ItemState::Completed, CallbackState::Delivered);
    assert_eq!(
        store.put_item(&a.key(), &done).await.unwrap(),
        Written::Stored
    );
    assert_eq!(
        store.put_item(&a.key(), &settled).await.unwrap(),
        Written::Stored
    );
    let failed = item(1, ItemState::Failed, CallbackState::Pending);
    assert_eq!(
        store.put_item(&a.key(), &failed).await.unwrap(),
        Written::Conflict(Box::new(settled.clone()))
    );
    store.cancel(&a.key()).await.unwrap();

    let loaded = store.load().await.unwrap();
    let ids: Vec<_> = loaded
        .iter()
        .map(|j| (j.record.user_id.as_str(), j.record.job_id.as_str()))
        .collect();
    assert_eq!(ids, [("v", "j.1"), ("u", "j.1")], "submission order");
    assert!(loaded[1].record.cancelled);
    assert_eq!(loaded[1].items, std::slice::from_ref(&settled));
    assert!(
        loaded[0].items.is_empty(),
        "items stay with their user's job"
    );

    // Expiry interrupted between the record and the items, then the id reused with another spec: the new job sees
    // none of the old items.
    store.forget(&[a.run()]).await.unwrap();
    store.put_item(&a.key(), &settled).await.unwrap();
    let reused = record("u", "j.1", "h4", 3);
    assert!(matches!(store.create(&reused).await.unwrap(), Created::New));
    let loaded = store.load().await.unwrap();
    let again = loaded.iter().find(|j| j.record.user_id == "u").unwrap();
    assert_eq!(again.record, reused);
    assert!(again.items.is_empty(), "{:?}", again.items);
    store
        .forget(&[a.run(), reused.run(), other_user.run()])
        .await
        .unwrap();
    assert!(store.load().await.unwrap().is_empty());

    // The same spec submitted again once its first run was forgotten: a replica that forgets the first run late
    // (it missed the first deletion, or raced it) leaves the second run's record and items alone.
    let first = record("u", "again", "h5", 5);
    store.create(&first).await.unwrap();
    store.forget(&[first.run()]).await.unwrap();
    let second = record("u", "again", "h5", 6);
    assert!(matches!(store.create(&second).await.unwrap(), Created::New));
    store.put_item(&second.key(), &settled).await.unwrap();
    store.forget(&[first.run()]).await.unwrap();
    let loaded = store.load().await.unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].record, second);
    assert_eq!(loaded[0].items, std::slice::from_ref(&settled));
    store.forget(&[second.run()]).await.unwrap();
    assert!(store.load().await.unwrap().is_empty());
}

#[tokio::test]
async fn the_local_store_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalJobStore::open(&dir.path().join("jobs.redb")).unwrap();
    contract(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_store_keeps_the_contract() {
    let Some(server) = nats::start() else { return };
    let store = NatsJobStore::open(&server.url, "palette-jobs")
        .await
        .unwrap();
    contract(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_racing_on_the_nats_store_never_both_win() {
    let Some(server) = nats::start() else { return };
    let a: Arc<dyn JobStore> = Arc::new(
        NatsJobStore::open(&server.url, "palette-jobs")
            .await
            .unwrap(),
    );
    let b: Arc<dyn JobStore> = Arc::new(
        NatsJobStore::open(&server.url, "palette-jobs")
            .await
            .unwrap(),
    );
    const ROUNDS: u32 = 20;
    let mut created = 0;
    for round in 0..ROUNDS {
        let job = record("u", &format!("race-{round}"), "h", u64::from(round));
        let (x, y) = tokio::join!(a.create(&job), b.create(&job));
        let new = [x.unwrap(), y.unwrap()]
            .iter()
            .filter(|c| matches!(c, Created::New))
            .count();
        assert_eq!(new, 1, "round {round}");
        created += new;
        // One item, two replicas, two different ends: exactly one is recorded, the other is told which.
        let (completed, cancelled) = (
            item(0, ItemState::Completed, CallbackState::Pending),
            item(0, ItemState::Cancelled, CallbackState::Pending),
        );
        let key = job.key();
        let (x, y) = tokio::join!(a.put_item(&key, &completed), b.put_item(&key, &cancelled));
        let outcomes = [x.unwrap(), y.unwrap()];
        let stored = outcomes.iter().filter(|w| **w == Written::Stored).count();
        assert_eq!(stored, 1, "round {round}: {outcomes:?}");
        let loaded = a.load().await.unwrap();
        let this = loaded.iter().find(|j| j.record.key() == job.key()).unwrap();
        let winner = if outcomes[0] == Written::Stored {
            &completed
        } else {
            &cancelled
        };
        assert_eq!(this.items, std::slice::from_ref(winner), "round {round}");
        // First reports of one item in the same state (a task run twice): one writer reports it, the other is told
        // it was recorded; a write retried after its answer was lost (the identical record) counts as its own.
        let done_here = item(1, ItemState::Cancelled, CallbackState::Pending);
        let done_there = Item {
            error: "stopped elsewhere".into(),
            ..done_here.clone()
        };
        let (x, y) = tokio::join!(
            a.put_first_item(&key, &done_here, false),
            b.put_first_item(&key, &done_there, false)
        );
        let outcomes = [x.unwrap(), y.unwrap()];
        let stored = outcomes.iter().filter(|w| **w == Written::Stored).count();
        assert_eq!(stored, 1, "round {round}: {outcomes:?}");
        let mine = if outcomes[0] == Written::Stored {
            &done_here
        } else {
            &done_there
        };
        assert_eq!(
            a.put_first_item(&key, mine, true).await.unwrap(),
            Written::Stored
        );
        // The identical record from a writer whose earlier call did not fail: another holder that ran the item to
        // the same keys. It must not call it back too.
        assert!(matches!(
            b.put_first_item(&key, mine, false).await.unwrap(),
            Written::Conflict(_)
        ));
    }
    assert_eq!(created, ROUNDS as usize);
    let keys: Vec<RunKey> = a
        .load()
        .await
        .unwrap()
        .iter()
        .map(|j| j.record.run())
        .collect();
    b.forget(&keys).await.unwrap();
    assert!(a.load().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgetting_a_job_on_nats_leaves_nothing_of_it_and_touches_no_other_job() {
    use futures::TryStreamExt;
    use orchestrator_svc::jobs::store::RunClaim;
    let Some(server) = nats::start() else { return };
    let store = NatsJobStore::open(&server.url, "palette-jobs")
        .await
        .unwrap();
    // "j" is a prefix of "j.1" as text: forgetting one must not reach the other.
    let (forgotten, kept) = (record("u", "j", "h", 1), record("u", "j.1", "h", 2));
    let claim = RunClaim {
        replica: "replica-a".into(),
        delivery: 1,
    };
    for job in [&forgotten, &kept] {
        store.create(job).await.unwrap();
        for idx in 0..3 {
            store.claim(&job.key(), idx, &claim).await.unwrap();
            let done = item(idx, ItemState::Completed, CallbackState::Delivered);
            store
                .put_first_item(&job.key(), &done, false)
                .await
                .unwrap();
        }
    }
    assert_eq!(store.claim_of(&kept.key(), 2).await.unwrap(), Some(claim));
    store.forget(&[forgotten.run()]).await.unwrap();
    let subjects = |filter: &'static str| {
        let stream = store.bucket().stream.clone();
        async move {
            let listed: Vec<(String, usize)> = stream
                .info_with_subjects(filter)
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            let mut names: Vec<String> = listed.into_iter().map(|(s, _)| s).collect();
            names.sort();
            names
        }
    };
    // No tombstone of its items or claims stays behind; the other job's are all there.
    let items = subjects("$KV.palette-jobs.item.>").await;
    let claims = subjects("$KV.palette-jobs.run.>").await;
    assert_eq!(items.len(), 3, "{items:?}");
    assert!(items.iter().all(|s| s.contains(".j=2E1.")), "{items:?}");
    assert_eq!(claims.len(), 3, "{claims:?}");
    assert!(claims.iter().all(|s| s.contains(".j=2E1.")), "{claims:?}");
    assert_eq!(store.item(&forgotten.key(), 0).await.unwrap(), None);
    assert_eq!(store.claim_of(&forgotten.key(), 0).await.unwrap(), None);
    let loaded = store.load().await.unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].record, kept);
    assert_eq!(loaded[0].items.len(), 3);
}

/// A forgotten job's record leaves a purge marker (its watchers learn it is gone); `drop_marker` removes it later,
/// unless the key was written again since: then the newer record stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_jobs_marker_is_removed_but_never_a_later_record() {
    use async_nats::jetstream::kv::Operation;
    use futures::TryStreamExt;
    let Some(server) = nats::start() else { return };
    let store = NatsJobStore::open(&server.url, "palette-jobs")
        .await
        .unwrap();
    let job_subjects = || {
        let stream = store.bucket().stream.clone();
        async move {
            let listed: Vec<(String, usize)> = stream
                .info_with_subjects("$KV.palette-jobs.job.>")
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            listed.into_iter().map(|(s, _)| s).collect::<Vec<_>>()
        }
    };
    let marker = || async {
        let subjects = job_subjects().await;
        assert_eq!(subjects.len(), 1, "{subjects:?}");
        let key = subjects[0]
            .strip_prefix("$KV.palette-jobs.")
            .unwrap()
            .to_string();
        let entry = store.bucket().entry(&key).await.unwrap().unwrap();
        assert_eq!(entry.operation, Operation::Purge);
        (key, entry.revision)
    };

    let first = record("u", "again", "h1", 1);
    store.create(&first).await.unwrap();
    store.forget(&[first.run()]).await.unwrap();
    let (key, revision) = marker().await;
    store.drop_marker(&key, revision).await.unwrap();
    assert!(job_subjects().await.is_empty(), "the marker is gone");

    // The same id forgotten again, and recorded anew before its marker is removed: the new record stays.
    store.create(&first).await.unwrap();
    store.forget(&[first.run()]).await.unwrap();
    let (key, revision) = marker().await;
    let second = record("u", "again", "h2", 2);
    assert!(matches!(store.create(&second).await.unwrap(), Created::New));
    store.drop_marker(&key, revision).await.unwrap();
    assert_eq!(store.job("u", "again").await.unwrap(), Some(second));
    // Forgetting the first spec again leaves the second's record alone.
    store.forget(&[first.run()]).await.unwrap();
    assert_eq!(
        store.job("u", "again").await.unwrap().map(|r| r.spec_hash),
        Some("h2".into())
    );
}

/// A first item write whose answer never came (NATS stalled with the write in its socket, and committed it once it
/// went on) is an error, not "another writer came first": the retried write knows the record as its own, and the
/// item is reported. async-nats's `kv::Store::create` answered AlreadyExists here, and the item's callback was never
/// sent by anyone (seen once in a few dozen runs of the NATS-restart test on real parts, on a loaded machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_item_write_whose_answer_was_lost_is_known_as_its_own_when_retried() {
    let Some(server) = nats::start() else { return };
    let client = async_nats::connect(&server.url).await.unwrap();
    let mut js = async_nats::jetstream::new(client);
    js.set_timeout(Duration::from_millis(300));
    let store = NatsJobStore::open_on(&js, "palette-jobs", 1).await.unwrap();
    let job = record("u", "lost-answer", "h", 1);
    store.create(&job).await.unwrap();
    let ended = item(0, ItemState::Completed, CallbackState::Pending);

    server.freeze();
    let write = tokio::spawn({
        let (store, ended, key) = (store.clone(), ended.clone(), job.key());
        async move { store.put_first_item(&key, &ended, false).await }
    });
    // Past the write's timeout: a lookup after it waits in the socket behind the write.
    tokio::time::sleep(Duration::from_millis(450)).await;
    server.thaw();
    // An error (no answer); Stored only if this machine was so slow that the thaw came before the timeout.
    let first = write.await.unwrap();
    assert!(
        !matches!(first, Ok(Written::Conflict(_))),
        "no answer is no conflict: {first:?}"
    );
    let retried = store.put_first_item(&job.key(), &ended, true).await;
    assert!(matches!(retried, Ok(Written::Stored)), "{retried:?}");
    // Another holder's different end of the same item still loses.
    let other = item(0, ItemState::Failed, CallbackState::Pending);
    let other = store.put_first_item(&job.key(), &other, true).await;
    assert!(matches!(other, Ok(Written::Conflict(_))), "{other:?}");
}

/// Retention purges a forgotten job's items without tombstones. A second holder of an item's task (its lease passed
/// on during a NATS blip) that ended the item after that found the key free: its end was recorded and called back
/// after the first one (COMPLETED, then FAILED), and a later run of the job id took the record for its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_end_of_an_item_of_a_forgotten_job_is_not_recorded() {
    let Some(server) = nats::start() else { return };
    let store = NatsJobStore::open(&server.url, "palette-jobs")
        .await
        .unwrap();
    let job = record("u", "forgotten", "h", 1);
    store.create(&job).await.unwrap();
    let done = item(1, ItemState::Completed, CallbackState::Delivered);
    assert_eq!(
        store
            .put_first_item(&job.key(), &done, false)
            .await
            .unwrap(),
        Written::Stored
    );
    store.forget(&[job.run()]).await.unwrap();
    let late = item(1, ItemState::Failed, CallbackState::Pending);
    assert_eq!(
        store
            .put_first_item(&job.key(), &late, false)
            .await
            .unwrap(),
        Written::Forgotten
    );
    assert_eq!(store.item(&job.key(), 1).await.unwrap(), None);
    // Another spec recorded under the id since: not this run's either.
    store
        .create(&record("u", "forgotten", "h2", 2))
        .await
        .unwrap();
    assert_eq!(
        store.put_first_item(&job.key(), &late, true).await.unwrap(),
        Written::Forgotten
    );
}
