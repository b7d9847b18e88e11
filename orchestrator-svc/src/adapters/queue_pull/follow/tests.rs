use std::sync::{Arc, Mutex};

use palette_proto::orchestrator::v1::JobState;
use tokio::time::Instant;

use super::*;

/// Records each acknowledgement with the (paused) time it was sent at.
struct Recorded {
    start: Instant,
    acks: Mutex<Vec<(Duration, String)>>,
    /// Renewals sent in these windows (from, to) of the clock go unconfirmed (NATS out of reach).
    unconfirmed: Mutex<Vec<(Duration, Duration)>>,
}

#[async_trait::async_trait]
impl Acknowledge for Recorded {
    async fn acknowledge(&self, kind: AckKind) -> Result<(), BoxError> {
        let at = self.start.elapsed();
        self.acks.lock().unwrap().push((at, format!("{kind:?}")));
        let cut_off = self
            .unconfirmed
            .lock()
            .unwrap()
            .iter()
            .any(|&(from, to)| (from..to).contains(&at));
        if cut_off && matches!(kind, AckKind::Progress) {
            return Err("double ack response timed out".into());
        }
        Ok(())
    }
}

/// A worker cut off from NATS: its renewals go unconfirmed, and once the lease (three renewal periods) would end
/// before the next one, the job is handed over, with no ack or NAK sent for it (either would end the other worker's
/// delivery). One renewal unconfirmed now and then changes nothing.
#[tokio::test(start_paused = true)]
async fn renewals_unconfirmed_until_the_lease_ends_hand_the_job_over() {
    let setup = start(Duration::from_secs(10));
    // A blip at 20 s: confirmed again at 30 s.
    setup
        .message
        .unconfirmed
        .lock()
        .unwrap()
        .push((Duration::from_secs(15), Duration::from_secs(25)));
    tokio::time::sleep(Duration::from_secs(36)).await;
    assert!(!setup.follower.is_finished());
    // Cut off from 35 s: the renewal at 40 s is unconfirmed (the lease, renewed at 30 s, ends at 60 s: the one at 50 s
    // may still reach it); the one at 50 s is too, and the lease ends before a third: handed over then.
    setup
        .message
        .unconfirmed
        .lock()
        .unwrap()
        .push((Duration::from_secs(35), Duration::from_secs(1000)));
    let left = setup.follower.await.unwrap();
    assert!(matches!(left, Left::HandedOver), "{left:?}");
    let progress = "Progress".to_string();
    assert_eq!(
        acks(&setup.message),
        [
            (10, progress.clone()),
            (20, progress.clone()),
            (30, progress.clone()),
            (40, progress.clone()),
            (50, progress),
        ]
    );
}

/// The last state of a job acknowledged; None when it left otherwise.
fn acked(left: Left) -> Option<Progress> {
    match left {
        Left::Acked(job) => Some(job),
        Left::PutBack | Left::HandedOver => None,
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
    follower: tokio::task::JoinHandle<Left>,
}

fn start(progress_every: Duration) -> Setup {
    let message = Arc::new(Recorded {
        start: Instant::now(),
        acks: Mutex::default(),
        unconfirmed: Mutex::default(),
    });
    let state = Arc::new(Mutex::new(running_job()));
    let (events, receiver) = broadcast::channel(8);
    let (stop, mut stopping) = watch::channel(false);
    let (written, records) = watch::channel(0);
    let followed = Followed {
        renewed: Instant::now(),
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
    let last = acked(setup.follower.await.unwrap()).expect("finished");
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
    let last = acked(setup.follower.await.unwrap()).expect("finished");
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
    assert!(matches!(setup.follower.await.unwrap(), Left::PutBack));
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
    assert!(matches!(setup.follower.await.unwrap(), Left::PutBack));
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
        unconfirmed: Mutex::default(),
    };
    let mut job = running_job();
    settled(&mut job);
    let (_events, receiver) = broadcast::channel(1);
    let (_stop, mut stopping) = watch::channel(false);
    let (_written, records) = watch::channel(1);
    let followed = Followed {
        renewed: Instant::now(),
        job,
        events: receiver,
        snapshot: move || job,
        written: records,
    };
    let left = follow(
        &message,
        "j",
        Duration::from_secs(10),
        followed,
        &mut stopping,
    )
    .await;
    assert!(matches!(left, Left::Acked(_)));
    assert_eq!(
        *message.acks.lock().unwrap(),
        [(Duration::ZERO, "Ack".to_string())]
    );
}
