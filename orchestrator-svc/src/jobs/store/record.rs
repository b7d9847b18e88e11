//! The stored form of a job: JSON around the submitted spec's protobuf bytes (base64), so a record stays readable
//! with `jq` while the spec round-trips exactly.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use palette_proto::orchestrator::v1::JobSpec;
use palette_rules::preset::Preset;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

use super::RecordKey;
use crate::jobs::validate::EditSource;

/// A job as recorded at SubmitJob (and CancelJob).
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub user_id: String,
    pub job_id: String,
    /// `store::spec_hash` of the effective spec (for an edit, `job::plan_hash`: below): what idempotency compares,
    /// and part of every item record's key.
    pub spec_hash: String,
    /// The spec as submitted: a resumed job is planned from it again.
    pub spec: JobSpec,
    /// Submission order; resumed jobs keep it, so retention forgets the oldest first across restarts too.
    pub seq: u64,
    pub cancelled: bool,
    /// An edit (EditJob): where its photos and masks are. `spec` is then the edit's effective spec (the source's
    /// concepts and image count with the edit's rules), and `spec_hash` covers the source too (`job::plan_hash`).
    pub source: Option<EditSource>,
    /// The preset the spec names, as it was at submission: a resumed job (and every replica's share of it) is
    /// planned with it, so a preset file changed or removed since does not change nor fail a job already accepted.
    /// None when the spec names none, and in records written before presets were kept.
    pub preset: Option<Arc<Preset>>,
}

/// `EditSource` as stored.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StoredSource {
    source_job_id: String,
    photos_job_id: String,
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
    /// Absent for a submitted job (and in records written before edits were kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    edit_of: Option<StoredSource>,
    /// Absent when the spec names no preset (and in records written before presets were kept). A binary older than
    /// this field reads such a record as unreadable (`deny_unknown_fields`): on NATS it puts the task back for an
    /// upgraded replica, as for any record it cannot read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    preset: Option<Preset>,
}

impl JobRecord {
    pub fn key(&self) -> RecordKey {
        RecordKey {
            user_id: self.user_id.clone(),
            job_id: self.job_id.clone(),
            spec_hash: self.spec_hash.clone(),
        }
    }

    pub fn run(&self) -> super::RunKey {
        super::RunKey {
            job: self.key(),
            seq: self.seq,
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
            edit_of: self.source.as_ref().map(|s| StoredSource {
                source_job_id: s.source_job_id.clone(),
                photos_job_id: s.photos_job_id.clone(),
            }),
            preset: self.preset.as_deref().cloned(),
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
            source: stored.edit_of.map(|s| EditSource {
                source_job_id: s.source_job_id,
                photos_job_id: s.photos_job_id,
            }),
            preset: stored.preset.map(Arc::new),
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
            source: None,
            preset: None,
        };
        assert_eq!(JobRecord::decode(&record.encode()), Some(record.clone()));
        assert!(
            !String::from_utf8(record.encode())
                .unwrap()
                .contains("preset"),
            "a job without a preset is recorded as before (older binaries read it)"
        );
        let with_preset = JobRecord {
            preset: Some(Arc::new(Preset {
                name: "house".into(),
                concepts: vec!["wall".into(), "floor".into()],
                priorities: [("floor".to_string(), 1)].into(),
                rule_defaults: [(
                    "recolor".to_string(),
                    serde_json::json!({"finish": "matte", "feather": 1.5})
                        .as_object()
                        .unwrap()
                        .clone(),
                )]
                .into(),
                output_format: Some("png".into()),
            })),
            ..record.clone()
        };
        assert_eq!(
            JobRecord::decode(&with_preset.encode()),
            Some(with_preset.clone())
        );
        let edit = JobRecord {
            source: Some(EditSource {
                source_job_id: "src".into(),
                photos_job_id: "photos".into(),
            }),
            ..record
        };
        assert_eq!(JobRecord::decode(&edit.encode()), Some(edit));
        assert_eq!(JobRecord::decode(b"{}"), None);
        assert_eq!(JobRecord::decode(b"not json"), None);
    }
}
