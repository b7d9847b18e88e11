//! What must outlive the process: job records (submitted jobs and edits) and terminal item records, behind one trait (`JobStore`) so the
//! embedded store (`local`, a redb file) and a distributed one can stand in for each other. The design, with the
//! order of writes that gives one terminal state and one callback per item, is in docs/architecture.md ("Job state").

mod local;
mod nats;
mod record;

use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use palette_proto::orchestrator::v1::Item;

use super::job::JobHandle;
pub use super::job::{plan_hash, spec_hash};

pub use local::LocalJobStore;
pub use nats::{KeyOf, NatsJobStore, RunClaim, parse_key};
pub use record::JobRecord;

/// A job as the store keys it: its user, its id and the hash of its effective spec, so a job id reused with another
/// spec is another job whose items never mix with the first one's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordKey {
    pub user_id: String,
    pub job_id: String,
    pub spec_hash: String,
}

/// One run of a job: its key and its record's `seq` (when it was submitted). A job id may be submitted again with
/// the same spec once the first run was forgotten; the seq tells the two runs apart, so forgetting the first never
/// deletes the second's record or items.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RunKey {
    pub job: RecordKey,
    pub seq: u64,
}

/// A recorded job and the items it recorded as terminal (the others are to run).
#[derive(Debug, Clone)]
pub struct StoredJob {
    pub record: JobRecord,
    pub items: Vec<Item>,
}

/// What `JobStore::create` found.
#[derive(Debug)]
pub enum Created {
    New,
    /// A record was already under the (user id, job id); the caller compares its `spec_hash`.
    Existing(Box<JobRecord>),
}

/// What `JobStore::put_item` did.
#[derive(Debug, PartialEq)]
pub enum Written {
    Stored,
    /// The item already ended in another terminal state, kept as recorded (returned).
    Conflict(Box<Item>),
    /// `put_first_item`, JOB_STORE=nats: the job is no longer recorded (forgotten meanwhile): nothing written, and the
    /// end is not reported (its item's first end was, before the job could be forgotten).
    Forgotten,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be read or written (disk, file lock, corruption); `source` says why.
    #[error("job store unavailable")]
    Unavailable(#[source] crate::error::BoxError),
    /// A record that does not decode: written by something else, or damaged.
    #[error("job store record {key:?} is unreadable")]
    Corrupt { key: String },
}

impl StoreError {
    pub fn unavailable(source: impl Into<crate::error::BoxError>) -> Self {
        StoreError::Unavailable(source.into())
    }

    /// As a gRPC caller sees it: only an unreachable store is worth a retry (UNAVAILABLE); a record that does not
    /// decode (written by a newer binary, or damaged) reads the same however often it is asked (INTERNAL).
    pub fn into_api(self) -> crate::error::ApiError {
        use crate::error::ApiError;
        match self {
            StoreError::Unavailable(_) => ApiError::StoreUnavailable(self.into()),
            StoreError::Corrupt { .. } => ApiError::Internal {
                what: crate::error::report(&self),
            },
        }
    }
}

/// Durable job state; see docs/architecture.md, "Job state", for what each call promises.
#[async_trait]
pub trait JobStore: Send + Sync + Debug {
    /// Records a new job, or hands back the record already under its (user id, job id).
    async fn create(&self, job: &JobRecord) -> Result<Created, StoreError>;
    /// Writes a terminal item of the job. The first terminal state recorded wins; the same state may be written
    /// again (its callback settled).
    async fn put_item(&self, job: &RecordKey, item: &Item) -> Result<Written, StoreError>;
    /// The first report of an item that just ended in this process: stored only if no record exists yet, otherwise
    /// `Conflict` with the record, even one of the same state (JOB_STORE=nats: two replicas that ended one item the
    /// same way must not both call it back), and even an identical one (two holders of one task that ran its item
    /// to the same keys). `retried`: an earlier call for this report failed, so a record identical to `item` may be
    /// that call's own write whose answer was lost: `Stored`. A store with one writer per job may keep `put_item`'s
    /// behaviour.
    async fn put_first_item(
        &self,
        job: &RecordKey,
        item: &Item,
        retried: bool,
    ) -> Result<Written, StoreError> {
        let _ = retried;
        self.put_item(job, item).await
    }
    /// Marks the job cancelled.
    async fn cancel(&self, job: &RecordKey) -> Result<(), StoreError>;
    /// Every job recorded, in submission order, with its terminal items.
    async fn load(&self) -> Result<Vec<StoredJob>, StoreError>;
    /// Deletes the runs and all their items. A record of another run under the same id stays: a later run of another
    /// spec (its items are keyed apart), or of the same spec (its items are the ones under the key: they stay too).
    async fn forget(&self, runs: &[RunKey]) -> Result<(), StoreError>;
}

pub type SharedJobStore = Arc<dyn JobStore>;

/// The embedded store in the file at `path` (created with its directory if missing).
pub fn open_local(path: &Path) -> Result<SharedJobStore, StoreError> {
    Ok(Arc::new(LocalJobStore::open(path)?))
}

/// The job's key in the job store.
pub fn key_of(job: &JobHandle) -> RecordKey {
    RecordKey {
        user_id: job.plan.user_id.clone(),
        job_id: job.plan.job_id.clone(),
        spec_hash: job.spec_hash.clone(),
    }
}

/// The job's run in the job store.
pub fn run_of(job: &JobHandle) -> RunKey {
    RunKey {
        job: key_of(job),
        seq: job.seq,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palette_proto::orchestrator::v1::JobSpec;

    #[test]
    fn equal_specs_hash_equally_and_different_ones_do_not() {
        let spec = |color: &str| JobSpec {
            user_id: "u".into(),
            job_id: "j".into(),
            concepts: vec!["wall".into()],
            image_count: 2,
            rules: vec![palette_proto::orchestrator::v1::Rule {
                rule_id: "r".into(),
                concept: "wall".into(),
                r#type: "recolor".into(),
                params: Some(prost_types::Struct {
                    fields: [
                        ("color".to_string(), string_value(color)),
                        ("strength".to_string(), string_value("0.5")),
                    ]
                    .into(),
                }),
            }],
            preset: String::new(),
            output_format: String::new(),
        };
        assert_eq!(spec_hash(&spec("#fff")), spec_hash(&spec("#fff")));
        assert_ne!(spec_hash(&spec("#fff")), spec_hash(&spec("#000")));
        assert_eq!(spec_hash(&spec("#fff")).len(), 64);
    }

    #[test]
    fn only_an_unreachable_store_is_worth_a_retry() {
        let code = |e: StoreError| tonic::Status::from(e.into_api()).code();
        let corrupt = StoreError::Corrupt {
            key: "job.u.j".into(),
        };
        assert_eq!(code(corrupt), tonic::Code::Internal);
        let down = StoreError::unavailable(std::io::Error::other("no responders"));
        assert_eq!(code(down), tonic::Code::Unavailable);
    }

    fn string_value(s: &str) -> prost_types::Value {
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(s.into())),
        }
    }
}
