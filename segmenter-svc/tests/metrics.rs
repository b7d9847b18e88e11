//! The Prometheus endpoint (its own test binary: the metrics recorder is process-global).

use palette_testing::segmenter as common;

use common::{TestServer, image_bytes, request, test_config};

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
        // One lookup per phrase: "wall" and "floor" cold (misses), then "wall" warm (a hit).
        "segmenter_text_cache_total{result=\"miss\"} 2\n",
        "segmenter_text_cache_total{result=\"hit\"} 1\n",
        "segmenter_vision_batch_size",
        "segmenter_inflight_requests 0",
        "segmenter_queue_depth",
    ] {
        assert!(body.contains(want), "{want:?} missing from:\n{body}");
    }
    server.stop().await.unwrap();
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
