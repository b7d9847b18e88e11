//! ADAPTER=queue_pull against a real nats-server (JetStream): orchestrators sharing one work-queue stream, local
//! storage shared by all of them, the fake segmenter (slowed down so a job can be interrupted), and a real callback
//! receiver per orchestrator (so each callback tells which orchestrator sent it).

use palette_testing as common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream;
use common::fake_segmenter::{self, FakeSegmenter};
use common::nats::{self, Nats};
use common::orchestrator::photo_jpeg;
use common::receiver::{self, Delivery, Receiver};
use orchestrator_svc::Config;
use orchestrator_svc::config::Adapter;
use orchestrator_svc::storage::{LocalStore, ObjectStore};
use palette_proto::orchestrator::v1::jobs_client::JobsClient;
use serde_json::json;

const SECRET: &str = "queue-pull-callback-secret";
const USER: &str = "test-user";
const STREAM: &str = "palette-jobs";
const SUBJECT: &str = "palette.jobs";

/// An orchestrator in its own runtime, so that `kill` can end it abruptly: every task (items in flight, callbacks,
/// the NATS connection) is dropped at once, with no drain and no acknowledgement. `stop` is the graceful end.
struct Worker {
    runtime: Option<tokio::runtime::Runtime>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    /// What `run` returned (its error as text), once it has.
    stopped: Option<tokio::sync::oneshot::Receiver<Result<(), String>>>,
    /// Its gRPC server (which serves beside the queue).
    addr: std::net::SocketAddr,
}

