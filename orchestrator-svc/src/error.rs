//! Errors a gRPC caller sees (`ApiError`) and their one mapping to status codes, with no `_` arm: a new variant
//! must choose its code.
//!
//! The other audiences have their own errors, next to their code: why one image failed is `jobs::ItemError` (its
//! `code()` becomes `Item.error_code`, never a status: the job was accepted); what keeps the process from starting
//! is `server::StartupError`. The clients underneath (storage, the segmenter, callbacks) have typed errors too,
//! carried as `#[source]` rather than flattened into text. Display never repeats a source: `Report` prints the
//! whole chain, for logs and for an item's `error` text.

use std::fmt;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// One bad field of a request: `field` is the JSON-ish path ("rules[0].params.color"), `description` says why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        FieldViolation {
            field: field.into(),
            description: description.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is wrong; every bad field is listed.
    #[error("invalid request: {}", summarize(.0))]
    InvalidArgument(Vec<FieldViolation>),
    #[error("not found: no job {job_id:?}")]
    JobNotFound { job_id: String },
    /// The job id is taken by a different spec.
    #[error("already exists: job {job_id:?} exists with a different spec; use a new job id")]
    JobExists { job_id: String },
    /// An edit's source job cannot be read back from storage now (the storage error, boxed: this module sits below
    /// the storage clients).
    #[error("unavailable: job {job_id:?} cannot be read back from storage now; retry")]
    SourceUnavailable {
        job_id: String,
        #[source]
        source: BoxError,
    },
    /// An edit's source job exists but cannot be edited (its record is unreadable).
    #[error("failed precondition: job {job_id:?} cannot be edited: {reason}")]
    SourceUnusable { job_id: String, reason: String },
    /// An edit's source job has not ended: its photos without masks yet would fail `source_missing`.
    #[error(
        "failed precondition: job {job_id:?} has not ended ({ended} of {images} images ended); edit it once it has \
         (WatchJob follows it)"
    )]
    SourceRunning {
        job_id: String,
        ended: usize,
        images: usize,
    },
    /// A request failed on our side (a worker task died, an encoder failed): not the caller's doing.
    #[error("internal: {what}")]
    Internal { what: String },
    /// Too many jobs still running to keep another; `retry_after` is a hint, sent as RetryInfo.
    #[error("overloaded: {running} jobs are still running (MAX_RETAINED_JOBS); retry later")]
    Overloaded {
        running: usize,
        retry_after: Duration,
    },
    /// This process is shutting down: the client should go to another replica (or retry after the restart).
    #[error(
        "unavailable: draining: this orchestrator is shutting down; reconnect to another replica"
    )]
    Draining,
    /// The job store could not record the job (JOB_STORE): nothing was accepted, so a retry is safe.
    #[error("unavailable: the job store cannot record the job; retry")]
    StoreUnavailable(#[source] BoxError),
}

/// Violations sent back, at most: a request can carry thousands of bad keys, and the message and details travel in
/// HTTP/2 trailers, which clients cap at a few KB (larger ones arrive as a transport error instead: gRPC Java and
/// C-core, Python's grpcio, at 8 KiB by default).
pub const MAX_VIOLATIONS_SHOWN: usize = 50;

/// Trailer bytes the violations shown may take, as encoded: each appears three times, in `grpc-message`
/// (percent-encoded: a space or quote is 3 bytes) and, base64-encoded in `grpc-status-details-bin`, in the status
/// message copied there and in the BadRequest details. Well under the clients' 8 KiB with the rest of the trailers.
const VIOLATION_BYTES_SHOWN: usize = 5500;

/// What `text` adds to the trailers: percent-encoded once (bytes outside a conservative safe set take 3), plus two
/// copies in base64 (4 bytes per 3) with ~8 bytes of protobuf framing.
fn trailer_bytes(text: &str) -> usize {
    let percent: usize = text
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.:;,()[]/'=*+!@$&|^~".contains(&b) {
                1
            } else {
                3
            }
        })
        .sum();
    percent + (2 * (text.len() + 8)).div_ceil(3) * 4
}

/// Longest field name or description shown: both can echo what the caller sent (an unknown parameter's name, a
/// preset name, a 50 KB data: URL given as a swatch key), which goes back cut.
const TEXT_SHOWN: usize = 160;

