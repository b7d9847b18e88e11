//! Per-item callbacks to the upstream API.

use std::time::Duration;

use clap::Args;

use super::ConfigError;
use super::secret::{Secret, UrlWithCredentials};

#[derive(Clone, Debug, Args)]
pub struct CallbackArgs {
    /// Upstream API base URL (no query); callbacks go to {WORKERS_API_URL}/jobs/{jobId}/callback. Unset: no
    /// callbacks.
    #[arg(long, env = "WORKERS_API_URL", hide_env_values = true)]
    pub workers_api_url: Option<UrlWithCredentials>,
    /// Shared secret: sent as X-GPU-Callback-Secret (the seed's check) and, unless CALLBACK_SIGNING_SECRET is set,
    /// the HMAC key of webhook-signature. May be unset when CALLBACK_SIGNING_SECRET is set: no header then.
    #[arg(long, env = "GPU_CALLBACK_SECRET", hide_env_values = true)]
    pub gpu_callback_secret: Option<Secret>,
    /// HMAC key of webhook-signature (`whsec_<base64>`, as Standard Webhooks secrets, or any string), never sent.
    /// Unset: GPU_CALLBACK_SECRET signs, and since every request carries it as a header, whoever sees one
    /// request's headers can sign any body: set this, then receivers can rely on the signature.
    #[arg(long, env = "CALLBACK_SIGNING_SECRET", hide_env_values = true)]
    pub callback_signing_secret: Option<Secret>,
    /// During a rotation of the signing key (CALLBACK_SIGNING_SECRET, or GPU_CALLBACK_SECRET where that signs): the
    /// previous key. Its signature goes along in webhook-signature, so receivers still verifying with it keep working
    /// while they move to the new one; unset it once they all have. Never sent.
    #[arg(long, env = "CALLBACK_SIGNING_SECRET_PREVIOUS", hide_env_values = true)]
    pub callback_signing_secret_previous: Option<Secret>,
    /// Timeout of one callback attempt, in seconds (at least 1). Default 30.
    #[arg(long, env = "CALLBACK_TIMEOUT_SEC", default_value_t = 30)]
    pub callback_timeout_sec: u64,
    /// Callback attempts before giving up (first try included). Default 6.
    #[arg(long, env = "CALLBACK_MAX_ATTEMPTS", default_value_t = 6)]
    pub callback_max_attempts: u32,
    /// Base of the exponential callback backoff, in milliseconds (full jitter), 1 to 600000. Default 1000.
    #[arg(long, env = "CALLBACK_BASE_DELAY_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub callback_base_delay_ms: u64,
    /// Longest wait between two callback attempts, Retry-After included, in seconds, 1 to 86400. Default 300.
    #[arg(long, env = "CALLBACK_MAX_DELAY_SEC", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub callback_max_delay_sec: u64,
    /// Callback requests in flight at once, all jobs together, 1 to 1000 (the others wait their turn; a callback
    /// waiting between two attempts holds no place). Default 16.
    #[arg(long, env = "CALLBACK_CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub callback_concurrency: u64,
    /// Allow a plain-http WORKERS_API_URL on a host other than loopback (the secret and signed bodies then cross
    /// the network in clear: only inside a trusted network, e.g. a cluster-internal Service). Default false.
    #[arg(long, env = "CALLBACK_ALLOW_HTTP", default_value_t = false, action = clap::ArgAction::Set)]
    pub callback_allow_http: bool,
}

/// Callbacks on: where, signed with what, retried how.
#[derive(Clone, Debug)]
pub struct CallbackSettings {
    pub base_url: String,
    /// Sent as X-GPU-Callback-Secret; None: no such header.
    pub header_secret: Option<Secret>,
    /// The HMAC key of webhook-signature.
    pub signing_secret: Secret,
    /// The signing key before a rotation (CALLBACK_SIGNING_SECRET_PREVIOUS): signs too. None when unset or the
    /// same as `signing_secret`.
    pub previous_signing_secret: Option<Secret>,
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub attempt_timeout: Duration,
    /// Attempts in flight at once (CALLBACK_CONCURRENCY).
    pub concurrency: usize,
}

