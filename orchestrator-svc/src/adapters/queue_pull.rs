//! ADAPTER=queue_pull: durable job intake from a NATS JetStream work queue.
//!
//! - Stream NATS_STREAM (subjects [NATS_SUBJECT], work-queue retention: a message is gone once acknowledged) and the
//!   durable pull consumer NATS_CONSUMER (explicit acks, NATS_ACK_WAIT_SEC) are created if missing. Every
//!   orchestrator binds to the same consumer, so the stream's jobs are shared among them.
//! - A message is the seed's job JSON (as the Runpod `input`, see `spec_json::spec_from_input`). One message is fetched
//!   at a time, so no job waits in one orchestrator while another is idle.
//! - A message that names no job (not JSON; no string user and job id and integer image count) is terminated
//!   (`Term`: logged, never redelivered). One that names a job but is not the seed's job JSON (an unknown field: a
//!   newer upstream's, which a newer replica may read) is refused as an invalid job is. A job refused for good (its
//!   last delivery: see below) has its items called back FAILED `invalid_job` first, where the callback can name
//!   the job (`JobService::call_back_refused`).
//! - A valid job is submitted to the same `JobService` as gRPC SubmitJob (GetJob/WatchJob/CancelJob work on it)
//!   with durable items (`jobs::durable`), followed until every item is terminal and its callback settled, then
//!   acknowledged (double ack: the server confirms). While it runs an in-progress ack goes out every third of the
//!   ack wait, so a long job is not redelivered (`follow`, tested on the paused clock).
//! - An orchestrator that dies mid-job sends no more in-progress acks: after the ack wait JetStream redelivers the
//!   message to another orchestrator, which skips the items the first one recorded (no second callback) and runs
//!   the rest; outputs are written under fixed keys, so a rerun item overwrites them.
//! - One cut off from NATS sees its renewals go unconfirmed and hands the job over before its lease ends
//!   (`follow::Left::HandedOver`, `JobService::hand_over`): it starts none of the job's items any more. An item two
//!   runs end anyway has one end, the first recorded (`jobs::durable::claim`).
//! - With JOB_STORE=nats a valid job is submitted like a SubmitJob and acknowledged as soon as it is recorded: the
//!   shared store then runs its items on every replica, with leases of its own (`jobs::cluster`).
//! - A job that cannot be taken now (MAX_RETAINED_JOBS reached; JOB_STORE=nats: the store cannot record it) is
//!   submitted again in place, the message kept alive by in-progress acks (`retry`): a NAK counted a delivery each
//!   time, so an outage used up NATS_MAX_DELIVERIES. Only shutdown puts it back (NAK).
//! - A poison job (its runners keep dying) runs on at most NATS_MAX_DELIVERIES deliveries; the next one gives it up
//!   (`JobService::give_up_durable`: open items FAILED `too_many_deliveries`, called back) and acknowledges it.

use std::sync::Arc;
use std::time::Duration;

mod follow;
mod retry;

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use futures::StreamExt;
use tokio::sync::watch;

pub use crate::config::QueueSettings;
use crate::config::{adopt_consumer_limits, max_deliver_for};
use crate::error::{ApiError, BoxError, Report};
use crate::jobs::{JobKey, JobService};
use crate::spec_json::spec_from_bytes;
use follow::{Followed, Left, acknowledge, follow};
use retry::submit_patiently;

/// How long one fetch waits for a message before asking again (and checking for shutdown).
const FETCH_WAIT: Duration = Duration::from_secs(5);
/// Pause after a failed connection, setup or fetch, and between submissions the job store could not record.
const RETRY_PAUSE: Duration = Duration::from_secs(2);

/// How long a job refused here waits before it is offered again (to any replica) after its first refusal; it
/// doubles with each (5, 10, 20, 40 s: over a minute for a rolling deploy to bring a replica that takes it).
const REFUSED_PAUSE: Duration = Duration::from_secs(5);
/// Deliveries a refused job gets at most, whatever the consumer allows (it may allow any number).
const MAX_REFUSALS: u64 = 5;

