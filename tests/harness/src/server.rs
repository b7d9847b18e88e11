//! A service started in-process on 127.0.0.1:0, stopped on request, and the wait until its health says SERVING:
//! the one copy both services' tests and the end-to-end tests use.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Endpoint;

/// A service task: `run(config, listener, shutdown)` on its own listener.
pub struct Running<E> {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), E>>>,
}

/// Binds 127.0.0.1:0 and spawns `serve(listener, shutdown)`; returns at once (see `wait_serving`).
pub async fn start<E, F, Fut>(serve: F) -> Running<E>
where
    E: Send + 'static,
    F: FnOnce(TcpListener, futures::future::BoxFuture<'static, ()>) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(
        listener,
        Box::pin(async move {
            let _ = stopped.await;
        }),
    ));
    Running {
        addr,
        stop: Some(stop),
        task: Some(task),
    }
}

impl<E> Running<E> {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits up to `within` for `run` to return on its own (no shutdown signal); its result, None when it is still
    /// running.
    pub async fn ended_within(&mut self, within: Duration) -> Option<Result<(), E>> {
        let task = self.task.as_mut()?;
        let result = tokio::time::timeout(within, task).await.ok()?;
        self.task = None;
        Some(result.expect("service task panicked"))
    }

    /// Signals shutdown and waits until `run` returns; its result.
    pub async fn stop(&mut self) -> Result<(), E> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.expect("service task panicked"),
            None => Ok(()),
        }
    }
}

/// Waits until grpc.health.v1 reports `service` ("" = the server) SERVING; panics after 30 s.
pub async fn wait_serving(addr: SocketAddr, service: &str) {
    wait_serving_on(plaintext(addr), service).await
}

/// `wait_serving` through `endpoint` (a TLS one for a server with TLS on). Follows the health Watch stream, which
/// sends each change, so it returns at the change; it reconnects, backing off from 5 ms, only while the server
/// cannot be reached yet.
pub async fn wait_serving_on(endpoint: Endpoint, service: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut pause = Duration::from_millis(5);
    while !watch_until_serving(endpoint.clone(), service, deadline).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} did not become SERVING within 30 s",
            endpoint.uri()
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// True once the health Watch of `service` says SERVING; false when the server cannot be reached, the stream ends
/// or `deadline` passes first.
async fn watch_until_serving(
    endpoint: Endpoint,
    service: &str,
    deadline: tokio::time::Instant,
) -> bool {
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let Ok(channel) = endpoint.connect().await else {
        return false;
    };
    let request = tonic_health::pb::HealthCheckRequest {
        service: service.into(),
    };
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let Ok(response) = client.watch(request).await else {
        return false;
    };
    let mut updates = response.into_inner();
    loop {
        match tokio::time::timeout_at(deadline, updates.message()).await {
            Ok(Ok(Some(update))) if update.status == serving => return true,
            Ok(Ok(Some(_))) => {}
            _ => return false,
        }
    }
}

fn plaintext(addr: SocketAddr) -> Endpoint {
    Endpoint::from_shared(format!("http://{addr}")).unwrap()
}

/// The health status of `service` on `addr`; -1 when the server cannot be asked.
pub async fn health(addr: SocketAddr, service: &str) -> i32 {
    health_on(plaintext(addr), service).await
}

/// `health` through `endpoint`.
pub async fn health_on(endpoint: Endpoint, service: &str) -> i32 {
    let Ok(channel) = endpoint.connect().await else {
        return -1;
    };
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    client
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status)
        .unwrap_or(-1)
}

/// The workspace root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}
