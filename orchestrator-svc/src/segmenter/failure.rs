//! What a failed segmenter call means: whether another attempt may help, and the error an item gets when none did.

use tonic::{Code, Status};

/// A call that did not give a usable answer. Every kind ends the item as `segmenter_unavailable`; the status is
/// kept for whoever wants its code.
#[derive(Debug, thiserror::Error)]
pub enum SegmenterError {
    /// Gone, overloaded, too slow or cancelled, after every attempt.
    #[error("{call} unavailable after {attempts} attempt(s)")]
    Unavailable {
        call: &'static str,
        attempts: u32,
        #[source]
        status: Status,
    },
    /// Answered with an error that retrying will not fix.
    #[error("{call} refused after {attempts} attempt(s)")]
    Rejected {
        call: &'static str,
        attempts: u32,
        #[source]
        status: Status,
    },
    /// Answered, but not what was asked for.
    #[error("bad reply: {0}")]
    BadReply(String),
}

/// tonic reports the channel's own deadline (`Endpoint::timeout`, SEGMENTER_TIMEOUT_SEC) as CANCELLED "Timeout
/// expired": that is this call running out of time, not a replica going away, so it becomes DEADLINE_EXCEEDED and
/// is not retried (retrying it would make an item wait SEGMENTER_ATTEMPTS deadlines instead of one).
pub(super) fn own_deadline_passed(status: Status) -> Status {
    if status.code() == Code::Cancelled && status.message() == tonic::TimeoutExpired(()).to_string()
    {
        Status::deadline_exceeded(format!(
            "no segmenter answer within the call's deadline ({})",
            status.message()
        ))
    } else {
        status
    }
}

/// Starting, restarting or a full queue: worth another try shortly. Cancelled is what a call gets when its
/// replica closes the connection mid-call (a replica stopping); Segment is a pure function, so another replica may
/// answer it. A reply over the segmenter's message limit is RESOURCE_EXHAUSTED too, but says so in its ErrorInfo:
/// every replica would answer the same request the same way, after running the whole model again.
pub(super) fn retryable(status: &Status) -> bool {
    use palette_proto::segmenter::v1::error_info::{DOMAIN, REPLY_TOO_LARGE};
    use tonic_types::StatusExt;
    match status.code() {
        Code::Unavailable | Code::Cancelled => true,
        Code::ResourceExhausted => !status
            .get_details_error_info()
            .is_some_and(|info| info.domain == DOMAIN && info.reason == REPLY_TOO_LARGE),
        _ => false,
    }
}

pub(super) fn map_status(call: &'static str, attempts: u32, status: Status) -> SegmenterError {
    match status.code() {
        Code::Unavailable
        | Code::ResourceExhausted
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Unknown => SegmenterError::Unavailable {
            call,
            attempts,
            status,
        },
        Code::Ok
        | Code::InvalidArgument
        | Code::OutOfRange
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::Aborted
        | Code::Unimplemented
        | Code::Internal
        | Code::DataLoss
        | Code::Unauthenticated => SegmenterError::Rejected {
            call,
            attempts,
            status,
        },
    }
}
