//! Jobs whose item tasks arrived with no job record. A submitter publishes a job's tasks before it records the job,
//! so a task waits a while for the record; a submission whose record then failed leaves every one of its tasks an
//! orphan. Each waiting on its own, the tasks of a 500-image job held this replica's permits 60 s per batch of
//! BATCH_CONCURRENCY (two replicas of four: an hour). Timed from the job's first orphan task instead, the tasks after
//! the first batch wait only a short grace each.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::jobs::store::RecordKey;

/// Forgotten this long after its first sighting (a job dropped long ago; another of the same ids is a new wait).
const FORGET_AFTER: Duration = Duration::from_secs(600);

#[derive(Debug, Default)]
pub struct Orphans {
    /// Per job run (its spec hash included): the orphans of a submission that failed and those of a resubmission
    /// of the job id with another spec wait apart, and finding the second one's record does not restart the first
    /// one's wait (its tasks, which never find a record of their spec, then held permits as long as the second
    /// job's tasks kept coming).
    first_seen: Mutex<HashMap<RecordKey, Instant>>,
}

impl Orphans {
    /// How long ago a task of `job` was first found without its record (zero, and from now, for the first).
    pub fn waited(&self, job: &RecordKey) -> Duration {
        let now = Instant::now();
        let mut seen = self.first_seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|_, at| now.duration_since(*at) < FORGET_AFTER);
        now.duration_since(*seen.entry(job.clone()).or_insert(now))
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
        assert_eq!(orphans.waited(&key("a")), Duration::ZERO);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(orphans.waited(&key("a")), Duration::from_secs(30));
        assert_eq!(orphans.waited(&key("b")), Duration::ZERO, "per job");
        orphans.found(&key("a"));
        assert_eq!(orphans.waited(&key("a")), Duration::ZERO, "a new wait");
        tokio::time::advance(FORGET_AFTER).await;
        assert_eq!(orphans.waited(&key("b")), Duration::ZERO, "forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn the_record_of_a_job_id_resubmitted_with_another_spec_does_not_restart_the_first_ones_wait()
     {
        let orphans = Orphans::default();
        let (failed, again) = (spec("a", "s1"), spec("a", "s2"));
        orphans.waited(&failed);
        tokio::time::advance(Duration::from_secs(50)).await;
        assert_eq!(orphans.waited(&again), Duration::ZERO, "its own wait");
        orphans.found(&again);
        tokio::time::advance(Duration::from_secs(15)).await;
        assert_eq!(orphans.waited(&failed), Duration::from_secs(65));
    }
}
