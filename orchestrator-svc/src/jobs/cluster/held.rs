//! The item tasks this replica holds, by stream sequence: a task delivered again to the replica that still holds it
//! waits for that holder to end it (`work`).
//!
//! A lease runs out under a live holder when its renewals do not reach NATS in time (NATS restarting, or not
//! answering, for longer than NATS_ITEM_ACK_WAIT_SEC): JetStream hands the task out again, and the next pull may be
//! this replica's own. Run at once, that delivery ran the item a second time beside the first (a holder runs an item
//! shown RUNNING, taking it for a dead holder's), or, once the item had ended here, read its report half-written:
//! no record yet, so the task went back (a delivery used for nothing) or, on its last delivery, was acknowledged
//! with no record; the callback pending, so it was sent again beside the first holder's own delivery.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

type Lock = Arc<tokio::sync::Mutex<()>>;

/// One lock per task held here; a second delivery of the task waits on it.
#[derive(Debug, Default)]
pub(super) struct HeldTasks(Mutex<HashMap<u64, Lock>>);

/// This delivery holds its task here until dropped.
#[derive(Debug)]
pub(super) struct Held<'a> {
    tasks: &'a HeldTasks,
    sequence: u64,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl HeldTasks {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Lock>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds the task at stream `sequence`; when an earlier delivery of it is held here, once that one has ended.
    /// `waiting` runs when it has to wait.
    pub(super) async fn hold(&self, sequence: u64, waiting: impl FnOnce()) -> Held<'_> {
        let lock = self.map().entry(sequence).or_default().clone();
        let guard = match lock.clone().try_lock_owned() {
            Ok(guard) => guard,
            Err(_) => {
                waiting();
                lock.lock_owned().await
            }
        };
        Held {
            tasks: self,
            sequence,
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
        // Forgotten unless another delivery waits for it: the map's handle and this guard's are the only ones then
        // (a waiter takes its own under the same lock).
        if map
            .get(&self.sequence)
            .is_some_and(|lock| Arc::strong_count(lock) == 2)
        {
            map.remove(&self.sequence);
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
    async fn a_second_delivery_waits_for_the_first_and_other_tasks_do_not() {
        let tasks = HeldTasks::default();
        let waited = AtomicBool::new(false);
        let first = tasks.hold(7, || panic!("nothing held yet")).await;
        let _other = tasks.hold(8, || panic!("another task")).await;
        let second = tasks.hold(7, || waited.store(true, Ordering::SeqCst));
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
        let _again = tasks.hold(7, || panic!("nobody holds it")).await;
    }
}
