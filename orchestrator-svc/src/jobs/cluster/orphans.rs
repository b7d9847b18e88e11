//! Jobs whose item tasks arrived with no job record. A submitter publishes a job's tasks before it records the job,
//! so a task waits a while for the record; a submission whose record then failed leaves every one of its tasks an
//! orphan. Each waiting on its own, the tasks of a 500-image job held this replica's permits 60 s per batch of
//! BATCH_CONCURRENCY (two replicas of four: an hour). Timed from the job's first orphan task instead, the tasks after
//! the first batch wait only a short grace each.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::jobs::JobKey;

/// Forgotten this long after its first sighting (a job dropped long ago; another of the same ids is a new wait).
const FORGET_AFTER: Duration = Duration::from_secs(600);

#[derive(Debug, Default)]
pub struct Orphans {
    first_seen: Mutex<HashMap<JobKey, Instant>>,
}

impl Orphans {
    /// How long ago a task of `job` was first found without its record (zero, and from now, for the first).
    pub fn waited(&self, job: &JobKey) -> Duration {
        let now = Instant::now();
        let mut seen = self.first_seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|_, at| now.duration_since(*at) < FORGET_AFTER);
        now.duration_since(*seen.entry(job.clone()).or_insert(now))
    }

    /// `job`'s record was found: its tasks are no orphans.
    pub fn found(&self, job: &JobKey) {
        self.first_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(job);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(job: &str) -> JobKey {
        JobKey {
            user_id: "u".into(),
            job_id: job.into(),
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
}
