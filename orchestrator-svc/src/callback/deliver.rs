//! Delivery with retries: exponential backoff with full jitter, Retry-After honoured, 410 and other 4xx final.
//! Clock, randomness, the base delay and the HTTP transport are injected so the tests run in milliseconds (the
//! retry schedule itself on tokio's paused clock).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;

use super::transport::{Http, Transport};
use super::{CallbackBody, CallbackJob, idempotency_key, redacted_url, sign};
use crate::error::Report;

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
    /// The receiver answered 410 Gone: the job's URL (`/jobs/{jobId}/callback`) is gone, for its other items too.
    pub gone: bool,
}

enum Verdict {
    Delivered,
    /// Retry after at least this long (from Retry-After), or after the backoff when None.
    Retry(Option<Duration>, String),
    Stop(String),
    /// 410 Gone: final, and for the whole job.
    Gone(String),
    /// Not sent: the job's receiver answered 410 Gone to another of its callbacks meanwhile.
    GoneBefore,
}

/// Why a callback was not sent once its job's receiver answered 410 Gone.
pub const NOT_SENT_GONE: &str =
    "not sent: the receiver answered 410 Gone to this job's callback URL";

pub struct CallbackSender {
    http: Arc<dyn Transport>,
    base_url: String,
    /// Sent as X-GPU-Callback-Secret (the seed's check); None: not sent.
    header_secret: Option<String>,
    /// The HMAC key of webhook-signature.
    signing_secret: String,
    /// Keys whose signatures go along, after the signing key's: the header's secret (which signed before
    /// CALLBACK_SIGNING_SECRET was set) and the key before a rotation (CALLBACK_SIGNING_SECRET_PREVIOUS), so
    /// receivers still verifying with either keep working while they move to the signing key.
    also_signing: Vec<String>,
    policy: RetryPolicy,
    clock: Arc<dyn Clock>,
    rng: Mutex<StdRng>,
    /// CALLBACK_CONCURRENCY: places for attempts in flight, for every job together (None: unbounded).
    places: Option<tokio::sync::Semaphore>,
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
            http: Arc::new(Http(http)),
            base_url: base_url.trim_end_matches('/').to_string(),
            header_secret: Some(secret.to_string()),
            signing_secret: secret.to_string(),
            also_signing: Vec::new(),
            policy,
            clock: Arc::new(SystemClock),
            rng: Mutex::new(StdRng::from_os_rng()),
            places: None,
        })
    }

    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Signs with `key` instead of the secret the X-GPU-Callback-Secret header carries (CALLBACK_SIGNING_SECRET):
    /// with one secret for both, anyone who sees one request's headers (a log of them, a proxy) can sign any body.
    /// While the header still carries the secret that signed before, its signature goes along too (Standard Webhooks
    /// takes several, space-separated; any one that verifies will do): a receiver verifying with the old key keeps
    /// working, one verifying with `key` alone cannot be fooled by whoever read the header.
    pub fn signing_with(mut self, key: &str) -> Self {
        if key != self.signing_secret {
            let before = std::mem::replace(&mut self.signing_secret, key.to_string());
            self.also_signing.push(before);
            self.also_signing.retain(|k| k != key);
        }
        self
    }

    /// Signs with `key` too, after the signing key (CALLBACK_SIGNING_SECRET_PREVIOUS: the key before a rotation).
    pub fn also_signing_with(mut self, key: &str) -> Self {
        if key != self.signing_secret && !self.also_signing.iter().any(|k| k == key) {
            self.also_signing.push(key.to_string());
        }
        self
    }

    /// Sends no X-GPU-Callback-Secret header (GPU_CALLBACK_SECRET unset, CALLBACK_SIGNING_SECRET set): receivers
    /// check signatures only.
    pub fn without_secret_header(mut self) -> Self {
        if let Some(header) = self.header_secret.take() {
            self.also_signing.retain(|k| *k != header);
        }
        self
    }

    pub fn with_transport(mut self, transport: Arc<dyn Transport>) -> Self {
        self.http = transport;
        self
    }

    /// At most `n` (at least 1) attempts in flight at once, for every job together (CALLBACK_CONCURRENCY): a cancel
    /// of a large job, or a restart with many callbacks pending, would otherwise send them all at the same moment. A
    /// place is held for one attempt only (a callback waiting out its backoff holds none), and taken before the
    /// attempt is signed (`attempt`). Waiters are served in order (tokio's semaphore is fair).
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.places = Some(tokio::sync::Semaphore::new(n.max(1)));
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
    pub async fn deliver(&self, job: CallbackJob<'_>, body: &CallbackBody) -> DeliveryOutcome {
        self.deliver_unless_gone(job, body, &AtomicBool::new(false))
            .await
    }

    /// `deliver`, for one of a job's callbacks sent together: `gone` is the job's, set by the first 410 Gone, and
    /// asked before each attempt (once it has its place) by every callback of the job, so those waiting for a place
    /// or out their backoff are not sent after it (a large cancel posted hundreds to a URL that said Gone).
    pub async fn deliver_unless_gone(
        &self,
        job: CallbackJob<'_>,
        body: &CallbackBody,
        gone: &AtomicBool,
    ) -> DeliveryOutcome {
        let job_id = job.job_id;
        let payload = match serde_json::to_vec(body) {
            Ok(p) => p,
            Err(e) => {
                return DeliveryOutcome {
                    delivered: false,
                    attempts: 0,
                    error: Some(format!("encode: {e}")),
                    gone: false,
                };
            }
        };
        let id = idempotency_key(job, body.idx, body.status);
        let url = self.url_for(job_id);
        let mut last_error = String::new();
        let max_attempts = self.policy.max_attempts.max(1);
        for attempt in 1..=max_attempts {
            let verdict = self.attempt(&url, &id, &payload, gone).await;
            let said_gone = matches!(verdict, Verdict::Gone(_));
            let wait = match verdict {
                Verdict::GoneBefore => {
                    return DeliveryOutcome {
                        delivered: false,
                        attempts: attempt - 1,
                        error: Some(NOT_SENT_GONE.into()),
                        gone: true,
                    };
                }
                Verdict::Delivered => {
                    metrics::counter!("orchestrator_callbacks_total", "outcome" => "delivered")
                        .increment(1);
                    return DeliveryOutcome {
                        delivered: true,
                        attempts: attempt,
                        error: None,
                        gone: false,
                    };
                }
                Verdict::Stop(reason) | Verdict::Gone(reason) => {
                    if said_gone {
                        gone.store(true, Ordering::Relaxed);
                    }
                    metrics::counter!("orchestrator_callbacks_total", "outcome" => "refused")
                        .increment(1);
                    return DeliveryOutcome {
                        delivered: false,
                        attempts: attempt,
                        error: Some(reason),
                        gone: said_gone,
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
            gone: false,
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

    async fn attempt(&self, url: &str, id: &str, payload: &[u8], gone: &AtomicBool) -> Verdict {
        // The place first, then the timestamp: signed before a long wait for a place, the attempt would reach the
        // receiver with a stale webhook-timestamp (Standard Webhooks receivers refuse one over ~5 minutes old).
        let _place = match &self.places {
            Some(places) => places.acquire().await.ok(),
            None => None,
        };
        if gone.load(Ordering::Relaxed) {
            return Verdict::GoneBefore;
        }
        let timestamp = self.clock.now_unix();
        let mut headers = vec![("content-type", "application/json".to_string())];
        if let Some(secret) = &self.header_secret {
            headers.push(("x-gpu-callback-secret", secret.clone()));
        }
        headers.extend([
            ("x-idempotency-key", id.to_string()),
            ("webhook-id", id.to_string()),
            ("webhook-timestamp", timestamp.to_string()),
            ("webhook-signature", {
                let mut signatures = sign(&self.signing_secret, id, timestamp, payload);
                for other in &self.also_signing {
                    signatures.push(' ');
                    signatures.push_str(&sign(other, id, timestamp, payload));
                }
                signatures
            }),
        ]);
        match self.http.post(url, &headers, payload.to_vec()).await {
            // Timeouts, refused connections, resets: the receiver may come back.
            Err(e) => Verdict::Retry(None, format!("request failed: {}", Report(e.as_ref()))),
            Ok(answer) => match StatusCode::from_u16(answer.status) {
                Ok(status) => classify(status, answer.retry_after),
                Err(_) => Verdict::Stop(format!("HTTP {}", answer.status)),
            },
        }
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
        Verdict::Gone(format!(
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

#[cfg(test)]
mod tests;
