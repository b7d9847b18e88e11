//! The redb job store's own tests: records across reopens, unreadable records, a failed write.
use super::*;
use palette_proto::orchestrator::v1::{CallbackState, ItemState, JobSpec};

fn record(job_id: &str, spec_hash: &str, seq: u64) -> JobRecord {
    JobRecord {
        user_id: "u".into(),
        job_id: job_id.into(),
        spec_hash: spec_hash.into(),
        spec: JobSpec {
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

#[tokio::test]
async fn records_survive_a_reopen_and_the_first_terminal_state_wins() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/jobs.redb");
    let a = record("a", "h1", 1);
    {
        let store = LocalJobStore::open(&path).unwrap();
        assert!(matches!(store.create(&a).await.unwrap(), Created::New));
        assert!(matches!(
            store.create(&record("a", "h2", 2)).await.unwrap(),
            Created::Existing(r) if *r == a
        ));
        let done = item(1, ItemState::Completed, CallbackState::Pending);
        assert_eq!(
            store.put_item(&a.key(), &done).await.unwrap(),
            Written::Stored
        );
        let settled = item(1, ItemState::Completed, CallbackState::Delivered);
        assert_eq!(
            store.put_item(&a.key(), &settled).await.unwrap(),
            Written::Stored
        );
        let other = item(1, ItemState::Failed, CallbackState::Pending);
        assert_eq!(
            store.put_item(&a.key(), &other).await.unwrap(),
            Written::Conflict(Box::new(settled))
        );
        store.cancel(&a.key()).await.unwrap();
        // Open: a second handle on the same file is refused.
        assert!(LocalJobStore::open(&path).is_err());
    }
    let store = LocalJobStore::open(&path).unwrap();
    let loaded = store.load().await.unwrap();
    assert_eq!(loaded.len(), 1);
    assert!(loaded[0].record.cancelled);
    assert_eq!(
        loaded[0].items,
        [item(1, ItemState::Completed, CallbackState::Delivered)]
    );
}

#[tokio::test]
async fn a_reused_job_id_never_sees_the_items_of_another_spec() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalJobStore::open(&dir.path().join("jobs.redb")).unwrap();
    let (old, new) = (record("j", "old", 1), record("j", "new", 2));
    store.create(&old).await.unwrap();
    let done = item(0, ItemState::Completed, CallbackState::Delivered);
    store.put_item(&old.key(), &done).await.unwrap();
    // An expiry interrupted after the job record went, before its items did.
    store.forget(&[old.run()]).await.unwrap();
    store.put_item(&old.key(), &done).await.unwrap();
    store.create(&new).await.unwrap();
    let loaded = store.load().await.unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].record, new);
    assert!(loaded[0].items.is_empty(), "{:?}", loaded[0].items);
    // Forgetting the old key leaves the newer job's record alone.
    store.forget(&[old.run()]).await.unwrap();
    assert_eq!(store.load().await.unwrap().len(), 1);
    store.forget(&[new.run()]).await.unwrap();
    assert!(store.load().await.unwrap().is_empty());
}

/// A record with a field this version does not know (a newer version wrote it, then was rolled back), and an
/// item record that does not decode: both skipped, the rest loads (the whole load failed, and startup with it).
#[tokio::test]
async fn records_this_version_cannot_read_are_skipped_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalJobStore::open(&dir.path().join("jobs.redb")).unwrap();
    let good = record("good", "h", 1);
    store.create(&good).await.unwrap();
    let done = item(0, ItemState::Completed, CallbackState::Delivered);
    store.put_item(&good.key(), &done).await.unwrap();
    let mut newer: serde_json::Value =
        serde_json::from_slice(&record("newer", "h", 2).encode()).unwrap();
    newer["fieldFromTheFuture"] = serde_json::json!(1);
    let newer = serde_json::to_vec(&newer).unwrap();
    let garbled = item_key(&good.key(), 1);
    store
        .write(move |txn| {
            let mut jobs = txn.open_table(JOBS).unwrap();
            jobs.insert("u/newer", newer.as_slice()).unwrap();
            let mut items = txn.open_table(ITEMS).unwrap();
            items
                .insert(garbled.as_str(), b"{not json".as_slice())
                .unwrap();
            Ok(())
        })
        .await
        .unwrap();
    let loaded = store.load().await.unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].record, good);
    assert_eq!(loaded[0].items, std::slice::from_ref(&done));
    // The item that ran again is recorded over the unreadable record: it does not run again at every start.
    let again = item(1, ItemState::Failed, CallbackState::Delivered);
    assert_eq!(
        store.put_item(&good.key(), &again).await.unwrap(),
        Written::Stored
    );
    assert_eq!(store.load().await.unwrap()[0].items, [done, again]);
}

