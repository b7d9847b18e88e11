//! The segmenter's telemetry: logs and traces as both services set them up (`palette_service_kit::telemetry`), with
//! this service's name, metric descriptions and latency buckets.

use opentelemetry_sdk::trace::{SdkTracerProvider, SpanExporter};

use palette_service_kit::telemetry::{self as kit, TelemetryError};
pub use palette_service_kit::telemetry::{adopt_remote_parent, fix_mmap_threshold};

pub const SERVICE: &str = "segmenter-svc";

/// Logs only (tools and tests).
pub fn init_logs(level: &str, format: &str) {
    let _ = init(level, format, None::<opentelemetry_otlp::SpanExporter>);
}

/// Logs, plus OTLP traces when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the SDK reads the standard OTEL_* variables).
/// Keep the returned provider alive and shut it down at exit so buffered spans are flushed.
pub fn init_from_env(
    level: &str,
    format: &str,
) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    kit::init_from_env(SERVICE, level, format)
}

/// Installs the global subscriber with an optional span exporter (tests pass an in-memory one).
pub fn init<E: SpanExporter + 'static>(
    level: &str,
    format: &str,
    exporter: Option<E>,
) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    kit::init(SERVICE, level, format, exporter)
}

/// Starts the Prometheus exporter on `addr` ("" disables it).
pub fn init_metrics(addr: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    let addr = addr.trim();
    if addr.is_empty() {
        return Ok(());
    }
    let addr: std::net::SocketAddr = addr
        .parse()
        .with_context(|| format!("METRICS_ADDR {addr:?}: expected host:port, e.g. 0.0.0.0:9091"))?;
    kit::install_prometheus(
        addr,
        &[
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ],
    )
    .with_context(|| format!("METRICS_ADDR {addr}: the metrics exporter cannot listen there"))?;
    describe();
    Ok(())
}

fn describe() {
    metrics::describe_counter!("segmenter_requests_total", "Segment calls by outcome");
    metrics::describe_histogram!(
        "segmenter_request_seconds",
        "Segment latency end to end, successful calls"
    );
    metrics::describe_histogram!(
        "segmenter_stage_seconds",
        "Compute time per stage (vision, text, decoder)"
    );
    metrics::describe_histogram!(
        "segmenter_preprocess_seconds",
        "CPU work on the photo before the inference thread, per request (decode: decoding with EXIF orientation, or raw RGB's checks, failed decodes included; resize)"
    );
    metrics::describe_histogram!(
        "segmenter_vision_batch_size",
        "Images per vision-encoder run"
    );
    metrics::describe_gauge!(
        "segmenter_queue_depth",
        "Requests waiting for an inference thread (every ENGINE_INSTANCES queue together)"
    );
    metrics::describe_gauge!(
        "segmenter_inflight_requests",
        "Segment calls inside the server (autoscaling signal)"
    );
    metrics::describe_gauge!(
        "segmenter_text_cache_entries",
        "Phrases whose text features are cached (each ENGINE_INSTANCES thread has its own cache: their sum)"
    );
    metrics::describe_counter!(
        "segmenter_text_cache_total",
        "Distinct phrases of each batch by where their text features came from (hit: the cache, miss: the text encoder)"
    );
    metrics::describe_counter!(
        "segmenter_dropped_total",
        "Requests dropped unanswered, before or during their decoder runs: their client left (cancelled) or their deadline passed (deadline)"
    );
}
