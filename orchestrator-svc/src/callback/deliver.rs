//! Delivery with retries: exponential backoff with full jitter, Retry-After honoured, 410 and other 4xx final.
//! Clock, randomness and the base delay are injected so the tests run in milliseconds.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;

use super::{CallbackBody, idempotency_key, sign};

pub trait Clock: Send + Sync {
    fn now_unix(&self) -> u64;
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// First try included.
    pub max_attempts: u32,
    /// Backoff before retry n (1-based) is uniform in [0, min(max_delay, base_delay * 2^(n-1))].
    pub base_delay: Duration,
    /// Cap of the backoff and of a server's Retry-After.
    pub max_delay: Duration,
    /// Per attempt (CALLBACK_TIMEOUT_SEC).
    pub attempt_timeout: Duration,
}

/// What happened to one callback, recorded on the item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryOutcome {
    pub delivered: bool,
    pub attempts: u32,
    /// The last failure, when not delivered.
    pub error: Option<String>,
}

enum Verdict {
    Delivered,
    /// Retry after at least this long (from Retry-After), or after the backoff when None.
    Retry(Option<Duration>, String),
    Stop(String),
}

pub struct CallbackSender {
    http: reqwest::Client,
    base_url: String,
    secret: String,
    policy: RetryPolicy,
    clock: Arc<dyn Clock>,
    rng: Mutex<StdRng>,
}

impl std::fmt::Debug for CallbackSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackSender")
            .field("base_url", &redacted_url(&self.base_url))
            .field("policy", &self.policy)
            .finish()
    }
}

impl CallbackSender {
    pub fn new(base_url: &str, secret: &str, policy: RetryPolicy) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(policy.attempt_timeout)
            .connect_timeout(policy.attempt_timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("palette-orchestrator/", env!("CARGO_PKG_VERSION")))
            // A redirect would carry X-GPU-Callback-Secret to wherever it points, and turn the POST into a GET
            // that counts as delivered: never followed, a 3xx is a refusal (see `classify`).
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(CallbackSender {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            secret: secret.to_string(),
            policy,
            clock: Arc::new(SystemClock),
            rng: Mutex::new(StdRng::from_os_rng()),
        })
    }

    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    pub fn with_rng_seed(mut self, seed: u64) -> Self {
        self.rng = Mutex::new(StdRng::seed_from_u64(seed));
        self
    }

    pub fn url_for(&self, job_id: &str) -> String {
        format!("{}/jobs/{job_id}/callback", self.base_url)
    }

    /// Sends one item's terminal event until it is accepted, refused for good, or attempts run out. Never fails:
    /// the outcome is returned for the item's record.
    pub async fn deliver(&self, job_id: &str, body: &CallbackBody) -> DeliveryOutcome {
        let payload = match serde_json::to_vec(body) {
            Ok(p) => p,
            Err(e) => {
                return DeliveryOutcome {
                    delivered: false,
                    attempts: 0,
                    error: Some(format!("encode: {e}")),
                };
            }
        };
        let id = idempotency_key(job_id, body.idx, body.status);
        let url = self.url_for(job_id);
        let mut last_error = String::new();
        let max_attempts = self.policy.max_attempts.max(1);
        for attempt in 1..=max_attempts {
            let verdict = self.attempt(&url, &id, &payload).await;
            let wait = match verdict {
                Verdict::Delivered => {
                    metrics::counter!("orchestrator_callbacks_total", "outcome" => "delivered")
                        .increment(1);
                    return DeliveryOutcome {
                        delivered: true,
                        attempts: attempt,
                        error: None,
                    };
                }
                Verdict::Stop(reason) => {
                    metrics::counter!("orchestrator_callbacks_total", "outcome" => "refused")
                        .increment(1);
                    return DeliveryOutcome {
                        delivered: false,
                        attempts: attempt,
                        error: Some(reason),
                    };
                }
                Verdict::Retry(retry_after, reason) => {
                    tracing::warn!(job_id, idx = body.idx, attempt, %reason, "callback attempt failed");
                    last_error = reason;
                    let backoff = self.backoff(attempt);
                    retry_after
                        .map_or(backoff, |ra| ra.max(backoff))
                        .min(self.policy.max_delay)
                }
            };
            if attempt < max_attempts {
                tokio::time::sleep(wait).await;
            }
        }
        metrics::counter!("orchestrator_callbacks_total", "outcome" => "exhausted").increment(1);
        DeliveryOutcome {
            delivered: false,
            attempts: max_attempts,
            error: Some(format!(
                "gave up after {max_attempts} attempts: {last_error}"
            )),
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .policy
            .base_delay
            .saturating_mul(1u32 << (attempt - 1).min(20));
        let cap = exp.min(self.policy.max_delay);
        let millis = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
        let mut rng = self
            .rng
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Duration::from_millis(rng.random_range(0..=millis))
    }

    async fn attempt(&self, url: &str, id: &str, payload: &[u8]) -> Verdict {
        let timestamp = self.clock.now_unix();
        let signature = sign(&self.secret, id, timestamp, payload);
        let sent = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .header("x-gpu-callback-secret", &self.secret)
            .header("x-idempotency-key", id)
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(payload.to_vec())
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            // Timeouts, refused connections, resets: the receiver may come back. reqwest's message names the URL,
            // credentials and query included; it goes to logs and GetJob, so without it.
            Err(e) => return Verdict::Retry(None, format!("request failed: {}", e.without_url())),
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        classify(status, retry_after)
    }
}

