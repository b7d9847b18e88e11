//! A taken job followed to its end while its message is kept alive: an in-progress ack every `progress_every` (a
//! third of the ack wait, so a long job is not redelivered), the final ack once every item ended, was called back
//! and has its durable record written, none when the orchestrator stops first. The message is behind `Acknowledge`, so that tests run this
//! schedule on tokio's paused clock without a NATS server (as callbacks do with their `Transport`).

use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use tokio::sync::{broadcast, watch};

use crate::error::BoxError;
use crate::jobs::job::Progress;

/// The acknowledgements of the message a job came in: `jetstream::Message` in production.
#[async_trait::async_trait]
pub trait Acknowledge: Send + Sync {
    /// `AckKind::Ack` is a double ack (the server confirms it).
    async fn acknowledge(&self, kind: AckKind) -> Result<(), BoxError>;
}

#[async_trait::async_trait]
impl Acknowledge for jetstream::Message {
    async fn acknowledge(&self, kind: AckKind) -> Result<(), BoxError> {
        if matches!(kind, AckKind::Ack) {
            self.double_ack().await
        } else {
            self.ack_with(kind).await
        }
    }
}

/// Sends `kind`; a failure is logged (the job may then be redelivered, which durable items make harmless).
pub(super) async fn acknowledge(message: &dyn Acknowledge, kind: AckKind, job_id: &str) {
    if let Err(e) = message.acknowledge(kind).await {
        tracing::warn!(%job_id, error = %e, "queue_pull: acknowledgement failed; the job may be redelivered");
    }
}

/// Every item terminal and no callback still being sent (durable items are recorded once theirs is settled).
fn finished(job: &Progress) -> bool {
    job.is_terminal() && job.callbacks_pending == 0
}

/// A job followed: its counts now, a receiver of later changes (`JobHandle::subscribe`), and how to read its counts
/// again (`JobHandle::progress`, O(1): not a snapshot of every item at every change); and how many of its items have
/// their durable record written (`JobHandle::durable_written`).
pub(super) struct Followed<S> {
    pub(super) job: Progress,
    pub(super) events: broadcast::Receiver<u32>,
    pub(super) snapshot: S,
    pub(super) written: watch::Receiver<u32>,
}

/// Every item's durable record written. Acknowledged when the callbacks were settled (with callbacks off, as soon as
/// the last item ended), an ack that failed let the redelivery run again, and call back again, the items whose record
/// was still being written.
fn written(job: &Progress, written: &watch::Receiver<u32>) -> bool {
    *written.borrow() >= job.items
}

/// Follows the job until it is finished, sending an in-progress ack every `progress_every` meanwhile; then
/// acknowledges it and returns the last state. None, and no final ack, when `stop` turns true first.
pub(super) async fn follow<S: Fn() -> Progress>(
    message: &dyn Acknowledge,
    job_id: &str,
    progress_every: Duration,
    followed: Followed<S>,
    stop: &mut watch::Receiver<bool>,
) -> Option<Progress> {
    let Followed {
        mut job,
        mut events,
        snapshot,
        written: mut records,
    } = followed;
    let mut progress = tokio::time::interval(progress_every);
    progress.tick().await;
    let mut draining = false;
    while !(finished(&job) && written(&job, &records)) {
        if draining && settled_here(&job, &records) {
            // Offered again at once rather than after the ack wait: another worker runs what is left.
            tracing::info!(%job_id, "queue_pull: items in flight here ended and recorded; the job goes back to the queue");
            acknowledge(message, AckKind::Nak(Some(DRAINED_PUT_BACK)), job_id).await;
            return None;
        }
        tokio::select! {
            event = events.recv() => match event {
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => job = snapshot(),
                Err(broadcast::error::RecvError::Closed) => break,
            },
            Ok(()) = records.changed() => job = snapshot(),
            _ = progress.tick() => acknowledge(message, AckKind::Progress, job_id).await,
            // Shutting down: no item starts any more, so the job cannot finish here. Its lease is still renewed
            // while the items in flight here end and are recorded: renewals stopped at once, JetStream redelivered
            // the job after the ack wait, maybe to a worker that then ran those items beside them (a grace longer
            // than two thirds of the ack wait). The process's grace bounds the wait; past it the job goes back
            // unacknowledged, as before.
            () = stopped(stop), if !draining => {
                tracing::info!(%job_id, "queue_pull: shutting down mid-job; the items in flight here finish, then the job goes back");
                draining = true;
            }
        }
    }
    acknowledge(message, AckKind::Ack, job_id).await;
    Some(job)
}

