//! The bucket's keys: `job.{userId}.{jobId}` (job records), `item.{userId}.{jobId}.{specHash}.{idx}` (terminal
//! items) and `run.{userId}.{jobId}.{specHash}.{idx}` (the claim of the replica running the item: progress for the
//! other replicas' views, overwritten by the task's next holder, superseded by the item record). Ids may contain '.',
//! the subject token separator; it is written `=2E` ('=' never occurs in an id), so each id stays one token and
//! prefixes stay exact.

use serde::{Deserialize, Serialize};

use super::super::RecordKey;

fn token(id: &str) -> String {
    id.replace('.', "=2E")
}

pub(super) fn job_key(user_id: &str, job_id: &str) -> String {
    format!("job.{}.{}", token(user_id), token(job_id))
}

pub(super) fn items_prefix(job: &RecordKey) -> String {
    per_item_prefix("item", job)
}

pub(super) fn claims_prefix(job: &RecordKey) -> String {
    per_item_prefix("run", job)
}

fn per_item_prefix(kind: &str, job: &RecordKey) -> String {
    format!(
        "{kind}.{}.{}.{}.",
        token(&job.user_id),
        token(&job.job_id),
        job.spec_hash
    )
}

/// Who runs an item, as its `run.*` key records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunClaim {
    /// The replica holding the item's task (`Cluster::replica_id`).
    pub replica: String,
    /// Which delivery of the task this is (1 = the first).
    pub delivery: u64,
}

/// What a key of the bucket names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOf {
    Job {
        user_id: String,
        job_id: String,
    },
    Item {
        job: RecordKey,
        idx: u32,
    },
    /// An item's `RunClaim`.
    Run {
        job: RecordKey,
        idx: u32,
    },
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
        [kind @ ("item" | "run"), user, job, hash, idx] => {
            let job = RecordKey {
                user_id: id(user),
                job_id: id(job),
                spec_hash: hash.to_string(),
            };
            let idx = idx.parse().ok()?;
            Some(match *kind {
                "item" => KeyOf::Item { job, idx },
                _ => KeyOf::Run { job, idx },
            })
        }
        _ => None,
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
        assert_eq!(
            parse_key("run.u.a=2Eb.h.3"),
            Some(KeyOf::Run {
                job: job.clone(),
                idx: 3
            })
        );
        assert_eq!(claims_prefix(&job), "run.u.a=2Eb.h.");
        assert_eq!(parse_key("item.u.j.h.x"), None);
        assert_eq!(parse_key("other"), None);
    }
}
