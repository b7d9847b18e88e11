//! The job store in a NATS JetStream key-value bucket, shared by every replica: the record layer of the distributed
//! store designed in docs/architecture.md ("Job state"). Every change is a compare-and-set on the key's revision
//! (`create` = "only if absent", `update` = "only if still at the revision read"), so two replicas writing one item
//! cannot both win. JOB_STORE=nats: `jobs::cluster` adds the bucket's watch (every replica's view of every job) and
//! the work stream that spreads items over the replicas.
//!
//! Keys: see `keys` (job records, terminal items, and the claims of the items running).

use async_nats::jetstream::{self, kv};
use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use palette_proto::orchestrator::v1::Item;

mod keys;

pub use keys::{KeyOf, RunClaim, parse_key};
use keys::{claims_prefix, items_prefix, job_key};

use super::{Created, JobRecord, JobStore, RecordKey, RunKey, StoreError, StoredJob, Written};
use crate::jobs::durable;

/// Compare-and-set attempts before a write gives up: each failed one means another replica wrote the key meanwhile.
const CAS_ATTEMPTS: usize = 16;

/// What `absent_at` found.
enum Absent {
    /// The key was free: written.
    Created,
    /// The key holds a value.
    Taken,
    /// The key was deleted, at this revision: not written yet.
    DeletedAt(u64),
}

#[derive(Debug, Clone)]
pub struct NatsJobStore {
    kv: kv::Store,
}

impl NatsJobStore {
    /// Connects and opens the bucket, creating it (one value per key, on disk) if missing.
    pub async fn open(url: &str, bucket: &str) -> Result<Self, StoreError> {
        let client = async_nats::connect(url)
            .await
            .map_err(StoreError::unavailable)?;
        Self::open_on(&jetstream::new(client), bucket, 1).await
    }

    /// Opens the bucket on an existing JetStream connection, creating it (with `replicas` copies) if missing.
    pub async fn open_on(
        js: &jetstream::Context,
        bucket: &str,
        replicas: usize,
    ) -> Result<Self, StoreError> {
        // The bucket's stream, made as `create_key_value` would (one value per key, rollups, no deletes through the
        // stream API, direct gets), by hand: async-nats 0.51's `create_key_value` cannot read nats-server 2.9's
        // answer (Debian's), while plain stream creation works with both.
        js.get_or_create_stream(jetstream::stream::Config {
            name: format!("KV_{bucket}"),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: jetstream::stream::DiscardPolicy::New,
            storage: jetstream::stream::StorageType::File,
            num_replicas: replicas.max(1),
            ..Default::default()
        })
        .await
        .map_err(StoreError::unavailable)?;
        let kv = js
            .get_key_value(bucket)
            .await
            .map_err(StoreError::unavailable)?;
        Ok(NatsJobStore { kv })
    }

    /// The bucket, for its watch.
    pub fn bucket(&self) -> &kv::Store {
        &self.kv
    }

    /// The job recorded under (user id, job id), if any.
    pub async fn job(&self, user_id: &str, job_id: &str) -> Result<Option<JobRecord>, StoreError> {
        let key = job_key(user_id, job_id);
        match self.entry(&key).await? {
            None => Ok(None),
            Some((bytes, _)) => JobRecord::decode(&bytes)
                .map(Some)
                .ok_or(StoreError::Corrupt { key }),
        }
    }

    /// The terminal record of item `idx` of the job, if one was written.
    pub async fn item(&self, job: &RecordKey, idx: u32) -> Result<Option<Item>, StoreError> {
        let key = format!("{}{idx}", items_prefix(job));
        match self.entry(&key).await? {
            None => Ok(None),
            Some((bytes, _)) => durable::decode(&bytes)
                .map(Some)
                .ok_or(StoreError::Corrupt { key }),
        }
    }

    /// Records that `claim.replica` runs item `idx` now. Unconditional: a later holder of the item's task (the
    /// first one died, its lease ran out) overwrites an earlier claim.
    pub async fn claim(
        &self,
        job: &RecordKey,
        idx: u32,
        claim: &RunClaim,
    ) -> Result<(), StoreError> {
        let key = format!("{}{idx}", claims_prefix(job));
        let value = serde_json::to_vec(claim).map_err(StoreError::unavailable)?;
        self.kv
            .put(&key, value.into())
            .await
            .map(drop)
            .map_err(StoreError::unavailable)
    }

