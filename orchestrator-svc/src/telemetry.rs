//! JSON logs and the Prometheus exporter.

use std::net::SocketAddr;

use tracing_subscriber::EnvFilter;

use crate::error::Error;

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

/// JSON lines on stdout. Once per process (main); a second call is ignored.
pub fn init_logging(level: &str) -> Result<(), Error> {
    let filter = EnvFilter::try_new(log_filter(level))
        .map_err(|e| Error::Config(format!("LOG_LEVEL {level:?}: {e}")))?;
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(false)
        .try_init();
    Ok(())
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
