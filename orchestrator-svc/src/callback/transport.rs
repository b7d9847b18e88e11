//! The HTTP side of a delivery, behind a trait so that tests can script the receiver and run the retry schedule
//! on tokio's paused clock.

use std::time::Duration;

use crate::error::BoxError;

/// What the receiver answered to one POST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// The Retry-After header, in seconds form.
    pub retry_after: Option<Duration>,
}

/// One POST of a callback. `reqwest` in production; tests script the answers (`CallbackSender::with_transport`).
#[async_trait::async_trait]
pub trait Transport: Send + Sync {
    async fn post(
        &self,
        url: &str,
        headers: &[(&'static str, String)],
        body: Vec<u8>,
    ) -> Result<Answer, BoxError>;
}

pub(super) struct Http(pub(super) reqwest::Client);

#[async_trait::async_trait]
impl Transport for Http {
    async fn post(
        &self,
        url: &str,
        headers: &[(&'static str, String)],
        body: Vec<u8>,
    ) -> Result<Answer, BoxError> {
        let mut request = self.0.post(url).body(body);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        // reqwest's message names the URL, credentials and query included; it goes to logs and GetJob, so without
        // it.
        let response = request.send().await.map_err(|e| e.without_url())?;
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        Ok(Answer {
            status: response.status().as_u16(),
            retry_after,
        })
    }
}
