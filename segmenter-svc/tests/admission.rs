//! Admission before the decode: a request the engine's queue has no room for is refused RESOURCE_EXHAUSTED before
//! its image is decoded (at arrival, and again when it has a pre-processing slot), and the check counts only what
//! occupies the queue: not a job the inference thread has taken into the batch it is collecting, and
//! QUEUE_CAPACITY=0 holds one job, as the queue itself does. (The decode counter is checked in metrics.rs: the
//! metrics recorder is process-global.)
//!
//! Each test holds the inference thread busy with a delayed run (the fault hook) and waits for events, not time,
//! except where said.

use palette_testing::segmenter as common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{image_bytes, request, test_config};
use palette_proto::segmenter::v1 as pb;
use pb::segmenter_client::SegmenterClient;
use segmenter_svc::engine::{Job, JobOutput};
use segmenter_svc::postprocess::FilterParams;
use segmenter_svc::service::Shared;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::Channel;

/// How long the inference thread is held busy: what each test does meanwhile takes well under a second, so a loaded
/// CI machine has seconds to spare.
const HOLD: Duration = Duration::from_secs(15);

type Client = SegmenterClient<Channel>;

/// A server whose `Shared` the test holds: the engine (its queue) and the pre-processing slots.
async fn start(
    config: segmenter_svc::Config,
) -> (
    Arc<Shared>,
    palette_testing::server::Running<anyhow::Error>,
    Client,
) {
    let shared = segmenter_svc::server::load(&config).await.unwrap();
    let serving = shared.clone();
    let server = palette_testing::server::start(|listener, shutdown| {
        segmenter_svc::server::serve(config, serving, listener, shutdown)
    })
    .await;
    palette_testing::server::wait_serving(server.addr, segmenter_svc::server::SERVICE_NAME).await;
    let client = SegmenterClient::connect(server.url()).await.unwrap();
    (shared, server, client)
}

fn spawn_segment(
    client: &Client,
    req: pb::SegmentRequest,
) -> JoinHandle<Result<tonic::Response<pb::SegmentResponse>, tonic::Status>> {
    let mut client = client.clone();
    tokio::spawn(async move { client.segment(req).await })
}

async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < until, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Holds the inference thread: the next request's first session run takes `HOLD` longer. Returns that request's
/// call once the inference thread has taken it (its run has started), so the queue is empty behind it.
async fn hold_the_inference_thread(
    config_faults: &segmenter_svc::engine::Faults,
    client: &Client,
) -> JoinHandle<Result<tonic::Response<pb::SegmentResponse>, tonic::Status>> {
    let runs = config_faults.runs();
    config_faults.delay_next_run(HOLD);
    let call = spawn_segment(client, request(image_bytes("room_640x480.jpg"), &["wall"]));
    wait_until("the held request's run started", || {
        config_faults.runs() > runs
    })
    .await;
    call
}

/// A job put straight into the engine's queue (as the service does after the decode): the photo, "wall".
fn job(
    shared: &Shared,
) -> (
    Job,
    oneshot::Receiver<Result<JobOutput, segmenter_svc::Error>>,
) {
    let prepared = shared
        .preprocessor
        .from_encoded(&image_bytes("room_640x480.jpg"))
        .unwrap();
    let tokens = shared.tokenizer.encode("wall").unwrap();
    let (reply, answer) = oneshot::channel();
    let job = Job {
        pixels: prepared.pixels,
        image_size: (prepared.width, prepared.height),
        phrases: vec![("wall".to_string(), tokens)],
        filter: FilterParams {
            threshold: 0.5,
            max_instances: 20,
            keep_semantic: false,
        },
        deadline: Instant::now() + Duration::from_secs(60),
        enqueued: Instant::now(),
        reply,
        span: tracing::Span::none(),
    };
    (job, answer)
}

fn not_an_image() -> pb::SegmentRequest {
    request(b"not an image".to_vec(), &["wall"])
}

