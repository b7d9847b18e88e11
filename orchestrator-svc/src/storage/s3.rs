//! S3-compatible storage through aws-sdk-s3: Cloudflare R2 and any other S3 service.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::put_object::{PutObjectError, PutObjectOutput};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;

mod answers;

use super::{AccessCheck, ObjectMeta, ObjectStore, StorageError, check_key};
use crate::config::S3Settings;
use answers::{TooManyRequests, missing_key, status_of, unavailable, wrong_credentials_or_bucket};

#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    /// Whether a PUT's body is hashed into its signature (SigV4 signed payload). Over HTTPS, TLS already protects
    /// the body and the SDK's SHA-256 of every stored byte is CPU spent for nothing (a 12 MP photo stores ~20 MB:
    /// masks, outputs, preview), so it is sent as UNSIGNED-PAYLOAD there; over plain HTTP (an in-cluster
    /// SeaweedFS or MinIO) the signature is the only integrity check and stays.
    sign_payload: bool,
    /// STORAGE attempts (the SDK's retry count), also for a GET whose body fails while it is read: the SDK's retries
    /// end when the response headers arrive.
    attempts: u32,
    /// Whether the warning that the service takes no conditional writes was logged (`put_new`).
    said_no_conditional_writes: Arc<AtomicBool>,
}

/// How one GET ended: `Body` is a failure while reading the body (a reset, a stalled stream, a cut-short length),
/// which the SDK does not retry.
enum GetFailure {
    Final(StorageError),
    Body(StorageError),
}

impl S3Store {
    pub fn new(settings: S3Settings) -> Self {
        let credentials = Credentials::new(
            settings.access_key_id,
            settings.secret_access_key.expose().to_string(),
            None,
            None,
            "palette-static",
        );
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .operation_attempt_timeout(settings.attempt_timeout)
            .operation_timeout(settings.attempt_timeout * settings.max_attempts.max(1) * 2)
            .build();
        let mut builder = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(settings.region))
            .credentials_provider(credentials)
            // R2 and most self-hosted services do not resolve virtual-host bucket names.
            .force_path_style(true)
            // Since SDK 1.69 every PUT carries a CRC32 checksum by default, which R2 rejects ("not implemented").
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(timeouts)
            .retry_config(RetryConfig::standard().with_max_attempts(settings.max_attempts.max(1)))
            .retry_classifier(TooManyRequests);
        // No endpoint: the SDK's AWS endpoint, which is HTTPS.
        let sign_payload = settings
            .endpoint_url
            .as_deref()
            .is_some_and(|e| !e.trim_start().to_ascii_lowercase().starts_with("https://"));
        if let Some(endpoint) = settings.endpoint_url {
            builder = builder.endpoint_url(endpoint);
        }
        S3Store {
            client: Client::from_conf(builder.build()),
            bucket: settings.bucket,
            sign_payload,
            attempts: settings.max_attempts.max(1),
            said_no_conditional_writes: Arc::default(),
        }
    }

    /// Overrides the choice `new` made from the endpoint's scheme (see `sign_payload`): tests send unsigned
    /// payloads to a plain-HTTP SeaweedFS to check that the server accepts them.
    pub fn with_payload_signing(mut self, sign: bool) -> Self {
        self.sign_payload = sign;
        self
    }

    /// Whether PUT bodies are signed.
    pub fn signs_payload(&self) -> bool {
        self.sign_payload
    }

    pub fn client(&self) -> &Client {
        &self.client
    }
}

impl S3Store {
    /// One PutObject; `if_none`: only if no object is at `key` (`If-None-Match: *`).
    async fn put_object(
        &self,
        key: &str,
        body: Bytes,
        content_type: &str,
        if_none: bool,
    ) -> Result<PutObjectOutput, SdkError<PutObjectError, HttpResponse>> {
        let mut request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body));
        if if_none {
            request = request.if_none_match("*");
        }
        if self.sign_payload {
            request.send().await
        } else {
            request.customize().disable_payload_signing().send().await
        }
    }
}

