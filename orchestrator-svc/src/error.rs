//! The crate's one error type and its one mapping to gRPC status codes.

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
pub enum Error {
    /// The request is wrong; every bad field is listed.
    #[error("invalid request: {}", summarize(.0))]
    InvalidArgument(Vec<FieldViolation>),
    #[error("not found: {0}")]
    NotFound(String),
    /// The job id is taken by a different spec.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// An object that should be there is not (e.g. an input image).
    #[error("object not found: {0}")]
    ObjectNotFound(String),
    /// A key or id that would escape its prefix.
    #[error("invalid object key: {0}")]
    InvalidKey(String),
    #[error("storage unavailable: {0}")]
    StorageUnavailable(String),
    #[error("segmenter unavailable: {0}")]
    SegmenterUnavailable(String),
    /// The segmenter answered, but with an error that retrying will not fix.
    #[error("segmenter rejected the image: {0}")]
    SegmenterRejected(String),
    #[error("input too large: {0}")]
    InputTooLarge(String),
    #[error("input is not a readable image: {0}")]
    InputCorrupt(String),
    #[error("rule failed: {0}")]
    RuleFailed(String),
    #[error("cancelled")]
    Cancelled,
    /// Too much work already accepted; retry later.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// Startup configuration that cannot work.
    #[error("configuration: {0}")]
    Config(String),
    /// A reserved option (ADAPTER=runpod|queue_pull).
    #[error("not implemented yet: {0}")]
    NotImplemented(String),
    #[error("internal error: {0}")]
    Internal(String),
}

fn summarize(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The machine-readable reason reported on a failed item (see `Item.error_code` in orchestrator.proto).
    pub fn item_error_code(&self) -> &'static str {
        match self {
            Error::ObjectNotFound(_) => "input_missing",
            Error::InputCorrupt(_) => "input_corrupt",
            Error::InputTooLarge(_) => "input_too_large",
            Error::SegmenterUnavailable(_) | Error::SegmenterRejected(_) => "segmenter_unavailable",
            Error::StorageUnavailable(_) => "storage_unavailable",
            Error::RuleFailed(_) => "rule_failed",
            Error::Cancelled => "cancelled",
            Error::InvalidArgument(_)
            | Error::NotFound(_)
            | Error::AlreadyExists(_)
            | Error::InvalidKey(_)
            | Error::Config(_)
            | Error::NotImplemented(_)
            | Error::Overloaded(_)
            | Error::Internal(_) => "internal",
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        let message = err.to_string();
        match err {
            Error::InvalidArgument(violations) => {
                let mut details = ErrorDetails::new();
                for v in violations {
                    details.add_bad_request_violation(v.field, v.description);
                }
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            Error::NotFound(_) | Error::ObjectNotFound(_) => Status::not_found(message),
            Error::AlreadyExists(_) => Status::already_exists(message),
            Error::InvalidKey(_)
            | Error::InputTooLarge(_)
            | Error::InputCorrupt(_)
            | Error::RuleFailed(_) => Status::invalid_argument(message),
            Error::StorageUnavailable(_) | Error::SegmenterUnavailable(_) => {
                Status::unavailable(message)
            }
            Error::SegmenterRejected(_) => Status::failed_precondition(message),
            Error::Cancelled => Status::cancelled(message),
            Error::Overloaded(_) => Status::resource_exhausted(message),
            Error::NotImplemented(_) => Status::unimplemented(message),
            Error::Config(_) | Error::Internal(_) => Status::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_carries_every_violation() {
        let err = Error::InvalidArgument(vec![
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
    fn error_codes_for_items() {
        assert_eq!(
            Error::ObjectNotFound("k".into()).item_error_code(),
            "input_missing"
        );
        assert_eq!(Error::Cancelled.item_error_code(), "cancelled");
        assert_eq!(
            Status::from(Error::SegmenterUnavailable("x".into())).code(),
            Code::Unavailable
        );
    }
}
