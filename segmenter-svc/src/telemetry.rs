//! Logs (JSON or text, filtered by the seed's LOG_LEVEL) and the Prometheus exporter.

use tracing_subscriber::EnvFilter;

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

pub fn init_logs(level: &str, format: &str) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter_from(level))
        .with_target(false);
    let _ = if format == "text" {
        builder.try_init()
    } else {
        builder.json().flatten_event(true).try_init()
    };
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
    metrics::describe_counter!(
        "segmenter_text_cache_total",
        "Text-feature cache lookups by result"
    );
    metrics::describe_counter!(
        "segmenter_dropped_total",
        "Requests dropped before compute (cancelled, deadline)"
    );
}
