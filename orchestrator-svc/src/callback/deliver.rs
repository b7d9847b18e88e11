//! Delivery with retries: exponential backoff with full jitter, Retry-After honoured, 410 and other 4xx final.
//! Clock, randomness, the base delay and the HTTP transport are injected so the tests run in milliseconds (the
//! retry schedule itself on tokio's paused clock).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;

use super::transport::{Bounded, Http, Transport};
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
}

enum Verdict {
    Delivered,
    /// Retry after at least this long (from Retry-After), or after the backoff when None.
    Retry(Option<Duration>, String),
    Stop(String),
}

pub struct CallbackSender {
    http: Arc<dyn Transport>,
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
            http: Arc::new(Http(http)),
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

    pub fn with_transport(mut self, transport: Arc<dyn Transport>) -> Self {
        self.http = transport;
        self
    }

    /// At most `n` (at least 1) attempts in flight at once, for every job together (CALLBACK_CONCURRENCY).
    pub fn with_concurrency(self, n: usize) -> Self {
        let permits = tokio::sync::Semaphore::new(n.max(1));
        let bounded = Bounded {
            inner: self.http.clone(),
            permits,
        };
        self.with_transport(Arc::new(bounded))
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
        let job_id = job.job_id;
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
        let id = idempotency_key(job, body.idx, body.status);
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
        let headers = [
            ("content-type", "application/json".to_string()),
            ("x-gpu-callback-secret", self.secret.clone()),
            ("x-idempotency-key", id.to_string()),
            ("webhook-id", id.to_string()),
            ("webhook-timestamp", timestamp.to_string()),
            (
                "webhook-signature",
                sign(&self.secret, id, timestamp, payload),
            ),
        ];
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

    use super::super::transport::Answer;
    use crate::error::BoxError;

    /// Answers from a script (then 200).
    struct Scripted(Mutex<std::collections::VecDeque<Answer>>);

    #[async_trait::async_trait]
    impl Transport for Scripted {
        async fn post(
            &self,
            _url: &str,
            headers: &[(&'static str, String)],
            _body: Vec<u8>,
        ) -> Result<Answer, BoxError> {
            assert!(headers.iter().any(|(n, _)| *n == "webhook-signature"));
            let next = self.0.lock().unwrap().pop_front();
            Ok(next.unwrap_or(Answer {
                status: 200,
                retry_after: None,
            }))
        }
    }

    fn scripted(answers: &[(u16, Option<u64>)]) -> Arc<Scripted> {
        let answers = answers.iter().map(|&(status, ra)| Answer {
            status,
            retry_after: ra.map(Duration::from_secs),
        });
        Arc::new(Scripted(Mutex::new(answers.collect())))
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_and_backoff_on_the_paused_clock() {
        let sender = CallbackSender::new("http://unused", "s", policy())
            .unwrap()
            .with_rng_seed(7)
            .with_transport(scripted(&[(429, Some(1)), (503, None)]));
        let started = tokio::time::Instant::now();
        let outcome = sender.deliver(JOB, &body()).await;
        assert!(outcome.delivered, "{outcome:?}");
        assert_eq!(outcome.attempts, 3);
        let waited = started.elapsed();
        // Retry-After 1 s (the policy's cap), then a backoff of at most 200 ms.
        assert!(waited >= Duration::from_secs(1), "{waited:?}");
        assert!(waited <= Duration::from_millis(1_200), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_max_attempts_within_the_capped_backoff() {
        let sender = CallbackSender::new("http://unused", "s", policy())
            .unwrap()
            .with_transport(scripted(&[(503, None); 10]));
        let started = tokio::time::Instant::now();
        let outcome = sender.deliver(JOB, &body()).await;
        assert_eq!((outcome.delivered, outcome.attempts), (false, 6));
        assert!(outcome.error.unwrap().contains("gave up after 6 attempts"));
        // Five waits, each at most max_delay.
        assert!(started.elapsed() <= Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn gone_stops_at_once() {
        let sender = CallbackSender::new("http://unused", "s", policy())
            .unwrap()
            .with_transport(scripted(&[(410, None)]));
        let outcome = sender.deliver(JOB, &body()).await;
        assert_eq!((outcome.delivered, outcome.attempts), (false, 1));
    }

    const JOB: CallbackJob<'static> = CallbackJob {
        user_id: "u",
        job_id: "job",
        spec_hash: "h",
    };

    fn body() -> CallbackBody {
        CallbackBody {
            idx: 0,
            status: "completed",
            output_key: None,
            preview_key: None,
            error: None,
            error_code: None,
            outputs: vec![],
            masks: vec![],
        }
    }
}
