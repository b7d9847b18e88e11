//! A job the orchestrator cannot take now (the registry is full, or JOB_STORE=nats cannot record it) is submitted
//! again in place, its message kept alive by in-progress acks, instead of being put back. Each NAK was a delivery:
//! a store outage of ~10 s used up the consumer's `max_deliver` (NATS_MAX_DELIVERIES + 1), after which the job was
//! never delivered again (JOB_STORE=nats: never recorded, never called back), or its last delivery gave it up
//! (`too_many_deliveries`) though it never ran. Only shutdown puts the message back, for another orchestrator.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use tokio::sync::watch;

use super::follow::{Acknowledge, acknowledge, renew, stopped};
use crate::error::ApiError;

/// Submits with `submit` until it answers something other than "not now" (Overloaded, StoreUnavailable), waiting
/// `pause` (or the registry's `retry_after`) in between; an in-progress ack goes out every `progress_every`
/// meanwhile, the lease of the message, confirmed by the server (`renewed`: when the last confirmed one was sent, for
/// `follow` to go on from). None, the message put back (NAK), when `stop` turns true first (never with no `stop`: a
/// submission that must not be cut short).
pub(super) async fn submit_patiently<T, Fut>(
    message: &dyn Acknowledge,
    job_id: &str,
    (progress_every, renewed): (Duration, &mut tokio::time::Instant),
    pause: Duration,
    stop: Option<&mut watch::Receiver<bool>>,
    submit: impl Fn() -> Fut,
) -> Option<Result<T, ApiError>>
where
    Fut: Future<Output = Result<T, ApiError>>,
{
    let submitting = async {
        loop {
            let done = submit().await;
            let Some(wait) = done.as_ref().err().and_then(|e| e.submit_again_in(pause)) else {
                return done;
            };
            if let Err(e @ ApiError::StoreUnavailable(_)) = &done {
                tracing::warn!(%job_id, error = %e, "queue_pull: job not recorded now; submitting it again");
            }
            tokio::time::sleep(wait).await;
        }
    };
    let renew = async {
        let mut every = tokio::time::interval(progress_every);
        every.tick().await;
        loop {
            every.tick().await;
            if let Err(e) = renew(message, progress_every / 2, renewed).await {
                tracing::warn!(%job_id, error = %e, "queue_pull: renewal not confirmed while the job is submitted");
            }
        }
    };
    tokio::select! {
        done = submitting => Some(done),
        () = renew => unreachable!("renews until the submission ends"),
        () = async {
            match stop {
                Some(stop) => stopped(stop).await,
                None => std::future::pending().await,
            }
        } => {
            tracing::info!(%job_id, "queue_pull: shutting down before the job was taken; put back");
            acknowledge(message, AckKind::Nak(None), job_id).await;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::error::BoxError;

    /// Records each acknowledgement with the (paused) second it was sent at.
    struct Recorded {
        start: tokio::time::Instant,
        acks: Mutex<Vec<(u64, String)>>,
    }

    #[async_trait::async_trait]
    impl Acknowledge for Recorded {
        async fn acknowledge(&self, kind: AckKind) -> Result<(), BoxError> {
            let at = self.start.elapsed().as_secs();
            self.acks.lock().unwrap().push((at, format!("{kind:?}")));
            Ok(())
        }
    }

    fn recorded() -> Recorded {
        Recorded {
            start: tokio::time::Instant::now(),
            acks: Mutex::default(),
        }
    }

    fn unavailable() -> ApiError {
        ApiError::StoreUnavailable(std::io::Error::other("no responders").into())
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_outage_is_waited_out_under_progress_acks_not_naks() {
        let message = recorded();
        let (_stop, mut stopping) = watch::channel(false);
        let calls = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let mut renewed = start;
        let got = submit_patiently(
            &message,
            "j",
            (Duration::from_secs(3), &mut renewed),
            Duration::from_secs(2),
            Some(&mut stopping),
            || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move { if n < 5 { Err(unavailable()) } else { Ok(n) } }
            },
        )
        .await;
        assert_eq!(got.expect("not stopped").unwrap(), 5, "the sixth call");
        // Five pauses of 2 s: the lease renewed every 3 s, and the message never put back.
        let progress = || "Progress".to_string();
        assert_eq!(
            *message.acks.lock().unwrap(),
            [(3, progress()), (6, progress()), (9, progress())]
        );
        // The last confirmed renewal, which `follow` times the lease from.
        assert_eq!(renewed - start, Duration::from_secs(9));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_registry_waits_its_retry_after_and_other_errors_end_it() {
        let message = recorded();
        let (_stop, mut stopping) = watch::channel(false);
        let calls = AtomicU32::new(0);
        let got: Option<Result<(), ApiError>> = submit_patiently(
            &message,
            "j",
            (Duration::from_secs(10), &mut tokio::time::Instant::now()),
            Duration::from_secs(2),
            Some(&mut stopping),
            || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    Err(if n == 0 {
                        ApiError::Overloaded {
                            running: 1,
                            retry_after: Duration::from_secs(5),
                        }
                    } else {
                        ApiError::JobExists { job_id: "j".into() }
                    })
                }
            },
        )
        .await;
        assert!(matches!(got, Some(Err(ApiError::JobExists { .. }))));
        assert_eq!(message.start.elapsed(), Duration::from_secs(5));
        assert!(message.acks.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_puts_the_message_back() {
        let message = recorded();
        let (stop, mut stopping) = watch::channel(false);
        let mut renewed = tokio::time::Instant::now();
        let submitting = submit_patiently::<(), _>(
            &message,
            "j",
            (Duration::from_secs(3), &mut renewed),
            Duration::from_secs(2),
            Some(&mut stopping),
            || async { Err(unavailable()) },
        );
        let stopper = async {
            tokio::time::sleep(Duration::from_secs(4)).await;
            stop.send(true).unwrap();
            std::future::pending::<()>().await
        };
        let got = tokio::select! {
            got = submitting => got,
            () = stopper => unreachable!(),
        };
        assert!(got.is_none());
        assert_eq!(
            *message.acks.lock().unwrap(),
            [(3, "Progress".to_string()), (4, "Nak(None)".to_string())]
        );
    }
}
