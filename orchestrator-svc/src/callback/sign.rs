//! Standard Webhooks signatures: `webhook-signature: v1,<base64 HMAC-SHA256(secret, "{id}.{timestamp}.{body}")>`.
//!
//! The HMAC key is the secret's UTF-8 bytes, or, when the secret has the Standard Webhooks form `whsec_<base64>`,
//! the decoded bytes, so the official standardwebhooks libraries verify it unchanged.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Signatures older or newer than this (against the receiver's clock) are rejected: replay protection.
pub const TOLERANCE_SECS: u64 = 5 * 60;

fn key_bytes(secret: &str) -> Vec<u8> {
    if let Some(encoded) = secret.strip_prefix("whsec_")
        && let Ok(bytes) = B64.decode(encoded)
    {
        return bytes;
    }
    secret.as_bytes().to_vec()
}

/// Whether `encoded` is standard base64 with its padding: what `key_bytes` decodes (checked at startup, where
/// anything else is refused).
pub fn is_standard_base64(encoded: &str) -> bool {
    B64.decode(encoded).is_ok()
}

/// Length of the HMAC key `secret` gives (0 for `whsec_` followed by base64 of nothing): checked at startup.
pub fn key_len(secret: &str) -> usize {
    key_bytes(secret).len()
}

fn mac(secret: &str, id: &str, timestamp: u64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(&key_bytes(secret)).expect("HMAC takes keys of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `webhook-signature` header value.
pub fn sign(secret: &str, id: &str, timestamp: u64, body: &[u8]) -> String {
    format!(
        "v1,{}",
        B64.encode(mac(secret, id, timestamp, body).finalize().into_bytes())
    )
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("webhook-timestamp is not a unix time in seconds")]
    BadTimestamp,
    #[error("webhook-timestamp is outside the {TOLERANCE_SECS} s tolerance")]
    Expired,
    #[error("no signature matches")]
    NoMatch,
}

/// Checks a received callback: `headers` as received, `body` the raw bytes (before any JSON parsing), `now_unix`
/// the receiver's clock. Accepts any of several space-separated `v1,` signatures (secret rotation); compares in
/// constant time.
pub fn verify(
    secret: &str,
    headers: &http::HeaderMap,
    body: &[u8],
    now_unix: u64,
) -> Result<(), VerifyError> {
    let header = |name: &'static str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .ok_or(VerifyError::MissingHeader(name))
    };
    let id = header("webhook-id")?;
    let timestamp: u64 = header("webhook-timestamp")?
        .trim()
        .parse()
        .map_err(|_| VerifyError::BadTimestamp)?;
    let signatures = header("webhook-signature")?;
    if now_unix.abs_diff(timestamp) > TOLERANCE_SECS {
        return Err(VerifyError::Expired);
    }
    for candidate in signatures.split_whitespace() {
        let Some(encoded) = candidate.strip_prefix("v1,") else {
            continue;
        };
        let Ok(received) = B64.decode(encoded) else {
            continue;
        };
        // verify_slice compares in constant time.
        if mac(secret, id, timestamp, body)
            .verify_slice(&received)
            .is_ok()
        {
            return Ok(());
        }
    }
    Err(VerifyError::NoMatch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn headers(id: &str, ts: u64, sig: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("webhook-id", id.parse().unwrap());
        h.insert("webhook-timestamp", ts.to_string().parse().unwrap());
        h.insert("webhook-signature", sig.parse().unwrap());
        h
    }

    #[test]
    fn round_trip() {
        let body = br#"{"idx":0}"#;
        let sig = sign("s3cret", "abc", 1_700_000_000, body);
        assert!(sig.starts_with("v1,"));
        verify(
            "s3cret",
            &headers("abc", 1_700_000_000, &sig),
            body,
            1_700_000_100,
        )
        .unwrap();
    }

    #[test]
    fn rejects_tampering_wrong_secret_and_replays() {
        let body = br#"{"idx":0}"#;
        let sig = sign("s3cret", "abc", 1_700_000_000, body);
        let h = headers("abc", 1_700_000_000, &sig);
        assert_eq!(
            verify("s3cret", &h, br#"{"idx":1}"#, 1_700_000_000),
            Err(VerifyError::NoMatch)
        );
        assert_eq!(
            verify("other", &h, body, 1_700_000_000),
            Err(VerifyError::NoMatch)
        );
        assert_eq!(
            verify("s3cret", &h, body, 1_700_000_000 + 301),
            Err(VerifyError::Expired)
        );
        assert_eq!(
            verify("s3cret", &h, body, 1_700_000_000 - 301),
            Err(VerifyError::Expired)
        );
        let other_id = headers("abd", 1_700_000_000, &sig);
        assert_eq!(
            verify("s3cret", &other_id, body, 1_700_000_000),
            Err(VerifyError::NoMatch)
        );
        assert_eq!(
            verify("s3cret", &HeaderMap::new(), body, 0),
            Err(VerifyError::MissingHeader("webhook-id"))
        );
    }

    #[test]
    fn accepts_any_of_several_signatures() {
        let body = b"{}";
        let old = sign("old", "id", 10, body);
        let new = sign("new", "id", 10, body);
        let h = headers("id", 10, &format!("{old} {new}"));
        verify("new", &h, body, 10).unwrap();
        verify("old", &h, body, 10).unwrap();
    }

    #[test]
    fn matches_the_standard_webhooks_test_vector() {
        // From the Standard Webhooks specification's reference libraries.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let body = br#"{"test": 2432232314}"#;
        let sig = sign(secret, id, 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