fn classify(status: StatusCode, retry_after: Option<Duration>) -> Verdict {
    let reason = format!("HTTP {}", status.as_u16());
    if status.is_success() {
        Verdict::Delivered
    } else if status.is_redirection() {
        Verdict::Stop(format!(
            "{reason}: redirects are not followed (they would carry the callback secret elsewhere); set \
             WORKERS_API_URL to the address that answers"
        ))
    } else if status == StatusCode::GONE {
        Verdict::Stop(format!(
            "{reason}: the receiver no longer wants this job's callbacks"
        ))
    } else if status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error()
    {
        Verdict::Retry(retry_after, reason)
    } else {
        Verdict::Stop(reason)
    }
}

/// The URL without credentials, query or fragment: what logs and errors may show of WORKERS_API_URL.
pub fn redacted_url(raw: &str) -> String {
    match reqwest::Url::parse(raw) {
        Ok(mut url) => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.set_query(None);
            url.set_fragment(None);
            url.to_string()
        }
        Err(_) => "<unparsable URL>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_credentials_or_query() {
        assert_eq!(
            redacted_url("https://user:pa55@api.example.invalid/hooks?token=t0k#x"),
            "https://api.example.invalid/hooks"
        );
        assert_eq!(redacted_url("not a url"), "<unparsable URL>");
        let sender =
            CallbackSender::new("https://u:pa55@h.invalid/?token=t0k", "s", policy()).unwrap();
        let shown = format!("{sender:?}");
        assert!(!shown.contains("pa55") && !shown.contains("t0k"), "{shown}");
    }

    #[test]
    fn redirects_are_refusals() {
        for code in [301, 302, 307, 308] {
            let status = StatusCode::from_u16(code).unwrap();
            assert!(
                matches!(classify(status, None), Verdict::Stop(r) if r.contains("not followed"))
            );
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 6,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            attempt_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn backoff_is_bounded_by_the_exponential_cap() {
        let sender = CallbackSender::new("http://127.0.0.1:1", "s", policy())
            .unwrap()
            .with_rng_seed(7);
        for attempt in 1..=10 {
            let cap = Duration::from_millis(100 * (1 << (attempt - 1))).min(Duration::from_secs(1));
            for _ in 0..50 {
                assert!(sender.backoff(attempt) <= cap);
            }
        }
    }

    #[test]
    fn status_classes() {
        assert!(matches!(classify(StatusCode::OK, None), Verdict::Delivered));
        assert!(matches!(
            classify(StatusCode::NO_CONTENT, None),
            Verdict::Delivered
        ));
        assert!(matches!(classify(StatusCode::GONE, None), Verdict::Stop(_)));
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, None),
            Verdict::Stop(_)
        ));
        assert!(matches!(
            classify(StatusCode::UNAUTHORIZED, None),
            Verdict::Stop(_)
        ));
        assert!(matches!(
            classify(StatusCode::TOO_MANY_REQUESTS, None),
            Verdict::Retry(..)
        ));
        assert!(matches!(
            classify(StatusCode::BAD_GATEWAY, None),
            Verdict::Retry(..)
        ));
    }
}