    /// The claim on item `idx` of the job, if one was written (the item may have ended since).
    pub async fn claim_of(
        &self,
        job: &RecordKey,
        idx: u32,
    ) -> Result<Option<RunClaim>, StoreError> {
        let key = format!("{}{idx}", claims_prefix(job));
        match self.entry(&key).await? {
            None => Ok(None),
            Some((bytes, _)) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|_| StoreError::Corrupt { key }),
        }
    }

    /// The key's value and revision; None when absent or deleted.
    async fn entry(&self, key: &str) -> Result<Option<(Bytes, u64)>, StoreError> {
        Ok(self
            .kv
            .entry(key)
            .await
            .map_err(StoreError::unavailable)?
            .filter(|e| e.operation == kv::Operation::Put)
            .map(|e| (e.value, e.revision)))
    }

    /// Writes `value` if the key is still at `revision` (None: absent, or deleted). False when another writer came
    /// first; an error when the write's answer did not come (it may have been written all the same).
    async fn compare_and_set(
        &self,
        key: &str,
        value: Vec<u8>,
        revision: Option<u64>,
    ) -> Result<bool, StoreError> {
        let value = Bytes::from(value);
        let revision = match revision {
            Some(revision) => revision,
            None => match self.absent_at(key, value.clone()).await? {
                Absent::Created => return Ok(true),
                Absent::Taken => return Ok(false),
                Absent::DeletedAt(revision) => revision,
            },
        };
        match self.kv.update(key, value, revision).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
            Err(e) => Err(StoreError::unavailable(e)),
        }
    }

    /// Writes `value` under `key` if the key never held a value. Not `kv::Store::create`: after any failed first
    /// write (a timeout included) that one looks the key up and answers AlreadyExists if it holds a value, so a
    /// write that was committed but whose answer was lost (NATS restarting) came back as "another writer came
    /// first", and `put_first_item`'s caller dropped its item's report as someone else's: that item's callback was
    /// never sent. Here only the server's "wrong last sequence" answer means the key is taken; a timeout stays an
    /// error, and the retried write recognises its own record.
    async fn absent_at(&self, key: &str, value: Bytes) -> Result<Absent, StoreError> {
        match self.kv.update(key, value, 0).await {
            Ok(_) => Ok(Absent::Created),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                // A deleted key (a forgotten job's, its delete marker in place) may be written again, at the
                // marker's revision.
                match self.kv.entry(key).await.map_err(StoreError::unavailable)? {
                    Some(entry) if entry.operation != kv::Operation::Put => {
                        Ok(Absent::DeletedAt(entry.revision))
                    }
                    // Taken, or purged meanwhile (the caller reads again and retries).
                    _ => Ok(Absent::Taken),
                }
            }
            Err(e) => Err(StoreError::unavailable(e)),
        }
    }

    /// The keys under `prefix` (which ends with '.'), deleted ones included: one stream-info request whose
    /// subject filter the server resolves from its subject index, instead of listing every key of the bucket.
    async fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let subjects: Vec<(String, usize)> = self
            .kv
            .stream
            .info_with_subjects(self.subjects_under(prefix))
            .await
            .map_err(StoreError::unavailable)?
            .try_collect()
            .await
            .map_err(StoreError::unavailable)?;
        let mut keys: Vec<String> = subjects
            .into_iter()
            .filter_map(|(subject, _)| subject.strip_prefix(&self.kv.prefix).map(str::to_string))
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// The bucket's subjects of the keys under `prefix` (which ends with '.').
    fn subjects_under(&self, prefix: &str) -> String {
        format!("{}{prefix}>", self.kv.prefix)
    }

    /// Removes the purge marker a forgotten job's record left at `revision` (its watchers have seen it by now), if
    /// it is still the key's last message: every later write (a new job under the same id) stays. Markers are kept
    /// for ever otherwise, one per job ever forgotten, and every watch and listing reads them all.
    pub async fn drop_marker(&self, key: &str, revision: u64) -> Result<(), StoreError> {
        self.kv
            .stream
            .purge()
            .filter(format!("{}{key}", self.kv.prefix))
            .sequence(revision + 1)
            .await
            .map(drop)
            .map_err(StoreError::unavailable)
    }

    /// Removes every key under `prefix` with one filtered purge of the bucket's stream: no tombstone stays behind
    /// (no watcher needs one for item records and claims: the job record's purge drops the job).
    async fn purge_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        self.kv
            .stream
            .purge()
            .filter(self.subjects_under(prefix))
            .await
            .map(drop)
            .map_err(StoreError::unavailable)
    }
}

fn contention(key: &str) -> StoreError {
    StoreError::unavailable(format!(
        "{key}: still changing after {CAS_ATTEMPTS} compare-and-set attempts"
    ))
}

#[async_trait]
impl JobStore for NatsJobStore {
    async fn create(&self, job: &JobRecord) -> Result<Created, StoreError> {
        let key = job_key(&job.user_id, &job.job_id);
        for _ in 0..CAS_ATTEMPTS {
            if self.compare_and_set(&key, job.encode(), None).await? {
                return Ok(Created::New);
            }
            // Taken: by whom? (It may have been deleted again in between: then try once more.)
            if let Some((bytes, _)) = self.entry(&key).await? {
                let existing = JobRecord::decode(&bytes).ok_or(StoreError::Corrupt { key })?;
                return Ok(Created::Existing(Box::new(existing)));
            }
        }
        Err(contention(&key))
    }

