use clap::Parser;
use palette_service_kit::{healthcheck, shutdown};
use segmenter_svc::{Config, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `segmenter-svc healthcheck`: for container HEALTHCHECKs, which have no grpc_health_probe.
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        return healthcheck::run_from_env(50051, segmenter_svc::server::SERVICE_NAME).await;
    }
    telemetry::fix_mmap_threshold();
    let config = Config::parse();
    let traces = telemetry::init_from_env(&config.log_level, &config.log_format)?;
    telemetry::init_metrics(&config.metrics_addr)?;
    let listener = tokio::net::TcpListener::bind(config.grpc_addr).await?;
    let result = segmenter_svc::run(config, listener, shutdown::signal()).await;
    if let Some(provider) = traces {
        let _ = provider.shutdown();
    }
    if let Err(e) = &result
        && e.downcast_ref::<segmenter_svc::exit::StalledRun>()
            .is_some()
    {
        // A model run never returned: a normal exit runs the libraries' exit handlers, which may wait on the hung
        // device too. The supervisor restarts the process either way.
        eprintln!("Error: {e:#}");
        std::process::abort();
    }
    result
}