/// Why the queue cannot be read now (retried after RETRY_PAUSE).
#[derive(Debug, thiserror::Error)]
enum QueueError {
    #[error("connect")]
    Connect(#[source] async_nats::ConnectError),
    #[error("stream {name}")]
    Stream {
        name: String,
        #[source]
        source: BoxError,
    },
    #[error("consumer {name}")]
    Consumer {
        name: String,
        #[source]
        source: BoxError,
    },
    #[error("fetch")]
    Fetch(#[source] BoxError),
}

/// Connects, and creates the stream and the shared consumer if missing. `settings` take the consumer's lease and
/// delivery limit as it has them (`adopt_consumer_limits`: an existing consumer keeps the ones it was created with).
async fn connect(settings: &mut QueueSettings) -> Result<PullConsumer, QueueError> {
    let client = async_nats::connect(settings.url.expose())
        .await
        .map_err(QueueError::Connect)?;
    let js = jetstream::new(client);
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: settings.stream.clone(),
            subjects: vec![settings.subject.clone()],
            retention: jetstream::stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
        .map_err(|e| QueueError::Stream {
            name: settings.stream.clone(),
            source: e.into(),
        })?;
    let consumer = stream
        .get_or_create_consumer(
            &settings.consumer,
            jetstream::consumer::pull::Config {
                durable_name: Some(settings.consumer.clone()),
                filter_subject: settings.subject.clone(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: settings.ack_wait,
                // One past the deliveries that run the job: the delivery that gives it up (`handle`).
                max_deliver: max_deliver_for(settings.max_deliveries),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| QueueError::Consumer {
            name: settings.consumer.clone(),
            source: e.into(),
        })?;
    let config = &consumer.cached_info().config;
    adopt_consumer_limits(
        &settings.consumer,
        &mut settings.ack_wait,
        &mut settings.max_deliveries,
        config.ack_wait,
        config.max_deliver,
    );
    Ok(consumer)
}

/// Runs one message's job to its end, then acknowledges it.
async fn handle(
    settings: &QueueSettings,
    service: &JobService,
    message: jetstream::Message,
    mut stop: watch::Receiver<bool>,
) {
    // A message that names a job but is not one (an unknown field: a newer upstream, which a newer replica may
    // read) is refused as a job is, so its caller is told: offered again, then its items called back FAILED.
    let (spec, unreadable) = match spec_from_bytes(&message.payload) {
        Ok(spec) => (spec, None),
        Err(e) => match crate::spec_json::named_job(&message.payload) {
            Some(named) => {
                let reason = Report(&e).to_string();
                let refusal = service.refusal_of_unreadable(&named, reason);
                (named, Some(refusal))
            }
            None => {
                tracing::error!(error = %Report(&e), "queue_pull: invalid job dropped (it names no job to tell)");
                acknowledge(&message, AckKind::Term, "").await;
                return;
            }
        },
    };
    let job_id = spec.job_id.clone();
    let delivered = message
        .info()
        .map_or(1, |info| info.delivered.max(1) as u64);
    if delivered > 1 {
        tracing::info!(%job_id, delivered, "queue_pull: job redelivered; recorded items are skipped");
    }
    let progress_every = settings.progress_every();
    // JOB_STORE=nats: once recorded, the job is the shared store's (its items are leased and redelivered there), so
    // the message has done its work. Otherwise this worker runs it, durably, and gives it up past the limit.
    let shared = service.shares_jobs();
    let submit = || async {
        if let Some(refusal) = &unreadable {
            Err(ApiError::InvalidArgument(refusal.clone()))
        } else if shared {
            service.submit_unchecked(&spec).await
        } else if delivered > settings.max_deliveries {
            service.give_up_durable(&spec, delivered - 1).await
        } else {
            service.submit_durable(&spec).await
        }
    };
    // The delivery that gives the job up is the consumer's last: put back now, it was never delivered again, and
    // its open items never ended. It runs to its end (within the drain's grace).
    let giving_up = !shared && delivered > settings.max_deliveries;
    // When the last renewal the server confirmed was sent: the delivery, until one is.
    let mut renewed = tokio::time::Instant::now();
    match submit_patiently(
        &message,
        &job_id,
        (progress_every, &mut renewed),
        RETRY_PAUSE,
        (!giving_up).then_some(&mut stop),
        submit,
    )
    .await
    {
        None => return,
        Some(Ok(_)) if shared => {
            acknowledge(&message, AckKind::Ack, &job_id).await;
            return;
        }
        Some(Ok(_)) => {}
        // A refusal may be this replica's alone (a rolling deploy: a preset only newer replicas have; a job id this
        // one still retains with an older spec), and a message cannot tell anyone: offered again, to whichever
        // replica takes it, until its deliveries run out; dropped then.
        Some(Err(e)) if delivered < settings.max_deliveries.min(MAX_REFUSALS) => {
            tracing::warn!(%job_id, delivered, error = %e, "queue_pull: job refused here; offered again");
            let pause = REFUSED_PAUSE * 2u32.pow(delivered.saturating_sub(1).min(6) as u32);
            acknowledge(&message, AckKind::Nak(Some(pause)), &job_id).await;
            return;
        }
        Some(Err(e)) => {
            tracing::error!(%job_id, delivered, error = %e, "queue_pull: job refused on its last delivery; dropped");
            // Its caller hears nothing else: its items are called back FAILED where the refusal allows, the message
            // kept by in-progress acks meanwhile (a receiver down takes minutes of retries). A shutdown does not cut
            // them short: put back, the next delivery could go to a replica that accepts the job and runs items
            // already told FAILED (JOB_STORE=nats reads no item records). Past the drain's grace the message comes
            // back after the ack wait, and a refusing delivery resends the callbacks still pending.
            let callbacks = service.call_back_refused(&spec, &e);
            tokio::pin!(callbacks);
            let mut progress = tokio::time::interval(progress_every);
            progress.tick().await;
            loop {
                tokio::select! {
                    _ = &mut callbacks => break,
                    _ = progress.tick() => acknowledge(&message, AckKind::Progress, &job_id).await,
                }
            }
            acknowledge(&message, AckKind::Term, &job_id).await;
            return;
        }
    }
    let handle = match service.get(&JobKey::of_spec(&spec)) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(%job_id, error = %e, "queue_pull: job vanished; offered again");
            acknowledge(&message, AckKind::Nak(None), &job_id).await;
            return;
        }
    };
    tracing::info!(%job_id, "queue_pull: job taken");
    if delivered > 1 {
        handle
            .redelivered
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    // Subscribed first: a change after it is an event, which reads the counts again.
    let events = handle.subscribe().1;
    let job = handle.progress();
    // A job this replica already runs without durable records (the same spec submitted over gRPC, or resumed from
    // JOB_STORE=local): `durable_written` never counts its items, so it is followed until it is finished. Should
    // this replica stop first, the redelivery runs it durably elsewhere, its ended items again.
    let written = if handle.plan.durable_items {
        handle.durable_written.watch()
    } else {
        watch::channel(u32::MAX).1
    };
    let followed = Followed {
        renewed,
        job,
        events,
        snapshot: || handle.progress(),
        written,
    };
    match follow(&message, &job_id, progress_every, followed, &mut stop).await {
        Left::Acked(job) => {
            tracing::info!(%job_id, completed = job.completed, failed = job.failed, cancelled = job.cancelled, "queue_pull: job acknowledged");
        }
        Left::PutBack => {}
        // A job this replica runs without durable records (submitted over gRPC too) is its own to finish: only
        // the message goes, unacknowledged, to the worker it is redelivered to.
        Left::HandedOver if handle.plan.durable_items => service.hand_over(&handle),
        Left::HandedOver => {}
    }
}

/// Takes jobs one at a time until `stop` turns true; a job in progress then keeps its lease while its items in
/// flight here finish and are recorded, and is then put back (NAK) for another worker (`follow`).
pub async fn run(
    mut settings: QueueSettings,
    service: Arc<JobService>,
    stop: watch::Receiver<bool>,
) {
    tracing::info!(stream = %settings.stream, subject = %settings.subject, consumer = %settings.consumer, "queue_pull worker started");
    let mut stop_wait = stop.clone();
    let mut consumer: Option<PullConsumer> = None;
    while !*stop.borrow() {
        let Some(current) = consumer.as_ref() else {
            tokio::select! {
                connected = connect(&mut settings) => match connected {
                    Ok(c) => consumer = Some(c),
                    Err(e) => {
                        tracing::warn!(error = %Report(&e), "queue_pull: NATS not ready");
                        tokio::select! {
                            _ = tokio::time::sleep(RETRY_PAUSE) => {}
                            _ = stop_wait.changed() => break,
                        }
                    }
                },
                _ = stop_wait.changed() => break,
            }
            continue;
        };
        let fetched = tokio::select! {
            batch = async {
                let mut batch = current.fetch().max_messages(1).expires(FETCH_WAIT).messages().await?;
                batch.next().await.transpose()
            } => batch.map_err(QueueError::Fetch),
            _ = stop_wait.changed() => break,
        };
        match fetched {
            Ok(Some(message)) => handle(&settings, &service, message, stop.clone()).await,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %Report(&e), "queue_pull: fetch failed");
                consumer = None;
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_PAUSE) => {}
                    _ = stop_wait.changed() => break,
                }
            }
        }
    }
    tracing::info!("queue_pull worker stopped");
}
