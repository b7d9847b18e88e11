//! Logs (JSON or text, filtered by the seed's LOG_LEVEL), traces (OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set,
//! parented on the caller's W3C `traceparent`), and the Prometheus exporter.

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub const SERVICE: &str = "segmenter-svc";

/// The seed's LOG_LEVEL names (DEBUG, INFO, WARNING, ERROR) or any tracing filter directive.
pub fn filter_from(level: &str) -> EnvFilter {
    let directive = match level.to_ascii_uppercase().as_str() {
        "DEBUG" => "debug",
        "INFO" => "info",
        "WARNING" | "WARN" => "warn",
        "ERROR" | "CRITICAL" => "error",
        _ => level,
    };
    EnvFilter::try_new(directive).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Logs only (tools and tests).
pub fn init_logs(level: &str, format: &str) {
    let _ = init(level, format, None::<opentelemetry_otlp::SpanExporter>);
}

/// Logs, plus OTLP traces when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the SDK reads the standard OTEL_* variables).
/// Keep the returned provider alive and shut it down at exit so buffered spans are flushed.
pub fn init_from_env(level: &str, format: &str) -> anyhow::Result<Option<SdkTracerProvider>> {
    let exporter = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => Some(
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()?,
        ),
        _ => None,
    };
    Ok(init(level, format, exporter))
}

/// Installs the global subscriber with an optional span exporter (tests pass an in-memory one).
pub fn init<E: SpanExporter + 'static>(
    level: &str,
    format: &str,
    exporter: Option<E>,
) -> Option<SdkTracerProvider> {
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
    let registry = tracing_subscriber::registry()
        .with(filter_from(level))
        .with(otel);
    let _ = if format == "text" {
        registry
            .with(tracing_subscriber::fmt::layer().with_target(false))
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_target(false),
            )
            .try_init()
    };
    provider
}

/// Parents `span` on the W3C trace context in the request's metadata, so the orchestrator's trace continues here.
pub fn adopt_remote_parent(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    let context = TraceContextPropagator::new().extract(&MetadataExtractor(metadata));
    let _ = span.set_parent(context);
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

/// Starts the Prometheus exporter on `addr` ("" disables it).
pub fn init_metrics(addr: &str) -> anyhow::Result<()> {
    if addr.is_empty() {
        return Ok(());
    }
    let addr: std::net::SocketAddr = addr.parse()?;
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(&[
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ])?
        .install()?;
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
        "segmenter_vision_batch_size",
        "Images per vision-encoder run"
    );
    metrics::describe_gauge!(
        "segmenter_queue_depth",
        "Requests waiting for the inference thread"
    );
    metrics::describe_gauge!(
        "segmenter_inflight_requests",
        "Segment calls inside the server (autoscaling signal)"
    );
    metrics::describe_gauge!(
        "segmenter_text_cache_entries",
        "Phrases whose text features are cached"
    );
    metrics::describe_counter!(
        "segmenter_text_cache_total",
        "Text-feature cache lookups by result"
    );
    metrics::describe_counter!(
        "segmenter_dropped_total",
        "Requests dropped before compute (cancelled, deadline)"
    );
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
