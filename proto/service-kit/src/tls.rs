//! TLS material from files named in config: the server's identity (TLS_CERT, TLS_KEY), the CA its clients must be
//! signed by (TLS_CLIENT_CA), and a client's trust and identity (the orchestrator's SEGMENTER_TLS_*). Every file is
//! read and parsed here, at startup, so a missing or malformed one is reported with its variable and path instead
//! of as a handshake failure later.
//!
//! Certificates are read once: a renewed certificate takes a restart (a rolling one in Kubernetes). Tokens, which
//! rotate more often, are re-read live (`auth`).

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Why the TLS settings cannot be used; names the variable and the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{setting}={path}: cannot read the file")]
    Read {
        setting: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{setting}={path}: no PEM certificate in the file")]
    NoCertificate {
        setting: &'static str,
        path: PathBuf,
    },
    #[error("{setting}={path}: no PEM private key in the file")]
    NoKey {
        setting: &'static str,
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{setting}={path}: malformed PEM")]
    Pem {
        setting: &'static str,
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// One of a pair set without the other (TLS_CERT without TLS_KEY, ...).
    #[error("{set} is set but {missing} is not: set both, or neither")]
    Incomplete {
        set: &'static str,
        missing: &'static str,
    },
    /// Files that each parse but do not make a TLS configuration together: a key that is not the certificate's
    /// (an older issuance), a CA file rustls cannot use as a trust anchor.
    #[error("{settings}: not usable together: {reason}")]
    Unusable { settings: String, reason: String },
}

/// How long a connection may take to finish its TLS handshake. Without a limit a peer that opens connections and
/// never sends a ClientHello holds a task and a file descriptor each for ever, before any token is checked (a
/// segmenter port open to the internet on Runpod).
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The full error chain of a tonic transport error (its own Display says only "transport error").
fn chain(e: &tonic::transport::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Makes ring the process's rustls crypto provider, as tonic's client already falls back to. Both providers are
/// compiled into this tree (the AWS SDK brings aws-lc-rs), and then rustls refuses to choose for a server: the
/// first TLS handshake panicked. A provider installed earlier (by an embedding program) is kept.
fn ensure_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A PEM file read and checked: the text tonic takes, once it is known to hold what it should.
fn read_pem(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        setting,
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read_pem(setting, path)?;
    let mut found = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|source| TlsError::Pem {
            setting,
            path: path.to_path_buf(),
            source,
        })?;
        found += 1;
    }
    if found == 0 {
        return Err(TlsError::NoCertificate {
            setting,
            path: path.to_path_buf(),
        });
    }
    Ok(pem)
}

fn private_key(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read_pem(setting, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|source| TlsError::NoKey {
        setting,
        path: path.to_path_buf(),
        source,
    })?;
    Ok(pem)
}

/// A path setting that is set and not empty (`.env` files list unset settings as `NAME=`).
pub fn given(path: Option<&Path>) -> Option<&Path> {
    path.filter(|p| !p.as_os_str().is_empty())
}

/// Both or neither of a pair of settings.
fn pair<'a>(
    a: (&'static str, Option<&'a Path>),
    b: (&'static str, Option<&'a Path>),
) -> Result<Option<(&'a Path, &'a Path)>, TlsError> {
    match (given(a.1), given(b.1)) {
        (Some(x), Some(y)) => Ok(Some((x, y))),
        (None, None) => Ok(None),
        (Some(_), None) => Err(TlsError::Incomplete {
            set: a.0,
            missing: b.0,
        }),
        (None, Some(_)) => Err(TlsError::Incomplete {
            set: b.0,
            missing: a.0,
        }),
    }
}

/// How a server speaks, for its startup log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerMode {
    Plaintext,
    Tls,
    MutualTls,
}

/// The server's TLS from TLS_CERT, TLS_KEY and TLS_CLIENT_CA; None when TLS is off (neither file set).
pub fn server_config(
    cert: Option<&Path>,
    key: Option<&Path>,
    client_ca: Option<&Path>,
    handshake_timeout: std::time::Duration,
) -> Result<(Option<ServerTlsConfig>, ServerMode), TlsError> {
    let client_ca = given(client_ca);
    ensure_crypto_provider();
    let Some((cert, key)) = pair(("TLS_CERT", cert), ("TLS_KEY", key))? else {
        if client_ca.is_some() {
            return Err(TlsError::Incomplete {
                set: "TLS_CLIENT_CA",
                missing: "TLS_CERT",
            });
        }
        return Ok((None, ServerMode::Plaintext));
    };
    let identity = Identity::from_pem(
        certificates("TLS_CERT", cert)?,
        private_key("TLS_KEY", key)?,
    );
    let config = ServerTlsConfig::new()
        .identity(identity)
        .timeout(handshake_timeout);
    let (config, mode, settings) = match client_ca {
        Some(ca) => {
            let roots = Certificate::from_pem(certificates("TLS_CLIENT_CA", ca)?);
            (
                config.client_ca_root(roots),
                ServerMode::MutualTls,
                "TLS_CERT, TLS_KEY, TLS_CLIENT_CA",
            )
        }
        None => (config, ServerMode::Tls, "TLS_CERT, TLS_KEY"),
    };
    // What serving does with it, now: rustls checks the key against the certificate and builds the client
    // verifier here, not after the model has loaded (the segmenter) or the workers have started (the orchestrator).
    tonic::transport::Server::builder()
        .tls_config(config.clone())
        .map_err(|e| TlsError::Unusable {
            settings: settings.to_string(),
            reason: chain(&e),
        })?;
    Ok((Some(config), mode))
}

