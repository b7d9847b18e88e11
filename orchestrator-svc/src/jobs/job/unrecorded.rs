//! Items that ended here whose record the job store did not take within the store patience (JOB_STORE=nats, NATS
//! unreachable for longer than NATS_STORE_PATIENCE_SEC while the item's report was written): each as the store should
//! hold it, its callback not sent yet (its first record gave up) or settled (its settled record did). The holder of
//! the item's task keeps the task until the store answers, then writes it and sends a callback not sent yet if this
//! end stands (`jobs::cluster::late`): putting the task back ran the item again (a second callback), and
//! acknowledging it with only the settled record missing left every replica showing the callback pending for ever.

use std::collections::BTreeMap;
use std::sync::Mutex;

use palette_proto::orchestrator::v1::Item;

/// Empty unless the store was unreachable: one entry per item whose report gave up, until it is written.
#[derive(Debug, Default)]
pub struct Unrecorded(Mutex<BTreeMap<u32, Item>>);

impl Unrecorded {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, Item>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `item`'s last write gave up; a later report of the same item replaces an earlier one.
    pub fn keep(&self, item: Item) {
        self.lock().insert(item.idx, item);
    }

    /// Item `idx` as the store should hold it, if its report gave up.
    pub fn get(&self, idx: u32) -> Option<Item> {
        self.lock().get(&idx).cloned()
    }

    /// Item `idx` is recorded now (`item` as `get` gave it; a newer report kept meanwhile stays).
    pub fn written(&self, item: &Item) {
        let mut kept = self.lock();
        if kept.get(&item.idx) == Some(item) {
            kept.remove(&item.idx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(idx: u32, callback_attempts: u32) -> Item {
        Item {
            idx,
            callback_attempts,
            ..Default::default()
        }
    }

    #[test]
    fn a_written_item_is_forgotten_but_not_a_newer_report_of_it() {
        let kept = Unrecorded::default();
        assert_eq!(kept.get(0), None);
        kept.keep(item(0, 1));
        kept.keep(item(1, 1));
        let first = kept.get(0).unwrap();
        // Reported again (a resend) while the first was being written: the newer one stays to be written.
        kept.keep(item(0, 2));
        kept.written(&first);
        assert_eq!(kept.get(0), Some(item(0, 2)));
        kept.written(&item(0, 2));
        assert_eq!(kept.get(0), None);
        assert_eq!(kept.get(1), Some(item(1, 1)), "other items untouched");
    }
}
