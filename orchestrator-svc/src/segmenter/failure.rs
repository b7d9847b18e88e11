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
    if connection_failed(status) {
        return true;
    }
    match status.code() {
        Code::Unavailable | Code::Cancelled => true,
        Code::ResourceExhausted => !status
            .get_details_error_info()
            .is_some_and(|info| info.domain == DOMAIN && info.reason == REPLY_TOO_LARGE),
        _ => false,
    }
}

/// The connection the call ran on failed under it: no replica answered. tonic reports a GOAWAY (a replica shutting
/// down while a call was on its way: h2 NO_ERROR) as INTERNAL "h2 protocol error", with the transport error as the
/// status' source; a status a replica sent has no source. Segment is a pure function, so another attempt is safe,
/// as for CANCELLED; INTERNAL from a replica itself (the request's own fault) stays final.
fn connection_failed(status: &Status) -> bool {
    std::error::Error::source(status).is_some_and(|source| source.is::<tonic::transport::Error>())
}

/// The replica the call ran on may be gone (unavailable, its connection closed or failed): worth looking up the
/// replicas again before the next attempt.
pub(super) fn replica_gone(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::Cancelled) || connection_failed(status)
}

pub(super) fn map_status(call: &'static str, attempts: u32, status: Status) -> SegmenterError {
    if connection_failed(&status) {
        return SegmenterError::Unavailable {
            call,
            attempts,
            status,
        };
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use palette_proto::segmenter::v1 as pb;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// What a call gets from a replica that answers its connection with GOAWAY (NO_ERROR, last stream 0: the call's
    /// stream was never processed), as a replica shutting down does to a call already on its way.
    async fn status_from_a_replica_going_away() -> Status {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut preface = [0u8; 24];
            socket.read_exact(&mut preface).await.unwrap();
            // SETTINGS (empty), then GOAWAY: last stream id 0, NO_ERROR.
            let mut frames = vec![0, 0, 0, 0x4, 0, 0, 0, 0, 0];
            frames.extend_from_slice(&[0, 0, 8, 0x7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            socket.write_all(&frames).await.unwrap();
            let mut rest = [0u8; 1024];
            while socket.read(&mut rest).await.is_ok_and(|n| n > 0) {}
        });
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        pb::segmenter_client::SegmenterClient::new(channel)
            .segment(pb::SegmentRequest::default())
            .await
            .unwrap_err()
    }

    #[tokio::test]
    async fn a_call_cut_by_a_goaway_is_retried_and_unavailable() {
        let status = status_from_a_replica_going_away().await;
        assert!(retryable(&status), "{status:?}");
        assert!(
            matches!(
                map_status("Segment", 1, status),
                SegmenterError::Unavailable { .. }
            ),
            "not Rejected"
        );
    }

    #[test]
    fn internal_from_a_replica_itself_stays_final() {
        let status = Status::internal("decoder run failed for this request");
        assert!(!retryable(&status));
        assert!(matches!(
            map_status("Segment", 1, status),
            SegmenterError::Rejected { .. }
        ));
    }
}
