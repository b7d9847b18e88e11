//! The item tasks this replica holds, by item: a task of an item whose task is held here waits for that holder to
//! end it (`work`), then reads the item's record as any later holder does.
//!
//! A lease runs out under a live holder when its renewals do not reach NATS in time (NATS restarting, or not
//! answering, for longer than NATS_ITEM_ACK_WAIT_SEC): JetStream hands the task out again, and the next pull may be
//! this replica's own. A resubmission after a failed record publishes a job's tasks again: one item, two tasks.
//! Run at once, such a task ran the item a second time beside the first (a holder runs an item shown RUNNING,
//! taking it for a dead holder's), or, once the item had ended here, read its report half-written: no record yet,
//! so the task went back (a delivery used for nothing) or, on its last delivery, was acknowledged with no record;
//! the callback pending, so it was sent again beside the first holder's own delivery.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::ItemTask;
use crate::jobs::store::RecordKey;

type Lock = Arc<tokio::sync::Mutex<()>>;
/// An item: its job's record key and its index.
type Item = (RecordKey, u32);

/// One lock per item whose task is held here; another task of the item waits on it.
#[derive(Debug, Default)]
pub(super) struct HeldTasks(Mutex<HashMap<Item, Lock>>);

/// This delivery holds its item here until dropped.
#[derive(Debug)]
pub(super) struct Held<'a> {
    tasks: &'a HeldTasks,
    item: Item,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl HeldTasks {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Item, Lock>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds `task`'s item; when a task of it is held here already, once that one has ended. `waiting` runs when it
    /// has to wait.
    pub(super) async fn hold(&self, task: &ItemTask, waiting: impl FnOnce()) -> Held<'_> {
        let item = (task.job(), task.idx);
        let lock = self.map().entry(item.clone()).or_default().clone();
        let guard = match lock.clone().try_lock_owned() {
            Ok(guard) => guard,
            Err(_) => {
                waiting();
                lock.lock_owned().await
            }
        };
        Held {
            tasks: self,
            item,
            guard: Some(guard),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map().len()
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut map = self.tasks.map();
        // Forgotten unless another task waits for it: the map's handle and this guard's are the only ones then (a
        // waiter takes its own under the same lock).
        if map
            .get(&self.item)
            .is_some_and(|lock| Arc::strong_count(lock) == 2)
        {
            map.remove(&self.item);
        }
        drop(self.guard.take());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_second_task_of_an_item_waits_for_the_first_and_other_items_do_not() {
        let tasks = HeldTasks::default();
        let waited = AtomicBool::new(false);
        let (seven, eight) = (ItemTask::for_tests(7), ItemTask::for_tests(8));
        let first = tasks.hold(&seven, || panic!("nothing held yet")).await;
        let _other = tasks.hold(&eight, || panic!("another item")).await;
        let second = tasks.hold(&seven, || waited.store(true, Ordering::SeqCst));
        tokio::pin!(second);
        assert!(
            tokio::time::timeout(Duration::from_secs(60), second.as_mut())
                .await
                .is_err(),
            "held while the first holds it"
        );
        assert!(waited.load(Ordering::SeqCst));
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(1), second)
            .await
            .expect("held once the first ended");
        assert_eq!(tasks.len(), 2, "7 (held again) and 8");
        drop(second);
        assert_eq!(tasks.len(), 1, "7 forgotten once nobody holds it");
        let _again = tasks.hold(&seven, || panic!("nobody holds it")).await;
    }
}
