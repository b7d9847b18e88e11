//! Execution-provider failures, injected (a CPU run cannot be made to fail like a lost CUDA context otherwise): a
//! transient fault fails only the request it hit; a provider that stays broken turns health NOT_SERVING and requests
//! UNAVAILABLE; when it works again a recovery probe brings the segmenter back to SERVING without a restart.

use palette_testing::segmenter as common;

use std::time::Duration;

use common::{TestServer, image_bytes, request, test_config};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const SERVING: i32 = ServingStatus::Serving as i32;
const NOT_SERVING: i32 = ServingStatus::NotServing as i32;

async fn wait_health(server: &TestServer, want: i32) {
    for _ in 0..200 {
        if server.health().await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("health never became {want} (now {})", server.health().await);
}

#[tokio::test]
async fn a_transient_fault_costs_no_request() {
    let config = test_config();
    let faults = config.faults.clone();
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let req = || request(image_bytes("room_640x480.jpg"), &["wall"]);
    let clean = client.segment(req()).await.unwrap().into_inner();

    // One run fails; the probe after it passes; the request runs once more on its own and is answered (INTERNAL,
    // which no client retries, failed it for good).
    faults.fail_next_runs(1);
    let runs = faults.runs();
    let answered = client.segment(req()).await.unwrap().into_inner();
    assert_eq!(faults.failed_runs(), 1);
    assert!(
        faults.runs() > runs + 2,
        "the failed run, the probe, the run again"
    );
    assert_eq!(answered.concepts.len(), 1);
    assert_eq!(
        answered.concepts[0].instances.len(),
        clean.concepts[0].instances.len(),
        "the same answer as without the fault"
    );
    assert_eq!(server.health().await, SERVING);
    let ok = client.segment(req()).await.unwrap().into_inner();
    assert_eq!(ok.concepts.len(), 1);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_broken_provider_goes_not_serving_and_recovers_by_probe() {
    let mut config = test_config();
    config.reprobe_interval_sec = 1;
    let faults = config.faults.clone();
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let req = || request(image_bytes("room_640x480.jpg"), &["wall", "floor"]);

    faults.set_broken(true);
    let err = client.segment(req()).await.unwrap_err();
    // The request that hit the fault: UNAVAILABLE, which a client retries on another replica (the fault is this
    // replica's, not the request's).
    assert_eq!(
        err.code(),
        Code::Unavailable,
        "the request that hit the fault: {err:?}"
    );
    assert!(
        err.message().contains("execution provider failed"),
        "{err:?}"
    );
    wait_health(&server, NOT_SERVING).await;
    // Refused at admission now, with the reason, instead of queueing work on a broken device.
    let err = client.segment(req()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("execution provider failed"),
        "{}",
        err.message()
    );
    // Model info stays available for operators while NOT_SERVING.
    client
        .get_model_info(palette_proto::segmenter::v1::GetModelInfoRequest {})
        .await
        .unwrap();

    // Still broken at the next recovery probe (it hits the fault): stays NOT_SERVING.
    let failed = faults.failed_runs();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while faults.failed_runs() == failed {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no recovery probe ran"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(server.health().await, NOT_SERVING);

    faults.set_broken(false);
    wait_health(&server, SERVING).await;
    let ok = client.segment(req()).await.unwrap().into_inner();
    assert_eq!(ok.concepts.len(), 2);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_panic_of_the_inference_thread_turns_not_serving_with_the_reason() {
    let config = test_config();
    let faults = config.faults.clone();
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let req = || request(image_bytes("room_640x480.jpg"), &["wall"]);

    faults.panic_next_run();
    client.segment(req()).await.unwrap_err();
    wait_health(&server, NOT_SERVING).await;
    let err = client.segment(req()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("panic"), "{}", err.message());
    let _ = server.stop().await;
}

/// A broken engine (here a panic of the inference thread) is not left NOT_SERVING for ever where nothing probes
/// health (compose, a Runpod pod): `run` returns an error naming the reason EXIT_AFTER_FAILURE_SEC later, for the
/// process to exit and its supervisor to start it again. The default, and 0 (a liveness probe's job then), keep it up.
#[tokio::test]
async fn a_broken_engine_ends_the_server_after_exit_after_failure_sec() {
    let mut config = test_config();
    config.exit_after_failure_sec = 1;
    let faults = config.faults.clone();
    let mut server = TestServer::start(config).await;
    let mut client = server.client().await;
    faults.panic_next_run();
    client
        .segment(request(image_bytes("room_640x480.jpg"), &["wall"]))
        .await
        .unwrap_err();
    wait_health(&server, NOT_SERVING).await;
    let error = server
        .ended_within(Duration::from_secs(20))
        .await
        .expect("run returned on its own")
        .unwrap_err()
        .to_string();
    assert!(error.contains("the model cannot serve"), "{error}");
    assert!(error.contains("panic"), "the reason: {error}");

    let mut config = test_config();
    config.exit_after_failure_sec = 0;
    let faults = config.faults.clone();
    let mut server = TestServer::start(config).await;
    faults.panic_next_run();
    let mut client = server.client().await;
    client
        .segment(request(image_bytes("room_640x480.jpg"), &["wall"]))
        .await
        .unwrap_err();
    wait_health(&server, NOT_SERVING).await;
    assert!(
        server.ended_within(Duration::from_secs(2)).await.is_none(),
        "EXIT_AFTER_FAILURE_SEC=0 stays up"
    );
    let _ = server.stop().await;
}

/// A request queued behind the run that panicked is answered UNAVAILABLE (retried elsewhere) when the inference
/// thread ends, not left to wait out its deadline.
#[tokio::test]
async fn a_request_queued_behind_a_panic_is_answered_at_once() {
    let config = test_config();
    let faults = config.faults.clone();
    let server = TestServer::start(config).await;
    let req = || request(image_bytes("room_640x480.jpg"), &["wall"]);

    let runs = faults.runs();
    faults.delay_next_run(Duration::from_millis(1500));
    faults.panic_next_run();
    let mut first = server.client().await;
    let first = tokio::spawn(async move { first.segment(req()).await });
    for _ in 0..400 {
        if faults.runs() > runs {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        faults.runs() > runs,
        "the first request's run never started"
    );
    let mut queued = server.client().await;
    let mut behind = tonic::Request::new(req());
    behind.set_timeout(Duration::from_secs(30));
    let started = std::time::Instant::now();
    let err = queued.segment(behind).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered after {:?}: it waited for its deadline",
        started.elapsed()
    );
    first.await.unwrap().unwrap_err();
    let _ = server.stop().await;
}

#[tokio::test]
async fn without_reprobes_a_broken_provider_stays_not_serving() {
    let mut config = test_config();
    config.reprobe_interval_sec = 0;
    let faults = config.faults.clone();
    let server = TestServer::start(config).await;
    let mut client = server.client().await;

    faults.set_broken(true);
    let _ = client
        .segment(request(image_bytes("room_640x480.jpg"), &["wall"]))
        .await
        .unwrap_err();
    wait_health(&server, NOT_SERVING).await;
    faults.set_broken(false);
    // Kept as a real wait: what is tested is that nothing happens (no probe), which has no event to wait for; 300 ms
    // is three times what a probe of the tiny model takes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.health().await, NOT_SERVING, "no probe, no recovery");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_request_whose_deadline_passes_mid_decoder_stops_running_chunks() {
    let mut config = test_config();
    config.decoder_chunk = 1;
    let faults = config.faults.clone();
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let concepts: Vec<String> = (0..32).map(|i| format!("thing {i}")).collect();
    let refs: Vec<&str> = concepts.iter().map(String::as_str).collect();
    // Once to cache the phrases' text features, once timed: how long do a vision and 32 decoder runs take?
    let mut full = std::time::Duration::ZERO;
    for _ in 0..2 {
        let started = std::time::Instant::now();
        client
            .segment(request(image_bytes("room_640x480.jpg"), &refs))
            .await
            .unwrap();
        full = started.elapsed();
    }
    let runs_full = faults.runs();
    // A deadline a third of the way through the decoder runs.
    let before = faults.runs();
    let mut req = tonic::Request::new(request(image_bytes("room_640x480.jpg"), &refs));
    req.set_timeout(full / 3);
    let status = client.segment(req).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    // Let the inference thread get past the request, then count what it ran for it.
    let after_next = client
        .segment(request(image_bytes("room_640x480.jpg"), &["wall"]))
        .await;
    assert!(after_next.is_ok(), "{after_next:?}");
    let ran = faults.runs() - before;
    eprintln!(
        "full request {full:?}, {runs_full} runs; the expired one and a 1-phrase one ran {ran}"
    );
    // In full: 1 vision + 32 decoder runs (+ the 1-phrase request's 1 vision, 1 text, 1 decoder).
    assert!(
        ran < 3 + 1 + 32,
        "the decoder kept running after the deadline: {ran} runs"
    );
    server.stop().await.unwrap();
}

/// A failed warm-up is final: the recovery probes are for a provider that failed after serving. One 1-image x
/// 1-phrase probe passing would not show that the shapes the warm-up did not finish work, so health stays NOT_SERVING
/// (the liveness probe restarts the pod) even when the fault was transient.
#[tokio::test]
async fn a_failed_warm_up_is_not_re_probed_into_serving() {
    let mut config = test_config();
    config.reprobe_interval_sec = 1;
    let faults = config.faults.clone();
    // The warm-up's first run (the probe's text encoder) fails; every later run would pass.
    faults.fail_next_runs(1);
    let mut server = palette_testing::server::start(|listener, shutdown| {
        segmenter_svc::run(config, listener, shutdown)
    })
    .await;
    let service = segmenter_svc::server::SERVICE_NAME;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while faults.failed_runs() == 0
        || palette_testing::server::health(server.addr, service).await != NOT_SERVING
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the warm-up never failed"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let runs = faults.runs();
    let mut client = palette_proto::segmenter::v1::segmenter_client::SegmenterClient::new(
        tonic::transport::Endpoint::from_shared(server.url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let err = client
        .segment(request(image_bytes("room_640x480.jpg"), &["wall"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("warm-up failed"),
        "{}",
        err.message()
    );
    // Refused before the image is decoded: bytes that are no image get the same answer, not INVALID_ARGUMENT.
    let err = client
        .segment(request(b"not an image".to_vec(), &["wall"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "not decoded first: {err:?}");
    // Kept as a real wait (nothing is to happen, no event to wait for): two and a half reprobe intervals, each
    // probe of the tiny model taking about 100 ms.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(faults.runs(), runs, "a probe ran after the failed warm-up");
    assert_eq!(
        palette_testing::server::health(server.addr, service).await,
        NOT_SERVING
    );
    assert_eq!(
        palette_testing::server::health(server.addr, "").await,
        NOT_SERVING
    );
    server.stop().await.unwrap();
}

/// In a batch, an image is answered once its own decoder runs are done, not after its batch-mates' as well: with slow
/// decoder runs (the CPU at full size: seconds each) a one-concept request batched before a many-concept one waited
/// for all of the other's runs, past its deadline with its result ready.
#[tokio::test]
async fn a_batched_request_is_answered_when_its_own_decoder_runs_are_done() {
    let mut config = test_config();
    config.max_batch_images = 2;
    // The batch runs once both requests are in.
    config.max_queue_delay_ms = 20_000;
    config.decoder_chunk = 1;
    let faults = config.faults.clone();
    let server = TestServer::start(config).await;
    let client = server.client().await;
    faults.slow_decoder_runs(Duration::from_millis(400));

    let start = std::time::Instant::now();
    let one = {
        let mut client = client.clone();
        tokio::spawn(async move {
            let reply = client
                .segment(request(image_bytes("room_640x480.jpg"), &["wall"]))
                .await;
            (reply, start.elapsed())
        })
    };
    // Queued after the first, in the same batch: four decoder runs.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let four = {
        let mut client = client.clone();
        tokio::spawn(async move {
            let reply = client
                .segment(request(
                    image_bytes("room_640x480.jpg"),
                    &["wall", "floor", "sofa", "lamp"],
                ))
                .await;
            (reply, start.elapsed())
        })
    };
    let (one, one_at) = one.await.unwrap();
    let (four, four_at) = four.await.unwrap();
    let (one, four) = (one.unwrap().into_inner(), four.unwrap().into_inner());
    assert_eq!(one.timings.unwrap().vision_batch_size, 2, "one batch");
    assert_eq!(four.timings.unwrap().vision_batch_size, 2, "one batch");
    // Four slow runs of the other's (1.6 s) came after the first's answer, not before it.
    assert!(
        one_at + Duration::from_millis(1000) < four_at,
        "answered at {one_at:?} and {four_at:?}"
    );
    faults.slow_decoder_runs(Duration::ZERO);
    server.stop().await.unwrap();
}

/// A batch still running when the shutdown's grace period is over stops between decoder runs (on the CPU each takes
/// seconds, a preset's concepts minutes), instead of holding the exit until it is done.
#[tokio::test]
async fn a_batch_running_past_the_grace_period_stops_between_decoder_runs() {
    let mut config = test_config();
    config.shutdown_grace_sec = 1;
    config.decoder_chunk = 1;
    let faults = config.faults.clone();
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    // Eight decoder runs of 1 s each.
    faults.slow_decoder_runs(Duration::from_secs(1));
    let runs = faults.runs();
    let call = tokio::spawn(async move {
        client
            .segment(request(
                image_bytes("room_640x480.jpg"),
                &[
                    "wall", "floor", "sofa", "lamp", "door", "window", "rug", "table",
                ],
            ))
            .await
    });
    for _ in 0..200 {
        if faults.runs() > runs + 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let started = std::time::Instant::now();
    server.stop().await.unwrap();
    let took = started.elapsed();
    // The 1 s grace, then at most the decoder run in progress: not the 6 s of runs left.
    assert!(took < Duration::from_millis(3500), "stopped after {took:?}");
    faults.slow_decoder_runs(Duration::ZERO);
    let _ = call.await;
}

/// A provider that breaks between the probe that cleared a failed batch and the request's run alone: the request
/// used to be answered INTERNAL (which clients do not retry: the image failed for good) with health still SERVING.
/// The rerun's failure is probed too: UNAVAILABLE, retried on another replica, and NOT_SERVING.
#[tokio::test]
async fn a_provider_that_breaks_during_the_rerun_is_unavailable_not_internal() {
    let config = test_config();
    let faults = config.faults.clone();
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let req = || request(image_bytes("room_640x480.jpg"), &["wall"]);
    client.segment(req()).await.unwrap();

    // The batch's run fails; the probe's three runs (text, vision, decoder) pass; then the provider is broken.
    faults.fail_next_runs(1);
    faults.break_after_runs(3);
    let err = client.segment(req()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert_eq!(server.health().await, NOT_SERVING);
    server.stop().await.unwrap();
}

/// A run that does not return (a GPU fault that hangs a stream instead of failing it) changed nothing: health said
/// SERVING while every request waited for its deadline. Past RUN_STALL_SEC health is NOT_SERVING until the run
/// returns (1 s here, against a run held for 3 s), and Segment answers as health says: UNAVAILABLE at once, where a
/// request was queued behind the run to wait out its deadline.
#[tokio::test]
async fn a_run_that_does_not_return_turns_health_not_serving_until_it_does() {
    let mut config = test_config();
    config.run_stall_sec = 1;
    let faults = config.faults.clone();
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let mut other = server.client().await;
    let req = || request(image_bytes("room_640x480.jpg"), &["wall"]);
    client.segment(req()).await.unwrap();
    faults.delay_next_run(Duration::from_secs(3));
    let held = tokio::spawn(async move { client.segment(req()).await });
    wait_health(&server, NOT_SERVING).await;
    let started = std::time::Instant::now();
    let refused = other.segment(req()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("has not returned"),
        "{refused:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once"
    );
    wait_health(&server, SERVING).await;
    assert!(
        held.await.unwrap().is_ok(),
        "the run returned and was answered"
    );
    server.stop().await.unwrap();
}

/// A run that never returns (a hung GPU stream) left the segmenter up and NOT_SERVING for ever where nothing probes
/// health (compose, Runpod), and a shutdown then hung joining the inference thread. Past RUN_STALL_SEC and
/// EXIT_AFTER_FAILURE_SEC more, `run` returns `StalledRun` (main aborts on it) without waiting for the run or the
/// requests it holds (1 s + 1 s here, against a run held for 8 s).
#[tokio::test]
async fn a_run_that_never_returns_ends_the_server_without_waiting_for_it() {
    let mut config = test_config();
    config.run_stall_sec = 1;
    config.exit_after_failure_sec = 1;
    let faults = config.faults.clone();
    let mut server = TestServer::start(config).await;
    let mut client = server.client().await;
    let req = || request(image_bytes("room_640x480.jpg"), &["wall"]);
    client.segment(req()).await.unwrap();
    faults.delay_next_run(Duration::from_secs(8));
    let held = tokio::spawn(async move { client.segment(req()).await });
    let started = tokio::time::Instant::now();
    let error = server
        .ended_within(Duration::from_secs(6))
        .await
        .expect("run returned while the run was still held")
        .unwrap_err();
    assert!(
        error
            .downcast_ref::<segmenter_svc::exit::StalledRun>()
            .is_some(),
        "{error:#}"
    );
    assert!(started.elapsed() < Duration::from_secs(6));
    assert!(
        held.await.unwrap().is_err(),
        "the held request was not answered"
    );
}
