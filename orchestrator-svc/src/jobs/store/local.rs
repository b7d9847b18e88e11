//! JOB_STORE=local: the job store in one redb file. Every call is one transaction, committed with
//! `Durability::Immediate` (fsynced before it returns), run on the blocking pool. redb locks the file, so a second
//! process opening it fails at start instead of corrupting it.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use palette_proto::orchestrator::v1::Item;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Created, JobRecord, JobStore, RecordKey, StoreError, StoredJob, Written};
use crate::jobs::durable;

/// `{userId}/{jobId}` -> `JobRecord::encode`.
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
/// `{userId}/{jobId}/{specHash}/{idx:010}` -> `durable::encode` of the terminal item. The zero-padded index keeps a
/// job's items in order; ids never contain '/', so one job's items are exactly one key range.
const ITEMS: TableDefinition<&str, &[u8]> = TableDefinition::new("items");

#[derive(Debug, Clone)]
pub struct LocalJobStore {
    db: Arc<Database>,
}

fn job_key(user_id: &str, job_id: &str) -> String {
    format!("{user_id}/{job_id}")
}

fn item_key(job: &RecordKey, idx: u32) -> String {
    format!("{}/{}/{}/{idx:010}", job.user_id, job.job_id, job.spec_hash)
}

/// The keys of every item of `job`: from `{userId}/{jobId}/{specHash}/` up to, not including,
/// `{userId}/{jobId}/{specHash}0` ('0' follows '/').
fn item_range(job: &RecordKey) -> (String, String) {
    let prefix = format!("{}/{}/{}", job.user_id, job.job_id, job.spec_hash);
    (format!("{prefix}/"), format!("{prefix}0"))
}

impl LocalJobStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(StoreError::unavailable)?;
        }
        let db = Database::create(path).map_err(StoreError::unavailable)?;
        // Both tables exist from the start, so readers never meet a missing table.
        let txn = db.begin_write().map_err(StoreError::unavailable)?;
        txn.open_table(JOBS).map_err(StoreError::unavailable)?;
        txn.open_table(ITEMS).map_err(StoreError::unavailable)?;
        txn.commit().map_err(StoreError::unavailable)?;
        Ok(LocalJobStore { db: Arc::new(db) })
    }

    /// Runs `work` in one write transaction on the blocking pool, committing when it returns Ok.
    async fn write<T: Send + 'static>(
        &self,
        work: impl FnOnce(&redb::WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write().map_err(StoreError::unavailable)?;
            let out = work(&txn)?;
            txn.commit().map_err(StoreError::unavailable)?;
            Ok(out)
        })
        .await
        .map_err(StoreError::unavailable)?
    }
}

fn decode_item(key: &str, bytes: &[u8]) -> Result<Item, StoreError> {
    durable::decode(bytes).ok_or_else(|| StoreError::Corrupt {
        key: key.to_string(),
    })
}

/// A record `load` skips: logged with its key and counted, never deleted.
fn unreadable(what: &str, key: &str) {
    tracing::warn!(
        key,
        what,
        "job store: a {what} record this version cannot read is skipped and left in the file (written by a newer version?)"
    );
    metrics::counter!("orchestrator_job_store_errors_total").increment(1);
}

#[async_trait]
impl JobStore for LocalJobStore {
    async fn create(&self, job: &JobRecord) -> Result<Created, StoreError> {
        let job = job.clone();
        self.write(move |txn| {
            let mut jobs = txn.open_table(JOBS).map_err(StoreError::unavailable)?;
            let key = job_key(&job.user_id, &job.job_id);
            let existing = jobs
                .get(key.as_str())
                .map_err(StoreError::unavailable)?
                .map(|v| v.value().to_vec());
            if let Some(bytes) = existing {
                return JobRecord::decode(&bytes)
                    .map(|r| Created::Existing(Box::new(r)))
                    .ok_or(StoreError::Corrupt { key });
            }
            jobs.insert(key.as_str(), job.encode().as_slice())
                .map_err(StoreError::unavailable)?;
            Ok(Created::New)
        })
        .await
    }

