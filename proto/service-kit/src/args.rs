//! The serving settings both services take, flattened into each one's `Config` (so the variable names, defaults and
//! docs are the same on both tiers).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::secret::Secret;

#[derive(Clone, Debug, Args)]
pub struct ServeArgs {
    /// Serve gRPC server reflection (what lets grpcurl work without .proto files). Default true; the production
    /// manifests turn it off, so the API's shape is not handed to whoever reaches the port. With AUTH_TOKENS on,
    /// reflection needs a token like the API.
    #[arg(long, env = "REFLECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub reflection: bool,

    /// A second listener, always plaintext, serving only grpc.health.v1: for probes that cannot present TLS or a
    /// client certificate (Kubernetes' gRPC probe, the image's `healthcheck`). Empty (default): none; health is
    /// served on GRPC_ADDR either way, without a token.
    #[arg(long, env = "HEALTH_ADDR", default_value = "")]
    pub health_addr: String,

    /// PEM certificate chain of this server. With TLS_KEY it turns TLS on; unset (default): plaintext.
    #[arg(long, env = "TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of TLS_CERT.
    #[arg(long, env = "TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate(s): with it, clients must present a certificate signed by one of them (mutual TLS); a
    /// client without one is refused during the handshake. Needs TLS_CERT.
    #[arg(long, env = "TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// Accepted bearer tokens, comma-separated (several, so a token can be rotated without downtime; each at least
    /// 16 characters). Calls then need `authorization: Bearer <token>`; grpc.health.v1 stays open. Unset and no
    /// AUTH_TOKENS_FILE (default): no authentication.
    #[arg(long, env = "AUTH_TOKENS", hide_env_values = true)]
    pub auth_tokens: Option<Secret>,

    /// A file of accepted bearer tokens, one per line (`#` comments), added to AUTH_TOKENS. Read again every 10 s
    /// and on SIGHUP, so rotating a mounted Secret needs no restart.
    #[arg(long, env = "AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<PathBuf>,

    /// Most streams (calls in flight) one client connection may hold open at once: the HTTP/2
    /// SETTINGS_MAX_CONCURRENT_STREAMS the server advertises; a client past it waits for a stream to end. Default
    /// 1024, well above the orchestrator's Segment calls on one connection (at most BATCH_CONCURRENCY, itself at most
    /// 256) and room for a caller's WatchJob streams; a caller watching more jobs at once opens more connections.
    #[arg(long, env = "MAX_CONCURRENT_STREAMS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,

    /// Most grpc.health.v1 Watch streams open at once, over both listeners (and at most 8 on one connection, so a
    /// single connection cannot take them all): health needs no token, and a Watch stays open until shutdown (~5 KB
    /// each). Beyond it Watch answers RESOURCE_EXHAUSTED (Check is never refused). Default 1024; a client doing
    /// client-side health checking holds one per connection.
    #[arg(long, env = "MAX_HEALTH_WATCHES", default_value_t = 1024, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_health_watches: usize,

    /// How often AUTH_TOKENS_FILE is read again (tests shorten it; not a flag).
    #[arg(skip = Duration::from_secs(10))]
    pub auth_tokens_reload: Duration,

    /// How long an HTTP/2 connection may be silent before the server pings it (`server::KEEPALIVE_INTERVAL`; tests
    /// shorten it; not a flag).
    #[arg(skip = crate::server::KEEPALIVE_INTERVAL)]
    pub keepalive_interval: Duration,

    /// How long the server waits for that ping's answer before it closes the connection
    /// (`server::KEEPALIVE_TIMEOUT`; tests shorten it; not a flag).
    #[arg(skip = crate::server::KEEPALIVE_TIMEOUT)]
    pub keepalive_timeout: Duration,

    /// How long a TLS handshake may take (`tls::HANDSHAKE_TIMEOUT`; tests shorten it; not a flag).
    #[arg(skip = crate::tls::HANDSHAKE_TIMEOUT)]
    pub tls_handshake_timeout: Duration,
}
