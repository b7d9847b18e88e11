//! `<service> healthcheck`, the images' HEALTHCHECK (they have no grpc_health_probe): a grpc.health.v1 Check on
//! 127.0.0.1, exit 0 only when SERVING. It asks the plaintext health-only port (HEALTH_ADDR) when there is one:
//! with TLS on, the main port would need the server's CA and, with mutual TLS, a client certificate.

use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Reads HEALTH_ADDR, GRPC_ADDR and TLS_CERT from the environment (only the port of an address is used) and checks
/// `service` there.
pub async fn run_from_env(default_port: u16, service: &str) -> anyhow::Result<()> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let port = match (var("HEALTH_ADDR"), var("GRPC_ADDR")) {
        (Some(addr), _) => port_of(&addr, default_port),
        (None, _) if var("TLS_CERT").is_some() => anyhow::bail!(
            "TLS is on (TLS_CERT) and HEALTH_ADDR is unset: set HEALTH_ADDR so the healthcheck has a plaintext \
             health port"
        ),
        (None, Some(addr)) => port_of(&addr, default_port),
        (None, None) => default_port,
    };
    check(port, service).await
}

fn port_of(addr: &str, default_port: u16) -> u16 {
    addr.trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(default_port)
}

/// Ok only when `service` on 127.0.0.1:`port` reports SERVING.
pub async fn check(port: u16, service: &str) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(3))
        .connect()
        .await?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?
        .into_inner()
        .status;
    anyhow::ensure!(
        status == ServingStatus::Serving as i32,
        "not serving (status {status})"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn port_of_an_address() {
        assert_eq!(super::port_of("0.0.0.0:50061", 1), 50061);
        assert_eq!(super::port_of("[::]:7", 1), 7);
        assert_eq!(super::port_of("nonsense", 1), 1);
    }
}
