//! A real HTTP callback receiver (axum on 127.0.0.1:0): verifies every delivery with `callback::verify`, answers
//! from a script of status codes (then 200), and records deliveries per webhook-id.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use orchestrator_svc::callback::{Clock, SystemClock, verify};

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
    deliveries: Vec<Delivery>,
}

#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    secret: String,
    inner: Arc<Mutex<Inner>>,
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
                deliveries: vec![],
            })),
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
        self.inner.lock().unwrap().deliveries.clone()
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
    inner.deliveries.push(Delivery {
        job_id,
        webhook_id: header("webhook-id"),
        idempotency_key: header("x-idempotency-key"),
        seed_secret: header("x-gpu-callback-secret"),
        body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        verified,
    });
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
