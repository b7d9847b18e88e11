//! The crate's one error type and its one mapping to gRPC status codes.

use std::path::PathBuf;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// Why the model folder cannot be served. Startup fails with it; the message names the fix.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(
        "no usable model in {dir}: {detail}. Export one with `python segmenter-svc/export/export_sam3.py --model \
         facebook/sam3 --out {dir}` (HF_TOKEN set), or point MODEL_DIR at the bundled segmenter-svc/models/sam3-tiny"
    )]
    Missing { dir: PathBuf, detail: String },
    #[error("invalid model: {0}")]
    Invalid(String),
    #[error(
        "ONNX Runtime could not be loaded from {path}: {detail}. Install it (see README) or set ORT_DYLIB_PATH"
    )]
    Runtime { path: PathBuf, detail: String },
    #[error("execution provider {provider} is unavailable: {detail}")]
    ExecutionProvider { provider: String, detail: String },
    #[error("building the {graph} session failed: {detail}")]
    Session { graph: &'static str, detail: String },
    /// Settings that cannot work together (or not on this provider); the message names them and the fix.
    #[error("invalid settings: {0}")]
    Settings(String),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad request fields: every violation found, not only the first.
    #[error("invalid request: {}", describe(.0))]
    InvalidArgument(Vec<Violation>),
    #[error("the inference queue is full ({capacity} requests waiting); retry with backoff")]
    Overloaded { capacity: usize },
    #[error("the segmenter is not serving: {0}")]
    NotServing(String),
    #[error("the request's deadline passed before it was computed")]
    DeadlineExceeded,
    #[error("the client cancelled the request")]
    Cancelled,
    #[error(
        "the reply would be {bytes} bytes, over the {limit}-byte message limit (MAX_MESSAGE_BYTES): ask for \
         PROBABILITY_U8 or NONE masks, fewer concepts or instances, a higher score_threshold, or no RLE"
    )]
    ReplyTooLarge { bytes: usize, limit: usize },
    #[error("inference failed: {0}")]
    Inference(String),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// One bad field: its path in the request and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub field: String,
    pub description: String,
}

impl Violation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

fn describe(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

impl Error {
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![Violation::new(field, description)])
    }

    /// Short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidArgument(_) => "invalid_argument",
            Error::Overloaded { .. } => "overloaded",
            Error::NotServing(_) => "not_serving",
            Error::DeadlineExceeded => "deadline_exceeded",
            Error::Cancelled => "cancelled",
            Error::ReplyTooLarge { .. } => "reply_too_large",
            Error::Inference(_) => "inference",
            Error::Model(_) => "model",
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match error {
            Error::InvalidArgument(violations) => {
                let details = ErrorDetails::with_bad_request(
                    violations
                        .into_iter()
                        .map(|v| FieldViolation::new(v.field, v.description))
                        .collect::<Vec<_>>(),
                );
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            Error::Overloaded { .. } => Status::resource_exhausted(message),
            Error::NotServing(_) => Status::unavailable(message),
            Error::DeadlineExceeded => Status::deadline_exceeded(message),
            Error::Cancelled => Status::cancelled(message),
            // What gRPC itself answers for a message over the limit, with a message saying what to change, and a
            // reason that tells it from a full queue (clients retry that one).
            Error::ReplyTooLarge { .. } => {
                use palette_proto::segmenter::v1::error_info::{DOMAIN, REPLY_TOO_LARGE};
                let details = ErrorDetails::with_error_info(
                    REPLY_TOO_LARGE,
                    DOMAIN,
                    std::collections::HashMap::<String, String>::new(),
                );
                Status::with_error_details(Code::ResourceExhausted, message, details)
            }
            Error::Inference(_) => Status::internal(message),
            Error::Model(_) => Status::failed_precondition(message),
        }
    }
}