    async fn put_item(&self, job: &RecordKey, item: &Item) -> Result<Written, StoreError> {
        let key = item_key(job, item.idx);
        let item = item.clone();
        self.write(move |txn| {
            let mut items = txn.open_table(ITEMS).map_err(StoreError::unavailable)?;
            let existing = items
                .get(key.as_str())
                .map_err(StoreError::unavailable)?
                .map(|v| v.value().to_vec());
            if let Some(bytes) = existing {
                let recorded = decode_item(&key, &bytes)?;
                if recorded.state != item.state {
                    return Ok(Written::Conflict(Box::new(recorded)));
                }
            }
            items
                .insert(key.as_str(), durable::encode(&item).as_slice())
                .map_err(StoreError::unavailable)?;
            Ok(Written::Stored)
        })
        .await
    }

    async fn cancel(&self, job: &RecordKey) -> Result<(), StoreError> {
        let job = job.clone();
        self.write(move |txn| {
            let mut jobs = txn.open_table(JOBS).map_err(StoreError::unavailable)?;
            let key = job_key(&job.user_id, &job.job_id);
            let existing = jobs
                .get(key.as_str())
                .map_err(StoreError::unavailable)?
                .map(|v| v.value().to_vec());
            let Some(mut record) = existing.as_deref().and_then(JobRecord::decode) else {
                return Ok(());
            };
            if record.spec_hash == job.spec_hash && !record.cancelled {
                record.cancelled = true;
                jobs.insert(key.as_str(), record.encode().as_slice())
                    .map_err(StoreError::unavailable)?;
            }
            Ok(())
        })
        .await
    }

    async fn load(&self) -> Result<Vec<StoredJob>, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(StoreError::unavailable)?;
            let jobs = txn.open_table(JOBS).map_err(StoreError::unavailable)?;
            let items = txn.open_table(ITEMS).map_err(StoreError::unavailable)?;
            let mut out = Vec::new();
            for entry in jobs.iter().map_err(StoreError::unavailable)? {
                let (key, value) = entry.map_err(StoreError::unavailable)?;
                // A record this binary cannot read (written by a newer version: a rollback) is left in the file
                // for the version that can, and skipped: failing the whole load kept the service from starting
                // at all, and the way out was deleting every job.
                let Some(record) = JobRecord::decode(value.value()) else {
                    unreadable("job", key.value());
                    continue;
                };
                let (from, to) = item_range(&record.key());
                let mut terminal = Vec::new();
                for entry in items
                    .range(from.as_str()..to.as_str())
                    .map_err(StoreError::unavailable)?
                {
                    let (key, value) = entry.map_err(StoreError::unavailable)?;
                    // An item record it cannot read: the item runs again (its callback is sent again).
                    match decode_item(key.value(), value.value()) {
                        Ok(item) => terminal.push(item),
                        Err(_) => unreadable("item", key.value()),
                    }
                }
                out.push(StoredJob {
                    record,
                    items: terminal,
                });
            }
            out.sort_by_key(|j| j.record.seq);
            Ok(out)
        })
        .await
        .map_err(StoreError::unavailable)?
    }

    async fn forget(&self, forgotten: &[RecordKey]) -> Result<(), StoreError> {
        let forgotten = forgotten.to_vec();
        self.write(move |txn| {
            let mut jobs = txn.open_table(JOBS).map_err(StoreError::unavailable)?;
            let mut items = txn.open_table(ITEMS).map_err(StoreError::unavailable)?;
            for job in &forgotten {
                let key = job_key(&job.user_id, &job.job_id);
                let same = jobs
                    .get(key.as_str())
                    .map_err(StoreError::unavailable)?
                    .and_then(|v| JobRecord::decode(v.value()))
                    .is_some_and(|r| r.spec_hash == job.spec_hash);
                // A newer job under the same id keeps its record; this job's items go either way.
                if same {
                    jobs.remove(key.as_str()).map_err(StoreError::unavailable)?;
                }
                let (from, to) = item_range(job);
                items
                    .retain_in(from.as_str()..to.as_str(), |_, _| false)
                    .map_err(StoreError::unavailable)?;
            }
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
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
        store.forget(&[old.key()]).await.unwrap();
        store.put_item(&old.key(), &done).await.unwrap();
        store.create(&new).await.unwrap();
        let loaded = store.load().await.unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].record, new);
        assert!(loaded[0].items.is_empty(), "{:?}", loaded[0].items);
        // Forgetting the old key leaves the newer job's record alone.
        store.forget(&[old.key()]).await.unwrap();
        assert_eq!(store.load().await.unwrap().len(), 1);
        store.forget(&[new.key()]).await.unwrap();
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
}
