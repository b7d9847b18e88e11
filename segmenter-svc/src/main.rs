use clap::Parser;
use segmenter_svc::{Config, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `segmenter-svc healthcheck`: for container HEALTHCHECKs, which have no grpc_health_probe.
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        let addr = std::env::var("GRPC_ADDR").unwrap_or_else(|_| "0.0.0.0:50051".into());
        return segmenter_svc::server::healthcheck(&addr).await;
    }
    telemetry::fix_mmap_threshold();
    let config = Config::parse();
    let traces = telemetry::init_from_env(&config.log_level, &config.log_format)?;
    telemetry::init_metrics(&config.metrics_addr)?;
    let listener = tokio::net::TcpListener::bind(config.grpc_addr).await?;
    let result = segmenter_svc::run(config, listener, shutdown_signal()).await;
    if let Some(provider) = traces {
        let _ = provider.shutdown();
    }
    result
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
