//! The job store in a NATS JetStream key-value bucket, shared by every replica: the record layer of the distributed
//! store designed in docs/architecture.md ("Job state"). Every change is a compare-and-set on the key's revision
//! (`create` = "only if absent", `update` = "only if still at the revision read"), so two replicas writing one item
//! cannot both win. JOB_STORE=nats: `jobs::cluster` adds the bucket's watch (every replica's view of every job) and
//! the work stream that spreads items over the replicas.
//!
//! Keys: `job.{userId}.{jobId}` and `item.{userId}.{jobId}.{specHash}.{idx}`. Ids may contain '.', the subject token
//! separator; it is written `=2E` ('=' never occurs in an id), so each id stays one token and prefixes stay exact.

use async_nats::jetstream::{self, kv};
use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use palette_proto::orchestrator::v1::Item;

use super::{Created, JobRecord, JobStore, RecordKey, StoreError, StoredJob, Written};
use crate::jobs::durable;

/// Compare-and-set attempts before a write gives up: each failed one means another replica wrote the key meanwhile.
const CAS_ATTEMPTS: usize = 16;

#[derive(Debug, Clone)]
pub struct NatsJobStore {
    kv: kv::Store,
}

fn token(id: &str) -> String {
    id.replace('.', "=2E")
}

fn job_key(user_id: &str, job_id: &str) -> String {
    format!("job.{}.{}", token(user_id), token(job_id))
}

fn items_prefix(job: &RecordKey) -> String {
    format!(
        "item.{}.{}.{}.",
        token(&job.user_id),
        token(&job.job_id),
        job.spec_hash
    )
}

/// What a key of the bucket names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOf {
    Job { user_id: String, job_id: String },
    Item { job: RecordKey, idx: u32 },
}

/// The ids and index a key was made from; None for a key this store does not write.
pub fn parse_key(key: &str) -> Option<KeyOf> {
    let id = |t: &str| t.replace("=2E", ".");
    let parts: Vec<&str> = key.split('.').collect();
    match parts.as_slice() {
        ["job", user, job] => Some(KeyOf::Job {
            user_id: id(user),
            job_id: id(job),
        }),
        ["item", user, job, hash, idx] => Some(KeyOf::Item {
            job: RecordKey {
                user_id: id(user),
                job_id: id(job),
                spec_hash: hash.to_string(),
            },
            idx: idx.parse().ok()?,
        }),
        _ => None,
    }
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

    /// Writes `value` if the key is still at `revision` (None: absent). False when another writer came first.
    async fn compare_and_set(
        &self,
        key: &str,
        value: Vec<u8>,
        revision: Option<u64>,
    ) -> Result<bool, StoreError> {
        let written = match revision {
            None => match self.kv.create(key, value.into()).await {
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => return Ok(false),
                other => other.map(drop).map_err(StoreError::unavailable),
            },
            Some(revision) => match self.kv.update(key, value.into(), revision).await {
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => return Ok(false),
                other => other.map(drop).map_err(StoreError::unavailable),
            },
        };
        written.map(|()| true)
    }

    async fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let keys: Vec<String> = self
            .kv
            .keys()
            .await
            .map_err(StoreError::unavailable)?
            .try_collect()
            .await
            .map_err(StoreError::unavailable)?;
        Ok(keys.into_iter().filter(|k| k.starts_with(prefix)).collect())
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

    async fn put_first_item(&self, job: &RecordKey, item: &Item) -> Result<Written, StoreError> {
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
                // Exactly this record: this write's own, whose answer was lost (NATS went away after committing
                // it, and the write was retried). Reported, or its callback would never be sent.
                if recorded == *item {
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

    async fn forget(&self, jobs: &[RecordKey]) -> Result<(), StoreError> {
        for job in jobs {
            let key = job_key(&job.user_id, &job.job_id);
            if let Some((bytes, _)) = self.entry(&key).await?
                && JobRecord::decode(&bytes).is_some_and(|r| r.spec_hash == job.spec_hash)
            {
                self.kv.purge(&key).await.map_err(StoreError::unavailable)?;
            }
            for item in self.keys_with_prefix(&items_prefix(job)).await? {
                self.kv
                    .purge(&item)
                    .await
                    .map_err(StoreError::unavailable)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_with_dots_stay_one_token() {
        assert_eq!(job_key("u.1", "j"), "job.u=2E1.j");
        let job = RecordKey {
            user_id: "u".into(),
            job_id: "a.b".into(),
            spec_hash: "h".into(),
        };
        assert_eq!(items_prefix(&job), "item.u.a=2Eb.h.");
        // "a" must not list "a.b"'s items.
        let other = RecordKey {
            job_id: "a".into(),
            ..job.clone()
        };
        assert!(!items_prefix(&job).starts_with(&items_prefix(&other)));
        assert_eq!(
            parse_key("item.u.a=2Eb.h.12"),
            Some(KeyOf::Item {
                job: job.clone(),
                idx: 12
            })
        );
        assert_eq!(
            parse_key(&job_key("u.1", "j")),
            Some(KeyOf::Job {
                user_id: "u.1".into(),
                job_id: "j".into()
            })
        );
        assert_eq!(parse_key("item.u.j.h.x"), None);
        assert_eq!(parse_key("other"), None);
    }
}