fn cut(text: &str) -> String {
    if text.len() <= TEXT_SHOWN {
        return text.to_string();
    }
    let mut end = TEXT_SHOWN;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &text[..end], text.len())
}

/// The violations sent back, each cut to `TEXT_SHOWN`, as many as fit `MAX_VIOLATIONS_SHOWN` and, as encoded in
/// the trailers, `VIOLATION_BYTES_SHOWN` (at least one), and how many more there were.
fn shown(violations: &[FieldViolation]) -> (Vec<(String, String)>, usize) {
    let mut out = Vec::new();
    let mut bytes = 0;
    for v in violations.iter().take(MAX_VIOLATIONS_SHOWN) {
        let (field, description) = (cut(&v.field), cut(&v.description));
        bytes += trailer_bytes(&format!("{field}: {description}; "));
        if bytes > VIOLATION_BYTES_SHOWN && !out.is_empty() {
            break;
        }
        out.push((field, description));
    }
    let more = violations.len() - out.len();
    (out, more)
}

fn summarize(violations: &[FieldViolation]) -> String {
    let (shown, more) = shown(violations);
    let mut text = shown
        .iter()
        .map(|(field, description)| format!("{field}: {description}"))
        .collect::<Vec<_>>()
        .join("; ");
    if more > 0 {
        text.push_str(&format!("; and {more} more"));
    }
    text
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Status {
        let message = err.to_string();
        match err {
            ApiError::InvalidArgument(violations) => {
                let mut details = ErrorDetails::new();
                for (field, description) in shown(&violations).0 {
                    details.add_bad_request_violation(field, description);
                }
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            ApiError::JobNotFound { .. } => Status::not_found(message),
            ApiError::JobExists { .. } => Status::already_exists(message),
            ApiError::SourceUnavailable { .. } => Status::unavailable(message),
            ApiError::SourceUnusable { .. } | ApiError::SourceRunning { .. } => {
                Status::failed_precondition(message)
            }
            ApiError::Internal { .. } => Status::internal(message),
            ApiError::Overloaded { retry_after, .. } => Status::with_error_details(
                Code::ResourceExhausted,
                message,
                ErrorDetails::with_retry_info(Some(retry_after)),
            ),
            ApiError::Draining | ApiError::StoreUnavailable(_) => Status::unavailable(message),
        }
    }
}

impl ApiError {
    /// A submission refused only for now, which the queue adapters (`queue_pull`, `runpod`) submit again in place
    /// rather than fail the job: the registry is full of running jobs (Overloaded, which says how long to wait) or the
    /// job store cannot record the job (StoreUnavailable; wait `pause`). The wait, or None for an answer to keep.
    pub fn submit_again_in(&self, pause: Duration) -> Option<Duration> {
        match self {
            ApiError::Overloaded { retry_after, .. } => Some(*retry_after),
            ApiError::StoreUnavailable(_) => Some(pause),
            ApiError::InvalidArgument(_)
            | ApiError::JobNotFound { .. }
            | ApiError::JobExists { .. }
            | ApiError::SourceUnavailable { .. }
            | ApiError::SourceUnusable { .. }
            | ApiError::SourceRunning { .. }
            | ApiError::Internal { .. }
            | ApiError::Draining => None,
        }
    }
}

/// An error and every source under it, joined by ": " (what logs and an item's `error` say).
pub struct Report<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// `Report` as a String.
pub fn report(err: &(dyn std::error::Error + 'static)) -> String {
    Report(err).to_string()
}

/// A lower layer's error, boxed where its concrete type matters to nobody above (I/O, SDK internals).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_carries_every_violation() {
        let err = ApiError::InvalidArgument(vec![
            FieldViolation::new("user_id", "must not be empty"),
            FieldViolation::new("image_count", "must be 1..=500"),
        ]);
        let status = Status::from(err);
        assert_eq!(status.code(), Code::InvalidArgument);
        let bad = status
            .get_details_bad_request()
            .expect("BadRequest details");
        let fields: Vec<_> = bad
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, ["user_id", "image_count"]);
    }

    #[test]
    fn thousands_of_violations_send_back_the_first_few_and_a_count() {
        let many = (0..5000)
            .map(|i| FieldViolation::new(format!("rules[0].params.k{i}"), "unknown parameter"))
            .collect();
        let status = Status::from(ApiError::InvalidArgument(many));
        let shown = status
            .get_details_bad_request()
            .unwrap()
            .field_violations
            .len();
        assert!((20..=MAX_VIOLATIONS_SHOWN).contains(&shown), "{shown}");
        let more = format!("; and {} more", 5000 - shown);
        assert!(status.message().ends_with(&more), "{}", status.message());
        let mut headers = http::HeaderMap::new();
        status.add_header(&mut headers).unwrap();
        let bytes: usize = headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum();
        assert!(bytes < 8192, "{bytes} bytes of trailers");
    }

    /// What the caller sent can come back in a violation (an unknown parameter's name, a 50 KB data: URL as a swatch
    /// key): cut, and the whole answer kept under the 8 KiB of trailers clients accept.
    #[test]
    fn echoed_values_are_cut_and_the_answer_stays_small() {
        let huge = "x".repeat(100_000);
        let trailers = |violations: Vec<FieldViolation>| {
            let status = Status::from(ApiError::InvalidArgument(violations));
            let mut headers = http::HeaderMap::new();
            status.add_header(&mut headers).unwrap();
            let bytes: usize = headers
                .iter()
                .map(|(name, value)| name.as_str().len() + value.len() + 32)
                .sum();
            (status, bytes)
        };
        let (status, bytes) = trailers(
            vec![
                FieldViolation::new("preset", format!("unknown preset {huge:?}")),
                FieldViolation::new(format!("rules[0].params.{huge}"), "unknown parameter"),
                FieldViolation::new(
                    "rules[1].params.swatch",
                    format!("{huge}: not under swatches/"),
                ),
            ]
            .into_iter()
            .chain(
                (0..40)
                    .map(|i| FieldViolation::new(format!("rules[{i}].concept"), "x".repeat(150))),
            )
            .collect(),
        );
        assert!(bytes < 8192, "{bytes} bytes of trailers");
        assert!(
            status.message().contains("(100017 bytes)"),
            "{}",
            status.message()
        );
        assert!(status.message().contains("more"), "{}", status.message());
        // Honest input that percent-encodes badly: 36 bad concepts (spaces and quotes in every description), and
        // non-ASCII unknown parameter names.
        let concepts = (0..36)
            .map(|i| {
                FieldViolation::new(
                    format!("concepts[{i}]"),
                    format!("\"wall_{i}\" may only contain letters, digits, spaces and '-'"),
                )
            })
            .collect();
        assert!(trailers(concepts).1 < 8192);
        let accented = (0..20)
            .map(|i| {
                FieldViolation::new(
                    format!("rules[0].params.épaisseur_{i}"),
                    "unknown parameter \"é\"",
                )
            })
            .collect();
        assert!(trailers(accented).1 < 8192);
    }

    #[test]
    fn every_variant_has_its_code() {
        let job_id = || "j".to_string();
        let cases = [
            (ApiError::InvalidArgument(vec![]), Code::InvalidArgument),
            (ApiError::JobNotFound { job_id: job_id() }, Code::NotFound),
            (
                ApiError::JobExists { job_id: job_id() },
                Code::AlreadyExists,
            ),
            (
                ApiError::SourceUnavailable {
                    job_id: job_id(),
                    source: Box::new(std::io::Error::other("reset")),
                },
                Code::Unavailable,
            ),
            (
                ApiError::SourceUnusable {
                    job_id: job_id(),
                    reason: "unreadable".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                ApiError::Internal {
                    what: "encoder".into(),
                },
                Code::Internal,
            ),
            (
                ApiError::Overloaded {
                    running: 3,
                    retry_after: Duration::from_secs(5),
                },
                Code::ResourceExhausted,
            ),
            (
                ApiError::StoreUnavailable(std::io::Error::other("disk full").into()),
                Code::Unavailable,
            ),
            (ApiError::Draining, Code::Unavailable),
        ];
        for (err, code) in cases {
            assert_eq!(Status::from(err).code(), code);
        }
    }

    #[test]
    fn overloaded_says_when_to_retry() {
        let status = Status::from(ApiError::Overloaded {
            running: 3,
            retry_after: Duration::from_secs(5),
        });
        let retry = status.get_details_retry_info().expect("RetryInfo");
        assert_eq!(retry.retry_delay, Some(Duration::from_secs(5)));
    }

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn report_walks_the_sources() {
        let err = Outer(std::io::Error::other("inner"));
        assert_eq!(report(&err), "outer: inner");
    }
}