impl S3Store {
    async fn get_once(&self, key: &str, max_bytes: u64) -> Result<Bytes, GetFailure> {
        use GetFailure::{Body, Final};
        let mut out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => out,
            Err(err) => {
                return Err(Final(if missing_key(&err) {
                    StorageError::NotFound(key.to_string())
                } else {
                    unavailable("GET", key, err)
                }));
            }
        };
        let too_large = |size: Option<u64>| StorageError::TooLarge {
            key: key.to_string(),
            size,
            limit: max_bytes,
        };
        // Content-Length first, so an oversized object is refused before a byte of its body is read.
        let declared = out.content_length().and_then(|n| u64::try_from(n).ok());
        if let Some(size) = declared.filter(|&s| s > max_bytes) {
            return Err(Final(too_large(Some(size))));
        }
        // And counted while reading, for a store that did not say (or said wrong).
        let mut body = bytes::BytesMut::with_capacity(declared.unwrap_or(0) as usize);
        while let Some(chunk) = out.body.next().await {
            let chunk = chunk.map_err(|e| {
                Body(StorageError::unavailable(
                    format!("GET {key}: reading the body"),
                    e,
                ))
            })?;
            if (body.len() + chunk.len()) as u64 > max_bytes {
                return Err(Final(too_large(None)));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    /// A body that fails while it is read (a connection reset mid-photo) is fetched again, whole, up to the
    /// attempts the SDK has for the rest, after 200 ms, 400 ms, ...
    async fn get_at_most(&self, key: &str, max_bytes: u64) -> Result<Bytes, StorageError> {
        check_key(key)?;
        let mut attempt = 1;
        loop {
            match self.get_once(key, max_bytes).await {
                Ok(body) => return Ok(body),
                Err(GetFailure::Final(e)) => return Err(e),
                Err(GetFailure::Body(e)) if attempt >= self.attempts => return Err(e),
                Err(GetFailure::Body(e)) => {
                    tracing::warn!(key, attempt, error = %crate::error::Report(&e), "GET body failed; fetching again");
                    tokio::time::sleep(Duration::from_millis(100 << attempt.min(6))).await;
                    attempt += 1;
                }
            }
        }
    }

    async fn put(&self, key: &str, body: Bytes, content_type: &str) -> Result<(), StorageError> {
        check_key(key)?;
        self.put_object(key, body, content_type, false)
            .await
            .map_err(|err| unavailable("PUT", key, err))?;
        Ok(())
    }

    async fn put_new(
        &self,
        key: &str,
        body: Bytes,
        content_type: &str,
    ) -> Result<bool, StorageError> {
        check_key(key)?;
        let body_again = body.clone();
        match self.put_object(key, body, content_type, true).await {
            Ok(_) => Ok(true),
            // 412: an object is there. (A retry of this very PUT whose first answer was lost also finds one: its
            // own. Callers read what is there, so they see their own record.) 409 ConditionalRequestConflict (AWS:
            // another conditional write of the key in flight) is an outage: asked again, it answers 412 or 200.
            Err(err) if status_of(&err) == Some(412) => Ok(false),
            // A service without conditional writes: written as `put` writes, last writer wins (said once).
            Err(err) if status_of(&err) == Some(501) || err.code() == Some("NotImplemented") => {
                if !self
                    .said_no_conditional_writes
                    .swap(true, Ordering::Relaxed)
                {
                    tracing::warn!(%key, "the S3 service does not take If-None-Match writes (501): first records are plain writes, so two workers running one queue job can both record and call back an item (see docs/operations.md)");
                }
                self.put(key, body_again, content_type).await?;
                Ok(true)
            }
            Err(err) => Err(unavailable("PUT (if none)", key, err)),
        }
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        check_key(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => Ok(Some(ObjectMeta {
                size: out.content_length().unwrap_or(0).max(0) as u64,
            })),
            Err(err) if status_of(&err) == Some(404) => self.confirm_missing(key).await,
            Err(err) => Err(unavailable("HEAD", key, err)),
        }
    }

    /// One ranged GET of a key no job writes: NoSuchKey (or the object) means the credentials and bucket work.
    async fn check_access(&self) -> AccessCheck {
        let answer = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(ACCESS_PROBE_KEY)
            .range("bytes=0-0")
            .send()
            .await;
        match answer {
            Ok(_) => AccessCheck::Usable,
            Err(err) if missing_key(&err) || status_of(&err) == Some(416) => AccessCheck::Usable,
            Err(err) => {
                let refused = wrong_credentials_or_bucket(&err);
                let answered = matches!(status_of(&err), Some(status) if status < 500);
                let why =
                    crate::error::Report(&unavailable("GET", ACCESS_PROBE_KEY, err)).to_string();
                match (refused, answered) {
                    (true, _) => AccessCheck::Refused(why),
                    (false, true) => AccessCheck::Doubtful(why),
                    (false, false) => AccessCheck::Unreachable(why),
                }
            }
        }
    }
}

/// The start-up probe's key: under `inputs/`, the prefix this service must be allowed to read; no id may start
/// with '.', so no job's key can be this one.
const ACCESS_PROBE_KEY: &str = "inputs/.palette-access-check";

impl S3Store {
    /// After a HEAD's 404, which has no body to say what is missing: a one-byte GET says whether the key or the
    /// whole bucket is (a wrong R2_BUCKET_NAME must show as a storage outage of every item, not as every input
    /// missing). Only missing objects pay for it.
    async fn confirm_missing(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .range("bytes=0-0")
            .send()
            .await
        {
            Err(err) if missing_key(&err) => Ok(None),
            // Written between the two requests, and empty: a range of an empty object is not satisfiable.
            Err(err) if status_of(&err) == Some(416) => Ok(Some(ObjectMeta { size: 0 })),
            Err(err) => Err(unavailable("HEAD (then GET)", key, err)),
            // Written between the two requests: its size is after the slash of "bytes 0-0/SIZE".
            Ok(out) => Ok(Some(ObjectMeta {
                size: out
                    .content_range()
                    .and_then(|r| r.rsplit('/').next()?.parse().ok())
                    .unwrap_or(0),
            })),
        }
    }
}
