//! Per-item callbacks to the upstream API: the seed's body and headers, plus Standard Webhooks signatures and
//! a retry policy that a receiver can deduplicate.

mod deliver;
mod sign;
mod transport;

use serde::Serialize;
use sha2::{Digest, Sha256};

pub use deliver::{CallbackSender, Clock, DeliveryOutcome, RetryPolicy, SystemClock};
pub use sign::{VerifyError, sign, verify};
pub(crate) use sign::{is_standard_base64, key_len};
pub use transport::{Answer, Transport};

/// The seed's body (`idx`, `status`, `output_key`, `preview_key`, `error`) extended with the job it is about, every
/// output, every mask and a machine-readable error code. Absent values are JSON `null`, as in the seed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CallbackBody {
    pub idx: u32,
    /// "completed" | "failed" | "cancelled"
    pub status: &'static str,
    pub output_key: Option<String>,
    pub preview_key: Option<String>,
    pub error: Option<String>,
    pub error_code: Option<String>,
    /// The job's user and id. The URL names only the job id (the seed's contract), and two users may use one job id
    /// (jobs are scoped by user): a receiver keys items on (user_id, job_id, idx), or a failed item of one user's
    /// job could be taken for another's.
    pub user_id: String,
    pub job_id: String,
    pub outputs: Vec<OutputRef>,
    pub masks: Vec<MaskRef>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OutputRef {
    pub rule_id: String,
    pub output_key: String,
    /// False when the rule had nothing to edit in this photo (its output is the photo as it was).
    pub applied: bool,
    /// Why not: `concept_not_found`, `region_empty` or `nothing_to_fill_from`; null when applied.
    pub not_applied_reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MaskRef {
    pub concept: String,
    pub instance: u32,
    pub key: String,
    /// Where the instance is non-zero: width x height pixels from (x, y) of the image_width x image_height photo
    /// (upright). With grid_width 0 the stored PNG is that crop (its oFFs chunk says (x, y)), or, as large as the
    /// photo, the full-frame mask itself (`MASK_LAYOUT=full`); otherwise it is the model's grid_width x grid_height
    /// mask of the whole photo, resized to the photo and zeroed outside the rectangle to compose (docs/api.md).
    /// Zero for full-frame masks stored before crops.
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    pub image_width: u32,
    pub image_height: u32,
    pub grid_width: u32,
    pub grid_height: u32,
}

/// The job a callback is about. Its URL names `job_id` (the seed's contract); its webhook-id also covers the user
/// and the hash of the job's effective spec, so a job id used again (by another user, or with another spec after the
/// first job expired) never repeats an earlier job's webhook-ids, which receivers would drop as duplicates.
#[derive(Debug, Clone, Copy)]
pub struct CallbackJob<'a> {
    pub user_id: &'a str,
    pub job_id: &'a str,
    /// `jobs::store::spec_hash` of the job (for an edit, of its spec and source): the same after a restart and on
    /// every replica, so a resend keeps its webhook-id.
    pub spec_hash: &'a str,
}

/// Stable per event: the same on every retry, every restart of the sender and every replica, different for
/// different terminal states of one item and for different jobs under one job id. (The seed's key mixed in the
/// attempt number and the minute, so it could not deduplicate.) Ids never contain a newline: the fields stay apart.
pub fn idempotency_key(job: CallbackJob<'_>, idx: u32, status: &str) -> String {
    let CallbackJob {
        user_id,
        job_id,
        spec_hash,
    } = job;
    let digest =
        Sha256::digest(format!("{user_id}\n{job_id}\n{spec_hash}\n{idx}\n{status}").as_bytes());
    hex::encode(digest)[..32].to_string()
}

/// The URL without credentials, query or fragment: what logs and errors may show of WORKERS_API_URL.
pub fn redacted_url(raw: &str) -> String {
    match reqwest::Url::parse(raw) {
        Ok(mut url) => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.set_query(None);
            url.set_fragment(None);
            url.to_string()
        }
        Err(_) => "<unparsable URL>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: CallbackJob<'static> = CallbackJob {
        user_id: "u",
        job_id: "test-job",
        spec_hash: "h1",
    };

    #[test]
    fn idempotency_key_is_stable_and_event_specific() {
        let a = idempotency_key(JOB, 0, "completed");
        assert_eq!(a, idempotency_key(JOB, 0, "completed"));
        assert_eq!(a.len(), 32);
        assert_ne!(a, idempotency_key(JOB, 0, "failed"));
        assert_ne!(a, idempotency_key(JOB, 1, "completed"));
    }

    #[test]
    fn a_job_id_used_again_gets_other_ids() {
        let a = idempotency_key(JOB, 0, "completed");
        let respecified = CallbackJob {
            spec_hash: "h2",
            ..JOB
        };
        let other_user = CallbackJob {
            user_id: "v",
            ..JOB
        };
        assert_ne!(a, idempotency_key(respecified, 0, "completed"));
        assert_ne!(a, idempotency_key(other_user, 0, "completed"));
    }

    #[test]
    fn body_keeps_the_seed_fields() {
        let body = CallbackBody {
            user_id: "u".into(),
            job_id: "j".into(),
            idx: 0,
            status: "completed",
            output_key: Some("outputs/u/j/r/0.jpg".into()),
            preview_key: Some("previews/u/j/0_preview.jpg".into()),
            error: None,
            error_code: None,
            outputs: vec![OutputRef {
                rule_id: "r".into(),
                output_key: "outputs/u/j/r/0.jpg".into(),
                applied: true,
                not_applied_reason: None,
            }],
            masks: vec![],
        };
        let json: serde_json::Value = serde_json::to_value(&body).unwrap();
        for field in ["idx", "status", "output_key", "preview_key", "error"] {
            assert!(json.get(field).is_some(), "missing {field}");
        }
        assert!(json["error"].is_null());
        assert_eq!(
            (&json["user_id"], &json["job_id"]),
            (&"u".into(), &"j".into())
        );
    }
}
