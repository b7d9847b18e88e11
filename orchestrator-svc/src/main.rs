use orchestrator_svc::{Config, run, telemetry};
use palette_service_kit::{healthcheck, shutdown};

orchestrator_svc::use_jemalloc!();

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `orchestrator-svc healthcheck`: for container HEALTHCHECKs, which have no grpc_health_probe.
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        if let Err(e) =
            healthcheck::run_from_env(50052, orchestrator_svc::server::JOBS_SERVICE).await
        {
            eprintln!("unhealthy: {e:#}");
            std::process::exit(1);
        }
        return Ok(());
    }
    // Rust's allocations go to jemalloc (`orchestrator_svc::allocator`); glibc still serves the C libraries'.
    telemetry::fix_mmap_threshold();
    let config = Config::from_env();
    let traces = telemetry::init_from_env(&config.log_level)?;
    let listener = tokio::net::TcpListener::bind(config.grpc_addr).await?;
    let result = run(config, listener, shutdown::signal()).await;
    if let Some(provider) = traces {
        let _ = provider.shutdown();
    }
    result?;
    Ok(())
}
