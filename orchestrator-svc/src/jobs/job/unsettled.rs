//! Durable jobs: the items this run started whose report is not settled yet (their end claimed, called back or
//! given up, and recorded so: `report`). A run handed over to another worker (`JobService::hand_over`) finishes the
//! items it has in flight; a later delivery of the same job to this worker waits for each of them
//! (`jobs::handed_over`) before it reads the item's record, so it takes that end as told instead of running the item
//! a second time beside it, or sending its callback again.

use std::collections::BTreeSet;

use tokio::sync::watch;

/// At most the items in flight and those ended whose report is still going: a few, whatever the job's size.
#[derive(Debug)]
pub struct Unsettled(watch::Sender<BTreeSet<u32>>);

impl Default for Unsettled {
    fn default() -> Self {
        Unsettled(watch::Sender::new(BTreeSet::new()))
    }
}

impl Unsettled {
    /// Item `idx` started here.
    pub fn started(&self, idx: u32) {
        self.0.send_modify(|items| {
            items.insert(idx);
        });
    }

    /// Held by item `idx`'s report: the item is settled once it is dropped, whichever way the report ended. A no-op
    /// for an item that never started here (ended unstarted by a cancel).
    pub fn reporting(&self, idx: u32) -> Reporting<'_> {
        Reporting(self, idx)
    }

    /// Resolves once item `idx` is not (or no longer) started here and unsettled.
    pub async fn wait_settled(&self, idx: u32) {
        let mut items = self.0.subscribe();
        // The sender lives as long as `self`: the wait cannot fail.
        let _ = items.wait_for(|items| !items.contains(&idx)).await;
    }

    pub fn contains(&self, idx: u32) -> bool {
        self.0.borrow().contains(&idx)
    }
}

/// See `Unsettled::reporting`.
pub struct Reporting<'a>(&'a Unsettled, u32);

impl Drop for Reporting<'_> {
    fn drop(&mut self) {
        let idx = self.1;
        self.0.0.send_if_modified(|items| items.remove(&idx));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_wait_ends_when_the_items_report_does_and_at_once_for_others() {
        let unsettled = Unsettled::default();
        unsettled.started(3);
        unsettled.wait_settled(4).await;
        let reporting = unsettled.reporting(3);
        let waiting = tokio::time::timeout(Duration::from_millis(50), unsettled.wait_settled(3));
        assert!(waiting.await.is_err(), "item 3's report is still going");
        drop(unsettled.reporting(7));
        assert!(unsettled.contains(3));
        drop(reporting);
        unsettled.wait_settled(3).await;
        assert!(!unsettled.contains(3));
    }
}
