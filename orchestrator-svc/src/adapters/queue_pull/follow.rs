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
    /// `AckKind::Ack` is a double ack (the server confirms it); the others are sent and not waited for.
    async fn acknowledge(&self, kind: AckKind) -> Result<(), BoxError>;

    /// An in-progress ack the server confirms (a double ack): an unconfirmed renewal is how a worker cut off from
    /// NATS learns that its lease may be running out (`follow`).
    async fn renew(&self) -> Result<(), BoxError> {
        self.acknowledge(AckKind::Progress).await
    }
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

    async fn renew(&self) -> Result<(), BoxError> {
        self.double_ack_with(AckKind::Progress).await
    }
}

/// How a followed job left this worker.
#[derive(Debug)]
pub(super) enum Left {
    /// Finished and acknowledged: its last state.
    Acked(Progress),
    /// Shutting down: put back (NAK) once the items in flight here were recorded, or left to the ack wait.
    PutBack,
    /// No renewal confirmed for so long that the lease ends before the next one: JetStream hands the job to another
    /// worker, so this one starts none of its items any more (those in flight finish; their first records decide
    /// against the other worker's, `jobs::durable::claim`) and sends nothing for it (an ack would end the other
    /// worker's delivery too).
    HandedOver,
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
    /// When the last renewal the server confirmed was sent (the delivery, when none was).
    pub(super) renewed: tokio::time::Instant,
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

/// Follows the job until it is finished, sending an in-progress ack every `progress_every` (a third of the lease)
/// meanwhile; then acknowledges it (`Left::Acked`). No final ack when `stop` turns true first (`Left::PutBack`), or
/// when renewals go unconfirmed until the lease would end before the next one (`Left::HandedOver`): a worker cut off
/// from NATS used to run the job to its end beside the redelivery, never told.
pub(super) async fn follow<S: Fn() -> Progress>(
    message: &dyn Acknowledge,
    job_id: &str,
    progress_every: Duration,
    followed: Followed<S>,
    stop: &mut watch::Receiver<bool>,
) -> Left {
    let Followed {
        mut renewed,
        mut job,
        mut events,
        snapshot,
        written: mut records,
    } = followed;
    // Renewed one period after the last confirmed renewal (at once when that is past: the submission took long),
    // then every period.
    let mut progress = tokio::time::interval_at(renewed + progress_every, progress_every);
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let lease = progress_every * 3;
    let mut draining = false;
    while !(finished(&job) && written(&job, &records)) {
        if draining && settled_here(&job, &records) {
            // Offered again at once rather than after the ack wait: another worker runs what is left.
            tracing::info!(%job_id, "queue_pull: items in flight here ended and recorded; the job goes back to the queue");
            acknowledge(message, AckKind::Nak(Some(DRAINED_PUT_BACK)), job_id).await;
            return Left::PutBack;
        }
        tokio::select! {
            event = events.recv() => match event {
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => job = snapshot(),
                Err(broadcast::error::RecvError::Closed) => break,
            },
            Ok(()) = records.changed() => job = snapshot(),
            // Confirmed within half a renewal period, or taken as unconfirmed (the client's own wait is 5 s, which
            // at a short ack wait would overrun the lease). Timed from the sending: the server applied it then or later.
            _ = progress.tick() => match renew(message, progress_every / 2, &mut renewed).await {
                Ok(()) => {}
                Err(e) if renewed.elapsed() + progress_every >= lease => {
                    tracing::error!(%job_id, error = %e, unconfirmed_for_ms = renewed.elapsed().as_millis() as u64, "queue_pull: renewals unconfirmed until the lease ends: the job goes to another worker; no item of it starts here any more");
                    return Left::HandedOver;
                }
                Err(e) => tracing::warn!(%job_id, error = %e, unconfirmed_for_ms = renewed.elapsed().as_millis() as u64, "queue_pull: renewal not confirmed; asked again"),
            },
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
    Left::Acked(job)
}

/// One in-progress ack, confirmed by the server within `within`; `renewed` becomes the time it was sent when it is.
pub(super) async fn renew(
    message: &dyn Acknowledge,
    within: Duration,
    renewed: &mut tokio::time::Instant,
) -> Result<(), BoxError> {
    let sent = tokio::time::Instant::now();
    match tokio::time::timeout(within, message.renew()).await {
        Ok(Ok(())) => {
            *renewed = sent;
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("not confirmed within {} ms", within.as_millis()).into()),
    }
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
mod tests;
