//! The Prometheus endpoint (its own test binary: the metrics recorder is process-global).

use palette_testing::segmenter as common;

use std::time::Duration;

use common::{TestServer, image_bytes, request, test_config};
use palette_proto::segmenter::v1 as pb;
use pb::segmenter_client::SegmenterClient;
use tonic::transport::Channel;

#[tokio::test]
async fn metrics_endpoint_reports_requests_stages_and_cache() {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics_addr = probe.local_addr().unwrap();
    drop(probe);
    segmenter_svc::telemetry::init_metrics(&metrics_addr.to_string()).unwrap();
    let server = TestServer::start(test_config()).await;
    let mut client = server.client().await;
    client
        .segment(request(image_bytes("room_640x480.jpg"), &["wall", "floor"]))
        .await
        .unwrap();
    client
        .segment(request(image_bytes("room_640x480.jpg"), &["wall"]))
        .await
        .unwrap();
    let _ = client.segment(request(b"junk".to_vec(), &["wall"])).await;
    let body = http_get(metrics_addr).await;
    for want in [
        "segmenter_requests_total{outcome=\"ok\"} 2",
        "segmenter_requests_total{outcome=\"invalid_argument\"} 1",
        "segmenter_stage_seconds_bucket{stage=\"vision\"",
        "segmenter_stage_seconds_bucket{stage=\"decoder\"",
        // Two photos and the junk decoded (a failed decode counts: its CPU was spent), two photos resized.
        "segmenter_preprocess_seconds_count{stage=\"decode\"} 3\n",
        "segmenter_preprocess_seconds_count{stage=\"resize\"} 2\n",
        // One lookup per phrase: "wall" and "floor" cold (misses), then "wall" warm (a hit).
        "segmenter_text_cache_total{result=\"miss\"} 2\n",
        "segmenter_text_cache_total{result=\"hit\"} 1\n",
        "segmenter_vision_batch_size",
        "segmenter_inflight_requests 0",
        // Moved by the same steps as the queue: back to 0 once every request was taken.
        "segmenter_queue_depth 0\n",
    ] {
        assert!(body.contains(want), "{want:?} missing from:\n{body}");
    }
    server.stop().await.unwrap();

    dropped_at_the_deadline_are_counted_as_deadline(metrics_addr).await;
    a_full_queue_refuses_without_a_decode(metrics_addr).await;
    a_call_its_client_left_is_counted(metrics_addr).await;
}

