//! JOB_STORE=local: the job store in one redb file. Every call is one transaction, committed with
//! `Durability::Immediate` (fsynced before it returns), run on the blocking pool, except item records, which arrive
//! in bursts and share transactions (`group`). redb locks the file, so a second process opening it fails at start
//! instead of corrupting it.
//!
//! After an I/O error (a full disk for a moment, a failed fsync) redb refuses every later transaction of that
//! `Database` ("PreviousIo": close and re-open it). So a call that fails on the store drops this handle's database,
//! and the next call opens the file again (redb repairs it from its last commit): one failed write costs that call,
//! not every call until the process restarts.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use palette_proto::orchestrator::v1::Item;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Created, JobRecord, JobStore, RecordKey, RunKey, StoreError, StoredJob, Written};
use crate::jobs::durable;

mod group;

/// `{userId}/{jobId}` -> `JobRecord::encode`.
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
/// `{userId}/{jobId}/{specHash}/{idx:010}` -> `durable::encode` of the terminal item. The zero-padded index keeps a
/// job's items in order; ids never contain '/', so one job's items are exactly one key range.
const ITEMS: TableDefinition<&str, &[u8]> = TableDefinition::new("items");

/// Opens the database (the file, or in tests a backend that fails on demand).
type Opener = Arc<dyn Fn() -> Result<Database, redb::DatabaseError> + Send + Sync>;

#[derive(Clone)]
pub struct LocalJobStore {
    open: Opener,
    /// The open database; None after a call failed on it, until the next call opens it again.
    db: Arc<Mutex<Option<Arc<Database>>>>,
    /// One write transaction at a time reaches the blocking pool. redb runs one at a time anyway: without this, each
    /// waiting write took a blocking thread (up to tokio's 512) to wait in `begin_write`, and the items' own CPU work
    /// queued behind them.
    writer: Arc<tokio::sync::Semaphore>,
    /// Item records waiting for the next group's transaction (`group`).
    pending: Arc<group::Pending>,
    /// Write transactions committed (tests: how records were grouped).
    commits: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for LocalJobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalJobStore").finish_non_exhaustive()
    }
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
        let path = path.to_path_buf();
        Self::with_opener(Arc::new(move || Database::create(&path)))
    }

    /// Opens the database now (an error here stops the start), and again with `open` after a failed call.
    fn with_opener(open: Opener) -> Result<Self, StoreError> {
        let store = LocalJobStore {
            open,
            db: Arc::new(Mutex::new(None)),
            writer: Arc::new(tokio::sync::Semaphore::new(1)),
            pending: Arc::default(),
            commits: Arc::default(),
        };
        store.database()?;
        Ok(store)
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<Database>>> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The open database, opened first if a failed call dropped it (blocking: call it on the blocking pool).
    fn database(&self) -> Result<Arc<Database>, StoreError> {
        let mut slot = self.slot();
        if let Some(db) = slot.as_ref() {
            return Ok(db.clone());
        }
        let db = (self.open)().map_err(StoreError::unavailable)?;
        // Both tables exist from the start, so readers never meet a missing table.
        let txn = db.begin_write().map_err(StoreError::unavailable)?;
        txn.open_table(JOBS).map_err(StoreError::unavailable)?;
        txn.open_table(ITEMS).map_err(StoreError::unavailable)?;
        txn.commit().map_err(StoreError::unavailable)?;
        let db = Arc::new(db);
        *slot = Some(db.clone());
        Ok(db)
    }

    /// Runs `work` on the open database on the blocking pool. A store error (not a record that does not decode)
    /// drops the database, so the next call opens the file again: redb refuses every transaction after an I/O
    /// error. (A call still running on the old one keeps its file lock until it ends; an open meanwhile fails
    /// and is tried again by the call after.)
    async fn with_db<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let db = this.database()?;
            let result = work(&db);
            if let Err(e @ StoreError::Unavailable(_)) = &result {
                tracing::warn!(error = %crate::error::Report(e), "job store: a call failed; the file is opened again for the next one");
                let mut slot = this.slot();
                if slot.as_ref().is_some_and(|open| Arc::ptr_eq(open, &db)) {
                    *slot = None;
                }
            }
            result
        })
        .await
        .map_err(StoreError::unavailable)?
    }

    /// Runs `work` in one write transaction on the blocking pool, committing when it returns Ok.
    async fn write<T: Send + 'static>(
        &self,
        work: impl FnOnce(&redb::WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let _turn = self
            .writer
            .acquire()
            .await
            .expect("the writer semaphore is never closed");
        let commits = self.commits.clone();
        self.with_db(move |db| {
            let txn = db.begin_write().map_err(StoreError::unavailable)?;
            let out = work(&txn)?;
            txn.commit().map_err(StoreError::unavailable)?;
            commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(out)
        })
        .await
    }
}

/// The value stored under `key`, copied out of the table (the transaction's borrow ends here).
fn stored_bytes(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(table
        .get(key)
        .map_err(StoreError::unavailable)?
        .map(|v| v.value().to_vec()))
}

fn decode_item(key: &str, bytes: &[u8]) -> Result<Item, StoreError> {
    durable::decode(bytes).ok_or_else(|| StoreError::Corrupt {
        key: key.to_string(),
    })
}

/// A record `load` skips: logged with its key and counted, left in the file (an item's is replaced once the item
/// that runs again ends, `put_item`).
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
            let existing = stored_bytes(&jobs, &key)?;
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
        self.put_item_grouped(item_key(job, item.idx), item.clone())
            .await
    }

    async fn cancel(&self, job: &RecordKey) -> Result<(), StoreError> {
        let job = job.clone();
        self.write(move |txn| {
            let mut jobs = txn.open_table(JOBS).map_err(StoreError::unavailable)?;
            let key = job_key(&job.user_id, &job.job_id);
            let existing = stored_bytes(&jobs, &key)?;
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
        self.with_db(move |db| {
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
    }

    async fn forget(&self, forgotten: &[RunKey]) -> Result<(), StoreError> {
        let forgotten = forgotten.to_vec();
        self.write(move |txn| {
            let mut jobs = txn.open_table(JOBS).map_err(StoreError::unavailable)?;
            let mut items = txn.open_table(ITEMS).map_err(StoreError::unavailable)?;
            for run in &forgotten {
                let job = &run.job;
                let key = job_key(&job.user_id, &job.job_id);
                let recorded = jobs
                    .get(key.as_str())
                    .map_err(StoreError::unavailable)?
                    .and_then(|v| JobRecord::decode(v.value()))
                    .filter(|r| r.spec_hash == job.spec_hash)
                    .map(|r| r.seq);
                // A newer job under the same id keeps its record; so does a newer run of this spec, with the items
                // under its key (they are its own). Otherwise this job's items go, whatever became of the record.
                match recorded {
                    Some(seq) if seq != run.seq => continue,
                    Some(_) => {
                        jobs.remove(key.as_str()).map_err(StoreError::unavailable)?;
                    }
                    None => {}
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
mod tests;
