//! Bearer-token authentication of every call but grpc.health.v1, as a tower layer in front of a service's routes.
//!
//! The model: tokens are *service* tokens. They say "this caller is one of our services" (the upstream API, the
//! orchestrator calling the segmenter), not which user a call is for: the upstream API is the authority on users.
//! Tokens come from AUTH_TOKENS and/or AUTH_TOKENS_FILE; several may be valid at once, so a token is rotated by
//! adding the new one, moving the callers over, then removing the old one. The file is read again periodically and
//! on SIGHUP. No token configured: authentication is off (local runs), and the startup log says so.

mod client;
mod layer;
mod tokens;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

pub use client::BearerToken;
pub use layer::{AuthLayer, AuthService};
pub use tokens::{MIN_TOKEN_CHARS, TokenError, TokenSet};

/// Why the tokens cannot be used; names the variable (and the file), never a token.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("AUTH_TOKENS: {0}")]
    Inline(#[source] TokenError),
    #[error("AUTH_TOKENS_FILE={path}: cannot read the file")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("AUTH_TOKENS_FILE={path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: TokenError,
    },
    #[error("AUTH_TOKENS holds no token: every call would be refused")]
    NoInlineToken,
    #[error("AUTH_TOKENS_FILE={path} holds no token: every call would be refused")]
    EmptyFile { path: PathBuf },
}

/// Decides whether a call may proceed. Cheap to clone; every clone sees token reloads.
#[derive(Clone, Debug)]
pub enum Authenticator {
    /// No tokens configured: every call proceeds.
    Off,
    On(Arc<Tokens>),
}

/// The accepted tokens now, and where they come from.
#[derive(Debug)]
pub struct Tokens {
    current: RwLock<Arc<TokenSet>>,
    inline: TokenSet,
    file: Option<PathBuf>,
}

impl Authenticator {
    /// From AUTH_TOKENS (`inline`) and AUTH_TOKENS_FILE (`file`); Off when neither is set (an empty AUTH_TOKENS,
    /// as compose passes an unset variable, counts as unset).
    pub fn load(inline: Option<&str>, file: Option<&Path>) -> Result<Self, AuthError> {
        let inline = inline.filter(|text| !text.trim().is_empty());
        let file = crate::tls::given(file);
        if inline.is_none() && file.is_none() {
            return Ok(Authenticator::Off);
        }
        let inline = TokenSet::parse(inline.unwrap_or("")).map_err(AuthError::Inline)?;
        if inline.is_empty() && file.is_none() {
            return Err(AuthError::NoInlineToken);
        }
        let tokens = Tokens {
            current: RwLock::new(Arc::new(TokenSet::default())),
            inline,
            file: file.map(Path::to_path_buf),
        };
        let set = tokens.read()?;
        *tokens.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        Ok(Authenticator::On(Arc::new(tokens)))
    }

    /// How many tokens are accepted now (0 when off).
    pub fn token_count(&self) -> usize {
        match self {
            Authenticator::Off => 0,
            Authenticator::On(tokens) => tokens.snapshot().len(),
        }
    }

    pub fn is_on(&self) -> bool {
        matches!(self, Authenticator::On(_))
    }

    /// Whether a call carrying these headers may proceed.
    pub fn allows(&self, headers: &http::HeaderMap) -> Result<(), Refusal> {
        let Authenticator::On(tokens) = self else {
            return Ok(());
        };
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return Err(Refusal::Missing);
        };
        let presented = value
            .as_bytes()
            .strip_prefix(b"Bearer ")
            .or_else(|| value.as_bytes().strip_prefix(b"bearer "))
            .ok_or(Refusal::NotBearer)?;
        if tokens.snapshot().accepts(presented) {
            Ok(())
        } else {
            Err(Refusal::Wrong)
        }
    }

    /// Re-reads AUTH_TOKENS_FILE every `every` and on SIGHUP, until the authenticator is dropped. None when there
    /// is no file to watch.
    pub fn spawn_reload(&self, every: Duration) -> Option<tokio::task::JoinHandle<()>> {
        let Authenticator::On(tokens) = self else {
            return None;
        };
        tokens.file.as_ref()?;
        let weak = Arc::downgrade(tokens);
        // Never a busy loop, whatever a caller passes.
        let every = every.max(Duration::from_millis(10));
        Some(tokio::spawn(reload_loop(weak, every)))
    }
}

/// Why a call was refused (logged; the caller only learns UNAUTHENTICATED).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    NotBearer,
    Wrong,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Missing => "no authorization header",
            Refusal::NotBearer => "authorization is not a Bearer token",
            Refusal::Wrong => "unknown token",
        }
    }

    /// The `reason` label of `grpc_unauthenticated_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::NotBearer => "not_bearer",
            Refusal::Wrong => "unknown_token",
        }
    }
}

impl Tokens {
    fn snapshot(&self) -> Arc<TokenSet> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// AUTH_TOKENS plus the file's tokens as they are now.
    fn read(&self) -> Result<TokenSet, AuthError> {
        let mut set = self.inline.clone();
        if let Some(path) = &self.file {
            let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
                path: path.clone(),
                source,
            })?;
            let before = set.len();
            set.extend(&text).map_err(|source| AuthError::File {
                path: path.clone(),
                source,
            })?;
            if set.len() == before {
                return Err(AuthError::EmptyFile { path: path.clone() });
            }
        }
        Ok(set)
    }

    /// Replaces the tokens with the file's current ones. A file whose lines list no token now (comments only)
    /// revokes all of the file's (only AUTH_TOKENS stay; without them every call is refused): that is how the last
    /// file token is revoked. A file that cannot be read, or is 0 bytes (being rewritten in place: truncated, not
    /// yet written), or has a malformed line keeps the previous tokens: an operator's typo or a reload that lands
    /// mid-write must not lock every client out. At startup an empty file is refused instead (`load`).
    fn reload(&self) {
        let being_written = |path: &Path| std::fs::metadata(path).is_ok_and(|m| m.len() == 0);
        let read = match self.read() {
            Err(AuthError::EmptyFile { path }) if being_written(&path) => {
                Err(AuthError::EmptyFile { path })
            }
            Err(AuthError::EmptyFile { .. }) => {
                tracing::warn!(
                    tokens = self.inline.len(),
                    "AUTH_TOKENS_FILE lists no token now: its tokens are revoked, only AUTH_TOKENS are accepted"
                );
                Ok(self.inline.clone())
            }
            other => other,
        };
        match read {
            Ok(set) => {
                let count = set.len();
                let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
                if current.digests() != set.digests() {
                    *current = Arc::new(set);
                    tracing::info!(
                        tokens = count,
                        "AUTH_TOKENS_FILE read again: accepted tokens changed"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "AUTH_TOKENS_FILE not usable: keeping the tokens accepted so far");
            }
        }
    }
}

async fn reload_loop(tokens: Weak<Tokens>, every: Duration) {
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let signal = async {
            match hangup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let signal = std::future::pending::<()>();
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = signal => tracing::info!("SIGHUP: reading AUTH_TOKENS_FILE again"),
        }
        let Some(tokens) = tokens.upgrade() else {
            return;
        };
        // A small file; read off the async threads all the same.
        let _ = tokio::task::spawn_blocking(move || tokens.reload()).await;
    }
}
