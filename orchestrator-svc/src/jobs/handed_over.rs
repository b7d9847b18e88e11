//! ADAPTER=queue_pull: runs this worker handed over (`JobService::hand_over`: its lease ran out, cut off from NATS)
//! whose items in flight are still finishing here. The queue redelivers the job to any worker, this one included
//! (the only one, in a one-worker deployment). A later run of the job here waits, item by item, for those items'
//! reports to settle before it reads their records: it then takes each end as recorded and told, instead of
//! running the item again beside the first run (segmented twice, the first record keeping one end) or sending its
//! callback again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::JobKey;
use super::job::JobHandle;

/// How long a later run waits for an earlier run's item: its run (segmenter and storage timeouts), record and
/// callback take less, unless the receiver is down (its retries). Past it the later run reads the record as it is:
/// an end recorded is taken (its callback sent again if still pending), none runs the item here again, and the
/// first record decides which end stands.
const EARLIER_RUN_WAIT: Duration = Duration::from_secs(120);

/// Weak: a run is kept only while something still works on it (its run loop, its items' reports), so a run that
/// finished leaves nothing behind here but its key, dropped at the next hand-over.
#[derive(Debug, Default)]
pub struct HandedOverRuns(Mutex<HashMap<JobKey, Weak<JobHandle>>>);

impl HandedOverRuns {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JobKey, Weak<JobHandle>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn keep(&self, job: &Arc<JobHandle>) {
        let mut runs = self.lock();
        runs.retain(|_, run| run.strong_count() > 0);
        runs.insert(key_of(job), Arc::downgrade(job));
    }

    /// Waits until no earlier run of `job` handed over here has item `idx` started and its report unsettled (at most
    /// EARLIER_RUN_WAIT).
    pub async fn wait_for_earlier_run(&self, job: &Arc<JobHandle>, idx: u32) {
        let earlier = self.lock().get(&key_of(job)).and_then(Weak::upgrade);
        let Some(earlier) = earlier.filter(|earlier| !Arc::ptr_eq(earlier, job)) else {
            return;
        };
        if !earlier.unsettled.contains(idx) {
            return;
        }
        tracing::info!(
            idx,
            "item still in the hands of the run this worker handed over; waiting for its end and callback"
        );
        if tokio::time::timeout(EARLIER_RUN_WAIT, earlier.unsettled.wait_settled(idx))
            .await
            .is_err()
        {
            tracing::warn!(
                idx,
                "the run this worker handed over did not settle the item in time; its record is read as it stands"
            );
        }
    }
}

fn key_of(job: &JobHandle) -> JobKey {
    JobKey {
        user_id: job.plan.user_id.clone(),
        job_id: job.plan.job_id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use palette_proto::orchestrator::v1::JobSpec;

    use super::*;
    use crate::jobs::JobPlan;

    fn handle_of(job_id: &str, image_count: u32) -> Arc<JobHandle> {
        let plan = JobPlan {
            user_id: "u".into(),
            job_id: job_id.into(),
            image_count,
            concepts: vec!["wall".into()],
            rules: vec![],
            effective_spec: JobSpec::default(),
            durable_items: true,
            message_hash: None,
            source: None,
            preset: None,
        };
        Arc::new(JobHandle::new(plan, 1))
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_run_waits_for_the_items_the_earlier_one_has_in_flight() {
        let runs = HandedOverRuns::default();
        let (earlier, later) = (handle_of("job-a", 3), handle_of("job-a", 3));
        earlier.unsettled.started(1);
        runs.keep(&earlier);
        // Items the earlier run did not start, and the earlier run's own items, do not wait.
        runs.wait_for_earlier_run(&later, 0).await;
        runs.wait_for_earlier_run(&earlier, 1).await;
        let wait = runs.wait_for_earlier_run(&later, 1);
        tokio::pin!(wait);
        assert!(
            tokio::time::timeout(Duration::from_secs(60), &mut wait)
                .await
                .is_err(),
            "item 1 is in flight in the earlier run"
        );
        drop(earlier.unsettled.reporting(1));
        wait.await;
        // A stuck earlier run holds a later one up for EARLIER_RUN_WAIT at most.
        earlier.unsettled.started(2);
        let started = tokio::time::Instant::now();
        runs.wait_for_earlier_run(&later, 2).await;
        assert_eq!(started.elapsed(), EARLIER_RUN_WAIT);
    }

    #[test]
    fn a_run_nothing_works_on_any_more_is_dropped() {
        let runs = HandedOverRuns::default();
        runs.keep(&handle_of("job-a", 1));
        let b = handle_of("job-b", 1);
        runs.keep(&b);
        let kept: Vec<String> = runs.lock().keys().map(|k| k.job_id.clone()).collect();
        assert_eq!(kept, ["job-b"]);
    }
}
