//! Logs (JSON or text, filtered by the seed's LOG_LEVEL names), traces (OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is
//! set; the W3C `traceparent` goes out with the orchestrator's segmenter calls and parents the segmenter's spans, so
//! a job's trace continues across the tiers), the Prometheus exporter, and the allocator setting both services
//! need. Each service names itself and its histogram buckets.

use std::net::SocketAddr;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Layer as _, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// Why logs or traces could not be set up; names the variable.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("LOG_LEVEL={level:?}: not a level or tracing filter")]
    LogLevel {
        level: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("OTEL_EXPORTER_OTLP_ENDPOINT={endpoint:?}: span exporter")]
    Otlp {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

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

/// Logs, plus OTLP traces when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the exporter reads the standard OTEL_*
/// variables). Keep the returned provider and shut it down at exit to flush buffered spans.
pub fn init_from_env(
    service: &'static str,
    level: &str,
    format: &str,
) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    let exporter = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.trim().is_empty() => Some(
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .map_err(|source| TelemetryError::Otlp { endpoint, source })?,
        ),
        _ => None,
    };
    init(service, level, format, exporter)
}

/// Installs the process-global subscriber (`format`: "text", else JSON lines) with an optional span exporter (tests
/// pass an in-memory one), and the W3C trace-context propagator. A second call installs nothing.
pub fn init<E: SpanExporter + 'static>(
    service: &'static str,
    level: &str,
    format: &str,
    exporter: Option<E>,
) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    let filter =
        EnvFilter::try_new(log_filter(level)).map_err(|source| TelemetryError::LogLevel {
            level: level.to_string(),
            source,
        })?;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = exporter.map(|exporter| {
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource(service))
            .build()
    });
    // LOG_LEVEL filters the logs only. The spans are this project's (job, item, segment, inference ...) at INFO
    // whatever LOG_LEVEL says: a global filter made LOG_LEVEL=WARNING switch tracing off (no span exported, no
    // traceparent sent) and LOG_LEVEL=DEBUG export every dependency's spans (h2, hyper, tower).
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service))
            .with_filter(LevelFilter::INFO)
    });
    let registry = tracing_subscriber::registry().with(otel);
    let _ = if format == "text" {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_target(false)
                    .with_filter(filter),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_filter(filter),
            )
            .try_init()
    };
    Ok(provider)
}

/// Writes the W3C trace context of `span` (`traceparent`, `tracestate`) into outgoing gRPC metadata. Nothing is
/// written when no trace is recorded (no exporter installed).
pub fn inject_context(span: &tracing::Span, metadata: &mut tonic::metadata::MetadataMap) {
    let context = span.context();
    TraceContextPropagator::new().inject_context(&context, &mut MetadataInjector(metadata));
}

/// Parents `span` on the W3C trace context in a request's metadata, so the caller's trace continues here.
pub fn adopt_remote_parent(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    let context = TraceContextPropagator::new().extract(&MetadataExtractor(metadata));
    let _ = span.set_parent(context);
}

/// The W3C trace context of `span` as (name, value) pairs (`traceparent`, `tracestate`), for carriers other than
/// gRPC metadata (a NATS message's headers). Empty when no trace is recorded.
pub fn trace_headers(span: &tracing::Span) -> Vec<(String, String)> {
    let mut pairs = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut pairs);
    pairs.into_iter().collect()
}

/// Parents `span` on the W3C trace context in `get`'s headers (`traceparent`, `tracestate`): the trace of whoever
/// wrote them continues here. Without them `span` stays as it was.
pub fn adopt_trace_headers<'a>(span: &tracing::Span, get: impl Fn(&str) -> Option<&'a str>) {
    let pairs: std::collections::HashMap<String, String> = ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|name| get(name).map(|value| (name.to_string(), value.to_string())))
        .collect();
    if pairs.contains_key("traceparent") {
        let _ = span.set_parent(TraceContextPropagator::new().extract(&pairs));
    }
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

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Why `install_prometheus` failed (a second install in one process, tests, is `FailedToSetGlobalRecorder`).
pub use metrics_exporter_prometheus::BuildError as MetricsInstallError;

/// Serves `/metrics` on `addr` with these histogram buckets (seconds). The recorder is process-global: a second
/// install in one process fails.
pub fn install_prometheus(addr: SocketAddr, buckets: &[f64]) -> Result<(), MetricsInstallError> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(buckets)?
        .install()
}

/// Pins glibc's mmap threshold at 128 KiB. By default glibc raises it after large frees, so image-sized buffers
/// (decoded photos, masks, tensors) move into the heap arenas, fragment them, and the peak RSS then grows with the
/// number of images processed: measured with orchestrator-bench (both services, 1008x756 photos): 329 -> 651 MB from
/// a 10-image to a 100-image job by default, 226 -> 237 MB with the threshold pinned (jemalloc and mimalloc stayed
/// above 500 MB). Large buffers are then mapped and unmapped, returning memory to the system when freed.
pub fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: mallopt only sets an allocator parameter; called once at startup before threads allocate heavily.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// The traces' resource. `OTEL_SERVICE_NAME`, or `service.name` in `OTEL_RESOURCE_ATTRIBUTES`, names the service when
/// set, as OpenTelemetry's convention has it (the SDK's builder reads both); this binary's name otherwise. It was
/// always this binary's name, whatever the deployment set.
fn resource(service: &'static str) -> opentelemetry_sdk::Resource {
    let builder = opentelemetry_sdk::Resource::builder();
    let env = |name: &str| std::env::var(name).ok();
    if names_service(env("OTEL_SERVICE_NAME"), env("OTEL_RESOURCE_ATTRIBUTES")) {
        builder.build()
    } else {
        builder.with_service_name(service).build()
    }
}

/// Whether the deployment names the service: a non-empty `OTEL_SERVICE_NAME`, or a `service.name=` entry in
/// `OTEL_RESOURCE_ATTRIBUTES` (comma-separated key=value pairs).
fn names_service(service_name: Option<String>, attributes: Option<String>) -> bool {
    service_name.is_some_and(|v| !v.trim().is_empty())
        || attributes.is_some_and(|a| {
            a.split(',')
                .filter_map(|kv| kv.split_once('='))
                .any(|(k, v)| k.trim() == "service.name" && !v.trim().is_empty())
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_deployment_names_the_service_by_either_variable() {
        use super::names_service;
        let some = |s: &str| Some(s.to_string());
        assert!(!names_service(None, None));
        assert!(!names_service(
            some(" "),
            some("deployment.environment=staging")
        ));
        assert!(names_service(some("palette-staging"), None));
        assert!(names_service(None, some("team=x, service.name=palette")));
        assert!(!names_service(None, some("service.name=")));
    }

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
