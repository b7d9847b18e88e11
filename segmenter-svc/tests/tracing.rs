//! Trace context crosses the gRPC boundary: a caller's W3C traceparent becomes the parent of the server's span.
//! (Its own test binary: the tracing subscriber is process-global.)

use palette_testing::segmenter as common;

use common::{TestServer, image_bytes, request, test_config};
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::trace::InMemorySpanExporter;

#[tokio::test]
async fn the_callers_trace_continues_in_the_segmenter() {
    let exporter = InMemorySpanExporter::default();
    let provider = segmenter_svc::telemetry::init("info", "text", Some(exporter.clone()))
        .unwrap()
        .expect("an exporter was given");
    let server = TestServer::start(test_config()).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let mut req = tonic::Request::new(request(image_bytes("mug_480x720.png"), &["mug"]));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent_id}-01").parse().unwrap(),
    );
    server.client().await.segment(req).await.unwrap();
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let segment = spans
        .iter()
        .find(|s| s.name == "segment")
        .expect("a segment span was exported");
    assert_eq!(
        segment.span_context.trace_id(),
        TraceId::from_hex(trace_id).unwrap()
    );
    assert_eq!(segment.parent_span_id, SpanId::from_hex(parent_id).unwrap());
    // The request's span crosses into the inference thread with its job.
    let decode = spans
        .iter()
        .find(|s| s.name == "decode")
        .expect("a decode span was exported");
    assert_eq!(decode.parent_span_id, segment.span_context.span_id());
    assert_eq!(
        decode.span_context.trace_id(),
        TraceId::from_hex(trace_id).unwrap()
    );
    server.stop().await.unwrap();
}
