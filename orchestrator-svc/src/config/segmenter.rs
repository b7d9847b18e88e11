//! Where the segmenter is and how it is called: its URL(s), deadlines, and how calls are secured (TLS for
//! `https://` entries, with a custom CA and a client certificate for mutual TLS; the bearer token sent on each call).

use std::path::PathBuf;

use clap::Args;
use palette_service_kit::BearerToken;
use palette_service_kit::tls::{self, ClientFiles};
use tonic::transport::ClientTlsConfig;

use super::{ConfigError, Secret};

#[derive(Clone, Debug, Args)]
pub struct SegmenterArgs {
    /// Segmenter gRPC endpoint(s): comma-separated `http://host:port`, `https://host:port` (TLS, checked against
    /// SEGMENTER_TLS_CA or the system's CAs) or `dns:///host:port` (plaintext). A host name is resolved to ALL its
    /// addresses (a Kubernetes headless Service gives one per ready Pod) and calls are balanced over them; a replica
    /// that stops answering or reports NOT_SERVING on grpc.health.v1 is left out until a later resolver round finds
    /// it SERVING again. Default http://127.0.0.1:50051.
    #[arg(long, env = "SEGMENTER_URL", default_value = "http://127.0.0.1:50051")]
    pub segmenter_url: String,
    /// How often SEGMENTER_URL's host names are looked up again (replicas added or gone), in seconds; 0 = only at
    /// start and after a failed call; at most 86400. Default 10.
    #[arg(long, env = "SEGMENTER_RESOLVE_INTERVAL_SEC", default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub segmenter_resolve_interval_sec: u64,
    /// Deadline of one Segment call, in seconds, 1 to 86400. Default 120.
    #[arg(long, env = "SEGMENTER_TIMEOUT_SEC", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub segmenter_timeout_sec: u64,
    /// HTTP/2 pings on every segmenter connection, idle or not, every this many seconds, 1 to 3600; a connection
    /// whose ping is not answered within as long again is closed and its calls are retried on another replica: a
    /// replica gone without closing its connections (a lost host or pod, a network partition) costs a retry, not
    /// SEGMENTER_TIMEOUT_SEC and the item. Default 20.
    #[arg(long, env = "SEGMENTER_KEEPALIVE_SEC", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub segmenter_keepalive_sec: u64,
    /// Attempts per Segment call while the segmenter answers UNAVAILABLE or RESOURCE_EXHAUSTED, or a call is
    /// CANCELLED by its replica closing the connection (the next attempt may go to another replica), 1 to 20; the
    /// pause between attempts doubles from 200 ms up to 10 s. Default 4.
    #[arg(long, env = "SEGMENTER_ATTEMPTS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub segmenter_attempts: u32,
    /// Memory for segmentation results reused across jobs on the same input bytes, in MiB. Default 256; 0 = off.
    #[arg(long, env = "MASK_CACHE_MB", default_value_t = 256)]
    pub mask_cache_mb: usize,
    /// Bearer token sent to the segmenter on every call (one of the segmenter's AUTH_TOKENS). Unset: none sent.
    #[arg(long, env = "SEGMENTER_TOKEN", hide_env_values = true)]
    pub segmenter_token: Option<Secret>,
    /// A file holding SEGMENTER_TOKEN (its first line that is not blank or a `#` comment), for tokens mounted from a
    /// secret store; read at startup. Used when SEGMENTER_TOKEN is unset.
    #[arg(long, env = "SEGMENTER_TOKEN_FILE")]
    pub segmenter_token_file: Option<PathBuf>,
    /// PEM CA certificate(s) the segmenter's certificate must chain to, for `https://` SEGMENTER_URL entries.
    /// Unset: the system's CA store.
    #[arg(long, env = "SEGMENTER_TLS_CA")]
    pub segmenter_tls_ca: Option<PathBuf>,
    /// PEM client certificate presented to the segmenter (when it requires mutual TLS: its TLS_CLIENT_CA). Needs
    /// SEGMENTER_TLS_KEY.
    #[arg(long, env = "SEGMENTER_TLS_CERT")]
    pub segmenter_tls_cert: Option<PathBuf>,
    /// PEM private key of SEGMENTER_TLS_CERT.
    #[arg(long, env = "SEGMENTER_TLS_KEY")]
    pub segmenter_tls_key: Option<PathBuf>,
}

