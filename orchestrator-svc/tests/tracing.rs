//! A job's trace reaches the segmenter: every Segment call carries the W3C traceparent of the item's trace; and with
//! JOB_STORE=nats each job is one trace of its own, whichever replica runs its items.
//! (Its own test binary: the tracing subscriber is process-global, so its tests share one in-memory exporter and
//! tell their spans apart by job id.)

use palette_testing as common;

use std::sync::OnceLock;

use common::fake_segmenter;
use common::orchestrator::{is_terminal, photo_jpeg, seed_spec, start};
use opentelemetry::trace::TraceId;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use orchestrator_svc::config::JobStoreKind;
use palette_proto::orchestrator::v1::ItemState;

/// The process's exporter, installed once. LOG_LEVEL=WARNING (a seed value) filters logs, not traces: every span
/// the tests look for is still exported.
fn traces() -> &'static (InMemorySpanExporter, SdkTracerProvider) {
    static TRACES: OnceLock<(InMemorySpanExporter, SdkTracerProvider)> = OnceLock::new();
    TRACES.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = orchestrator_svc::telemetry::init("WARNING", Some(exporter.clone()))
            .unwrap()
            .expect("a tracer provider");
        (exporter, provider)
    })
}

/// Finished spans named `name` whose `attribute` starts with `value` (a job id, or a request id `job/idx`).
fn spans(name: &str, attribute: &str, value: &str) -> Vec<SpanData> {
    let (exporter, provider) = traces();
    provider.force_flush().unwrap();
    exporter
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|s| {
            s.name == name
                && s.attributes
                    .iter()
                    .any(|kv| kv.key.as_str() == attribute && kv.value.as_str().starts_with(value))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_calls_carry_the_item_spans_trace_context() {
    traces();
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

    let jobs = spans("job", "job_id", "traced");
    let job_span = jobs.first().expect("a job span was exported");
    let items = spans("item", "job_id", "traced");
    assert_eq!(items.len(), 2, "one item span per image");
    for item in &items {
        assert_eq!(
            item.span_context.trace_id(),
            job_span.span_context.trace_id(),
            "items belong to the job's trace"
        );
        assert_eq!(item.parent_span_id, job_span.span_context.span_id());
    }
    let segment_spans = spans("segment", "request_id", "traced/");
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
}

/// JOB_STORE=nats: items run from the shared work stream, under a replica's long-lived task. Each job is still one
/// trace (the submitter's `job` span travels in the tasks' headers), and two jobs are two traces, not one trace per
/// replica that ends only with the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_shared_job_store_each_job_is_a_trace_of_its_own() {
    traces();
    let Some(nats) = common::nats::start() else {
        return;
    };
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |c| {
        c.jobs.job_store = JobStoreKind::Nats;
        c.nats.nats_url = Some(nats.url.clone().into());
    })
    .await;
    for job in ["nats-traced-a", "nats-traced-b"] {
        for idx in 0..2 {
            orch.put_input("test-user", job, idx, photo_jpeg(40 + idx * 8, 32))
                .await;
        }
        orch.client.submit_job(seed_spec(job, 2)).await.unwrap();
    }
    for job in ["nats-traced-a", "nats-traced-b"] {
        let done = orch.wait_for(job, is_terminal).await;
        assert_eq!(done.completed, 2, "{done:?}");
    }
    orch.shutdown().await;

    let mut traces_seen = Vec::new();
    for job in ["nats-traced-a", "nats-traced-b"] {
        let job_span = spans("job", "job_id", job);
        let job_span = job_span.first().expect("the submitter's job span");
        let items = spans("item", "job_id", job);
        assert_eq!(items.len(), 2, "{job}: one item span per image");
        for item in &items {
            assert_eq!(
                item.span_context.trace_id(),
                job_span.span_context.trace_id(),
                "{job}: items belong to the job's trace"
            );
            assert_eq!(item.parent_span_id, job_span.span_context.span_id());
        }
        traces_seen.push(job_span.span_context.trace_id());
    }
    assert_ne!(traces_seen[0], traces_seen[1], "two jobs, two traces");
}
