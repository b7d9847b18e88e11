//! The gRPC server around a service's API, the same on both tiers: grpc.health.v1 (open), server reflection (when
//! REFLECTION is on; behind the token like the API), TLS or mutual TLS from files, the bearer-token layer, TCP
//! options, HTTP/2 limits (`builder`), and the optional plaintext health-only listener for probes.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Server, ServerTlsConfig};
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::HealthService;

use crate::args::ServeArgs;
use crate::auth::{AuthError, AuthLayer, Authenticator};
use crate::health::EndingHealth;
use crate::tls::{self, ServerMode, TlsError};

/// Why serving could not be set up; each names the variable to fix.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("HEALTH_ADDR={value}: not a listen address")]
    HealthAddr {
        value: String,
        #[source]
        source: std::net::AddrParseError,
    },
    #[error("HEALTH_ADDR={addr}: cannot listen")]
    HealthBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("server reflection")]
    Reflection(#[source] tonic_reflection::server::Error),
}

type AddReflection = Box<dyn FnOnce(Routes) -> Routes + Send>;

/// Everything `serve` needs besides the API, checked at startup.
pub struct Serving {
    tls: Option<ServerTlsConfig>,
    mode: ServerMode,
    auth: Authenticator,
    reload: Option<tokio::task::JoinHandle<()>>,
    /// Adds both reflection services to the routes (their types are opaque, so they travel as this closure).
    reflection: Option<AddReflection>,
    health_listener: Option<TcpListener>,
    /// MAX_CONCURRENT_STREAMS.
    max_streams: u32,
    /// MAX_HEALTH_WATCHES.
    max_health_watches: usize,
    keepalive: Keepalive,
    /// How long an accepted connection may stay silent before it is closed (`incoming`).
    first_bytes_within: Duration,
}

impl Serving {
    /// Reads the TLS files and tokens, binds HEALTH_ADDR, builds reflection for `api_services` (the full names of
    /// the services this server adds), and logs how the server will serve.
    pub async fn prepare(args: &ServeArgs, api_services: &[&str]) -> Result<Self, SetupError> {
        let (tls, mode) = tls::server_config(
            args.tls_cert.as_deref(),
            args.tls_key.as_deref(),
            args.tls_client_ca.as_deref(),
            args.tls_handshake_timeout,
        )?;
        let auth = Authenticator::load(
            args.auth_tokens.as_ref().map(|s| s.expose()),
            args.auth_tokens_file.as_deref(),
        )?;
        // Without a tokens file SIGHUP still must not stop the process (its default action): operations.md tells
        // operators to send it to reload tokens, and a generic secret reloader may send it to any pod.
        let reload = auth
            .spawn_reload(args.auth_tokens_reload)
            .or_else(crate::shutdown::ignore_hangups);
        let reflection = if args.reflection {
            Some(reflection(api_services)?)
        } else {
            None
        };
        let health_listener = match args.health_addr.trim() {
            "" => None,
            value => {
                let addr: SocketAddr = value.parse().map_err(|source| SetupError::HealthAddr {
                    value: value.to_string(),
                    source,
                })?;
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| SetupError::HealthBind { addr, source })?,
                )
            }
        };
        log_mode(mode, &auth, args, health_listener.as_ref());
        Ok(Serving {
            tls,
            mode,
            auth,
            reload,
            reflection,
            health_listener,
            max_streams: args.max_concurrent_streams,
            max_health_watches: args.max_health_watches,
            keepalive: Keepalive {
                interval: args.keepalive_interval,
                timeout: args.keepalive_timeout,
            },
            // The TLS handshake's limit, for every connection: a TLS one's first bytes are its ClientHello.
            first_bytes_within: args.tls_handshake_timeout,
        })
    }

    pub fn mode(&self) -> ServerMode {
        self.mode
    }

    /// Where the health-only listener (HEALTH_ADDR) listens, if there is one.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Serves `api` plus health (and reflection) on `listener` until `shutdown` resolves and the connections close;
    /// the health-only listener, if any, stops with it. `health` (from `health::reporter`) is served with its Watch
    /// streams ending when `shutdown` resolves (`health::EndingHealth`).
    pub async fn serve(
        self,
        health: HealthService,
        api: Routes,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error> {
        let (stopping, stopped) = tokio::sync::watch::channel(false);
        let shutdown = async move {
            shutdown.await;
            stopping.send_replace(true);
        };
        // One cap over both listeners (HealthServer shares its service between clones).
        let health = HealthServer::new(EndingHealth::new(health, stopped, self.max_health_watches));
        let mut routes = api.add_service(health.clone());
        if let Some(add_reflection) = self.reflection {
            routes = add_reflection(routes);
        }
        // Both tasks end with this future, however it ends (a caller may drop it after its grace period).
        let _health_only = self.health_listener.map(|listener| {
            AbortOnDrop(tokio::spawn(
                builder(self.max_streams, self.keepalive)
                    .add_service(health)
                    .serve_with_incoming(incoming(listener, self.first_bytes_within)),
            ))
        });
        let _reload = self.reload.map(AbortOnDrop);
        // Photos and masks cross this listener only: the health-only one keeps hyper's small windows.
        let mut api_server = crate::http2::server(builder(self.max_streams, self.keepalive));
        if let Some(tls) = self.tls {
            api_server = api_server.tls_config(tls)?;
        }
        api_server
            .layer(AuthLayer::new(self.auth))
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming(listener, self.first_bytes_within), shutdown)
            .await
    }
}

