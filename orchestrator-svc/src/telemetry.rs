//! The orchestrator's telemetry: JSON logs and traces as both services set them up
//! (`palette_service_kit::telemetry`; the W3C `traceparent` of the current span goes out with every Segment call,
//! so a job's trace continues in the segmenter), with this service's name and latency buckets.

use std::net::SocketAddr;

use opentelemetry_sdk::trace::{SdkTracerProvider, SpanExporter};
use palette_service_kit::telemetry::{self as kit, TelemetryError};
pub use palette_service_kit::telemetry::{
    adopt_trace_headers, fix_mmap_threshold, inject_context, log_filter, trace_headers,
};

pub const SERVICE: &str = "orchestrator-svc";

/// The orchestrator always logs JSON lines.
const LOG_FORMAT: &str = "json";

/// JSON logs, plus OTLP traces when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the exporter reads the standard OTEL_*
/// variables: OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_TIMEOUT,
/// OTEL_EXPORTER_OTLP_HEADERS, ...). Keep the returned provider and shut it down at exit to flush buffered spans.
pub fn init_from_env(level: &str) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    kit::init_from_env(SERVICE, level, LOG_FORMAT)
}

/// Installs the process-global subscriber with an optional span exporter (tests pass an in-memory one). A second
/// call installs nothing.
pub fn init<E: SpanExporter + 'static>(
    level: &str,
    exporter: Option<E>,
) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    kit::init(SERVICE, level, LOG_FORMAT, exporter)
}

/// Serves `/metrics` on `addr`. An address it cannot listen on is an error (the autoscalers read these metrics: a
/// replica without them would run unseen), as the segmenter's is; the recorder being process-global, a second
/// install (tests) is reported, not fatal.
pub fn install_metrics(addr: SocketAddr) -> Result<(), String> {
    use kit::MetricsInstallError as BuildError;
    let buckets = [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];
    match kit::install_prometheus(addr, &buckets) {
        Ok(()) => tracing::info!(%addr, "metrics exporter listening"),
        Err(e @ BuildError::FailedToSetGlobalRecorder(_)) => {
            tracing::warn!(%addr, error = %e, "metrics exporter not installed")
        }
        Err(e) => return Err(e.to_string()),
    }
    Ok(())
}
