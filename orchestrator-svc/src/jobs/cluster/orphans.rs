//! Jobs whose item tasks arrived with no job record. A submitter publishes a job's tasks before it records the job,
//! so a task waits a while for the record; a submission whose record then failed leaves every one of its tasks an
//! orphan. Each waiting on its own, the tasks of a 500-image job held this replica's permits 60 s per batch of
//! BATCH_CONCURRENCY (two replicas of four: an hour). Timed from the job's first orphan task instead, the tasks after
//! the first batch wait only a short grace each.
//!
//! The same job submitted again (same ids, same spec) after its first submission's record failed publishes new
//! tasks under the same key. Timed from the first submission's orphans, they got only the short grace each: those
//! published more than a grace before the record was written were dropped, and their items stayed PENDING with
//! no task. A task published well after the first orphan of its key (by JetStream's own clock, so no replica's
//! clock is compared with the server's) belongs to a later submission: its key's wait starts again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::datetime::{DateTime, add_std_duration};
use tokio::time::Instant;

use crate::jobs::store::RecordKey;

/// Forgotten this long after its first sighting (a job dropped long ago; another of the same ids is a new wait).
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// A task published this long after the first orphan of its key is a later submission's. Publishing one
/// submission's tasks takes far less (a 500-image job: well under a second on a healthy stream); a slower one
/// only waits longer for a record that is about to come.
const RESUBMITTED_AFTER: Duration = Duration::from_secs(20);

#[derive(Debug)]
struct Sighting {
    at: Instant,
    /// JetStream's publish time of that first orphan task, when the message said.
    published: Option<DateTime>,
}

#[derive(Debug, Default)]
pub struct Orphans {
    /// Per job run (its spec hash included): the orphans of a submission that failed and those of a resubmission
    /// of the job id with another spec wait apart, and finding the second one's record does not restart the first
    /// one's wait (its tasks, which never find a record of their spec, then held permits as long as the second
    /// job's tasks kept coming).
    first_seen: Mutex<HashMap<RecordKey, Sighting>>,
}

impl Orphans {
    /// How long ago a task of `job` was first found without its record (zero, and from now, for the first, or for
    /// the first of a later submission: a task `published` well after the first orphan seen of the key).
    pub fn waited(&self, job: &RecordKey, published: Option<DateTime>) -> Duration {
        let now = Instant::now();
        let mut seen = self.first_seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|_, first| now.duration_since(first.at) < FORGET_AFTER);
        let first = seen
            .entry(job.clone())
            .or_insert(Sighting { at: now, published });
        let later = match (first.published, published) {
            (Some(first), Some(this)) => {
                add_std_duration(first, RESUBMITTED_AFTER).is_ok_and(|limit| this > limit)
            }
            _ => false,
        };
        if later {
            *first = Sighting { at: now, published };
        }
        now.duration_since(first.at)
    }

    /// `job`'s record was found: its tasks are no orphans.
    pub fn found(&self, job: &RecordKey) {
        self.first_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(job);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(job: &str) -> RecordKey {
        spec(job, "s1")
    }

    fn spec(job: &str, spec_hash: &str) -> RecordKey {
        RecordKey {
            user_id: "u".into(),
            job_id: job.into(),
            spec_hash: spec_hash.into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_jobs_wait_runs_from_its_first_orphan_task_until_its_record_is_found() {
        let orphans = Orphans::default();
        assert_eq!(orphans.waited(&key("a"), None), Duration::ZERO);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(orphans.waited(&key("a"), None), Duration::from_secs(30));
        assert_eq!(orphans.waited(&key("b"), None), Duration::ZERO, "per job");
        orphans.found(&key("a"));
        assert_eq!(
            orphans.waited(&key("a"), None),
            Duration::ZERO,
            "a new wait"
        );
        tokio::time::advance(FORGET_AFTER).await;
        assert_eq!(orphans.waited(&key("b"), None), Duration::ZERO, "forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn the_record_of_a_job_id_resubmitted_with_another_spec_does_not_restart_the_first_ones_wait()
     {
        let orphans = Orphans::default();
        let (failed, again) = (spec("a", "s1"), spec("a", "s2"));
        orphans.waited(&failed, None);
        tokio::time::advance(Duration::from_secs(50)).await;
        assert_eq!(orphans.waited(&again, None), Duration::ZERO, "its own wait");
        orphans.found(&again);
        tokio::time::advance(Duration::from_secs(15)).await;
        assert_eq!(orphans.waited(&failed, None), Duration::from_secs(65));
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_job_submitted_again_after_its_record_failed_waits_afresh() {
        let orphans = Orphans::default();
        let t0 = async_nats::datetime::from_nanos(1_800_000_000_000_000_000).unwrap();
        let at = |secs: u64| add_std_duration(t0, Duration::from_secs(secs)).unwrap();
        let job = key("a");
        assert_eq!(orphans.waited(&job, Some(at(0))), Duration::ZERO);
        tokio::time::advance(Duration::from_secs(70)).await;
        // Another task of the first submission (published with the first): the wait runs on.
        assert_eq!(orphans.waited(&job, Some(at(1))), Duration::from_secs(70));
        // A task of the resubmission, published 2 minutes later: its wait starts now ...
        tokio::time::advance(Duration::from_secs(50)).await;
        assert_eq!(
            orphans.waited(&job, Some(at(120))),
            Duration::ZERO,
            "a later submission"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        // ... and its other tasks, published just after it, share that wait.
        assert_eq!(orphans.waited(&job, Some(at(121))), Duration::from_secs(5));
        // A late copy of the first submission's task does not restart it (published before it).
        assert_eq!(orphans.waited(&job, Some(at(2))), Duration::from_secs(5));
    }
}