/// How long a job put back by a draining worker waits before it is offered again: a worker taking it at once is
/// likely the next one a rolling restart stops, and each hop counts a delivery against NATS_MAX_DELIVERIES.
const DRAINED_PUT_BACK: Duration = Duration::from_secs(5);

/// Draining: no item of the job runs here any more and every one that ended has its callback settled and its
/// durable record written, so a redelivery now runs nothing twice. (A job not run durably here, `written` at
/// u32::MAX, is judged by its callbacks alone.)
fn settled_here(job: &Progress, written: &watch::Receiver<u32>) -> bool {
    job.running == 0 && job.callbacks_pending == 0 && *written.borrow() >= job.ended()
}

/// Resolves once `stop` is true (or its sender is gone).
pub(super) async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send: dropped here, before anything else awaits.
    let _ = stop.wait_for(|stopping| *stopping).await;
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use palette_proto::orchestrator::v1::JobState;
    use tokio::time::Instant;

    use super::*;

    /// Records each acknowledgement with the (paused) time it was sent at.
    struct Recorded {
        start: Instant,
        acks: Mutex<Vec<(Duration, String)>>,
    }

    #[async_trait::async_trait]
    impl Acknowledge for Recorded {
        async fn acknowledge(&self, kind: AckKind) -> Result<(), BoxError> {
            let at = self.start.elapsed();
            self.acks.lock().unwrap().push((at, format!("{kind:?}")));
            Ok(())
        }
    }

    fn running_job() -> Progress {
        Progress {
            state: JobState::Running as i32,
            items: 1,
            running: 1,
            ..Default::default()
        }
    }

    fn settled(job: &mut Progress) {
        job.state = JobState::Done as i32;
        job.running -= 1;
        job.completed += 1;
    }

    struct Setup {
        message: Arc<Recorded>,
        state: Arc<Mutex<Progress>>,
        events: broadcast::Sender<u32>,
        /// Items whose durable record is written.
        written: watch::Sender<u32>,
        stop: watch::Sender<bool>,
        follower: tokio::task::JoinHandle<Option<Progress>>,
    }

    fn start(progress_every: Duration) -> Setup {
        let message = Arc::new(Recorded {
            start: Instant::now(),
            acks: Mutex::default(),
        });
        let state = Arc::new(Mutex::new(running_job()));
        let (events, receiver) = broadcast::channel(8);
        let (stop, mut stopping) = watch::channel(false);
        let (written, records) = watch::channel(0);
        let followed = Followed {
            job: running_job(),
            events: receiver,
            snapshot: {
                let state = state.clone();
                move || *state.lock().unwrap()
            },
            written: records,
        };
        let follower = tokio::spawn({
            let message = message.clone();
            async move { follow(&*message, "j", progress_every, followed, &mut stopping).await }
        });
        Setup {
            message,
            state,
            events,
            written,
            stop,
            follower,
        }
    }

    fn acks(message: &Recorded) -> Vec<(u64, String)> {
        let acks = message.acks.lock().unwrap();
        acks.iter()
            .map(|(at, k)| (at.as_secs(), k.clone()))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn progress_every_interval_while_running_then_one_final_ack() {
        let setup = start(Duration::from_secs(10));
        tokio::time::sleep(Duration::from_secs(35)).await;
        // An item event that does not finish the job changes nothing in the schedule.
        setup.events.send(0).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        settled(&mut setup.state.lock().unwrap());
        setup.events.send(0).unwrap();
        setup.written.send(1).unwrap();
        let last = setup.follower.await.unwrap().expect("finished");
        assert_eq!(last.state, JobState::Done as i32);
        let progress = "Progress".to_string();
        assert_eq!(
            acks(&setup.message),
            [
                (10, progress.clone()),
                (20, progress.clone()),
                (30, progress),
                (36, "Ack".into())
            ]
        );
    }

    /// Every item ended and called back (or callbacks off) is not enough: acknowledged then, an ack that failed let
    /// the redelivery run again, and call back again, the items whose durable record was still being written.
    #[tokio::test(start_paused = true)]
    async fn the_final_ack_waits_for_every_items_durable_record() {
        let setup = start(Duration::from_secs(10));
        tokio::time::sleep(Duration::from_secs(5)).await;
        settled(&mut setup.state.lock().unwrap());
        setup.events.send(0).unwrap();
        tokio::time::sleep(Duration::from_secs(7)).await;
        assert_eq!(
            acks(&setup.message),
            [(10, "Progress".to_string())],
            "no final ack while the record is being written"
        );
        setup.written.send(1).unwrap();
        let last = setup.follower.await.unwrap().expect("finished");
        assert_eq!(last.state, JobState::Done as i32);
        assert_eq!(
            acks(&setup.message),
            [(10, "Progress".to_string()), (12, "Ack".into())]
        );
    }

    /// A shutdown mid-job keeps renewing the lease while the item running here ends and is recorded, then puts
    /// the job back (NAK) for the item that never started: renewals stopped at once let JetStream hand the job to
    /// another worker while the item still ran here.
    #[tokio::test(start_paused = true)]
    async fn stopping_mid_job_renews_until_the_items_here_are_recorded_then_puts_it_back() {
        let setup = start(Duration::from_secs(10));
        // A second item, not started.
        setup.state.lock().unwrap().items = 2;
        setup.events.send(0).unwrap();
        tokio::time::sleep(Duration::from_secs(15)).await;
        setup.stop.send(true).unwrap();
        tokio::time::sleep(Duration::from_secs(17)).await;
        {
            let mut job = setup.state.lock().unwrap();
            job.running = 0;
            job.completed = 1;
        }
        setup.events.send(0).unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            acks(&setup.message).len(),
            3,
            "still renewed: the item's record is being written"
        );
        setup.written.send(1).unwrap();
        assert!(setup.follower.await.unwrap().is_none());
        let progress = "Progress".to_string();
        assert_eq!(
            acks(&setup.message),
            [
                (10, progress.clone()),
                (20, progress.clone()),
                (30, progress),
                (35, "Nak(Some(5s))".into())
            ]
        );
    }

    /// Nothing running here when the shutdown comes: put back at once.
    #[tokio::test(start_paused = true)]
    async fn stopping_with_nothing_running_here_puts_the_job_back_at_once() {
        let setup = start(Duration::from_secs(10));
        setup.state.lock().unwrap().running = 0;
        setup.events.send(0).unwrap();
        tokio::time::sleep(Duration::from_secs(15)).await;
        setup.stop.send(true).unwrap();
        assert!(setup.follower.await.unwrap().is_none());
        assert_eq!(
            acks(&setup.message),
            [(10, "Progress".to_string()), (15, "Nak(Some(5s))".into())]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_already_finished_is_acknowledged_at_once() {
        let message = Recorded {
            start: Instant::now(),
            acks: Mutex::default(),
        };
        let mut job = running_job();
        settled(&mut job);
        let (_events, receiver) = broadcast::channel(1);
        let (_stop, mut stopping) = watch::channel(false);
        let (_written, records) = watch::channel(1);
        let followed = Followed {
            job,
            events: receiver,
            snapshot: move || job,
            written: records,
        };
        follow(
            &message,
            "j",
            Duration::from_secs(10),
            followed,
            &mut stopping,
        )
        .await
        .unwrap();
        assert_eq!(
            *message.acks.lock().unwrap(),
            [(Duration::ZERO, "Ack".to_string())]
        );
    }
}