impl CallbackArgs {
    /// None when WORKERS_API_URL is unset (items are reported through GetJob/WatchJob only).
    pub fn settings(&self) -> Result<Option<CallbackSettings>, ConfigError> {
        let Some(url) = self
            .workers_api_url
            .as_ref()
            .map(|u| u.expose().trim())
            .filter(|u| !u.is_empty())
        else {
            return Ok(None);
        };
        check_callback_url(url, self.callback_allow_http)?;
        let set = |s: &Option<Secret>| s.clone().filter(|s| !s.expose().is_empty());
        let header_secret = set(&self.gpu_callback_secret);
        let signing = set(&self.callback_signing_secret);
        if let Some(secret) = &header_secret {
            check_secret_key("GPU_CALLBACK_SECRET", secret)?;
        }
        if let Some(secret) = &signing {
            check_secret_key("CALLBACK_SIGNING_SECRET", secret)?;
        }
        let previous = set(&self.callback_signing_secret_previous);
        if let Some(secret) = &previous {
            check_secret_key("CALLBACK_SIGNING_SECRET_PREVIOUS", secret)?;
        }
        let signing_secret =
            signing
                .or_else(|| header_secret.clone())
                .ok_or(ConfigError::Missing {
                    setting: "GPU_CALLBACK_SECRET",
                    reason: "with WORKERS_API_URL (or CALLBACK_SIGNING_SECRET)",
                })?;
        // Checked here too: a Config built in code skips clap, and no permit at all would hold every callback.
        let concurrency = usize::try_from(self.callback_concurrency)
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| {
                ConfigError::invalid(
                    "CALLBACK_CONCURRENCY",
                    self.callback_concurrency.to_string(),
                    "expected 1 to 1000",
                )
            })?;
        Ok(Some(CallbackSettings {
            // Checked trimmed, used trimmed: a stray space from an env file would otherwise pass the check and
            // make every callback URL unparsable.
            base_url: url.to_string(),
            header_secret,
            previous_signing_secret: previous.filter(|p| p.expose() != signing_secret.expose()),
            signing_secret,
            max_attempts: self.callback_max_attempts.max(1),
            base_delay: Duration::from_millis(self.callback_base_delay_ms),
            max_delay: Duration::from_secs(self.callback_max_delay_sec),
            // reqwest's 0 is "time out at once": every attempt would fail.
            attempt_timeout: Duration::from_secs(self.callback_timeout_sec.max(1)),
            concurrency,
        }))
    }
}

/// The secret goes out as a header and keys the HMAC, so: a valid header value with nothing around it (a secret
/// file mounted from a Secret often ends with a newline, which no request can carry: every callback failed, found
/// only at the first delivery); after `whsec_`, standard padded base64 (else it signed with the raw bytes, where
/// Standard Webhooks verifiers decode another key or refuse it); a key that is not empty (`whsec_` followed by
/// nothing would sign with an empty key, which anyone can forge).
fn check_secret_key(setting: &'static str, secret: &Secret) -> Result<(), ConfigError> {
    let raw = secret.expose();
    if raw.trim() != raw || http::HeaderValue::from_str(raw).is_err() {
        return Err(ConfigError::invalid(
            setting,
            "<redacted>".to_string(),
            "it has surrounding whitespace (a trailing newline from a file?) or a character a header cannot carry",
        ));
    }
    if let Some(encoded) = raw.strip_prefix("whsec_")
        && !crate::callback::is_standard_base64(encoded)
    {
        return Err(ConfigError::invalid(
            setting,
            "<redacted>".to_string(),
            "whsec_ must be followed by standard padded base64 of the key, as Standard Webhooks secrets are",
        ));
    }
    if crate::callback::key_len(raw) == 0 {
        return Err(ConfigError::invalid(
            setting,
            "<redacted>".to_string(),
            "its HMAC key is empty (whsec_ must be followed by base64 of the key)",
        ));
    }
    Ok(())
}