    async fn put_item(&self, job: &RecordKey, item: &Item) -> Result<Written, StoreError> {
        let key = format!("{}{}", items_prefix(job), item.idx);
        for _ in 0..CAS_ATTEMPTS {
            let current = self.entry(&key).await?;
            if let Some((bytes, _)) = &current {
                let recorded = durable::decode(bytes)
                    .ok_or_else(|| StoreError::Corrupt { key: key.clone() })?;
                if recorded.state != item.state {
                    return Ok(Written::Conflict(Box::new(recorded)));
                }
            }
            let revision = current.map(|(_, revision)| revision);
            if self
                .compare_and_set(&key, durable::encode(item), revision)
                .await?
            {
                return Ok(Written::Stored);
            }
        }
        Err(contention(&key))
    }

    async fn put_first_item(
        &self,
        job: &RecordKey,
        item: &Item,
        retried: bool,
    ) -> Result<Written, StoreError> {
        // Retention purges a forgotten job's items without tombstones: an end reported after that (a second holder of
        // the item's task, its lease passed on during a NATS blip) found the key free, was recorded and called back
        // after the first end was (COMPLETED, then FAILED), and a later run of the job id took it for its own.
        match self.job(&job.user_id, &job.job_id).await {
            Ok(Some(record)) if record.spec_hash == job.spec_hash => {}
            Ok(_) => return Ok(Written::Forgotten),
            // A record this release cannot decode (a newer release's): whose it is cannot be told; written as before.
            Err(StoreError::Corrupt { .. }) => {}
            Err(e) => return Err(e),
        }
        let key = format!("{}{}", items_prefix(job), item.idx);
        for _ in 0..CAS_ATTEMPTS {
            if self
                .compare_and_set(&key, durable::encode(item), None)
                .await?
            {
                return Ok(Written::Stored);
            }
            if let Some((bytes, _)) = self.entry(&key).await? {
                let recorded = durable::decode(&bytes)
                    .ok_or_else(|| StoreError::Corrupt { key: key.clone() })?;
                // Exactly this record after a failed call: this report's own write, whose answer was lost (NATS
                // went away after committing it). Reported, or its callback would never be sent. Without a failed
                // call it is another holder's (the same item run twice to the same keys): that one reports it.
                if retried && recorded == *item {
                    return Ok(Written::Stored);
                }
                return Ok(Written::Conflict(Box::new(recorded)));
            }
        }
        Err(contention(&key))
    }

    async fn cancel(&self, job: &RecordKey) -> Result<(), StoreError> {
        let key = job_key(&job.user_id, &job.job_id);
        for _ in 0..CAS_ATTEMPTS {
            let Some((bytes, revision)) = self.entry(&key).await? else {
                return Ok(());
            };
            let mut record =
                JobRecord::decode(&bytes).ok_or(StoreError::Corrupt { key: key.clone() })?;
            if record.spec_hash != job.spec_hash || record.cancelled {
                return Ok(());
            }
            record.cancelled = true;
            if self
                .compare_and_set(&key, record.encode(), Some(revision))
                .await?
            {
                return Ok(());
            }
        }
        Err(contention(&key))
    }

    async fn load(&self) -> Result<Vec<StoredJob>, StoreError> {
        let mut out = Vec::new();
        for key in self.keys_with_prefix("job.").await? {
            let Some((bytes, _)) = self.entry(&key).await? else {
                continue;
            };
            let record = JobRecord::decode(&bytes).ok_or(StoreError::Corrupt { key })?;
            let mut items = Vec::new();
            for key in self.keys_with_prefix(&items_prefix(&record.key())).await? {
                if let Some((bytes, _)) = self.entry(&key).await? {
                    items.push(durable::decode(&bytes).ok_or(StoreError::Corrupt { key })?);
                }
            }
            items.sort_by_key(|i| i.idx);
            out.push(StoredJob { record, items });
        }
        out.sort_by_key(|j| j.record.seq);
        Ok(out)
    }

    async fn forget(&self, runs: &[RunKey]) -> Result<(), StoreError> {
        'runs: for run in runs {
            let job = &run.job;
            let key = job_key(&job.user_id, &job.job_id);
            // Only the record read: between the read and the purge another replica may have forgotten it and a new
            // job (another spec under the same id, or a new run of this one) been recorded, which an unconditional
            // purge deleted. A record rewritten meanwhile for the same run (a cancel) is read again and purged at its
            // new revision.
            for _ in 0..CAS_ATTEMPTS {
                let Some((bytes, revision)) = self.entry(&key).await? else {
                    break;
                };
                let Some(recorded) =
                    JobRecord::decode(&bytes).filter(|r| r.spec_hash == job.spec_hash)
                else {
                    break;
                };
                if recorded.seq != run.seq {
                    // A new run of this spec: the items and claims under its key are its own.
                    continue 'runs;
                }
                match self.kv.purge_expect_revision(&key, Some(revision)).await {
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                    other => {
                        other.map_err(StoreError::unavailable)?;
                        break;
                    }
                }
            }
            // Items and claims are keyed by spec hash: the old job's go whatever became of the record.
            self.purge_prefix(&items_prefix(job)).await?;
            self.purge_prefix(&claims_prefix(job)).await?;
        }
        Ok(())
    }
}
