//! The segmenter client: one lazily connected channel, a deadline per call, a few retries while the segmenter is
//! starting or overloaded, and the model id (cached) that keys mask reuse.

use std::time::{Duration, Instant};

use palette_proto::segmenter::v1::segmenter_client::SegmenterClient;
use palette_proto::segmenter::v1::{
    GetModelInfoRequest, Image, MaskFormat, SegmentRequest, SegmentResponse, image::Source,
};
use tokio::sync::RwLock;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::error::Error;

/// Responses carry model-resolution masks for every instance: generous, but bounded.
const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;
/// How long a learnt model id is trusted before GetModelInfo is asked again.
const MODEL_ID_TTL: Duration = Duration::from_secs(60);
/// Inputs are sent encoded (at most MAX_INPUT_BYTES, 40 MB by default) plus a little framing.
const MAX_REQUEST_BYTES: usize = 128 * 1024 * 1024;

#[derive(Debug)]
pub struct Segmenter {
    client: SegmenterClient<Channel>,
    attempts: u32,
    first_backoff: Duration,
    /// The model id and when it was learnt.
    model_id: RwLock<Option<(String, Instant)>>,
}

impl Segmenter {
    /// Never connects here: the first call does, so the orchestrator starts (and serves health) before the segmenter.
    pub fn new(url: &str, deadline: Duration, attempts: u32) -> Result<Self, Error> {
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| Error::Config(format!("SEGMENTER_URL {url:?}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(deadline)
            .tcp_nodelay(true);
        let client = SegmenterClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
            .max_encoding_message_size(MAX_REQUEST_BYTES);
        Ok(Segmenter {
            client,
            attempts: attempts.max(1),
            first_backoff: Duration::from_millis(200),
            model_id: RwLock::new(None),
        })
    }

    /// The loaded model's id (GetModelInfo, remembered for MODEL_ID_TTL; refreshed sooner when a Segment reply
    /// names another). It keys mask reuse, so a segmenter upgraded in place is noticed within the TTL.
    pub async fn model_id(&self) -> Result<String, Error> {
        if let Some((id, learnt)) = self.model_id.read().await.clone()
            && learnt.elapsed() < MODEL_ID_TTL
        {
            return Ok(id);
        }
        let info = self
            .with_retries("GetModelInfo", |mut client| async move {
                client
                    .get_model_info(GetModelInfoRequest {})
                    .await
                    .map(|r| r.into_inner())
            })
            .await?;
        *self.model_id.write().await = Some((info.model_id.clone(), Instant::now()));
        Ok(info.model_id)
    }

    /// One Segment call for all `concepts` of one image, masks as 8-bit probabilities at model resolution.
    pub async fn segment(
        &self,
        encoded: &[u8],
        concepts: &[String],
        request_id: &str,
    ) -> Result<SegmentResponse, Error> {
        let request = SegmentRequest {
            image: Some(Image {
                source: Some(Source::Encoded(encoded.to_vec())),
            }),
            concepts: concepts.to_vec(),
            score_threshold: None,
            max_instances_per_concept: 0,
            mask_format: MaskFormat::ProbabilityU8 as i32,
            include_rle: false,
            include_semantic: false,
            request_id: request_id.to_string(),
        };
        let response = self
            .with_retries("Segment", |mut client| {
                let request = request.clone();
                async move { client.segment(request).await.map(|r| r.into_inner()) }
            })
            .await?;
        if !response.model_id.is_empty() {
            *self.model_id.write().await = Some((response.model_id.clone(), Instant::now()));
        }
        Ok(response)
    }

    async fn with_retries<T, F, Fut>(&self, what: &str, call: F) -> Result<T, Error>
    where
        F: Fn(SegmenterClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut backoff = self.first_backoff;
        let mut attempt = 1;
        loop {
            match call(self.client.clone()).await {
                Ok(value) => return Ok(value),
                Err(status) if retryable(status.code()) && attempt < self.attempts => {
                    tracing::warn!(what, attempt, code = ?status.code(), message = status.message(), "segmenter call failed, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    attempt += 1;
                }
                Err(status) => return Err(map_status(what, attempt, status)),
            }
        }
    }
}

/// Starting, restarting or a full queue: worth another try shortly.
fn retryable(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::ResourceExhausted)
}

fn map_status(what: &str, attempts: u32, status: Status) -> Error {
    let text = format!(
        "{what} after {attempts} attempt(s): {:?}: {}",
        status.code(),
        status.message()
    );
    match status.code() {
        Code::Unavailable
        | Code::ResourceExhausted
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Unknown => Error::SegmenterUnavailable(text),
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
        | Code::Unauthenticated => Error::SegmenterRejected(text),
    }
}