/// How calls to the segmenter are secured, checked at startup.
#[derive(Clone, Default)]
pub struct SegmenterSecurity {
    /// For `https://` entries (the name each one dials is set per entry).
    pub tls: Option<ClientTlsConfig>,
    pub token: BearerToken,
}

/// Says what is on, never the key or the token.
impl std::fmt::Debug for SegmenterSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmenterSecurity")
            .field("tls", &self.tls.is_some())
            .field("token", &self.token)
            .finish()
    }
}

impl SegmenterArgs {
    /// The TLS files read and the token checked. TLS files without any `https://` entry are refused: they would
    /// otherwise suggest an encryption that does not happen. So is a list mixing `https://` with plaintext entries:
    /// every replica shares one channel and its token, so the plaintext ones would get the token and the photos
    /// unencrypted.
    pub fn security(&self) -> Result<SegmenterSecurity, ConfigError> {
        let entries: Vec<&str> = self
            .segmenter_url
            .split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .collect();
        // Schemes are case-insensitive (the URL parser reads HTTPS:// as https): counted the same way, or an upper-case
        // entry would pass here as plaintext and then find no TLS settings.
        let encrypted = entries
            .iter()
            .filter(|entry| {
                entry
                    .get(..8)
                    .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
            })
            .count();
        if encrypted > 0 && encrypted < entries.len() {
            return Err(ConfigError::invalid(
                "SEGMENTER_URL",
                self.segmenter_url.clone(),
                "mixes https:// with plaintext entries: make every entry https:// (the token and photos would go \
                 to the others unencrypted)",
            ));
        }
        let wants_tls = encrypted > 0;
        let files = ClientFiles {
            ca: ("SEGMENTER_TLS_CA", self.segmenter_tls_ca.as_deref()),
            cert: ("SEGMENTER_TLS_CERT", self.segmenter_tls_cert.as_deref()),
            key: ("SEGMENTER_TLS_KEY", self.segmenter_tls_key.as_deref()),
        };
        let any_file = [files.ca.1, files.cert.1, files.key.1]
            .into_iter()
            .any(|path| tls::given(path).is_some());
        if any_file && !wants_tls {
            return Err(ConfigError::invalid(
                "SEGMENTER_URL",
                self.segmenter_url.clone(),
                "SEGMENTER_TLS_* is set but no entry is https://: calls would go out in plaintext",
            ));
        }
        let tls = if wants_tls {
            Some(tls::client_config(files)?)
        } else {
            None
        };
        let token = BearerToken::new(self.token()?.as_ref())
            .map_err(|e| ConfigError::invalid("SEGMENTER_TOKEN", "<redacted>", e))?;
        Ok(SegmenterSecurity { tls, token })
    }

    /// SEGMENTER_TOKEN, else the token in SEGMENTER_TOKEN_FILE, else none.
    fn token(&self) -> Result<Option<Secret>, ConfigError> {
        if let Some(token) = self
            .segmenter_token
            .as_ref()
            .filter(|t| !t.expose().trim().is_empty())
        {
            return Ok(Some(token.clone()));
        }
        let Some(path) = tls::given(self.segmenter_token_file.as_deref()) else {
            return Ok(None);
        };
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::invalid("SEGMENTER_TOKEN_FILE", shown.clone(), e))?;
        let token = text
            .lines()
            .map(str::trim)
            .find(|line| !line.is_empty() && !line.starts_with('#'))
            .ok_or_else(|| {
                ConfigError::invalid("SEGMENTER_TOKEN_FILE", shown, "no token in the file")
            })?;
        Ok(Some(Secret::from(token)))
    }
}
