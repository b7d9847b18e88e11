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

/// The violations' text a status carries at most (at least one is shown, then "and N more"): the message and the
/// BadRequest details (base64, in `grpc-status-details-bin`) both carry it, and gRPC clients commonly accept 8 KiB of
/// trailers (grpc-java, C-core). 32 over-long phrases made ~11 KB.
const VIOLATIONS_TEXT_SHOWN: usize = 2048;

/// The violations a status shows (see VIOLATIONS_TEXT_SHOWN), and how many more there were.
fn shown(mut violations: Vec<Violation>) -> (Vec<Violation>, usize) {
    let mut text = 0;
    let fit = violations
        .iter()
        .take_while(|v| {
            text += v.field.len() + v.description.len() + 4;
            text <= VIOLATIONS_TEXT_SHOWN
        })
        .count()
        .max(1);
    let more = violations.len().saturating_sub(fit);
    violations.truncate(fit);
    (violations, more)
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match error {
            Error::InvalidArgument(violations) => {
                let (violations, more) = shown(violations);
                let message = match more {
                    0 => message,
                    more => format!(
                        "invalid request: {}; and {more} more",
                        describe(&violations)
                    ),
                };
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

#[cfg(test)]
mod tests {
    use super::*;

    /// 32 phrases over the token limit: every violation was in the message and again in the details, ~11 KB of
    /// trailers, over the 8 KiB common clients accept.
    #[test]
    fn many_violations_fit_the_trailers_common_clients_accept() {
        let violations: Vec<Violation> = (0..32)
            .map(|i| {
                Violation::new(
                    format!("concepts[{i}]"),
                    "83 tokens with BOS/EOS; the model reads at most 32: shorten the phrase \"sofa 1234567890 \
                     1234567890 1234567890 1234567890 1234567890\"",
                )
            })
            .collect();
        let status = Status::from(Error::InvalidArgument(violations));
        let trailers = status.clone().into_http::<()>();
        let bytes: usize = trailers
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        assert!(bytes < 8 * 1024, "{bytes} bytes of trailers");
        assert!(status.message().ends_with("more"), "{}", status.message());
        let shown = status.get_details_bad_request().unwrap().field_violations;
        assert!(!shown.is_empty() && shown.len() < 32, "{}", shown.len());
        // A few short ones are all shown.
        let status = Status::from(Error::invalid("image", "required"));
        assert_eq!(status.message(), "invalid request: image: required");
    }
}
