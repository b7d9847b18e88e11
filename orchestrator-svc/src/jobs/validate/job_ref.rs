//! The job a GetJob/WatchJob/CancelJob request names: (user_id, job_id), both checked like a spec's ids.
//!
//! Jobs are scoped by user, so a lookup needs both ids: another user's job is NOT_FOUND, exactly as a job that does
//! not exist (the answer must not tell a caller which job ids other users have).

use palette_proto::orchestrator::v1::{CancelJobRequest, GetJobRequest, JobSpec, WatchJobRequest};

use super::{Validate, Violations};
use crate::keys;

/// A job's identity: the registry's key. Two users may each have a job with the same job id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobKey {
    pub user_id: String,
    pub job_id: String,
}

impl JobKey {
    /// The key of a submitted spec (its ids were checked when it was accepted).
    pub fn of_spec(spec: &JobSpec) -> JobKey {
        JobKey {
            user_id: spec.user_id.clone(),
            job_id: spec.job_id.clone(),
        }
    }

    /// Both ids checked as in a JobSpec; each bad one is a violation of its field.
    fn checked(user_id: &str, job_id: &str, v: &mut Violations) -> Option<JobKey> {
        let before = v.is_empty();
        for (field, id) in [("user_id", user_id), ("job_id", job_id)] {
            if let Some(problem) = keys::id_problem(id) {
                v.add(field, problem);
            }
        }
        (before == v.is_empty()).then(|| JobKey {
            user_id: user_id.to_string(),
            job_id: job_id.to_string(),
        })
    }
}

impl std::fmt::Display for JobKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.user_id, self.job_id)
    }
}

macro_rules! validate_job_ref {
    ($($message:ty),*) => {$(
        impl Validate<()> for $message {
            type Valid = JobKey;
            fn validate(&self, (): (), v: &mut Violations) -> Option<JobKey> {
                JobKey::checked(&self.user_id, &self.job_id, v)
            }
        }
    )*};
}

validate_job_ref!(GetJobRequest, WatchJobRequest, CancelJobRequest);

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(request: GetJobRequest) -> Vec<String> {
        let mut v = Violations::default();
        let key = request.validate((), &mut v);
        assert_eq!(key.is_some(), v.is_empty());
        v.fields().into_iter().map(String::from).collect()
    }

    #[test]
    fn both_ids_are_required_and_checked() {
        assert!(
            fields(GetJobRequest {
                job_id: "j".into(),
                user_id: "u".into(),
            })
            .is_empty()
        );
        assert_eq!(
            fields(GetJobRequest {
                job_id: "j".into(),
                ..Default::default()
            }),
            ["user_id"]
        );
        assert_eq!(
            fields(GetJobRequest {
                job_id: "../x".into(),
                user_id: "u/v".into(),
            }),
            ["user_id", "job_id"]
        );
    }
}