/// A client's TLS settings, each with the variable it came from (for the errors).
#[derive(Clone, Copy, Debug)]
pub struct ClientFiles<'a> {
    /// CA certificate(s) the server's certificate must chain to; None: the system's CA store.
    pub ca: (&'static str, Option<&'a Path>),
    /// The client's own certificate and key, for servers that require mutual TLS.
    pub cert: (&'static str, Option<&'a Path>),
    pub key: (&'static str, Option<&'a Path>),
}

/// The client's TLS (without a domain name: the caller sets the name it dials per target).
pub fn client_config(files: ClientFiles<'_>) -> Result<ClientTlsConfig, TlsError> {
    ensure_crypto_provider();
    let mut config = ClientTlsConfig::new();
    config = match (files.ca.0, given(files.ca.1)) {
        (setting, Some(ca)) => {
            config.ca_certificate(Certificate::from_pem(certificates(setting, ca)?))
        }
        (_, None) => config.with_native_roots(),
    };
    if let Some((cert, key)) = pair(files.cert, files.key)? {
        config = config.identity(Identity::from_pem(
            certificates(files.cert.0, cert)?,
            private_key(files.key.0, key)?,
        ));
    }
    let settings = [files.ca, files.cert, files.key]
        .iter()
        .filter(|(_, path)| given(*path).is_some())
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ");
    // As the first call would build it: a key that is not the certificate's failed every replica's connection
    // ("replica skipped") while the service reported SERVING.
    tonic::transport::Endpoint::from_static("https://localhost")
        .tls_config(config.clone().domain_name("localhost"))
        .map_err(|e| TlsError::Unusable {
            settings,
            reason: chain(&e),
        })?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_without_files() {
        let (config, mode) = server_config(None, None, None, HANDSHAKE_TIMEOUT).unwrap();
        assert!(config.is_none());
        assert_eq!(mode, ServerMode::Plaintext);
    }

    #[test]
    fn errors_name_the_variable_and_the_file() {
        let missing = Path::new("/nonexistent/server.pem");
        let err = server_config(Some(missing), Some(missing), None, HANDSHAKE_TIMEOUT).unwrap_err();
        assert_eq!(
            err.to_string(),
            "TLS_CERT=/nonexistent/server.pem: cannot read the file"
        );
        let err = server_config(Some(missing), None, None, HANDSHAKE_TIMEOUT).unwrap_err();
        assert_eq!(
            err.to_string(),
            "TLS_CERT is set but TLS_KEY is not: set both, or neither"
        );
        let err = server_config(None, None, Some(missing), HANDSHAKE_TIMEOUT).unwrap_err();
        assert!(err.to_string().starts_with("TLS_CLIENT_CA is set"), "{err}");
    }

    /// A certificate and key that each parse (a key from another issuance).
    fn mismatched_pair(dir: &Path) -> (PathBuf, PathBuf) {
        let a = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let b = rcgen::KeyPair::generate().unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("other.key"));
        std::fs::write(&cert, a.cert.pem()).unwrap();
        std::fs::write(&key, b.serialize_pem()).unwrap();
        (cert, key)
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused_when_read() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = mismatched_pair(dir.path());
        let err = server_config(Some(&cert), Some(&key), None, HANDSHAKE_TIMEOUT).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("TLS_CERT, TLS_KEY: not usable together"),
            "{err}"
        );
        let files = ClientFiles {
            ca: ("SEGMENTER_TLS_CA", None),
            cert: ("SEGMENTER_TLS_CERT", Some(&cert)),
            key: ("SEGMENTER_TLS_KEY", Some(&key)),
        };
        let err = client_config(files).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("SEGMENTER_TLS_CERT, SEGMENTER_TLS_KEY: not usable together"),
            "{err}"
        );
    }

    #[test]
    fn a_matching_pair_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let a = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("cert.key"));
        std::fs::write(&cert, a.cert.pem()).unwrap();
        std::fs::write(&key, a.signing_key.serialize_pem()).unwrap();
        let (config, mode) =
            server_config(Some(&cert), Some(&key), Some(&cert), HANDSHAKE_TIMEOUT).unwrap();
        assert!(config.is_some());
        assert_eq!(mode, ServerMode::MutualTls);
        let files = ClientFiles {
            ca: ("SEGMENTER_TLS_CA", Some(&cert)),
            cert: ("SEGMENTER_TLS_CERT", Some(&cert)),
            key: ("SEGMENTER_TLS_KEY", Some(&key)),
        };
        client_config(files).unwrap();
    }

    #[test]
    fn a_file_without_a_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-a-cert.pem");
        std::fs::write(&path, "hello\n").unwrap();
        let err = server_config(Some(&path), Some(&path), None, HANDSHAKE_TIMEOUT).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::NoCertificate {
                    setting: "TLS_CERT",
                    ..
                }
            ),
            "{err}"
        );
    }
}
