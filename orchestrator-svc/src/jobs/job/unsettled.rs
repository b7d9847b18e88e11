//! Durable jobs: the items of this run whose work is not settled yet: running, or ended with a report still going
//! (claim, callback and its retries, records; a resend of a callback found pending). A run handed over to another
//! worker (`JobService::hand_over`) finishes what it has in hand; a later delivery of the same job to this worker
//! waits for those items (`jobs::handed_over`) before it reads their records, so it takes each end as told instead
//! of running the item a second time beside it, or sending its callback again.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

use super::JobHandle;

/// Item -> the holds on it (`Held`): the items in flight and those whose report is going, at most a cancelled
/// job's items at once (their reports are scheduled together).
#[derive(Debug)]
pub struct Unsettled(watch::Sender<BTreeMap<u32, u32>>);

impl Default for Unsettled {
    fn default() -> Self {
        Unsettled(watch::Sender::new(BTreeMap::new()))
    }
}

impl Unsettled {
    /// Resolves once item `idx` is not held.
    pub async fn wait_settled(&self, idx: u32) {
        let mut items = self.0.subscribe();
        // The sender lives as long as `self`: the wait cannot fail.
        let _ = items.wait_for(|items| !items.contains_key(&idx)).await;
    }

    /// Resolves once no item is held.
    pub async fn wait_all_settled(&self) {
        let mut items = self.0.subscribe();
        let _ = items.wait_for(BTreeMap::is_empty).await;
    }

    pub fn holds(&self, idx: u32) -> bool {
        self.0.borrow().contains_key(&idx)
    }

    pub fn is_empty(&self) -> bool {
        self.0.borrow().is_empty()
    }
}

impl JobHandle {
    /// Holds `items` unsettled until the guard is dropped (durable jobs only; otherwise nothing is held). Taken
    /// before a report is spawned and moved into it, and by an item before it starts, so an item is never seen
    /// settled between its run and its report, or between a report and the resend it schedules.
    pub fn hold_unsettled(self: &Arc<Self>, items: Vec<u32>) -> Held {
        if !self.plan.durable_items || items.is_empty() {
            return Held(None);
        }
        self.unsettled.0.send_modify(|held| {
            for &idx in &items {
                *held.entry(idx).or_default() += 1;
            }
        });
        Held(Some((self.clone(), items)))
    }
}

/// See `JobHandle::hold_unsettled`.
#[derive(Debug)]
pub struct Held(Option<(Arc<JobHandle>, Vec<u32>)>);

impl Drop for Held {
    fn drop(&mut self) {
        let Some((job, items)) = self.0.take() else {
            return;
        };
        job.unsettled.0.send_modify(|held| {
            for idx in items {
                if let Some(n) = held.get_mut(&idx) {
                    *n -= 1;
                    if *n == 0 {
                        held.remove(&idx);
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::jobs::JobPlan;

    fn durable_job(job_id: &str, image_count: u32) -> Arc<JobHandle> {
        Arc::new(JobHandle::new(
            JobPlan::durable_for_tests(job_id, image_count),
            1,
        ))
    }

    #[tokio::test]
    async fn an_item_is_settled_when_its_last_hold_goes() {
        let job = durable_job("j", 8);
        let run = job.hold_unsettled(vec![3]);
        let report = job.hold_unsettled(vec![3, 4]);
        job.unsettled.wait_settled(5).await;
        drop(run);
        let waiting =
            tokio::time::timeout(Duration::from_millis(50), job.unsettled.wait_settled(3));
        assert!(waiting.await.is_err(), "item 3's report still holds it");
        assert!(job.unsettled.holds(4));
        drop(report);
        job.unsettled.wait_settled(3).await;
        job.unsettled.wait_all_settled().await;
        assert!(job.unsettled.is_empty());
    }
}