/// How long an HTTP/2 connection may sit without a frame before the server pings it.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long the server waits for the ping's answer before it closes the connection (gRPC's own default).
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The HTTP/2 keepalive of both listeners (KEEPALIVE_INTERVAL and KEEPALIVE_TIMEOUT unless a test shortens them).
#[derive(Debug, Clone, Copy)]
struct Keepalive {
    interval: Duration,
    timeout: Duration,
}
/// Streams a connection may make the server reset (malformed or refused requests) before it is sent GOAWAY:
/// hyper's own default, which tonic turns off unless set.
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// The server builder for both listeners, with HTTP/2 limits that tonic leaves off by default: without them one
/// connection could open any number of streams (100,000 health Watch streams, which need no token, grew the
/// orchestrator from 116 MB to 658 MB), reset streams without end, and a peer gone without a FIN or RST kept its
/// streams until TCP keepalive noticed (minutes). Now: at most `max_streams` streams per connection (advertised as
/// SETTINGS_MAX_CONCURRENT_STREAMS), GOAWAY after MAX_LOCAL_ERROR_RESETS resets, and a ping every
/// KEEPALIVE_INTERVAL that closes the connection, releasing its streams, when unanswered for KEEPALIVE_TIMEOUT.
/// The API listener adds flow-control windows and a frame size for multi-MB photos and replies (`http2`).
fn builder(max_streams: u32, keepalive: Keepalive) -> Server {
    Server::builder()
        .max_concurrent_streams(max_streams)
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .http2_keepalive_interval(Some(keepalive.interval))
        .http2_keepalive_timeout(Some(keepalive.timeout))
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Both reflection versions (grpcurl and many older clients speak only v1alpha), advertising only what this server
/// serves: the descriptor set holds every package of the workspace.
fn reflection(api_services: &[&str]) -> Result<AddReflection, SetupError> {
    let configure = |own: &str| {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(palette_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name(own);
        for name in api_services {
            builder = builder.with_service_name(*name);
        }
        builder
    };
    let v1 = configure("grpc.reflection.v1.ServerReflection")
        .build_v1()
        .map_err(SetupError::Reflection)?;
    let v1alpha = configure("grpc.reflection.v1alpha.ServerReflection")
        .build_v1alpha()
        .map_err(SetupError::Reflection)?;
    Ok(Box::new(move |routes: Routes| {
        routes.add_service(v1).add_service(v1alpha)
    }))
}

fn log_mode(
    mode: ServerMode,
    auth: &Authenticator,
    args: &ServeArgs,
    health: Option<&TcpListener>,
) {
    match mode {
        ServerMode::Plaintext => {
            tracing::warn!("TLS off: plaintext gRPC (set TLS_CERT and TLS_KEY for TLS)")
        }
        ServerMode::Tls => tracing::info!("TLS on (TLS_CERT); clients need no certificate"),
        ServerMode::MutualTls => {
            tracing::info!(
                "mutual TLS on: clients must present a certificate signed by TLS_CLIENT_CA"
            )
        }
    }
    match auth {
        Authenticator::Off => tracing::warn!(
            "authentication off: no AUTH_TOKENS or AUTH_TOKENS_FILE, every caller is accepted"
        ),
        Authenticator::On(_) => tracing::info!(
            tokens = auth.token_count(),
            file = %args
                .auth_tokens_file
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            "bearer-token authentication on (grpc.health.v1 stays open)"
        ),
    }
    if !args.reflection {
        tracing::info!("server reflection off (REFLECTION=false)");
    }
    if let Some(addr) = health.and_then(|l| l.local_addr().ok()) {
        tracing::info!(%addr, "plaintext health-only listener (HEALTH_ADDR)");
    }
}

/// Connections waiting for their first bytes at once (`incoming`); past it new connections are handed on at once,
/// as before that wait existed, so a flood of silent sockets never stops the listener from accepting.
const MAX_SILENT_CONNECTIONS: usize = 1024;

/// Bytes a client sends before the server answers anything: the HTTP/2 preface over plaintext (exactly this long),
/// a TLS ClientHello (longer). A peer that sent fewer and went quiet was handed on after its first byte, and held a
/// task and a descriptor for ever (hyper waits for the rest of the preface with no timer).
const OPENING_BYTES: usize = 24;

/// Resolves once OPENING_BYTES have arrived, or the peer closed (the server then reads the end). A peek returns as
/// soon as any byte is there, so a short one is asked again after a pause.
async fn opening_bytes(stream: &tokio::net::TcpStream) -> std::io::Result<()> {
    let mut opening = [0u8; OPENING_BYTES];
    loop {
        match stream.peek(&mut opening).await? {
            0 => return Ok(()),
            n if n >= OPENING_BYTES => return Ok(()),
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Accepted connections with TCP_NODELAY (no Nagle / delayed-ACK stalls on small gRPC frames: they held small
/// responses for ~40 ms, measured with segmenter-bench) and TCP keepalive (dead peers behind NAT or a load balancer
/// are noticed), handed to the server once their opening bytes arrive (OPENING_BYTES): one that sends fewer within
/// `first_bytes_within` is closed. Without that, a plaintext connection that never sent the HTTP/2 preface held a task and a file
/// descriptor for ever (HTTP/2 keepalive starts after the preface; tonic's TLS handshake timeout covers TLS only).
/// At most MAX_SILENT_CONNECTIONS wait at once.
pub fn incoming(
    listener: TcpListener,
    first_bytes_within: Duration,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + 'static {
    use futures::StreamExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let waiting = Arc::new(AtomicUsize::new(0));
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)))
        .map(move |accepted| {
            let waiting = waiting.clone();
            async move {
                let stream = match accepted {
                    Ok(stream) => stream,
                    Err(e) => return Some(Err(e)),
                };
                if waiting.fetch_add(1, Ordering::SeqCst) >= MAX_SILENT_CONNECTIONS {
                    waiting.fetch_sub(1, Ordering::SeqCst);
                    return Some(Ok(stream));
                }
                let spoke = tokio::time::timeout(first_bytes_within, opening_bytes(&stream)).await;
                waiting.fetch_sub(1, Ordering::SeqCst);
                match spoke {
                    Ok(Ok(())) => Some(Ok(stream)),
                    Ok(Err(_)) | Err(_) => None,
                }
            }
        })
        .buffer_unordered(usize::MAX)
        .filter_map(std::future::ready)
}
