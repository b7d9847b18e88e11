//! JSON logs, traces (OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set; the W3C `traceparent` of the current span goes
//! out with every segmenter call, so a job's trace continues in the segmenter), and the Prometheus exporter.

use std::net::SocketAddr;

use opentelemetry::propagation::{Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub const SERVICE: &str = "orchestrator-svc";

use crate::config::ConfigError;

/// The seed's LOG_LEVEL names (DEBUG, INFO, WARNING, ERROR) or any tracing filter directive.
pub fn log_filter(level: &str) -> String {
    match level.trim().to_ascii_uppercase().as_str() {
        "DEBUG" => "debug".into(),
        "INFO" | "" => "info".into(),
        "WARNING" | "WARN" => "warn".into(),
        "ERROR" | "CRITICAL" => "error".into(),
        "TRACE" => "trace".into(),
        _ => level.trim().to_string(),
    }
}

/// JSON lines on stdout, no traces (tools and tests). Once per process; a second call is ignored.
pub fn init_logging(level: &str) -> Result<(), ConfigError> {
    init(level, None::<opentelemetry_otlp::SpanExporter>).map(|_| ())
}

/// JSON logs, plus OTLP traces when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the exporter reads the standard OTEL_*
/// variables: OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_TIMEOUT,
/// OTEL_EXPORTER_OTLP_HEADERS, ...). Keep the returned provider and shut it down at exit to flush buffered spans.
pub fn init_from_env(level: &str) -> Result<Option<SdkTracerProvider>, ConfigError> {
    let exporter = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.trim().is_empty() => Some(
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .map_err(|e| ConfigError::invalid("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint, e))?,
        ),
        _ => None,
    };
    init(level, exporter)
}

/// Installs the process-global subscriber (JSON logs, filtered by `level`) with an optional span exporter (tests
/// pass an in-memory one), and the W3C trace-context propagator. A second call installs nothing.
pub fn init<E: SpanExporter + 'static>(
    level: &str,
    exporter: Option<E>,
) -> Result<Option<SdkTracerProvider>, ConfigError> {
    let filter = EnvFilter::try_new(log_filter(level))
        .map_err(|e| ConfigError::invalid("LOG_LEVEL", level, e))?;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = exporter.map(|exporter| {
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(SERVICE)
                    .build(),
            )
            .build()
    });
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(SERVICE)));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(otel)
        .with(
            tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(false),
        )
        .try_init();
    Ok(provider)
}

/// Writes the W3C trace context of `span` (`traceparent`, `tracestate`) into outgoing gRPC metadata. Nothing is
/// written when no trace is recorded (no exporter installed).
pub fn inject_context(span: &tracing::Span, metadata: &mut tonic::metadata::MetadataMap) {
    let context = span.context();
    TraceContextPropagator::new().inject_context(&context, &mut MetadataInjector(metadata));
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Serves `/metrics` on `addr`. The recorder is process-global: a second install (tests) is reported, not fatal.
pub fn install_metrics(addr: SocketAddr) {
    let installed = metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(&[
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ])
        .and_then(|b| b.install());
    match installed {
        Ok(()) => tracing::info!(%addr, "metrics exporter listening"),
        Err(e) => tracing::warn!(%addr, error = %e, "metrics exporter not installed"),
    }
}

/// Pins glibc's mmap threshold at 128 KiB so image-sized buffers are returned to the system when freed instead of
/// fragmenting the heap arenas; without it the peak RSS grew with the number of images a process had handled
/// (measured with orchestrator-bench: 329 -> 651 MB from a 10-image to a 100-image job; 226 -> 237 MB pinned).
pub fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: mallopt only sets an allocator parameter; called once at startup.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn seed_level_names() {
        assert_eq!(super::log_filter("WARNING"), "warn");
        assert_eq!(super::log_filter("INFO"), "info");
        assert_eq!(
            super::log_filter("orchestrator_svc=debug"),
            "orchestrator_svc=debug"
        );
    }
}
