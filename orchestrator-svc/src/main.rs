use clap::Parser;
use orchestrator_svc::{Config, run, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `orchestrator-svc healthcheck`: for container HEALTHCHECKs, which have no grpc_health_probe.
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        let addr = std::env::var("GRPC_ADDR").unwrap_or_else(|_| "0.0.0.0:50052".into());
        if let Err(e) = orchestrator_svc::server::healthcheck(&addr).await {
            eprintln!("unhealthy: {e:#}");
            std::process::exit(1);
        }
        return Ok(());
    }
    telemetry::fix_mmap_threshold();
    let config = Config::parse();
    let traces = telemetry::init_from_env(&config.log_level)?;
    let listener = tokio::net::TcpListener::bind(config.grpc_addr).await?;
    let result = run(config, listener, shutdown_signal()).await;
    if let Some(provider) = traces {
        let _ = provider.shutdown();
    }
    result?;
    Ok(())
}

/// SIGINT or SIGTERM (what Docker and Kubernetes send).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