/// The file's backend, failing writes and syncs while `fail` is set: a disk full for a moment.
#[derive(Debug)]
struct Flaky {
    inner: redb::backends::FileBackend,
    fail: Arc<std::sync::atomic::AtomicBool>,
}

impl Flaky {
    fn check(&self) -> std::io::Result<()> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            Err(std::io::Error::other("injected: no space left on device"))
        } else {
            Ok(())
        }
    }
}

impl redb::StorageBackend for Flaky {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.check()?;
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.check()?;
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.check()?;
        self.inner.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        self.inner.close()
    }
}

/// One failed commit (redb then refuses every transaction of that database) costs that call only: the next
/// call opens the file again and works, and what was committed before is still there.
#[tokio::test]
async fn a_failed_write_does_not_break_the_store_until_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.redb");
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = fail.clone();
    let store = LocalJobStore::with_opener(Arc::new(move || {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| redb::DatabaseError::Storage(redb::StorageError::Io(e)))?;
        let inner = redb::backends::FileBackend::new(file)?;
        redb::Builder::new().create_with_backend(Flaky {
            inner,
            fail: flag.clone(),
        })
    }))
    .unwrap();
    let a = record("a", "h", 1);
    store.create(&a).await.unwrap();
    let done = item(0, ItemState::Completed, CallbackState::Delivered);
    fail.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(store.put_item(&a.key(), &done).await.is_err());
    fail.store(false, std::sync::atomic::Ordering::SeqCst);
    // Room again: without reopening, redb answered PreviousIo to every call from here on.
    assert!(matches!(
        store.create(&record("b", "h", 2)).await.unwrap(),
        Created::New
    ));
    assert_eq!(
        store.put_item(&a.key(), &done).await.unwrap(),
        Written::Stored
    );
    let loaded = store.load().await.unwrap();
    assert_eq!(loaded.len(), 2);
    assert_eq!(loaded[0].items, [done]);
}

#[tokio::test]
async fn loads_in_submission_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalJobStore::open(&dir.path().join("jobs.redb")).unwrap();
    for (id, seq) in [("b", 1), ("a", 2), ("c", 0)] {
        store.create(&record(id, "h", seq)).await.unwrap();
    }
    let ids: Vec<_> = store
        .load()
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.record.job_id)
        .collect();
    assert_eq!(ids, ["c", "b", "a"]);
}

/// A burst of item records (a large job's cancel ends every open item at once) shares transactions, and waits for
/// its turn without a blocking thread each: before, every record was a transaction of its own (an fsync each: 300
/// took ~1 s) and took one of the blocking pool's threads (up to 512) to wait in redb's `begin_write`. Threads
/// counted by the pool's thread name on a runtime of its own.
#[test]
fn a_burst_of_item_records_shares_transactions_and_one_blocking_thread() {
    const NAME: &str = "jstore-burst";
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name(NAME)
        .max_blocking_threads(512)
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = LocalJobStore::open(&dir.path().join("jobs.redb")).unwrap();
    let job = record("burst", "h", 1);
    runtime.block_on(async {
        store.create(&job).await.unwrap();
        let writes = (0..300).map(|idx| {
            let (store, key) = (store.clone(), job.key());
            tokio::spawn(async move {
                let done = item(idx, ItemState::Cancelled, CallbackState::Pending);
                store.put_first_item(&key, &done, false).await.unwrap()
            })
        });
        let before = store.commits.load(std::sync::atomic::Ordering::Relaxed);
        for write in futures::future::join_all(writes).await {
            assert_eq!(write.unwrap(), Written::Stored);
        }
        let commits = store.commits.load(std::sync::atomic::Ordering::Relaxed) - before;
        assert!(commits <= 10, "300 records in {commits} transactions");
        // Decided one by one inside the group: a second terminal state loses, the same one again is stored.
        let key = job.key();
        let failed = item(7, ItemState::Failed, CallbackState::Pending);
        let settled = item(8, ItemState::Cancelled, CallbackState::Delivered);
        let (other, same) = tokio::join!(
            store.put_item(&key, &failed),
            store.put_item(&key, &settled)
        );
        assert!(matches!(other.unwrap(), Written::Conflict(r) if r.idx == 7 && r.state == ItemState::Cancelled as i32));
        assert_eq!(same.unwrap(), Written::Stored);
        assert_eq!(store.load().await.unwrap()[0].items.len(), 300);
    });
    // Idle blocking threads live on for 10 s: every one the burst started is still there.
    let threads = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
        .filter(|comm| comm.trim() == NAME)
        .count();
    assert!(threads <= 2, "{threads} blocking threads for one writer");
}
