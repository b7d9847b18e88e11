//! The HTTP side of a delivery, behind a trait so that tests can script the receiver and run the retry schedule
//! on tokio's paused clock.

use std::time::{Duration, SystemTime};

use crate::error::BoxError;

/// What the receiver answered to one POST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// The Retry-After header, as a wait: its seconds form, or its HTTP-date form less the time now.
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
            .and_then(|v| retry_after(v, SystemTime::now()));
        Ok(Answer {
            status: response.status().as_u16(),
            retry_after,
        })
    }
}

/// A Retry-After value as a wait from `now`: delay-seconds, or an HTTP-date (a date already past waits nothing;
/// the backoff still applies). Anything else is ignored, as if the header were absent.
fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_http_dates() {
        let now = httpdate::parse_http_date("Fri, 04 Dec 2026 08:00:00 GMT").unwrap();
        assert_eq!(retry_after(" 120 ", now), Some(Duration::from_secs(120)));
        assert_eq!(
            retry_after("Fri, 04 Dec 2026 08:01:30 GMT", now),
            Some(Duration::from_secs(90))
        );
        // The obsolete forms RFC 9110 still asks recipients to accept.
        assert_eq!(
            retry_after("Friday, 04-Dec-26 08:00:10 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            retry_after("Fri, 04 Dec 2026 07:59:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon", now), None);
        assert_eq!(retry_after("-5", now), None);
    }
}