/// https, or http on loopback, or http anywhere with CALLBACK_ALLOW_HTTP; no query or fragment (the callback path
/// is appended to the URL); errors show the URL redacted.
fn check_callback_url(raw: &str, allow_http: bool) -> Result<(), ConfigError> {
    let shown = crate::callback::redacted_url(raw);
    let url = reqwest::Url::parse(raw)
        .map_err(|e| ConfigError::invalid("WORKERS_API_URL", shown.clone(), e))?;
    let host = url.host_str().unwrap_or_default();
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" => {}
        "http" if loopback || allow_http => {}
        "http" => {
            return Err(ConfigError::invalid(
                "WORKERS_API_URL",
                shown,
                "callbacks carry the shared secret: use https, or set CALLBACK_ALLOW_HTTP=true inside a trusted network",
            ));
        }
        other => {
            return Err(ConfigError::invalid(
                "WORKERS_API_URL",
                shown,
                format!("scheme {other:?}: expected https (or http)"),
            ));
        }
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ConfigError::invalid(
            "WORKERS_API_URL",
            shown,
            "a query or fragment: /jobs/{jobId}/callback is appended to the URL, so it would land inside them",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(url: &str, allow_http: bool) -> CallbackArgs {
        CallbackArgs {
            workers_api_url: Some(url.into()),
            gpu_callback_secret: Some("s3cret".into()),
            callback_signing_secret: None,
            callback_signing_secret_previous: None,
            callback_timeout_sec: 30,
            callback_max_attempts: 6,
            callback_base_delay_ms: 1000,
            callback_max_delay_sec: 300,
            callback_concurrency: 16,
            callback_allow_http: allow_http,
        }
    }

    #[test]
    fn callbacks_need_https_except_on_loopback_or_when_allowed() {
        for ok in [
            "https://api.example.invalid",
            "http://127.0.0.1:8080",
            "http://localhost:9000/base",
            "http://[::1]:80",
        ] {
            assert!(args(ok, false).settings().is_ok(), "{ok}");
        }
        let refused = args("http://user:pa55@api.example.invalid/?token=t0k", false)
            .settings()
            .unwrap_err();
        let shown = format!("{refused} {:?}", std::error::Error::source(&refused));
        assert!(shown.contains("CALLBACK_ALLOW_HTTP"), "{shown}");
        assert!(!shown.contains("pa55") && !shown.contains("t0k"), "{shown}");
        assert!(args("http://api.internal:8080", true).settings().is_ok());
        assert!(args("ftp://api.example.invalid", true).settings().is_err());
    }

    #[test]
    fn the_url_is_used_as_checked_and_takes_no_query() {
        let settings = args(" https://api.example.invalid/base \n", false)
            .settings()
            .unwrap()
            .unwrap();
        assert_eq!(settings.base_url, "https://api.example.invalid/base");
        assert!(args("   ", false).settings().unwrap().is_none());
        for refused in [
            "https://api.example.invalid/hooks?token=t0k",
            "https://api.example.invalid/hooks#frag",
        ] {
            let err = args(refused, false).settings().unwrap_err();
            let shown = format!("{err} {:?}", std::error::Error::source(&err));
            assert!(shown.contains("query or fragment"), "{shown}");
            assert!(!shown.contains("t0k"), "{shown}");
        }
    }

    #[test]
    fn a_signing_secret_signs_and_may_stand_alone() {
        let mut a = args("https://api.example.invalid", false);
        a.callback_signing_secret =
            Some("whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".into());
        let both = a.settings().unwrap().unwrap();
        assert_eq!(
            both.header_secret.as_ref().map(|s| s.expose()),
            Some("s3cret")
        );
        assert!(both.signing_secret.expose().starts_with("whsec_"));
        a.gpu_callback_secret = None;
        let alone = a.settings().unwrap().unwrap();
        assert!(alone.header_secret.is_none());
        a.callback_signing_secret = Some("whsec_".into());
        let err = a.settings().unwrap_err();
        assert!(
            format!("{err:?}").contains("CALLBACK_SIGNING_SECRET"),
            "{err:?}"
        );
        a.callback_signing_secret = None;
        let err = a.settings().unwrap_err();
        assert!(
            format!("{err:?}").contains("GPU_CALLBACK_SECRET"),
            "{err:?}"
        );
    }

    #[test]
    fn a_previous_signing_key_is_checked_and_kept_only_when_it_differs() {
        let mut a = args("https://api.example.invalid", false);
        a.callback_signing_secret = Some("new-key".into());
        a.callback_signing_secret_previous = Some("old-key".into());
        let settings = a.settings().unwrap().unwrap();
        assert_eq!(
            settings
                .previous_signing_secret
                .as_ref()
                .map(|s| s.expose()),
            Some("old-key")
        );
        a.callback_signing_secret_previous = Some("new-key".into());
        assert!(
            a.settings()
                .unwrap()
                .unwrap()
                .previous_signing_secret
                .is_none()
        );
        a.callback_signing_secret_previous = Some("old-key\n".into());
        let err = a.settings().unwrap_err();
        assert!(
            format!("{err:?}").contains("CALLBACK_SIGNING_SECRET_PREVIOUS"),
            "{err:?}"
        );
    }

    #[test]
    fn a_zero_timeout_is_one_second_and_an_empty_hmac_key_is_refused() {
        let mut a = args("https://api.example.invalid", false);
        a.callback_timeout_sec = 0;
        let settings = a.settings().unwrap().unwrap();
        assert_eq!(settings.attempt_timeout, Duration::from_secs(1));
        let mut a = args("https://api.example.invalid", false);
        a.gpu_callback_secret = Some("whsec_".into());
        let err = a.settings().unwrap_err();
        assert!(format!("{err:?}").contains("HMAC key is empty"), "{err:?}");
    }

    #[test]
    fn a_secret_a_header_cannot_carry_or_a_whsec_key_that_is_not_base64_is_refused() {
        for (secret, reason) in [
            ("s3cret-from-a-file\n", "surrounding whitespace"),
            ("s3cret\r\n", "surrounding whitespace"),
            (" s3cret", "surrounding whitespace"),
            ("s3c\u{7f}ret", "a header cannot carry"),
            // 32 bytes of base64 without its padding: verifiers disagree on what key it is.
            (
                "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8",
                "padded base64",
            ),
            ("whsec_=", "padded base64"),
            ("whsec_not base64!", "padded base64"),
        ] {
            let mut a = args("https://api.example.invalid", false);
            a.gpu_callback_secret = Some(secret.into());
            let err = a.settings().unwrap_err();
            assert!(format!("{err:?}").contains(reason), "{secret:?}: {err:?}");
        }
        for fine in [
            "s3cret with inner spaces",
            "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        ] {
            let mut a = args("https://api.example.invalid", false);
            a.gpu_callback_secret = Some(fine.into());
            assert!(a.settings().is_ok(), "{fine}");
        }
    }

    #[test]
    fn callback_concurrency_is_1_to_1000() {
        let mut a = args("https://api.example.invalid", false);
        assert_eq!(a.settings().unwrap().unwrap().concurrency, 16);
        for refused in [0, 1001] {
            a.callback_concurrency = refused;
            let err = a.settings().unwrap_err();
            assert!(
                format!("{err:?}").contains("CALLBACK_CONCURRENCY"),
                "{err:?}"
            );
        }
        a.callback_concurrency = 1000;
        assert_eq!(a.settings().unwrap().unwrap().concurrency, 1000);
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            callbacks: CallbackArgs,
        }
        assert!(Cli::try_parse_from(["x", "--callback-concurrency", "0"]).is_err());
        assert!(Cli::try_parse_from(["x", "--callback-concurrency", "1001"]).is_err());
        let parsed = Cli::try_parse_from(["x", "--callback-concurrency", "4"]).unwrap();
        assert_eq!(parsed.callbacks.callback_concurrency, 4);
    }
}
