//! The stored form of a job: JSON around the submitted spec's protobuf bytes (base64), so a record stays readable
//! with `jq` while the spec round-trips exactly.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use palette_proto::orchestrator::v1::JobSpec;
use serde::{Deserialize, Serialize};

use super::RecordKey;

/// A job as recorded at SubmitJob (and CancelJob).
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub user_id: String,
    pub job_id: String,
    /// `store::spec_hash` of the effective spec: what idempotency compares, and part of every item record's key.
    pub spec_hash: String,
    /// The spec as submitted: a resumed job is planned from it again.
    pub spec: JobSpec,
    /// Submission order; resumed jobs keep it, so retention forgets the oldest first across restarts too.
    pub seq: u64,
    pub cancelled: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Stored {
    user_id: String,
    job_id: String,
    spec_hash: String,
    /// base64 of the protobuf-encoded `JobSpec`.
    spec: String,
    seq: u64,
    #[serde(default)]
    cancelled: bool,
}

impl JobRecord {
    pub fn key(&self) -> RecordKey {
        RecordKey {
            user_id: self.user_id.clone(),
            job_id: self.job_id.clone(),
            spec_hash: self.spec_hash.clone(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let stored = Stored {
            user_id: self.user_id.clone(),
            job_id: self.job_id.clone(),
            spec_hash: self.spec_hash.clone(),
            spec: STANDARD.encode(prost::Message::encode_to_vec(&self.spec)),
            seq: self.seq,
            cancelled: self.cancelled,
        };
        serde_json::to_vec(&stored).unwrap_or_default()
    }

    /// None when the bytes are not a job record.
    pub fn decode(bytes: &[u8]) -> Option<JobRecord> {
        let stored: Stored = serde_json::from_slice(bytes).ok()?;
        let spec_bytes = STANDARD.decode(stored.spec).ok()?;
        let spec = <JobSpec as prost::Message>::decode(&spec_bytes[..]).ok()?;
        Some(JobRecord {
            user_id: stored.user_id,
            job_id: stored.job_id,
            spec_hash: stored.spec_hash,
            spec,
            seq: stored.seq,
            cancelled: stored.cancelled,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let record = JobRecord {
            user_id: "u".into(),
            job_id: "j".into(),
            spec_hash: "ab".repeat(32),
            spec: JobSpec {
                user_id: "u".into(),
                job_id: "j".into(),
                concepts: vec!["wall".into()],
                image_count: 3,
                ..Default::default()
            },
            seq: 7,
            cancelled: true,
        };
        assert_eq!(JobRecord::decode(&record.encode()), Some(record));
        assert_eq!(JobRecord::decode(b"{}"), None);
        assert_eq!(JobRecord::decode(b"not json"), None);
    }
}
