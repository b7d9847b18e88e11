//! The sender's own tests: classification, backoff, retries on the paused clock, the concurrency bound.
use super::*;

#[test]
fn urls_are_shown_without_credentials_or_query() {
    assert_eq!(
        redacted_url("https://user:pa55@api.example.invalid/hooks?token=t0k#x"),
        "https://api.example.invalid/hooks"
    );
    assert_eq!(redacted_url("not a url"), "<unparsable URL>");
    let sender = CallbackSender::new("https://u:pa55@h.invalid/?token=t0k", "s", policy()).unwrap();
    let shown = format!("{sender:?}");
    assert!(!shown.contains("pa55") && !shown.contains("t0k"), "{shown}");
}

#[test]
fn redirects_are_refusals() {
    for code in [301, 302, 307, 308] {
        let status = StatusCode::from_u16(code).unwrap();
        assert!(matches!(classify(status, None), Verdict::Stop(r) if r.contains("not followed")));
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
    assert!(matches!(classify(StatusCode::GONE, None), Verdict::Gone(_)));
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
        user_id: "u".into(),
        job_id: "j".into(),
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

/// A clock the test sets.
struct SetClock(std::sync::atomic::AtomicU64);

impl Clock for SetClock {
    fn now_unix(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Records each POST's webhook-timestamp; the first one is held until `release` is notified.
#[derive(Default)]
struct HoldFirst {
    timestamps: Mutex<Vec<String>>,
    arrived: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl Transport for HoldFirst {
    async fn post(
        &self,
        _url: &str,
        headers: &[(&'static str, String)],
        _body: Vec<u8>,
    ) -> Result<Answer, BoxError> {
        let stamp = headers.iter().find(|(n, _)| *n == "webhook-timestamp");
        let first = {
            let mut seen = self.timestamps.lock().unwrap();
            seen.push(stamp.map(|(_, v)| v.clone()).unwrap_or_default());
            seen.len() == 1
        };
        if first {
            self.arrived.notify_one();
            self.release.notified().await;
        }
        Ok(Answer {
            status: 200,
            retry_after: None,
        })
    }
}

/// With every place taken, a callback waits for one before it is signed: after a 10-minute wait its
/// webhook-timestamp is the time it was sent, not the time it began waiting (receivers refuse stale ones).
#[tokio::test]
async fn a_callback_waiting_for_a_place_is_signed_when_it_is_sent() {
    let clock = Arc::new(SetClock(std::sync::atomic::AtomicU64::new(1_000)));
    let transport = Arc::new(HoldFirst::default());
    let sender = Arc::new(
        CallbackSender::new("http://unused", "s", policy())
            .unwrap()
            .with_transport(transport.clone())
            .with_clock(clock.clone())
            .with_concurrency(1),
    );
    let first = tokio::spawn({
        let sender = sender.clone();
        async move { sender.deliver(JOB, &body()).await }
    });
    transport.arrived.notified().await;
    let second = tokio::spawn({
        let sender = sender.clone();
        async move { sender.deliver(JOB, &body()).await }
    });
    // The second is waiting for the only place (give it time to get there), then ten minutes pass.
    tokio::time::sleep(Duration::from_millis(200)).await;
    clock.0.store(1_600, std::sync::atomic::Ordering::SeqCst);
    transport.release.notify_one();
    assert!(first.await.unwrap().delivered);
    assert!(second.await.unwrap().delivered);
    assert_eq!(*transport.timestamps.lock().unwrap(), ["1000", "1600"]);
}

/// Records every POST's headers.
#[derive(Default)]
struct Headers(Mutex<Vec<Vec<(&'static str, String)>>>);

#[async_trait::async_trait]
impl Transport for Headers {
    async fn post(
        &self,
        _url: &str,
        headers: &[(&'static str, String)],
        _body: Vec<u8>,
    ) -> Result<Answer, BoxError> {
        self.0.lock().unwrap().push(headers.to_vec());
        Ok(Answer {
            status: 200,
            retry_after: None,
        })
    }
}

/// With CALLBACK_SIGNING_SECRET the header carries the seed's secret and the signing key is never sent, so a
/// receiver verifying with that key cannot be fooled by whoever read a request's headers; while the header's secret
/// is set its signature goes along (receivers verifying with it keep working until they switch). Without
/// GPU_CALLBACK_SECRET no secret header, and no signature but the signing key's, goes out.
#[tokio::test]
async fn a_separate_signing_key_is_never_sent() {
    const KEY: &str = "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let check = |headers: &[(&'static str, String)], secret_header: Option<&str>| {
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("x-gpu-callback-secret").as_deref(), secret_header);
        assert!(headers.iter().all(|(_, v)| !v.contains(KEY)), "{headers:?}");
        let mut map = http::HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, value.parse().unwrap());
        }
        let payload = serde_json::to_vec(&body()).unwrap();
        let now = get("webhook-timestamp").unwrap().parse().unwrap();
        assert_eq!(crate::callback::verify(KEY, &map, &payload, now), Ok(()));
        let old_key = crate::callback::verify("seed-secret", &map, &payload, now);
        assert_eq!(old_key.is_ok(), secret_header.is_some(), "{old_key:?}");
        // The signing key's signature first.
        let signatures = get("webhook-signature").unwrap();
        let first = signatures.split(' ').next().unwrap().to_string();
        map.insert("webhook-signature", first.parse().unwrap());
        assert_eq!(crate::callback::verify(KEY, &map, &payload, now), Ok(()));
    };
    for keep_header in [true, false] {
        let transport = Arc::new(Headers::default());
        let sender = CallbackSender::new("http://unused", "seed-secret", policy())
            .unwrap()
            .with_transport(transport.clone())
            .signing_with(KEY);
        let sender = if keep_header {
            sender
        } else {
            sender.without_secret_header()
        };
        assert!(sender.deliver(JOB, &body()).await.delivered);
        let sent = transport.0.lock().unwrap().clone();
        check(&sent[0], keep_header.then_some("seed-secret"));
    }
}

/// A rotation of the signing key (CALLBACK_SIGNING_SECRET_PREVIOUS): the new key's signature first, then the
/// previous key's, so a receiver on either verifies; the seed header's secret keeps its signature too, and a key
/// given twice signs once.
#[tokio::test]
async fn during_a_rotation_both_keys_sign() {
    let transport = Arc::new(Headers::default());
    let sender = CallbackSender::new("http://unused", "seed-secret", policy())
        .unwrap()
        .with_transport(transport.clone())
        .signing_with("new-key")
        .also_signing_with("old-key")
        .also_signing_with("seed-secret")
        .also_signing_with("new-key");
    assert!(sender.deliver(JOB, &body()).await.delivered);
    let sent = transport.0.lock().unwrap().clone();
    let mut map = http::HeaderMap::new();
    for (name, value) in &sent[0] {
        map.insert(*name, value.parse().unwrap());
    }
    let payload = serde_json::to_vec(&body()).unwrap();
    let now = map["webhook-timestamp"].to_str().unwrap().parse().unwrap();
    let signatures = map["webhook-signature"].to_str().unwrap().to_string();
    assert_eq!(signatures.split(' ').count(), 3, "{signatures}");
    for key in ["new-key", "old-key", "seed-secret"] {
        assert_eq!(
            crate::callback::verify(key, &map, &payload, now),
            Ok(()),
            "{key}"
        );
    }
    assert!(crate::callback::verify("other", &map, &payload, now).is_err());
    let first = signatures.split(' ').next().unwrap();
    map.insert("webhook-signature", first.parse().unwrap());
    assert_eq!(
        crate::callback::verify("new-key", &map, &payload, now),
        Ok(())
    );
    // Without the seed header, only the two signing keys.
    let transport = Arc::new(Headers::default());
    let sender = CallbackSender::new("http://unused", "new-key", policy())
        .unwrap()
        .with_transport(transport.clone())
        .without_secret_header()
        .also_signing_with("old-key");
    assert!(sender.deliver(JOB, &body()).await.delivered);
    let sent = transport.0.lock().unwrap().clone();
    let (_, signatures) = sent[0]
        .iter()
        .find(|(n, _)| *n == "webhook-signature")
        .unwrap();
    assert_eq!(signatures.split(' ').count(), 2, "{signatures}");
    assert!(sent[0].iter().all(|(n, _)| *n != "x-gpu-callback-secret"));
}

/// Answers 410 Gone to every POST, counting them.
#[derive(Default)]
struct AlwaysGone(std::sync::atomic::AtomicUsize);

#[async_trait::async_trait]
impl Transport for AlwaysGone {
    async fn post(
        &self,
        _url: &str,
        _headers: &[(&'static str, String)],
        _body: Vec<u8>,
    ) -> Result<Answer, BoxError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(Answer {
            status: 410,
            retry_after: None,
        })
    }
}

/// A job's callbacks sent together (a large cancel): once the receiver answered 410 Gone, those still waiting for a
/// place are not sent. Before, only the callbacks that started after a 410 was recorded were held back: a cancel's
/// 256 at once each posted and got their own 410.
#[tokio::test]
async fn after_a_410_the_jobs_callbacks_waiting_for_a_place_are_not_sent() {
    let transport = Arc::new(AlwaysGone::default());
    let sender = CallbackSender::new("http://unused", "s", policy())
        .unwrap()
        .with_transport(transport.clone())
        .with_concurrency(2);
    let gone = AtomicBool::new(false);
    let one = body();
    let outcomes =
        futures::future::join_all((0..20).map(|_| sender.deliver_unless_gone(JOB, &one, &gone)))
            .await;
    let posted = transport.0.load(std::sync::atomic::Ordering::SeqCst);
    assert!(posted <= 2, "{posted} POSTs after the first 410");
    assert!(outcomes.iter().all(|o| o.gone && !o.delivered));
    let not_sent = outcomes.iter().filter(|o| o.attempts == 0).count();
    assert_eq!(not_sent, 20 - posted);
    assert!(gone.load(std::sync::atomic::Ordering::SeqCst));
}
