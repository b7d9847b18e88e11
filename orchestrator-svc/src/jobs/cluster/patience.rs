//! A task holder's reads of the job store: asked again while the store is unreachable, never when a record does
//! not decode (`work`).

use std::future::Future;
use std::time::Duration;

use super::ItemTask;
use crate::error::Report;
use crate::jobs::store::StoreError;

/// Pause between reads of an unreachable job store (and, in `work`, after a failed fetch).
pub(super) const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Why `patiently` brought back no value.
#[derive(Debug)]
pub(super) enum Unread {
    /// This replica started draining meanwhile: the task goes back for another replica.
    Stopping,
    /// The record does not decode (written by a newer binary, before a rollback; or damaged). Reading it again
    /// gives the same bytes: retrying held the task, its lease renewed and its permit taken, forever.
    Corrupt(StoreError),
}

/// `read` from the job store, asked again every RETRY_PAUSE while the store is unreachable (the caller renews the
/// task's lease meanwhile). Putting the task back instead counted a delivery each time: an outage of the store
/// alone (its stream electing a leader) used up NATS_MAX_DELIVERIES within seconds, so the item failed
/// `too_many_deliveries` without having run, or, on the last delivery, was never delivered again and kept no end
/// state. Only `Unavailable` is transient; `is_stopping` is asked after each failed read.
pub(super) async fn patiently<T, Fut>(
    task: &ItemTask,
    is_stopping: impl Fn() -> bool,
    read: impl Fn() -> Fut,
) -> Result<T, Unread>
where
    Fut: Future<Output = Result<T, StoreError>>,
{
    loop {
        // No `_` arm: a new kind of store error must say whether it is worth asking again.
        match read().await {
            Ok(value) => return Ok(value),
            Err(e @ StoreError::Corrupt { .. }) => {
                tracing::error!(job_id = %task.job_id, idx = task.idx, error = %Report(&e), "job store record unreadable; not asked again");
                return Err(Unread::Corrupt(e));
            }
            Err(e @ StoreError::Unavailable(_)) => {
                tracing::warn!(job_id = %task.job_id, idx = task.idx, error = %Report(&e), "job store unreachable; asking again");
                if is_stopping() {
                    return Err(Unread::Stopping);
                }
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn task() -> ItemTask {
        ItemTask::for_tests(0)
    }

    /// Reads that fail `failures` times with `error`, then answer 7; and how often they were made.
    async fn run(
        error: fn() -> StoreError,
        failures: u32,
        stopping: bool,
    ) -> (Result<u32, Unread>, u32, Duration) {
        let reads = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let read = || {
            let n = reads.fetch_add(1, Ordering::SeqCst);
            async move { if n < failures { Err(error()) } else { Ok(7) } }
        };
        // Bounded, so that a read retried forever fails the test instead of hanging it (the clock is paused: the
        // bound passes in no real time).
        let got = tokio::time::timeout(
            Duration::from_secs(600),
            patiently(&task(), || stopping, read),
        )
        .await
        .expect("patiently returned");
        (got, reads.load(Ordering::SeqCst), start.elapsed())
    }

    fn corrupt() -> StoreError {
        StoreError::Corrupt {
            key: "job.u.j".into(),
        }
    }

    fn unavailable() -> StoreError {
        StoreError::unavailable(std::io::Error::other("no responders"))
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_that_does_not_decode_is_not_read_again() {
        let (got, reads, waited) = run(corrupt, u32::MAX, false).await;
        assert!(matches!(got, Err(Unread::Corrupt(_))), "{got:?}");
        assert_eq!(reads, 1);
        assert_eq!(waited, Duration::ZERO, "returned at once");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_store_is_asked_again_until_it_answers() {
        let (got, reads, waited) = run(unavailable, 3, false).await;
        assert_eq!(got.unwrap(), 7);
        assert_eq!(reads, 4);
        assert_eq!(waited, 3 * RETRY_PAUSE);
    }

    #[tokio::test(start_paused = true)]
    async fn draining_stops_asking() {
        let (got, reads, _) = run(unavailable, u32::MAX, true).await;
        assert!(matches!(got, Err(Unread::Stopping)), "{got:?}");
        assert_eq!(reads, 1);
    }
}
