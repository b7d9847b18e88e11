//! A real HTTP callback receiver (axum on 127.0.0.1:0): verifies every delivery with `callback::verify`, answers
//! from a script of status codes (then 200), and records deliveries per webhook-id. A test waits for deliveries with
//! `wait_until`, woken by each arrival rather than polling.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use orchestrator_svc::callback::{Clock, SystemClock, verify};
use tokio::sync::Notify;

#[derive(Debug, Clone)]
pub struct Delivery {
    pub job_id: String,
    pub webhook_id: String,
    pub idempotency_key: String,
    pub seed_secret: String,
    pub body: serde_json::Value,
    pub verified: bool,
}

#[derive(Default)]
struct Inner {
    script: VecDeque<(u16, Option<u64>)>,
    /// Shared with a waiting `wait_until` while it judges them (copied on a push only then).
    deliveries: Arc<Vec<Delivery>>,
}

#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    secret: String,
    inner: Arc<Mutex<Inner>>,
    /// Woken at each delivery.
    arrived: Arc<Notify>,
}

impl Receiver {
    /// `script`: (status, Retry-After seconds) answered to the first requests, in order; 200 afterwards.
    pub async fn start(secret: &str, script: Vec<(u16, Option<u64>)>) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = Receiver {
            addr: listener.local_addr().unwrap(),
            secret: secret.to_string(),
            inner: Arc::new(Mutex::new(Inner {
                script: script.into(),
                deliveries: Arc::default(),
            })),
            arrived: Arc::default(),
        };
        let app = Router::new()
            .route("/jobs/{job_id}/callback", post(handle))
            .with_state(receiver.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        receiver
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.inner.lock().unwrap().deliveries.to_vec()
    }

    /// Waits (at most 60 s) until `done(deliveries)`; returns them.
    pub async fn wait_until(
        &self,
        what: &str,
        done: impl Fn(&[Delivery]) -> bool,
    ) -> Vec<Delivery> {
        wait_until(&[self], what, done).await
    }

    /// The webhook-ids each item of `job_id` was delivered under (one per item when nothing was called back twice
    /// under another id), and the number of its deliveries (more than its items: resends, deduplicable by id).
    pub fn ids_per_item(&self, job_id: &str) -> (BTreeMap<u64, BTreeSet<String>>, usize) {
        let deliveries: Vec<Delivery> = self
            .deliveries()
            .into_iter()
            .filter(|d| d.job_id == job_id)
            .collect();
        let mut ids: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
        for d in &deliveries {
            ids.entry(d.body["idx"].as_u64().expect("idx"))
                .or_default()
                .insert(d.webhook_id.clone());
        }
        (ids, deliveries.len())
    }

    /// Asserts that each of the `items` items of `job_id` was called back, every time under one webhook-id (resends
    /// after a crash or from another replica keep it: a deduplicating receiver sees each item once); returns the
    /// number of deliveries (`items` plus such resends).
    pub fn assert_one_id_per_item(&self, job_id: &str, items: u32) -> usize {
        let (ids, deliveries) = self.ids_per_item(job_id);
        assert_eq!(ids.len(), items as usize, "items lost: {ids:?}");
        assert!(ids.values().all(|set| set.len() == 1), "{ids:?}");
        deliveries
    }

    /// Deliveries per webhook-id (a retry reuses the id).
    pub fn per_id(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for d in self.deliveries() {
            *counts.entry(d.webhook_id).or_insert(0) += 1;
        }
        counts
    }
}

/// Waits (at most 60 s) until `done` holds for the deliveries of all `receivers` together, woken by each arrival at
/// any of them; returns those deliveries.
pub async fn wait_until(
    receivers: &[&Receiver],
    what: &str,
    done: impl Fn(&[Delivery]) -> bool,
) -> Vec<Delivery> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        // Registered before reading, so that a delivery in between still wakes this wait.
        let mut arrivals: Vec<_> = receivers
            .iter()
            .map(|r| Box::pin(r.arrived.notified()))
            .collect();
        for arrival in &mut arrivals {
            arrival.as_mut().enable();
        }
        // One receiver: judged on a shared snapshot, copied only once done (a copy per arrival made a
        // 10,000-delivery wait quadratic, and took a third of a 2-core machine from the orchestrator it was
        // measuring). Not under the lock: `done` may ask the receiver itself.
        let finished = match receivers {
            [one] => {
                let snapshot = one.inner.lock().unwrap().deliveries.clone();
                done(&snapshot).then(|| Arc::unwrap_or_clone(snapshot))
            }
            _ => {
                let all: Vec<Delivery> = receivers.iter().flat_map(|r| r.deliveries()).collect();
                done(&all).then_some(all)
            }
        };
        if let Some(all) = finished {
            return all;
        }
        let arrived = futures::future::select_all(arrivals);
        if tokio::time::timeout_at(deadline, arrived).await.is_err() {
            let all: Vec<Delivery> = receivers.iter().flat_map(|r| r.deliveries()).collect();
            panic!("timed out waiting for {what}: {all:?}");
        }
    }
}

async fn handle(
    State(receiver): State<Receiver>,
    Path(job_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let verified = verify(&receiver.secret, &headers, &body, SystemClock.now_unix()).is_ok();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let mut inner = receiver.inner.lock().unwrap();
    Arc::make_mut(&mut inner.deliveries).push(Delivery {
        job_id,
        webhook_id: header("webhook-id"),
        idempotency_key: header("x-idempotency-key"),
        seed_secret: header("x-gpu-callback-secret"),
        body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        verified,
    });
    receiver.arrived.notify_waiters();
    if !verified {
        return (StatusCode::UNAUTHORIZED, HeaderMap::new());
    }
    let (status, retry_after) = inner.script.pop_front().unwrap_or((200, None));
    let mut out = HeaderMap::new();
    if let Some(secs) = retry_after {
        out.insert("retry-after", secs.to_string().parse().unwrap());
    }
    (StatusCode::from_u16(status).unwrap(), out)
}
