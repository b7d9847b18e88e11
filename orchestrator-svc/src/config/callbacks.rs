//! Per-item callbacks to the upstream API.

use std::time::Duration;

use clap::Args;

use super::ConfigError;
use super::secret::Secret;

#[derive(Clone, Debug, Args)]
pub struct CallbackArgs {
    /// Upstream API base URL; callbacks go to {WORKERS_API_URL}/jobs/{jobId}/callback. Unset: no callbacks.
    #[arg(long, env = "WORKERS_API_URL")]
    pub workers_api_url: Option<String>,
    /// Shared secret: sent as X-GPU-Callback-Secret and the HMAC key of webhook-signature.
    #[arg(long, env = "GPU_CALLBACK_SECRET", hide_env_values = true)]
    pub gpu_callback_secret: Option<Secret>,
    /// Timeout of one callback attempt, in seconds. Default 30.
    #[arg(long, env = "CALLBACK_TIMEOUT_SEC", default_value_t = 30)]
    pub callback_timeout_sec: u64,
    /// Callback attempts before giving up (first try included). Default 6.
    #[arg(long, env = "CALLBACK_MAX_ATTEMPTS", default_value_t = 6)]
    pub callback_max_attempts: u32,
    /// Base of the exponential callback backoff, in milliseconds (full jitter). Default 1000.
    #[arg(long, env = "CALLBACK_BASE_DELAY_MS", default_value_t = 1000)]
    pub callback_base_delay_ms: u64,
    /// Longest wait between two callback attempts, Retry-After included, in seconds. Default 300.
    #[arg(long, env = "CALLBACK_MAX_DELAY_SEC", default_value_t = 300)]
    pub callback_max_delay_sec: u64,
}

/// Callbacks on: where, signed with what, retried how.
#[derive(Clone, Debug)]
pub struct CallbackSettings {
    pub base_url: String,
    pub secret: Secret,
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub attempt_timeout: Duration,
}

impl CallbackArgs {
    /// None when WORKERS_API_URL is unset (items are reported through GetJob/WatchJob only).
    pub fn settings(&self) -> Result<Option<CallbackSettings>, ConfigError> {
        let Some(url) = self
            .workers_api_url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
        else {
            return Ok(None);
        };
        let secret = self
            .gpu_callback_secret
            .clone()
            .filter(|s| !s.expose().is_empty())
            .ok_or(ConfigError::Missing {
                setting: "GPU_CALLBACK_SECRET",
                reason: "with WORKERS_API_URL",
            })?;
        Ok(Some(CallbackSettings {
            base_url: url.to_string(),
            secret,
            max_attempts: self.callback_max_attempts.max(1),
            base_delay: Duration::from_millis(self.callback_base_delay_ms),
            max_delay: Duration::from_secs(self.callback_max_delay_sec),
            attempt_timeout: Duration::from_secs(self.callback_timeout_sec),
        }))
    }
}
