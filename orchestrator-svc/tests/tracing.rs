//! A job's trace reaches the segmenter: every Segment call carries the W3C traceparent of the item's trace.
//! (Its own test binary: the tracing subscriber is process-global.)

use palette_testing as common;

use common::fake_segmenter;
use common::orchestrator::{is_terminal, photo_jpeg, seed_spec, start};
use opentelemetry::trace::TraceId;
use opentelemetry_sdk::trace::InMemorySpanExporter;
use palette_proto::orchestrator::v1::ItemState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_calls_carry_the_item_spans_trace_context() {
    let exporter = InMemorySpanExporter::default();
    // LOG_LEVEL=WARNING (a seed value) filters logs, not traces: every span below is still exported.
    let provider = orchestrator_svc::telemetry::init("WARNING", Some(exporter.clone()))
        .unwrap()
        .expect("a tracer provider");
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |c| c.segmenter.mask_cache_mb = 0).await;
    for idx in 0..2 {
        orch.put_input("test-user", "traced", idx, photo_jpeg(40 + idx * 8, 32))
            .await;
    }
    orch.client
        .submit_job(seed_spec("traced", 2))
        .await
        .unwrap();
    let job = orch.wait_for("traced", is_terminal).await;
    assert!(
        job.items
            .iter()
            .all(|i| i.state == ItemState::Completed as i32),
        "{job:?}"
    );
    // The job's span closes when its task ends, a moment after the last item's state is out: after the drain,
    // every span of the job has closed.
    orch.shutdown().await;
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();

    let job_span = spans
        .iter()
        .find(|s| s.name == "job")
        .expect("a job span was exported");
    let items: Vec<_> = spans.iter().filter(|s| s.name == "item").collect();
    assert_eq!(items.len(), 2, "one item span per image");
    for item in &items {
        assert_eq!(
            item.span_context.trace_id(),
            job_span.span_context.trace_id(),
            "items belong to the job's trace"
        );
        assert_eq!(item.parent_span_id, job_span.span_context.span_id());
    }
    let segment_spans: Vec<_> = spans.iter().filter(|s| s.name == "segment").collect();
    assert_eq!(segment_spans.len(), 2);

    let received = segmenter.counters.traceparents.lock().unwrap().clone();
    assert_eq!(received.len(), 2, "{received:?}");
    for traceparent in &received {
        let parts: Vec<&str> = traceparent.split('-').collect();
        assert_eq!(parts.len(), 4, "not a W3C traceparent: {traceparent:?}");
        assert_eq!(parts[0], "00");
        let trace_id = TraceId::from_hex(parts[1]).unwrap();
        assert!(
            items.iter().any(|s| s.span_context.trace_id() == trace_id),
            "traceparent {traceparent} is not an item's trace"
        );
        // The remote parent is the orchestrator's segment span of that item.
        let parent = segment_spans
            .iter()
            .find(|s| s.span_context.span_id().to_string() == parts[2])
            .expect("the traceparent names a segment span");
        assert_eq!(parent.span_context.trace_id(), trace_id);
    }
    let _ = provider.shutdown();
}