impl Worker {
    fn start(config: Config) -> Worker {
        // Logs go to the test's captured output: shown when a test fails (its worker threads, spawned from the
        // test's thread, inherit the capture).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("orchestrator_svc=info"))
            .with_test_writer()
            .with_ansi(false)
            .try_init();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (shutdown, shutdown_signal) = tokio::sync::oneshot::channel::<()>();
        let (stopped_signal, stopped) = tokio::sync::oneshot::channel();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let signal = async move {
                let _ = shutdown_signal.await;
            };
            let ran = orchestrator_svc::run(config, listener, signal)
                .await
                .map_err(|e| format!("{e:?}"));
            let _ = stopped_signal.send(ran);
        });
        Worker {
            runtime: Some(runtime),
            shutdown: Some(shutdown),
            stopped: Some(stopped),
            addr,
        }
    }

    fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    /// Shuts down gracefully and waits until `run` returned: every callback it was going to send has been sent.
    async fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(stopped) = self.stopped.take() {
            let ran = tokio::time::timeout(Duration::from_secs(60), stopped)
                .await
                .expect("the orchestrator did not stop")
                .expect("the orchestrator's task panicked");
            if let Err(e) = ran {
                panic!("the orchestrator's run failed: {e}");
            }
        }
        self.kill();
    }

    /// Panics with `run`'s error if it has already returned one (a test waiting for this worker's work would
    /// otherwise only time out).
    fn assert_running(&mut self, name: &str) {
        if let Some(stopped) = self.stopped.as_mut() {
            match stopped.try_recv() {
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {}
                Ok(Ok(())) => panic!("{name}'s orchestrator stopped early"),
                Ok(Err(e)) => panic!("{name}'s orchestrator failed: {e}"),
                Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                    panic!("{name}'s orchestrator task panicked")
                }
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Setup {
    nats: Nats,
    segmenter: FakeSegmenter,
    store: LocalStore,
    dir: tempfile::TempDir,
}

async fn setup() -> Option<Setup> {
    let nats = nats::start()?;
    let segmenter = fake_segmenter::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path().join("storage")).unwrap();
    Some(Setup {
        nats,
        segmenter,
        store,
        dir,
    })
}

impl Setup {
    fn config(&self, receiver: &Receiver, ack_wait_sec: u64) -> Config {
        let mut config = Config::for_tests(self.dir.path().join("storage"), &self.segmenter.url);
        config.limits.presets_dir = self.dir.path().join("no-presets");
        config.adapter = Adapter::QueuePull;
        config.nats.nats_url = Some(self.nats.url.clone().into());
        config.nats.nats_ack_wait_sec = ack_wait_sec;
        config.callbacks.workers_api_url = Some(receiver.url().into());
        config.callbacks.gpu_callback_secret = Some(SECRET.into());
        config.limits.batch_concurrency = 1;
        config
    }

    async fn jetstream(&self) -> jetstream::Context {
        let client = async_nats::connect(self.nats.url.as_str()).await.unwrap();
        jetstream::new(client)
    }

    async fn put_inputs(&self, job: &str, count: u32) {
        for idx in 0..count {
            self.store
                .put(
                    &format!("inputs/{USER}/{job}/{idx}.jpg"),
                    // Distinct images: identical ones would reuse masks and skip the (slow) segmenter.
                    bytes::Bytes::from(photo_jpeg(64 + idx, 48)),
                    "image/jpeg",
                )
                .await
                .unwrap();
        }
    }

    fn output_exists(&self, job: &str, idx: u32) -> bool {
        let path = format!("storage/outputs/{USER}/{job}/rule1/{idx}.jpg");
        Path::new(&self.dir.path().join(path)).is_file()
    }

    /// Under `jobs-state/{user}/{job}/{specHash}/` (the job's one spec here; `masks/` beside it holds EditJob's
    /// records, not item records).
    fn marker_exists(&self, job: &str, idx: u32) -> bool {
        self.marker(job, idx).is_some()
    }

    /// The item record's JSON, if written.
    fn marker(&self, job: &str, idx: u32) -> Option<serde_json::Value> {
        let job_dir = self
            .dir
            .path()
            .join(format!("storage/jobs-state/{USER}/{job}"));
        let is_spec_hash =
            |name: &str| name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit());
        std::fs::read_dir(job_dir)
            .ok()?
            .filter_map(Result::ok)
            .filter(|spec| is_spec_hash(&spec.file_name().to_string_lossy()))
            .find_map(|spec| std::fs::read(spec.path().join(format!("{idx}.json"))).ok())
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
    }

    /// Waits until item 0 of `job` is recorded with its callback delivered, by `worker` (still running).
    async fn wait_first_item_settled(&self, worker: &mut Worker, job: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while self.marker_callback(job, 0) != "CALLBACK_STATE_DELIVERED" {
            worker.assert_running("the worker");
            assert!(
                tokio::time::Instant::now() < deadline,
                "the worker never finished an item (its log is above)"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The item record's callback state ("" when there is no record).
    fn marker_callback(&self, job: &str, idx: u32) -> String {
        self.marker(job, idx)
            .and_then(|record| record["callbackState"].as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

/// The seed's job JSON.
fn seed_job(job_id: &str, image_count: u32) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "userId": USER,
        "jobId": job_id,
        "concepts": ["wall", "floor", "furniture"],
        "rules": [{"ruleId": "rule1", "concept": "wall", "type": "recolor", "params": {"color": "#FF5733"}}],
        "imageCount": image_count,
    }))
    .unwrap()
}

/// Creates the stream as the orchestrators do (so a publish cannot precede it) and publishes, confirmed.
async fn publish(js: &jetstream::Context, payloads: Vec<Vec<u8>>) {
    // Created at the same moment by an orchestrator, the server may refuse one of the two identical creations
    // ("subjects overlap with an existing stream"); the orchestrators retry, and so does this.
    let mut attempts = 0;
    while let Err(e) = js
        .get_or_create_stream(jetstream::stream::Config {
            name: STREAM.into(),
            subjects: vec![SUBJECT.into()],
            retention: jetstream::stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
    {
        attempts += 1;
        assert!(attempts < 20, "stream {STREAM}: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for payload in payloads {
        // Seen once in ~30 runs: the ack says StreamNotFound right after the stream was created (by an
        // orchestrator at the same moment); the stream is there a moment later.
        let mut attempts = 0;
        while let Err(e) = js
            .publish(SUBJECT, payload.clone().into())
            .await
            .unwrap()
            .await
        {
            attempts += 1;
            assert!(attempts < 20, "publish: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Waits until the stream holds no message (work-queue retention: every one acknowledged) and nothing awaits an ack.
async fn wait_queue_drained(js: &jetstream::Context) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut stream = js.get_stream(STREAM).await.unwrap();
        let messages = stream.info().await.unwrap().state.messages;
        let pending = match stream
            .get_consumer::<jetstream::consumer::pull::Config>("orchestrators")
            .await
        {
            Ok(mut consumer) => {
                let info = consumer.info().await.unwrap();
                info.num_ack_pending + info.num_pending as usize
            }
            Err(_) => usize::MAX,
        };
        if messages == 0 && pending == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue never drained: {messages} messages, {pending} pending"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Callbacks per (job, idx).
fn per_item(deliveries: &[Delivery]) -> HashMap<(String, u64), usize> {
    let mut counts = HashMap::new();
    for d in deliveries {
        assert!(d.verified, "unverified callback: {d:?}");
        let idx = d.body["idx"].as_u64().expect("callback without idx");
        *counts.entry((d.job_id.clone(), idx)).or_insert(0) += 1;
    }
    counts
}

fn of_job(receiver: &Receiver, job_id: &str) -> Vec<Delivery> {
    receiver
        .deliveries()
        .into_iter()
        .filter(|d| d.job_id == job_id)
        .collect()
}

/// Every item of `job` called back exactly once, over all the receivers together.
fn assert_one_callback_per_item(receivers: &[&Receiver], job: &str, images: u32) {
    let all: Vec<Delivery> = receivers.iter().flat_map(|r| of_job(r, job)).collect();
    let counts = per_item(&all);
    assert_eq!(counts.len(), images as usize, "{counts:?}");
    assert!(
        counts.values().all(|&n| n == 1),
        "an item was called back twice: {counts:?}"
    );
}

async fn wait_deliveries(receivers: &[&Receiver], count: usize) -> Vec<Delivery> {
    let what = format!("{count} callbacks");
    receiver::wait_until(receivers, &what, |all| all.len() >= count).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_job_is_run_called_back_and_acknowledged() {
    let Some(s) = setup().await else { return };
    let receiver = Receiver::start(SECRET, vec![]).await;
    s.put_inputs("qp-seed", 2).await;
    let mut worker = Worker::start(s.config(&receiver, 30));
    let js = s.jetstream().await;
    publish(&js, vec![seed_job("qp-seed", 2)]).await;

    let deliveries = wait_deliveries(&[&receiver], 2).await;
    wait_queue_drained(&js).await;
    // An item's record is written just after its callback settled, which may be after the acknowledgement: once the
    // worker has drained, every record it was writing is written.
    worker.stop().await;
    let counts = per_item(&deliveries);
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    for d in &deliveries {
        assert_eq!(d.body["status"], "completed", "{d:?}");
    }
    for idx in 0..2 {
        assert!(s.output_exists("qp-seed", idx));
        assert!(s.marker_exists("qp-seed", idx));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_messages_are_dropped_not_redelivered() {
    let Some(s) = setup().await else { return };
    let receiver = Receiver::start(SECRET, vec![]).await;
    s.put_inputs("qp-after-poison", 1).await;
    let _worker = Worker::start(s.config(&receiver, 2));
    let js = s.jetstream().await;
    publish(
        &js,
        vec![
            b"not json".to_vec(),
            serde_json::to_vec(&json!({"jobId": 3})).unwrap(),
            seed_job("qp-after-poison", 1),
        ],
    )
    .await;
    wait_deliveries(&[&receiver], 1).await;
    wait_queue_drained(&js).await;
    assert_eq!(receiver.deliveries().len(), 1);
}

/// The same job submitted over gRPC and published to the queue: the message follows the job this replica already
/// runs (not recorded durably: nothing counts its durable records) until it is finished, and the worker goes on to
/// the next message. It followed it for ever, taking no more jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_job_already_submitted_over_grpc_is_acknowledged_when_it_finishes() {
    let Some(s) = setup().await else { return };
    let receiver = Receiver::start(SECRET, vec![]).await;
    s.put_inputs("qp-both-ways", 2).await;
    s.put_inputs("qp-next", 1).await;
    let worker = Worker::start(s.config(&receiver, 30));
    let spec = orchestrator_svc::spec_json::spec_from_bytes(&seed_job("qp-both-ways", 2)).unwrap();
    let mut client = JobsClient::connect(format!("http://{}", worker.addr))
        .await
        .unwrap();
    client.submit_job(spec).await.unwrap();
    let js = s.jetstream().await;
    publish(
        &js,
        vec![seed_job("qp-both-ways", 2), seed_job("qp-next", 1)],
    )
    .await;
    wait_deliveries(&[&receiver], 3).await;
    wait_queue_drained(&js).await;
    let counts = per_item(&receiver.deliveries());
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(
        counts.values().all(|&n| n == 1),
        "run once each: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_orchestrators_share_the_stream() {
    let Some(s) = setup().await else { return };
    s.segmenter.faults.delay_ms.store(300, Ordering::SeqCst);
    let (receiver_a, receiver_b) = (
        Receiver::start(SECRET, vec![]).await,
        Receiver::start(SECRET, vec![]).await,
    );
    let jobs: Vec<String> = (0..6).map(|i| format!("qp-shared-{i}")).collect();
    for job in &jobs {
        s.put_inputs(job, 1).await;
    }
    let _a = Worker::start(s.config(&receiver_a, 30));
    let _b = Worker::start(s.config(&receiver_b, 30));
    let js = s.jetstream().await;
    publish(&js, jobs.iter().map(|j| seed_job(j, 1)).collect()).await;

    let deliveries = wait_deliveries(&[&receiver_a, &receiver_b], jobs.len()).await;
    wait_queue_drained(&js).await;
    let counts = per_item(&deliveries);
    assert_eq!(counts.len(), jobs.len(), "{counts:?}");
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    assert!(
        !receiver_a.deliveries().is_empty() && !receiver_b.deliveries().is_empty(),
        "one orchestrator took every job: A {} B {}",
        receiver_a.deliveries().len(),
        receiver_b.deliveries().len()
    );
    for job in &jobs {
        assert!(s.output_exists(job, 0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_of_a_killed_orchestrator_is_finished_by_another_without_duplicates() {
    let Some(s) = setup().await else { return };
    const JOB: &str = "qp-killed";
    const IMAGES: u32 = 4;
    s.segmenter.faults.delay_ms.store(700, Ordering::SeqCst);
    let (receiver_a, receiver_b) = (
        Receiver::start(SECRET, vec![]).await,
        Receiver::start(SECRET, vec![]).await,
    );
    s.put_inputs(JOB, IMAGES).await;
    let mut a = Worker::start(s.config(&receiver_a, 2));
    let js = s.jetstream().await;
    publish(&js, vec![seed_job(JOB, IMAGES)]).await;

    // A finishes its first item (called back, recorded settled), then dies mid-job.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while s.marker_callback(JOB, 0) != "CALLBACK_STATE_DELIVERED" {
        a.assert_running("A");
        if tokio::time::Instant::now() >= deadline {
            // Seen once in many runs, not reproduced since: say where the job stood.
            let mut stream = js.get_stream(STREAM).await.unwrap();
            let messages = stream.info().await.unwrap().state.messages;
            let consumer = match stream
                .get_consumer::<jetstream::consumer::pull::Config>("orchestrators")
                .await
            {
                Ok(mut c) => format!("{:?}", c.info().await.map(|i| i.num_ack_pending)),
                Err(e) => format!("missing: {e}"),
            };
            panic!(
                "A never finished an item: stream holds {messages} messages; consumer {consumer}; callbacks to A: \
                 {:?}",
                receiver_a.deliveries()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.kill();
    let done_by_a = of_job(&receiver_a, JOB).len();
    assert!(
        (1..IMAGES as usize).contains(&done_by_a),
        "A did {done_by_a} items: {:?}",
        receiver_a.deliveries()
    );

    // B gets the message once the ack wait (2 s) has passed and finishes the job.
    let mut b = Worker::start(s.config(&receiver_b, 2));
    wait_deliveries(&[&receiver_a, &receiver_b], IMAGES as usize).await;
    wait_queue_drained(&js).await;
    // A late duplicate would come from B (A is dead): once B has stopped, all it would ever send is in.
    b.stop().await;
    assert_one_callback_per_item(&[&receiver_a, &receiver_b], JOB, IMAGES);
    assert!(!receiver_b.deliveries().is_empty(), "B finished nothing");
    assert_eq!(
        receiver_a.deliveries().len(),
        done_by_a,
        "A sent callbacks after its death"
    );
    for idx in 0..IMAGES {
        assert!(s.output_exists(JOB, idx), "output {idx} missing");
        assert!(s.marker_exists(JOB, idx), "record {idx} missing");
    }
}

/// A worker cut off from NATS (a partition: its connection open, nothing passing) while it runs a job: its renewals
/// go unconfirmed, and before its lease ends it hands the job over and starts none of its items any more, while the
/// redelivery runs the rest on another worker. Before, it ran every item to the end beside that worker (each
/// segmented twice; with first-wins records, still one end called back per item). Each item ends once, under one
/// webhook-id over both receivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_nats_hands_its_job_over() {
    let Some(s) = setup().await else { return };
    const JOB: &str = "qp-cut-off";
    const IMAGES: u32 = 8;
    s.segmenter.faults.delay_ms.store(1_000, Ordering::SeqCst);
    let (receiver_a, receiver_b) = (
        Receiver::start(SECRET, vec![]).await,
        Receiver::start(SECRET, vec![]).await,
    );
    s.put_inputs(JOB, IMAGES).await;
    let partition = common::partition::Partition::start(&s.nats.url).await;
    let mut config_a = s.config(&receiver_a, 3);
    config_a.nats.nats_url = Some(partition.url.clone().into());
    let mut a = Worker::start(config_a);
    let js = s.jetstream().await;
    publish(&js, vec![seed_job(JOB, IMAGES)]).await;
    // A finishes its first item, then is cut off from NATS (storage and the receiver still within reach).
    s.wait_first_item_settled(&mut a, JOB).await;
    partition.cut();
    // B takes the job once A's lease (3 s) has run out, and runs what A left.
    let mut b = Worker::start(s.config(&receiver_b, 3));
    receiver::wait_until(
        &[&receiver_a, &receiver_b],
        "every item called back",
        |all| per_item(all).len() == IMAGES as usize,
    )
    .await;
    wait_queue_drained(&js).await;
    b.stop().await;
    // One end per item, under one webhook-id (a callback A recorded pending may be resent by B: the same id).
    let mut ids: HashMap<u64, std::collections::BTreeSet<(String, String)>> = HashMap::new();
    for d in receiver_a
        .deliveries()
        .iter()
        .chain(&receiver_b.deliveries())
    {
        let end = (d.webhook_id.clone(), d.body["status"].to_string());
        ids.entry(d.body["idx"].as_u64().unwrap())
            .or_default()
            .insert(end);
    }
    assert_eq!(ids.len(), IMAGES as usize);
    assert!(ids.values().all(|ends| ends.len() == 1), "{ids:?}");
    assert!(!receiver_b.deliveries().is_empty(), "B ran nothing");
    // The work: each image segmented once, but for the item A had in flight as it handed over (B may take it before
    // A records it). Without the hand-over, A ran on beside B: most of B's items were segmented twice.
    let calls = s.segmenter.counters.segment_calls.load(Ordering::SeqCst);
    assert!(
        calls <= IMAGES as usize + 1,
        "{calls} Segment calls for {IMAGES} images"
    );
    drop(partition);
    a.kill();
}

/// The queue gives a job handed over to any worker: here back to the one that handed it over (the only one), while
/// the item it had in flight still runs there. The new run waits for that item's end and callback and takes it as
/// recorded; before, it ran the item a second time beside the first run (segmented twice; the first record kept one
/// end), or, the item's permit taken, called it back again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_handed_over_and_given_back_to_the_same_worker_runs_and_calls_back_no_item_twice() {
    let Some(s) = setup().await else { return };
    const JOB: &str = "qp-given-back";
    const IMAGES: u32 = 1;
    // The item is still in flight when the job comes back: the hand-over is at most 2.5 s after the cut (3 s lease),
    // the heal 3.5 s after it, and the worker fetches again ~10 s after the hand-over (its NATS connection renewed).
    s.segmenter.faults.delay_ms.store(20_000, Ordering::SeqCst);
    let receiver = Receiver::start(SECRET, vec![]).await;
    s.put_inputs(JOB, IMAGES).await;
    let partition = common::partition::Partition::start(&s.nats.url).await;
    let mut config = s.config(&receiver, 3);
    config.nats.nats_url = Some(partition.url.clone().into());
    // A permit free for the new run's item: it does not wait for the first run's item to end for want of one.
    config.limits.batch_concurrency = 2;
    let mut a = Worker::start(config);
    let js = s.jetstream().await;
    publish(&js, vec![seed_job(JOB, IMAGES)]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while s.segmenter.counters.in_flight.load(Ordering::SeqCst) == 0 {
        a.assert_running("the worker");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the item never reached the segmenter"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    partition.cut();
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    partition.heal();
    receiver::wait_until(&[&receiver], "every item called back", |all| {
        per_item(all).len() == IMAGES as usize
    })
    .await;
    wait_queue_drained(&js).await;
    a.stop().await;
    assert_one_callback_per_item(&[&receiver], JOB, IMAGES);
    let calls = s.segmenter.counters.segment_calls.load(Ordering::SeqCst);
    assert_eq!(
        calls, IMAGES as usize,
        "{calls} Segment calls for {IMAGES} images"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_delivered_more_than_the_limit_is_given_up_with_a_failed_callback_per_open_item() {
    let Some(s) = setup().await else { return };
    const JOB: &str = "qp-poison";
    const IMAGES: u32 = 3;
    s.segmenter.faults.delay_ms.store(700, Ordering::SeqCst);
    let (receiver_a, receiver_b) = (
        Receiver::start(SECRET, vec![]).await,
        Receiver::start(SECRET, vec![]).await,
    );
    s.put_inputs(JOB, IMAGES).await;
    // One delivery may run the job; the second gives it up.
    let config = |receiver: &Receiver| {
        let mut config = s.config(receiver, 2);
        config.nats.nats_max_deliveries = 1;
        config
    };
    let mut a = Worker::start(config(&receiver_a));
    let js = s.jetstream().await;
    publish(&js, vec![seed_job(JOB, IMAGES)]).await;
    // Recorded settled: a record written before its callback and not yet settled is resent by the next delivery.
    s.wait_first_item_settled(&mut a, JOB).await;
    a.kill();
    let done_by_a = of_job(&receiver_a, JOB).len();
    // A request A wrote just before its death may still be on its way to the fake segmenter, which counts it on
    // arrival: wait until the count stops moving before taking it as A's.
    let calls_by_a = settled(&s.segmenter.counters.segment_calls).await;

    let mut b = Worker::start(config(&receiver_b));
    wait_deliveries(&[&receiver_a, &receiver_b], IMAGES as usize).await;
    wait_queue_drained(&js).await;
    // Once B has stopped, all it would ever send is in (A is dead).
    b.stop().await;
    let all: Vec<Delivery> = [&receiver_a, &receiver_b]
        .iter()
        .flat_map(|r| of_job(r, JOB))
        .collect();
    let counts = per_item(&all);
    assert_eq!(counts.len(), IMAGES as usize, "{counts:?}");
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    // B ran nothing: what A recorded stands, every other item failed with the code.
    assert_eq!(
        s.segmenter.counters.segment_calls.load(Ordering::SeqCst),
        calls_by_a
    );
    let given_up = of_job(&receiver_b, JOB);
    assert_eq!(given_up.len(), IMAGES as usize - done_by_a, "{given_up:?}");
    for d in &given_up {
        assert_eq!(d.body["status"], "failed", "{d:?}");
        assert_eq!(d.body["error_code"], "too_many_deliveries", "{d:?}");
    }
}

/// The counter's value once it has not changed for half a second.
async fn settled(counter: &std::sync::atomic::AtomicUsize) -> usize {
    let mut last = counter.load(Ordering::SeqCst);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = counter.load(Ordering::SeqCst);
        if now == last {
            return now;
        }
        last = now;
    }
}

/// The consumer keeps the lease it was created with (4 s here). Workers configured later with NATS_ACK_WAIT_SEC=300
/// must renew at the consumer's pace (every 1.3 s): renewing every 100 s, a job longer than 4 s was delivered again
/// to the other worker while it ran, which ran its open items a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_renew_at_the_consumers_lease_not_their_own_setting() {
    let Some(s) = setup().await else { return };
    const JOB: &str = "qp-long";
    const IMAGES: u32 = 4;
    let (receiver_b, receiver_c) = (
        Receiver::start(SECRET, vec![]).await,
        Receiver::start(SECRET, vec![]).await,
    );
    s.put_inputs(JOB, IMAGES).await;
    let js = s.jetstream().await;
    // The first worker creates the consumer with a 4 s lease, and stops before any job.
    let mut first = Worker::start(s.config(&receiver_b, 4));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let created = match js.get_stream(STREAM).await {
            Ok(stream) => stream
                .get_consumer::<jetstream::consumer::pull::Config>("orchestrators")
                .await
                .is_ok(),
            Err(_) => false,
        };
        if created {
            break;
        }
        first.assert_running("first");
        assert!(tokio::time::Instant::now() < deadline, "no consumer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.stop().await;

    // ~8 s of work (4 images, one at a time): twice the lease.
    s.segmenter.faults.delay_ms.store(2_000, Ordering::SeqCst);
    let mut b = Worker::start(s.config(&receiver_b, 300));
    let mut c = Worker::start(s.config(&receiver_c, 300));
    publish(&js, vec![seed_job(JOB, IMAGES)]).await;
    wait_deliveries(&[&receiver_b, &receiver_c], IMAGES as usize).await;
    wait_queue_drained(&js).await;
    b.stop().await;
    c.stop().await;
    assert_eq!(
        s.segmenter.counters.segment_calls.load(Ordering::SeqCst),
        IMAGES as usize,
        "each image segmented once: the job was not delivered again while it ran"
    );
    let all: Vec<Delivery> = [&receiver_b, &receiver_c]
        .iter()
        .flat_map(|r| of_job(r, JOB))
        .collect();
    assert!(per_item(&all).values().all(|&n| n == 1));
}

/// A refusal may be one replica's alone: during a rolling deploy a message names a preset only the newer replicas
/// have. It was terminated at once, the job lost without a word; it is offered again (after 5 s) until its
/// deliveries run out, and a replica that knows the preset runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_refused_by_one_replica_is_offered_again_to_another() {
    let Some(s) = setup().await else { return };
    let receiver = Receiver::start(SECRET, vec![]).await;
    s.put_inputs("qp-new-preset", 1).await;
    let old = Worker::start(s.config(&receiver, 30));
    let js = s.jetstream().await;
    let mut job: serde_json::Value = serde_json::from_slice(&seed_job("qp-new-preset", 1)).unwrap();
    job["preset"] = json!("house");
    publish(&js, vec![serde_json::to_vec(&job).unwrap()]).await;
    // The old replica takes it and refuses it (no such preset there), then a new one with the preset comes up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stream = js.get_stream(STREAM).await.unwrap();
        if let Ok(mut consumer) = stream
            .get_consumer::<jetstream::consumer::pull::Config>("orchestrators")
            .await
        {
            let info = consumer.info().await.unwrap();
            if info.delivered.consumer_sequence >= 1 {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the old replica never took the job"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let presets = s.dir.path().join("presets");
    std::fs::create_dir_all(&presets).unwrap();
    std::fs::write(
        presets.join("house.json"),
        r#"{"name": "house", "concepts": ["wall"]}"#,
    )
    .unwrap();
    drop(old);
    let mut config = s.config(&receiver, 30);
    config.limits.presets_dir = presets;
    let _new = Worker::start(config);
    wait_deliveries(&[&receiver], 1).await;
    wait_queue_drained(&js).await;
    assert_eq!(receiver.deliveries().len(), 1);
    assert_eq!(receiver.deliveries()[0].body["status"], "completed");
}

/// A redelivery to a replica whose preset changed since the first delivery (a rolling deploy) plans the job
/// differently; item records were keyed by that plan, so it found none, ran every item again and called each back a
/// second time under new webhook ids. They are keyed by the message's own spec now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_to_a_replica_with_a_changed_preset_calls_nothing_back_twice() {
    let Some(s) = setup().await else { return };
    const JOB: &str = "qp-preset-changed";
    const IMAGES: u32 = 4;
    s.segmenter.faults.delay_ms.store(700, Ordering::SeqCst);
    let (receiver_a, receiver_b) = (
        Receiver::start(SECRET, vec![]).await,
        Receiver::start(SECRET, vec![]).await,
    );
    s.put_inputs(JOB, IMAGES).await;
    let presets = |name: &str, format: &str| {
        let dir = s.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("house.json"),
            format!(r#"{{"name": "house", "concepts": ["wall"], "output_format": "{format}"}}"#),
        )
        .unwrap();
        dir
    };
    let mut config_a = s.config(&receiver_a, 2);
    config_a.limits.presets_dir = presets("presets-a", "jpeg");
    let mut a = Worker::start(config_a);
    let js = s.jetstream().await;
    let mut job: serde_json::Value = serde_json::from_slice(&seed_job(JOB, IMAGES)).unwrap();
    job["preset"] = json!("house");
    publish(&js, vec![serde_json::to_vec(&job).unwrap()]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while s.marker_callback(JOB, 0) != "CALLBACK_STATE_DELIVERED" {
        a.assert_running("A");
        assert!(
            tokio::time::Instant::now() < deadline,
            "A never finished an item"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.kill();
    let done_by_a = of_job(&receiver_a, JOB).len();

    let mut config_b = s.config(&receiver_b, 2);
    config_b.limits.presets_dir = presets("presets-b", "png");
    let mut b = Worker::start(config_b);
    wait_deliveries(&[&receiver_a, &receiver_b], IMAGES as usize).await;
    wait_queue_drained(&js).await;
    b.stop().await;
    eprintln!("A called back {done_by_a} items before it died");
    assert_one_callback_per_item(&[&receiver_a, &receiver_b], JOB, IMAGES);
}

/// A queued job refused for good (here at once: one delivery allowed) was terminated with a log line only: its caller
/// never heard of its items. Each is called back FAILED `invalid_job` with the refusal now, where the callback can
/// name the job, except an item an earlier delivery finished (its record exists); a job whose own ids are invalid
/// still gets nothing (no URL or webhook id can be made from them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_refused_for_good_calls_back_each_item_failed() {
    let Some(s) = setup().await else { return };
    let receiver = Receiver::start(SECRET, vec![]).await;
    s.put_inputs("qp-after-refusals", 1).await;
    let mut config = s.config(&receiver, 30);
    config.nats.nats_max_deliveries = 1;
    let _worker = Worker::start(config);
    let js = s.jetstream().await;
    let mut unknown_preset: serde_json::Value =
        serde_json::from_slice(&seed_job("qp-no-such-preset", 4)).unwrap();
    unknown_preset["preset"] = json!("nope");
    // Item 2 was finished by an earlier delivery (a replica that had the preset, stopped before the job's end): its
    // record is there (unreadable here: a newer release's), so it was called back then and is left alone now. Item
    // 3's record says its callback was still pending (its worker died sending it): its recorded end is sent again.
    let message = serde_json::to_vec(&unknown_preset).unwrap();
    let spec = orchestrator_svc::spec_json::spec_from_bytes(&message).unwrap();
    let record = |idx: u32| {
        format!(
            "jobs-state/{USER}/qp-no-such-preset/{}/{idx}.json",
            orchestrator_svc::jobs::job::spec_hash(&spec)
        )
    };
    let pending = json!({"idx": 3, "state": "ITEM_STATE_COMPLETED", "outputKey": "outputs/u/earlier.jpg",
        "callbackState": "CALLBACK_STATE_PENDING"});
    for (idx, body) in [
        (2, b"{}".to_vec()),
        (3, serde_json::to_vec(&pending).unwrap()),
    ] {
        s.store
            .put(&record(idx), bytes::Bytes::from(body), "application/json")
            .await
            .unwrap();
    }
    let mut bad_id: serde_json::Value = serde_json::from_slice(&seed_job("qp-bad-id", 2)).unwrap();
    bad_id["jobId"] = json!("../qp-bad-id");
    publish(
        &js,
        vec![
            message,
            serde_json::to_vec(&bad_id).unwrap(),
            seed_job("qp-after-refusals", 1),
        ],
    )
    .await;
    let deliveries = wait_deliveries(&[&receiver], 4).await;
    wait_queue_drained(&js).await;
    assert_eq!(receiver.deliveries().len(), 4);
    let (resent, refused): (Vec<_>, Vec<_>) = deliveries
        .iter()
        .filter(|d| d.job_id == "qp-no-such-preset")
        .partition(|d| d.body["idx"] == 3);
    assert_eq!(resent.len(), 1);
    assert_eq!(resent[0].body["status"], "completed", "the recorded end");
    assert_eq!(
        s.marker("qp-no-such-preset", 3).unwrap()["callbackState"],
        "CALLBACK_STATE_DELIVERED"
    );
    assert_eq!(refused.len(), 2);
    let mut idx: Vec<u64> = refused
        .iter()
        .map(|d| d.body["idx"].as_u64().unwrap())
        .collect();
    idx.sort_unstable();
    assert_eq!(idx, [0, 1]);
    for d in &refused {
        assert_eq!(d.body["status"], "failed");
        assert_eq!(d.body["error_code"], "invalid_job");
        assert!(
            d.body["error"].as_str().unwrap().contains("preset"),
            "{}",
            d.body["error"]
        );
    }
    // Each recorded with its end and its settled callback, so a later delivery to a replica that has the preset
    // takes them as ended instead of running them; the item an earlier delivery recorded keeps its record.
    for idx in [0, 1] {
        let record = s.marker("qp-no-such-preset", idx).expect("recorded");
        assert_eq!(record["state"], "ITEM_STATE_FAILED", "{record}");
        assert_eq!(record["errorCode"], "invalid_job", "{record}");
        assert_eq!(
            record["callbackState"], "CALLBACK_STATE_DELIVERED",
            "{record}"
        );
    }
    assert_eq!(s.marker("qp-no-such-preset", 2), Some(json!({})));
}

/// A message that names a job but is not one (here an unknown field: a newer upstream's, which a newer replica may
/// read) was terminated with a log line only, its caller never told. It is refused as a job is now: offered again
/// until its deliveries run out (here one), then each item is called back FAILED `invalid_job` with the parse
/// error; one whose ids cannot name a job still gets nothing, and the queue goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_names_a_job_but_is_not_one_calls_back_each_item_failed() {
    let Some(s) = setup().await else { return };
    let receiver = Receiver::start(SECRET, vec![]).await;
    s.put_inputs("qp-after-unreadable", 1).await;
    let mut config = s.config(&receiver, 30);
    config.nats.nats_max_deliveries = 1;
    let _worker = Worker::start(config);
    let js = s.jetstream().await;
    let mut newer: serde_json::Value =
        serde_json::from_slice(&seed_job("qp-newer-upstream", 2)).unwrap();
    newer["priority"] = json!("high");
    let mut bad_id = newer.clone();
    bad_id["jobId"] = json!("../qp-newer-upstream");
    publish(
        &js,
        vec![
            serde_json::to_vec(&newer).unwrap(),
            serde_json::to_vec(&bad_id).unwrap(),
            seed_job("qp-after-unreadable", 1),
        ],
    )
    .await;
    wait_deliveries(&[&receiver], 3).await;
    wait_queue_drained(&js).await;
    let deliveries = receiver.deliveries();
    assert_eq!(deliveries.len(), 3);
    let refused: Vec<_> = deliveries
        .iter()
        .filter(|d| d.job_id == "qp-newer-upstream")
        .collect();
    assert_eq!(refused.len(), 2);
    for d in &refused {
        assert_eq!(d.body["status"], "failed");
        assert_eq!(d.body["error_code"], "invalid_job");
        let error = d.body["error"].as_str().unwrap();
        assert!(
            error.contains("unknown field") && error.contains("priority"),
            "{error}"
        );
    }
    assert!(
        deliveries
            .iter()
            .any(|d| d.job_id == "qp-after-unreadable" && d.body["status"] == "completed")
    );
}

/// A CancelJob of a redelivered queue job one of whose unstarted items an earlier run had recorded COMPLETED: the
/// answer shows that item COMPLETED, as it stands, not CANCELLED (items read their record only when they start, so
/// the answer and WatchJob said CANCELLED until the record replaced it a moment later); no callback goes out for it,
/// and the other items end CANCELLED, each called back once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_answers_an_earlier_runs_recorded_end_as_it_stands() {
    use palette_proto::orchestrator::v1::{CancelJobRequest, ItemState};
    let Some(s) = setup().await else { return };
    const JOB: &str = "qp-cancel-recorded";
    const IMAGES: u32 = 4;
    s.segmenter.faults.delay_ms.store(5_000, Ordering::SeqCst);
    let receiver = Receiver::start(SECRET, vec![]).await;
    s.put_inputs(JOB, IMAGES).await;
    // The earlier run ended item 3 and told it (settled record), then stopped.
    let message = seed_job(JOB, IMAGES);
    let spec = orchestrator_svc::spec_json::spec_from_bytes(&message).unwrap();
    let hash = orchestrator_svc::jobs::job::spec_hash(&spec);
    let record = json!({"idx": 3, "state": "ITEM_STATE_COMPLETED", "outputKey": format!("outputs/{USER}/{JOB}/rule1/3.jpg"),
        "callbackState": "CALLBACK_STATE_DELIVERED", "callbackAttempts": 1});
    s.store
        .put(
            &format!("jobs-state/{USER}/{JOB}/{hash}/3.json"),
            bytes::Bytes::from(serde_json::to_vec(&record).unwrap()),
            "application/json",
        )
        .await
        .unwrap();
    // A first worker takes the job and dies while item 0 is being segmented; the redelivery goes to `worker`, whose
    // item 0 then runs (5 s) while the others wait.
    let mut first = Worker::start(s.config(&receiver, 2));
    let js = s.jetstream().await;
    publish(&js, vec![message]).await;
    let segments = s.segmenter.counters.clone();
    let segmenting = |calls: usize| {
        let segments = segments.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while segments.segment_calls.load(Ordering::SeqCst) < calls {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "item 0 never started"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    segmenting(1).await;
    first.kill();
    let worker = Worker::start(s.config(&receiver, 2));
    segmenting(2).await;
    let mut client = JobsClient::connect(format!("http://{}", worker.addr))
        .await
        .unwrap();
    let job = client
        .cancel_job(CancelJobRequest {
            user_id: USER.into(),
            job_id: JOB.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let states: Vec<i32> = job.items.iter().map(|i| i.state).collect();
    assert_eq!(states[3], ItemState::Completed as i32, "{states:?}");
    for idx in [1, 2] {
        assert_eq!(states[idx], ItemState::Cancelled as i32, "{states:?}");
    }
    receiver::wait_until(&[&receiver], "items 0-2 called back", |all| {
        per_item(all).len() == 3
    })
    .await;
    wait_queue_drained(&js).await;
    let deliveries = receiver.deliveries();
    assert!(
        deliveries.iter().all(|d| d.body["idx"] != 3),
        "item 3 called back again"
    );
    assert!(per_item(&deliveries).values().all(|&n| n == 1));
}

/// The worker dies while an item's callback is being retried (the receiver answered 503): the item was recorded
/// before its callback, callback pending. The redelivery to another worker finds that record and sends the callback
/// again (same webhook-id), instead of running the item again: with the segmenter now failing, that run ended FAILED
/// after the COMPLETED the receiver may have seen, two ends of one item. (Before, the record was written only once
/// the callback settled.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_whose_worker_died_mid_callback_is_called_back_again_not_run_again() {
    let Some(s) = setup().await else { return };
    const JOB: &str = "qp-mid-callback";
    // The first attempt is refused; its retry would come 30 s later.
    let receiver = Receiver::start(SECRET, vec![(503, Some(30))]).await;
    s.put_inputs(JOB, 1).await;
    let mut a = Worker::start(s.config(&receiver, 2));
    let js = s.jetstream().await;
    publish(&js, vec![seed_job(JOB, 1)]).await;
    tokio::time::timeout(
        Duration::from_secs(30),
        receiver.wait_until("the first attempt", |d| !d.is_empty()),
    )
    .await
    .expect("called back");
    assert_eq!(
        s.marker_callback(JOB, 0),
        "CALLBACK_STATE_PENDING",
        "recorded before its callback"
    );
    a.kill();
    let runs = s.segmenter.counters.segment_calls.load(Ordering::SeqCst);
    assert_eq!(runs, 1);
    // Any run now fails.
    s.segmenter
        .faults
        .unavailable_first
        .store(1_000, Ordering::SeqCst);
    let mut b = Worker::start(s.config(&receiver, 2));
    wait_deliveries(&[&receiver], 2).await;
    wait_queue_drained(&js).await;
    b.stop().await;
    let deliveries = of_job(&receiver, JOB);
    assert_eq!(deliveries.len(), 2, "{deliveries:?}");
    for d in &deliveries {
        assert_eq!(d.body["status"], "completed", "{d:?}");
    }
    assert_eq!(
        deliveries[0].webhook_id, deliveries[1].webhook_id,
        "the same callback again"
    );
    assert_eq!(
        s.segmenter.counters.segment_calls.load(Ordering::SeqCst),
        runs,
        "not run again"
    );
    assert_eq!(s.marker_callback(JOB, 0), "CALLBACK_STATE_DELIVERED");
}
