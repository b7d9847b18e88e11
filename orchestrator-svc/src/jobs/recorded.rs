//! Whether the SubmitJob (or EditJob) call that created a job has recorded it. A retry of the same submission finds
//! the job in the registry while the first call is still writing its record (with JOB_STORE=nats, queueing one task
//! per image first): it must not be told "accepted" before the record is written, nor at all if the write fails and
//! the first call takes the job back.

use tokio::sync::watch;

/// None while the creating call records the job; then whether it did. Jobs that come from the job store (resumed,
/// mirrored from another replica) are recorded from the start.
#[derive(Debug)]
pub struct Recorded(watch::Sender<Option<bool>>);

impl Default for Recorded {
    fn default() -> Self {
        Recorded(watch::Sender::new(Some(true)))
    }
}

impl Recorded {
    /// Before the creating call records the job.
    pub fn pending(&self) {
        self.0.send_replace(None);
    }

    pub fn set(&self, recorded: bool) {
        self.0.send_replace(Some(recorded));
    }

    /// Waits until the creating call has finished; whether the job was recorded.
    pub async fn wait(&self) -> bool {
        let mut seen = self.0.subscribe();
        let outcome = seen.wait_for(Option::is_some).await.map(|v| *v);
        matches!(outcome, Ok(Some(true)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_retry_waits_for_the_first_call_and_learns_how_it_ended() {
        let recorded = std::sync::Arc::new(Recorded::default());
        assert!(recorded.wait().await, "recorded from the start by default");
        recorded.pending();
        let waiter = tokio::spawn({
            let recorded = recorded.clone();
            async move { recorded.wait().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "waits while the record is written");
        recorded.set(false);
        assert!(!waiter.await.unwrap(), "the first call failed to record it");
    }
}
