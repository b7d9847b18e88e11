//! Reading the SDK's answers: which errors are retried, refused, missing or outages.

use aws_sdk_s3::config::interceptors::InterceptorContext;
use aws_sdk_s3::config::retry::{ClassifyRetry, RetryAction};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

use crate::storage::StorageError;

/// HTTP 429 retried as throttling (with the SDK's back-off). R2 answers a bucket over its request rate with 429; the
/// SDK's own classifiers know S3's `503 SlowDown` and AWS' throttling error codes, not a bare 429, so such a GET
/// or PUT failed its item `storage_unavailable` at the first answer.
#[derive(Debug)]
pub(super) struct TooManyRequests;

impl ClassifyRetry for TooManyRequests {
    fn classify_retry(&self, ctx: &InterceptorContext) -> RetryAction {
        match ctx.response().map(|r| u16::from(r.status())) {
            Some(429) => RetryAction::throttling_error(),
            _ => RetryAction::NoActionIndicated,
        }
    }

    fn name(&self) -> &'static str {
        "HTTP 429 Too Many Requests"
    }
}

pub(super) fn status_of<E, R>(err: &SdkError<E, R>) -> Option<u16>
where
    R: HasStatus,
{
    match err {
        SdkError::ServiceError(e) => Some(e.raw().status_code()),
        SdkError::ResponseError(e) => Some(e.raw().status_code()),
        _ => None,
    }
}

/// The raw HTTP response type of the SDK, reduced to what we read from it.
pub(super) trait HasStatus {
    fn status_code(&self) -> u16;
}

impl HasStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

/// The operation and key, plus the service's error code and message where it answered with one (the SDK's own
/// Display says only "service error"); transport failures are described by the error kept as the source.
pub(super) fn unavailable<E, R>(op: &str, key: &str, err: SdkError<E, R>) -> StorageError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: HasStatus + std::fmt::Debug + Send + Sync + 'static,
{
    let context = match &err {
        SdkError::ServiceError(e) => format!(
            "{op} {key}: {}: {}",
            e.err().code().unwrap_or("unknown"),
            e.err().message().unwrap_or("no message")
        ),
        _ => format!("{op} {key}"),
    };
    // 403 AccessDenied is this caller's policy speaking (one without s3:ListBucket answers a missing key so): asking
    // again gets the same answer. Other 4xx are not: wrong or rotated credentials, a missing bucket, clock skew and
    // throttling pass once fixed, and are waited out as outages where a caller waits.
    let code = match &err {
        SdkError::ServiceError(e) => e.err().code(),
        _ => None,
    };
    if status_of(&err) == Some(403) && matches!(code, Some("AccessDenied") | None) {
        return StorageError::refused(context, err);
    }
    StorageError::unavailable(context, err)
}

/// Whether the service said the credentials or the bucket are wrong, not only that this key may not be read:
/// unknown key id, wrong secret, expired or malformed credentials, a bucket that does not exist. AccessDenied is
/// not among them (a policy without s3:ListBucket answers a missing key with it), nor is any 5xx.
pub(super) fn wrong_credentials_or_bucket<E, R>(err: &SdkError<E, R>) -> bool
where
    E: ProvideErrorMetadata,
    R: HasStatus,
{
    let code = match err {
        SdkError::ServiceError(e) => e.err().code(),
        _ => return false,
    };
    matches!(
        code,
        Some(
            "InvalidAccessKeyId"
                | "SignatureDoesNotMatch"
                | "InvalidToken"
                | "ExpiredToken"
                | "AuthorizationHeaderMalformed"
                | "NoSuchBucket"
                | "InvalidBucketName"
        )
    ) || status_of(err) == Some(401)
}

/// Whether a GET's error says the key does not exist: NoSuchKey, or a 404 that does not say NoSuchBucket (some
/// services answer a missing key with a bare 404).
pub(super) fn missing_key<E, R>(err: &SdkError<E, R>) -> bool
where
    E: ProvideErrorMetadata,
    R: HasStatus,
{
    let code = match err {
        SdkError::ServiceError(e) => e.err().code(),
        _ => None,
    };
    code == Some("NoSuchKey") || (status_of(err) == Some(404) && code != Some("NoSuchBucket"))
}