/// With the inference thread busy and one request waiting in the queue (its capacity), a request whose bytes are
/// no image gets RESOURCE_EXHAUSTED: it was refused before the decode, which would have answered INVALID_ARGUMENT.
/// Before, every such request was decoded first, the CPU of an overloaded server spent on work thrown away.
async fn a_full_queue_refuses_before_the_decode(queue_capacity: usize) {
    let mut config = test_config();
    config.queue_capacity = queue_capacity;
    config.max_batch_images = 1;
    config.max_queue_delay_ms = 0;
    let faults = config.faults.clone();
    let (shared, mut server, client) = start(config).await;

    // Idle: admitted (an earlier early check refused every call when QUEUE_CAPACITY was 0).
    let idle = client
        .clone()
        .segment(request(image_bytes("mug_480x720.png"), &["mug"]))
        .await;
    assert!(idle.is_ok(), "an idle server admits: {idle:?}");

    let held = hold_the_inference_thread(&faults, &client).await;
    // One request waits in the queue: its room (QUEUE_CAPACITY=0 holds one, as 1 does).
    let waiting = spawn_segment(
        &client,
        request(image_bytes("room_640x480.jpg"), &["floor"]),
    );
    wait_until("a request waits in the queue", || {
        shared.engine.queue_depth() == 1
    })
    .await;

    let err = client.clone().segment(not_an_image()).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::ResourceExhausted,
        "refused before its bytes were decoded: {err:?}"
    );
    assert!(
        err.message().contains("queue is full (1 requests waiting)"),
        "{}",
        err.message()
    );

    // Both admitted requests are answered; then the queue has room again and the same bytes reach the decoder.
    held.await.unwrap().unwrap();
    waiting.await.unwrap().unwrap();
    let err = client.clone().segment(not_an_image()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_full_queue_refuses_before_the_decode_with_capacity_1() {
    a_full_queue_refuses_before_the_decode(1).await;
}

/// QUEUE_CAPACITY=0 means what the queue makes of it: room for one request waiting while a batch runs.
#[tokio::test]
async fn a_full_queue_refuses_before_the_decode_with_capacity_0() {
    a_full_queue_refuses_before_the_decode(0).await;
}

/// A request that passed the check at arrival (the queue had room) and waits for a pre-processing slot while the
/// queue fills is refused when it gets the slot, before the decode: the slot goes on at once.
#[tokio::test]
async fn a_request_that_waited_for_a_slot_while_the_queue_filled_is_refused_before_the_decode() {
    let mut config = test_config();
    config.queue_capacity = 1;
    config.max_batch_images = 1;
    config.max_queue_delay_ms = 0;
    config.preprocess_concurrency = 1;
    let faults = config.faults.clone();
    let (shared, mut server, client) = start(config).await;

    let held = hold_the_inference_thread(&faults, &client).await;
    // The only slot is taken: the request passes the check at arrival (the queue is empty) and waits for it.
    let slot = shared
        .preprocess_permits
        .clone()
        .acquire_owned()
        .await
        .unwrap();
    let call = spawn_segment(&client, not_an_image());
    // A real wait: nothing tells when the call is in line for the slot. Had it not arrived within the second, the
    // check at arrival refuses it instead, with the same answer.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The queue fills meanwhile (a job submitted straight to the engine, as after another request's decode).
    let (filler, filler_answer) = job(&shared);
    shared.engine.submit(filler).unwrap();
    assert_eq!(shared.engine.queue_depth(), 1);
    drop(slot);

    let err = call.await.unwrap().unwrap_err();
    assert_eq!(
        err.code(),
        Code::ResourceExhausted,
        "refused on getting the slot, before its bytes were decoded: {err:?}"
    );
    held.await.unwrap().unwrap();
    filler_answer.await.unwrap().unwrap();
    server.stop().await.unwrap();
}

/// A job the inference thread has taken into the batch it is collecting occupies no queue room: with QUEUE_CAPACITY=1
/// and the batcher waiting for a second image, a request is admitted and joins that batch. (The early check taken
/// back in f9b9eb7 counted the collected job and refused it.)
#[tokio::test]
async fn a_job_in_the_batch_being_collected_leaves_its_queue_room_free() {
    let mut config = test_config();
    config.queue_capacity = 1;
    config.max_batch_images = 2;
    // The batcher waits this long for a second image after the first: the request below comes well within it.
    config.max_queue_delay_ms = 20_000;
    let (shared, mut server, client) = start(config).await;

    let (first, first_answer) = job(&shared);
    shared.engine.submit(first).unwrap();
    wait_until("the inference thread took the first job", || {
        shared.engine.queue_depth() == 0
    })
    .await;

    let started = Instant::now();
    let reply = client
        .clone()
        .segment(request(image_bytes("room_640x480.jpg"), &["wall"]))
        .await;
    let reply = reply.expect("admitted: the queue is empty").into_inner();
    assert_eq!(
        reply.timings.unwrap().vision_batch_size,
        2,
        "it joined the batch being collected"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the batch ran when full"
    );
    first_answer.await.unwrap().unwrap();
    server.stop().await.unwrap();
}

/// Requests nobody waits for any more (client gone, deadline passed) do not keep live ones out: a full queue drops
/// them first. Before, they held their places until the inference thread reached them, and a live request arriving
/// meanwhile was refused RESOURCE_EXHAUSTED.
#[tokio::test]
async fn a_queue_full_of_requests_nobody_waits_for_takes_new_ones() {
    let mut config = test_config();
    config.queue_capacity = 2;
    config.max_batch_images = 1;
    config.max_queue_delay_ms = 0;
    let faults = config.faults.clone();
    let (shared, mut server, client) = start(config).await;
    let held = hold_the_inference_thread(&faults, &client).await;

    // The queue's two places: a job whose client left, and one whose deadline passes.
    let (left, left_answer) = job(&shared);
    shared.engine.submit(left).unwrap();
    drop(left_answer);
    let (mut late, late_answer) = job(&shared);
    late.deadline = Instant::now() + Duration::from_millis(100);
    shared.engine.submit(late).unwrap();
    assert_eq!(shared.engine.queue_depth(), 2);
    tokio::time::sleep(Duration::from_millis(150)).await;

    // Admitted and decoded (its bytes are no image), not refused as if the queue were full.
    let err = client.clone().segment(not_an_image()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(shared.engine.queue_depth(), 0, "both dropped");
    let late = late_answer.await.unwrap();
    assert!(
        matches!(late, Err(segmenter_svc::Error::DeadlineExceeded)),
        "the one still listening is told: {late:?}"
    );

    // Live jobs fill it again, and then it is full.
    let (first, first_answer) = job(&shared);
    let (second, second_answer) = job(&shared);
    shared.engine.submit(first).unwrap();
    shared.engine.submit(second).unwrap();
    let (third, _third_answer) = job(&shared);
    assert!(matches!(
        shared.engine.submit(third),
        Err(segmenter_svc::Error::Overloaded { capacity: 2 })
    ));
    let err = client.clone().segment(not_an_image()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    held.await.unwrap().unwrap();
    first_answer.await.unwrap().unwrap();
    second_answer.await.unwrap().unwrap();
    server.stop().await.unwrap();
}

/// The requests waiting for a pre-processing slot are bounded too (QUEUE_CAPACITY of them): a decode-bound replica
/// whose engine queue stays empty refuses the next one RESOURCE_EXHAUSTED at once, instead of holding every arriving
/// image until its deadline.
#[tokio::test]
async fn requests_waiting_for_a_decode_slot_are_bounded() {
    let mut config = test_config();
    config.queue_capacity = 1;
    config.preprocess_concurrency = 1;
    let (shared, mut server, client) = start(config).await;
    let slot = shared
        .preprocess_permits
        .clone()
        .acquire_owned()
        .await
        .unwrap();
    let first = spawn_segment(&client, not_an_image());
    wait_until("the first request waits for the slot", || {
        shared
            .preprocess_waiting
            .load(std::sync::atomic::Ordering::SeqCst)
            == 1
    })
    .await;
    let started = Instant::now();
    let err = client.clone().segment(not_an_image()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once"
    );
    drop(slot);
    // The one in line gets the slot and is answered (its bytes are not an image).
    let err = first.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(
        shared
            .preprocess_waiting
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    server.stop().await.unwrap();
}

/// A reply the engine has computed waits for its RLE's CPU slot even when the line for slots is full: it was refused
/// RESOURCE_EXHAUSTED, and its retry computed it all again, when the server was busiest.
#[tokio::test]
async fn an_answered_request_waits_for_its_rle_slot_in_a_full_line() {
    let mut config = test_config();
    config.queue_capacity = 1;
    config.preprocess_concurrency = 1;
    let faults = config.faults.clone();
    let (shared, mut server, client) = start(config).await;
    let runs = faults.runs();
    faults.delay_next_run(Duration::from_secs(2));
    let mut req = request(image_bytes("room_640x480.jpg"), &["wall"]);
    req.include_rle = true;
    let call = spawn_segment(&client, req);
    wait_until("its decode done and its run started", || {
        faults.runs() > runs
    })
    .await;
    let slot = shared
        .preprocess_permits
        .clone()
        .acquire_owned()
        .await
        .unwrap();
    // A new request takes the line's one place while the run goes on.
    let waiting = spawn_segment(&client, not_an_image());
    wait_until("the new request waits for the slot", || {
        shared
            .preprocess_waiting
            .load(std::sync::atomic::Ordering::SeqCst)
            == 1
    })
    .await;
    // The run (2 s) ends meanwhile; the encode waits for the slot, behind the new request.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!call.is_finished(), "the RLE encode waits for a CPU slot");
    drop(slot);
    let reply = call.await.unwrap().unwrap().into_inner();
    assert!(
        reply.concepts[0].instances.iter().all(|i| i.rle.is_some()),
        "{reply:?}"
    );
    let err = waiting.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    server.stop().await.unwrap();
}

/// RLE (walking every pixel of each instance's box on the photo) takes a CPU slot as a decode does: with the only
/// slot held, a reply with RLE waits for it after the engine answered, and comes once it is free.
#[tokio::test]
async fn rle_encoding_takes_a_cpu_slot() {
    let mut config = test_config();
    config.preprocess_concurrency = 1;
    let faults = config.faults.clone();
    let (shared, mut server, client) = start(config).await;
    let runs = faults.runs();
    faults.delay_next_run(Duration::from_secs(2));
    let mut req = request(image_bytes("room_640x480.jpg"), &["wall"]);
    req.include_rle = true;
    let call = spawn_segment(&client, req);
    wait_until("its decode done and its run started", || {
        faults.runs() > runs
    })
    .await;
    let slot = shared
        .preprocess_permits
        .clone()
        .acquire_owned()
        .await
        .unwrap();
    // The run (2 s) ends meanwhile; the encode waits for the slot.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!call.is_finished(), "the RLE encode waits for a CPU slot");
    drop(slot);
    let reply = call.await.unwrap().unwrap().into_inner();
    assert!(
        reply.concepts[0].instances.iter().all(|i| i.rle.is_some()),
        "{reply:?}"
    );
    server.stop().await.unwrap();
}