/// A call whose client goes away while it waits for the inference thread ends without its handler returning (tonic
/// drops it on the reset): it is counted all the same, as "cancelled".
async fn a_call_its_client_left_is_counted(metrics_addr: std::net::SocketAddr) {
    let config = test_config();
    let faults = config.faults.clone();
    let server = TestServer::start(config).await;
    let client = server.client().await;
    let before = value(
        &http_get(metrics_addr).await,
        "segmenter_requests_total{outcome=\"cancelled\"}",
    );
    faults.delay_next_run(Duration::from_secs(4));
    let held = {
        let mut client = client.clone();
        tokio::spawn(async move {
            client
                .segment(request(image_bytes("room_640x480.jpg"), &["wall"]))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let left = {
        let mut client = client.clone();
        tokio::spawn(async move {
            client
                .segment(request(image_bytes("room_640x480.jpg"), &["floor"]))
                .await
        })
    };
    // Decoded and queued behind the held run by now; then its client goes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    left.abort();
    held.await.unwrap().unwrap();
    let mut after = before;
    for _ in 0..50 {
        after = value(
            &http_get(metrics_addr).await,
            "segmenter_requests_total{outcome=\"cancelled\"}",
        );
        if after > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(after, before + 1.0, "the call its client left is counted");
    server.stop().await.unwrap();
}

/// The value of a metric line that starts with `name` (labels included), 0 when there is none.
fn value(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// A photo sent while the queue is full is refused RESOURCE_EXHAUSTED without being decoded: the decode count does
/// not move (it did before: every refused request was decoded first). Part of the one test above.
async fn a_full_queue_refuses_without_a_decode(metrics_addr: std::net::SocketAddr) {
    const DECODES: &str = "segmenter_preprocess_seconds_count{stage=\"decode\"}";
    const OVERLOADED: &str = "segmenter_requests_total{outcome=\"overloaded\"}";
    let mut config = test_config();
    config.queue_capacity = 1;
    config.max_batch_images = 1;
    config.max_queue_delay_ms = 0;
    let faults = config.faults.clone();
    let server = TestServer::start(config).await;
    let client = server.client().await;
    let call = |concept: &'static str| {
        let mut client = client.clone();
        tokio::spawn(async move {
            client
                .segment(request(image_bytes("room_640x480.jpg"), &[concept]))
                .await
        })
    };

    // The inference thread held 5 s by the first request's run (everything below takes well under a second), the
    // second waiting in the queue: full.
    let runs = faults.runs();
    faults.delay_next_run(Duration::from_secs(5));
    let until = std::time::Instant::now() + Duration::from_secs(30);
    let held = call("wall");
    while faults.runs() == runs {
        assert!(
            std::time::Instant::now() < until,
            "the first run never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let waiting = call("floor");
    let mut body = http_get(metrics_addr).await;
    while !body.contains("segmenter_queue_depth 1\n") {
        assert!(std::time::Instant::now() < until, "nothing queued:\n{body}");
        tokio::time::sleep(Duration::from_millis(5)).await;
        body = http_get(metrics_addr).await;
    }

    let decodes = value(&body, DECODES);
    let overloaded = value(&body, OVERLOADED);
    let err = call("sofa").await.unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    let body = http_get(metrics_addr).await;
    assert_eq!(value(&body, OVERLOADED), overloaded + 1.0, "{body}");
    assert_eq!(
        value(&body, DECODES),
        decodes,
        "refused without a decode:\n{body}"
    );

    held.await.unwrap().unwrap();
    waiting.await.unwrap().unwrap();
    let body = http_get(metrics_addr).await;
    assert_eq!(value(&body, DECODES), decodes, "{body}");
    server.stop().await.unwrap();
}

/// Requests whose deadline passes while the inference thread is busy are dropped with reason "deadline", although
/// by the time the thread looks at them the handler's timeout (or tonic's, from `grpc-timeout`) has closed their
/// reply, as a client that left would. Part of the one test above: the metrics recorder is process-global.
async fn dropped_at_the_deadline_are_counted_as_deadline(metrics_addr: std::net::SocketAddr) {
    let mut config = test_config();
    config.default_deadline_sec = 2;
    let faults = config.faults.clone();
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    // Answered once the inference thread is past the requests before it.
    let after = |client: &mut SegmenterClient<Channel>| {
        let mut req = tonic::Request::new(request(image_bytes("room_640x480.jpg"), &["wall"]));
        req.set_timeout(Duration::from_secs(60));
        let mut client = client.clone();
        async move { client.segment(req).await.unwrap() }
    };

    // No grpc-timeout: DEFAULT_DEADLINE_SEC (2 s) passes during a 4 s run; the handler's own timeout answers. (The
    // margins leave a loaded CI machine a second or more for the decode before the deadline.)
    faults.delay_next_run(Duration::from_secs(4));
    let err = client
        .segment(request(image_bytes("room_640x480.jpg"), &["wall"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    after(&mut client).await;

    // grpc-timeout 4 s, the request message sent 3 s after the headers: the deadline counts from the headers (as
    // tonic's timer, which ends the call at 4 s), so when a 2.4 s run ends at ~5.4 s it has passed.
    faults.delay_next_run(Duration::from_millis(2400));
    let late = segment_with_late_body(
        server.channel().await,
        request(image_bytes("room_640x480.jpg"), &["wall"]),
        Duration::from_secs(4),
        Duration::from_secs(3),
    )
    .await;
    assert!(late.is_err(), "{late:?}");
    after(&mut client).await;

    let body = http_get(metrics_addr).await;
    assert!(
        body.contains("segmenter_dropped_total{reason=\"deadline\"} 2\n"),
        "two deadline drops wanted:\n{body}"
    );
    assert!(
        !body.contains("segmenter_dropped_total{reason=\"cancelled\"}"),
        "no client left:\n{body}"
    );
    // Both calls counted as past their deadline.
    assert!(
        body.contains("segmenter_requests_total{outcome=\"deadline_exceeded\"} 2\n"),
        "two calls past their deadline wanted:\n{body}"
    );
    server.stop().await.unwrap();
}

/// A Segment call whose headers (with `grpc-timeout`) go out at once and whose request message follows `late`
/// after: a large image on a slow link.
async fn segment_with_late_body(
    channel: Channel,
    message: pb::SegmentRequest,
    timeout: Duration,
    late: Duration,
) -> Result<tonic::Response<pb::SegmentResponse>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let body = futures::stream::once(async move {
        tokio::time::sleep(late).await;
        message
    });
    let mut req = tonic::Request::new(body);
    req.set_timeout(timeout);
    grpc.client_streaming(
        req,
        tonic::codegen::http::uri::PathAndQuery::from_static(
            "/palette.segmenter.v1.Segmenter/Segment",
        ),
        tonic_prost::ProstCodec::default(),
    )
    .await
}

async fn http_get(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}
