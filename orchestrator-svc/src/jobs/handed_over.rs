//! ADAPTER=queue_pull: runs this worker handed over (`JobService::hand_over`: its lease ran out, cut off from NATS)
//! whose items are still in its hands here (running, or their reports going: `JobHandle::unsettled`). The queue
//! redelivers the job to any worker, this one included (the only one, in a one-worker deployment). A later run of
//! the job here waits, item by item, for those items to settle before it reads their records: it then takes each
//! end as recorded and told, instead of running the item again beside the first run (segmented twice, the first
//! record keeping one end) or sending its callback again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::JobKey;
use super::job::JobHandle;

/// How long a later run waits for the earlier runs' items: their run (segmenter and storage timeouts), records and
/// callback take less, unless the receiver is down (its retries). Past it the later run reads the record as it is:
/// an end recorded is taken (its callback sent again if still pending), none runs the item here again, and the
/// first record decides which end stands.
const EARLIER_RUN_WAIT: Duration = Duration::from_secs(120);

/// Every run of a job handed over here while something still works on it (a job handed over, given back, and
/// handed over again has two). Weak: a run is kept only while its run loop or its items' reports hold it; a run
/// they let go of is dropped at the next hand-over.
#[derive(Debug, Default)]
pub struct HandedOverRuns(Mutex<HashMap<JobKey, Vec<Weak<JobHandle>>>>);

impl HandedOverRuns {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JobKey, Vec<Weak<JobHandle>>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn keep(&self, job: &Arc<JobHandle>) {
        let mut runs = self.lock();
        runs.retain(|_, earlier| {
            earlier.retain(|run| run.strong_count() > 0);
            !earlier.is_empty()
        });
        runs.entry(key_of(job))
            .or_default()
            .push(Arc::downgrade(job));
    }

    /// The runs of `job` handed over here that still hold an item, `job` itself aside.
    fn earlier_runs(&self, job: &Arc<JobHandle>) -> Vec<Arc<JobHandle>> {
        let runs = self.lock();
        let Some(earlier) = runs.get(&key_of(job)) else {
            return Vec::new();
        };
        earlier
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|run| !Arc::ptr_eq(run, job) && !run.unsettled.is_empty())
            .collect()
    }

    /// Whether an earlier run of `job` handed over here holds item `idx` (`wait_for_item` would wait).
    pub fn holds(&self, job: &Arc<JobHandle>, idx: u32) -> bool {
        self.earlier_runs(job)
            .iter()
            .any(|run| run.unsettled.holds(idx))
    }

    /// Waits until no earlier run of `job` handed over here holds item `idx` (at most EARLIER_RUN_WAIT).
    pub async fn wait_for_item(&self, job: &Arc<JobHandle>, idx: u32) {
        let earlier = self.earlier_runs(job);
        if !earlier.iter().any(|run| run.unsettled.holds(idx)) {
            return;
        }
        tracing::info!(
            idx,
            "item still in the hands of a run this worker handed over; waiting for its end and callback"
        );
        let settled =
            futures::future::join_all(earlier.iter().map(|run| run.unsettled.wait_settled(idx)));
        if tokio::time::timeout(EARLIER_RUN_WAIT, settled)
            .await
            .is_err()
        {
            tracing::warn!(
                idx,
                "a run this worker handed over did not settle the item in time; its record is read as it stands"
            );
        }
    }

    /// Waits until no earlier run of `job` handed over here holds any item (at most EARLIER_RUN_WAIT).
    pub async fn wait_for_all(&self, job: &Arc<JobHandle>) {
        let earlier = self.earlier_runs(job);
        if earlier.is_empty() {
            return;
        }
        tracing::info!(
            "items still in the hands of a run this worker handed over; waiting for their ends and callbacks"
        );
        let settled =
            futures::future::join_all(earlier.iter().map(|run| run.unsettled.wait_all_settled()));
        if tokio::time::timeout(EARLIER_RUN_WAIT, settled)
            .await
            .is_err()
        {
            tracing::warn!(
                "a run this worker handed over did not settle its items in time; their records are read as they stand"
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
    use super::*;
    use crate::jobs::JobPlan;

    fn durable_job(job_id: &str, image_count: u32) -> Arc<JobHandle> {
        Arc::new(JobHandle::new(
            JobPlan::durable_for_tests(job_id, image_count),
            1,
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_run_waits_for_the_items_earlier_ones_hold() {
        let runs = HandedOverRuns::default();
        let (first, second, third) = (
            durable_job("a", 3),
            durable_job("a", 3),
            durable_job("a", 3),
        );
        let first_holds = first.hold_unsettled(vec![1]);
        runs.keep(&first);
        // Handed over again while its own item 1 waits for the first run's: the third run waits for both.
        let second_holds = second.hold_unsettled(vec![2]);
        runs.keep(&second);
        assert!(runs.holds(&third, 1) && runs.holds(&third, 2) && !runs.holds(&third, 0));
        // Items no earlier run holds, and a run's own items, do not wait.
        runs.wait_for_item(&third, 0).await;
        runs.wait_for_item(&second, 2).await;
        let wait = runs.wait_for_item(&third, 1);
        tokio::pin!(wait);
        assert!(
            tokio::time::timeout(Duration::from_secs(60), &mut wait)
                .await
                .is_err(),
            "item 1 is in the first run's hands"
        );
        drop(first_holds);
        wait.await;
        let all = runs.wait_for_all(&third);
        tokio::pin!(all);
        assert!(
            tokio::time::timeout(Duration::from_secs(60), &mut all)
                .await
                .is_err(),
            "item 2 is in the second run's hands"
        );
        drop(second_holds);
        all.await;
        // A stuck earlier run holds a later one up for EARLIER_RUN_WAIT at most.
        let _stuck = first.hold_unsettled(vec![0]);
        let started = tokio::time::Instant::now();
        runs.wait_for_item(&third, 0).await;
        assert_eq!(started.elapsed(), EARLIER_RUN_WAIT);
    }

    #[test]
    fn a_run_nothing_works_on_any_more_is_dropped() {
        let runs = HandedOverRuns::default();
        runs.keep(&durable_job("a", 1));
        let b = durable_job("b", 1);
        runs.keep(&b);
        let kept: Vec<String> = runs.lock().keys().map(|k| k.job_id.clone()).collect();
        assert_eq!(kept, ["b"]);
    }
}
