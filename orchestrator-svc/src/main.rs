use std::time::Duration;

use orchestrator_svc::{Config, run, telemetry};
use palette_service_kit::{healthcheck, shutdown};

orchestrator_svc::use_jemalloc!();

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(serve());
    // `run` returns within SHUTDOWN_GRACE_SEC, but an item's CPU step (a rule render, a fill) runs to its end once
    // started, even for an item the drain gave up on; dropping the runtime would wait for it and push the exit past
    // the grace period (and the platform's SIGKILL). Such work is abandoned to the exit instead.
    runtime.shutdown_timeout(Duration::from_millis(200));
    result
}

async fn serve() -> anyhow::Result<()> {
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
