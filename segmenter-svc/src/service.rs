//! The `palette.segmenter.v1.Segmenter` gRPC service: request validation, pre-processing off the async runtime,
//! submission to the engine, and encoding of the kept instances.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use palette_proto::segmenter::v1 as pb;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::engine::{EngineHandle, EngineThread, Job, JobOutput};
use crate::error::{Error, Violation};
use crate::mask_plane::MaskPlane;
use crate::model::tokenizer::{PhraseTokenizer, Tokens};
use crate::phrases::{self, normalise_phrase};
use crate::postprocess::{FilterParams, KeptConcept, rle_from_logits, to_le_bytes};
use crate::preprocess::{Prepared, Preprocessor};

/// Everything a request needs, shared by all handlers.
pub struct Shared {
    pub engine: EngineHandle,
    /// The inference thread, joined by `run` at shutdown (or when the last `Shared` is dropped).
    pub engine_thread: std::sync::Mutex<Option<EngineThread>>,
    pub preprocessor: Preprocessor,
    pub tokenizer: PhraseTokenizer,
    pub info: pb::ModelInfo,
    pub mask_size: usize,
    pub max_concepts: usize,
    pub max_concept_chars: usize,
    pub default_threshold: f32,
    pub max_instances: u32,
    pub default_deadline: Duration,
    /// Bounds the request's CPU work outside the engine: decode + resize before it, RLE masks after.
    pub preprocess_permits: Arc<Semaphore>,
    /// Requests waiting for a slot now (before the engine, each holding its whole message, up to MAX_MESSAGE_BYTES;
    /// or after it, for their RLE masks).
    pub preprocess_waiting: AtomicUsize,
    /// Most requests that may wait for a slot (QUEUE_CAPACITY, at least 1): past it a request is refused
    /// RESOURCE_EXHAUSTED at once, as by a full queue. Unbounded, a decode-bound replica never refused and its
    /// waiting requests (and their images) piled up until their deadlines.
    pub max_preprocess_waiting: usize,
    /// MAX_MESSAGE_BYTES: a reply larger than this is refused by tonic's encoder after all the compute, so it is
    /// checked here and answered with a status that says what to change.
    pub max_reply_bytes: usize,
    /// RUN_STALL_SEC as resolved for the provider: a run taking longer turns health NOT_SERVING until it ends.
    pub stall_limit: Duration,
}

impl Shared {
    /// Refuses while a model run has been in progress longer than RUN_STALL_SEC: health says NOT_SERVING then (the
    /// watchdog), and Segment answers as health says, UNAVAILABLE, instead of queuing requests behind a run that may
    /// never return, each to wait out its deadline.
    fn not_stalled(&self) -> Result<(), Error> {
        match self.engine.busy().running_for() {
            Some(running) if running > self.stall_limit => Err(Error::NotServing(format!(
                "a model run has not returned for {} s (RUN_STALL_SEC {})",
                running.as_secs(),
                self.stall_limit.as_secs()
            ))),
            _ => Ok(()),
        }
    }

    /// `EngineHandle::admissible`, and not while a run is stalled (`not_stalled`).
    fn admissible(&self) -> Result<(), Error> {
        self.not_stalled()?;
        self.engine.admissible()
    }
}

#[derive(Clone)]
pub struct SegmenterService {
    shared: Arc<Shared>,
}

impl SegmenterService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[tonic::async_trait]
impl pb::segmenter_server::Segmenter for SegmenterService {
    async fn segment(
        &self,
        request: Request<pb::SegmentRequest>,
    ) -> Result<Response<pb::SegmentResponse>, Status> {
        let started = Instant::now();
        // From the call's arrival, not from here: the request message (up to MAX_MESSAGE_BYTES) has been received and
        // decoded since, and tonic's own `grpc-timeout` timer runs from then too.
        let arrived = request
            .extensions()
            .get::<CallArrived>()
            .map_or(started, |arrived| arrived.0);
        let deadline = arrived + grpc_timeout(&request).unwrap_or(self.shared.default_deadline);
        let span = tracing::info_span!(
            "segment",
            request_id = tracing::field::Empty,
            concepts = tracing::field::Empty
        );
        crate::telemetry::adopt_remote_parent(&span, request.metadata());
        let request = request.into_inner();
        // Recorded before the checks refuse an over-long id, so cut to the limit: a 60 MB id would otherwise be
        // copied into every log line and span of the call.
        span.record(
            "request_id",
            within(&request.request_id, MAX_REQUEST_ID_BYTES),
        );
        span.record("concepts", request.concepts.len());
        // What autoscalers read (deploy/k8s: KEDA on segmenter_inflight_requests): calls inside the server now.
        metrics::gauge!("segmenter_inflight_requests").increment(1.0);
        let _inflight = InflightGuard;
        let mut unfinished = Unfinished {
            deadline,
            counted: false,
        };
        let result = segment(self.shared.clone(), request, started, deadline)
            .instrument(span.clone())
            .await;
        unfinished.counted = true;
        let elapsed = started.elapsed().as_secs_f64();
        match &result {
            Ok(_) => {
                metrics::counter!("segmenter_requests_total", "outcome" => "ok").increment(1);
                metrics::histogram!("segmenter_request_seconds").record(elapsed);
            }
            Err(e) => {
                metrics::counter!("segmenter_requests_total", "outcome" => e.kind()).increment(1);
                tracing::warn!(parent: &span, error = %e, "segment failed");
            }
        }
        result.map(Response::new).map_err(Status::from)
    }

    async fn get_model_info(
        &self,
        _request: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        Ok(Response::new(self.shared.info.clone()))
    }

    async fn check_concepts(
        &self,
        request: Request<pb::CheckConceptsRequest>,
    ) -> Result<Response<pb::CheckConceptsResponse>, Status> {
        let request = request.into_inner();
        phrases::check_all(
            &self.shared.tokenizer,
            self.shared.max_concept_chars,
            &request.concepts,
        )
        .map(|concepts| Response::new(pb::CheckConceptsResponse { concepts }))
        .map_err(Status::from)
    }
}

/// When a Segment call's headers arrived, before its message was received: set by `stamp_arrival`.
#[derive(Clone, Copy, Debug)]
pub struct CallArrived(pub Instant);

/// The interceptor the server wraps the Segment service in: it runs when the headers arrive, before the request
/// message is read, so the deadline counts from there (as the client's and tonic's timers do).
pub fn stamp_arrival(mut request: Request<()>) -> Result<Request<()>, Status> {
    request.extensions_mut().insert(CallArrived(Instant::now()));
    Ok(request)
}

/// Decrements the in-flight gauge however the handler ends (including a client cancelling mid-request).
struct InflightGuard;

impl Drop for InflightGuard {
    fn drop(&mut self) {
        metrics::gauge!("segmenter_inflight_requests").decrement(1.0);
    }
}

/// Counts a call in `segmenter_requests_total` when the handler never returns: tonic drops its future when the
/// client resets the call (outcome "cancelled") or when tonic's own `grpc-timeout` timer ends it first
/// ("deadline_exceeded"). Counted only on return, those calls were missing from the rate of failures.
struct Unfinished {
    deadline: Instant,
    counted: bool,
}

/// A reset this close to the deadline is the client's own deadline timer: it started before the headers were sent,
/// so it fires a little before ours, and the call was reset for its deadline, not because the client went away.
const DEADLINE_SLACK: Duration = Duration::from_millis(100);

impl Drop for Unfinished {
    fn drop(&mut self) {
        if !self.counted {
            let outcome = if Instant::now() + DEADLINE_SLACK >= self.deadline {
                Error::DeadlineExceeded.kind()
            } else {
                Error::Cancelled.kind()
            };
            metrics::counter!("segmenter_requests_total", "outcome" => outcome).increment(1);
        }
    }
}

/// Validated request, before pre-processing.
struct Checked {
    /// Normalised phrase of every requested concept, in request order (duplicates kept).
    requested: Vec<String>,
    /// Distinct phrases with tokens, first-seen order.
    distinct: Vec<(String, Tokens)>,
    filter: FilterParams,
    format: pb::MaskFormat,
    include_rle: bool,
}

async fn segment(
    shared: Arc<Shared>,
    request: pb::SegmentRequest,
    started: Instant,
    deadline: Instant,
) -> Result<pb::SegmentResponse, Error> {
    let checked = check(&shared, &request)?;
    // An expired request costs nothing more: neither the decode (which would run on after the caller has gone) nor
    // a place in the engine's queue. Nor does one the engine would refuse now (not serving, or no room in its
    // queue): asked here, before the wait for a pre-processing slot, and again once it has one (`prepare`).
    expired(deadline)?;
    shared.admissible()?;
    let (prepared, prep) = prepare(shared.clone(), request.image, deadline).await?;
    expired(deadline)?;

    let (reply, answer) = oneshot::channel();
    let image_size = (prepared.width, prepared.height);
    shared.not_stalled()?;
    shared.engine.submit(Job {
        pixels: prepared.pixels,
        image_size,
        phrases: checked.distinct.clone(),
        filter: checked.filter,
        deadline,
        enqueued: Instant::now(),
        reply,
        span: tracing::Span::current(),
    })?;
    let output = match tokio::time::timeout_at(deadline.into(), answer).await {
        Err(_) => return Err(Error::DeadlineExceeded),
        Ok(Err(_)) => {
            return Err(Error::NotServing(
                "the inference thread dropped the request".into(),
            ));
        }
        Ok(Ok(result)) => result?,
    };

    let t_encode = Instant::now();
    let mask_size = shared.mask_size;
    // RLE walks every pixel of each instance's box on the photo (seconds for hundreds of instances on a large
    // one): it takes a CPU slot as a decode does, so it does not crowd out the decodes, and it stops at the
    // deadline, or once the caller has gone (this future dropped), instead of working on for nobody. Its wait for
    // the slot is never refused: the model's work is done, and a refusal (RESOURCE_EXHAUSTED) would have it all
    // done again by the retry, when the server is busiest.
    let slot = if checked.include_rle {
        Some(cpu_slot(&shared, deadline, Line::Admitted).await?)
    } else {
        None
    };
    let gone = Arc::new(AtomicBool::new(false));
    let _gone_on_drop = SetOnDrop(gone.clone());
    let concepts = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let stop = Stop { deadline, gone };
        encode(&checked, output, mask_size, image_size, &stop)
    });
    let concepts = by_deadline(deadline, concepts)
        .await?
        .map_err(|e| Error::Inference(format!("encoding task failed: {e}")))?;
    let (concepts, mut timings) = concepts?;
    timings.queue_ms += ms(prep.wait);
    timings.decode_ms = ms(prep.decode);
    timings.preprocess_ms = ms(prep.resize);
    timings.postprocess_ms += ms(t_encode.elapsed());
    timings.total_ms = ms(started.elapsed());
    let response = pb::SegmentResponse {
        concepts,
        image_width: image_size.0,
        image_height: image_size.1,
        mask_height: mask_size as u32,
        mask_width: mask_size as u32,
        timings: Some(timings),
        model_id: shared.info.model_id.clone(),
    };
    fits(&response, shared.max_reply_bytes)?;
    Ok(response)
}

/// How a request waits in line for a CPU slot.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Line {
    /// A new request (its decode): refused (Overloaded) when `max_preprocess_waiting` already wait.
    Bounded,
    /// A request the engine has answered (its RLE): waits whatever the line's length (counted in it all the same,
    /// so new requests are refused while it waits). Their number is bounded by the requests admitted before.
    Admitted,
}

/// One of the PREPROCESS_CONCURRENCY slots for CPU work on a request (its decode and resize, its RLE), waited for
/// until `deadline` in a line of at most `max_preprocess_waiting` new requests.
async fn cpu_slot(
    shared: &Shared,
    deadline: Instant,
    line: Line,
) -> Result<OwnedSemaphorePermit, Error> {
    match shared.preprocess_permits.clone().try_acquire_owned() {
        Ok(permit) => Ok(permit),
        Err(tokio::sync::TryAcquireError::Closed) => Err(Error::NotServing("shutting down".into())),
        Err(tokio::sync::TryAcquireError::NoPermits) => {
            let _in_line = InLine::join(shared, line)?;
            tokio::time::timeout_at(
                deadline.into(),
                shared.preprocess_permits.clone().acquire_owned(),
            )
            .await
            .map_err(|_| Error::DeadlineExceeded)?
            .map_err(|_| Error::NotServing("shutting down".into()))
        }
    }
}

/// A request counted in `preprocess_waiting` while it waits for a slot.
struct InLine<'a>(&'a AtomicUsize);

impl<'a> InLine<'a> {
    /// In line, or Overloaded when `max_preprocess_waiting` requests already are (`Line::Bounded`).
    fn join(shared: &'a Shared, line: Line) -> Result<Self, Error> {
        let waiting = &shared.preprocess_waiting;
        let max = shared.max_preprocess_waiting;
        if waiting.fetch_add(1, Ordering::SeqCst) >= max && line == Line::Bounded {
            waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::Overloaded { capacity: max });
        }
        Ok(InLine(waiting))
    }
}

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Sets its flag when dropped: with the handler's future, when the client reset the call or tonic's timer ended it.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// When blocking work for a request stops: its deadline, or its caller gone (`SetOnDrop`).
struct Stop {
    deadline: Instant,
    gone: Arc<AtomicBool>,
}

impl Stop {
    fn check(&self) -> Result<(), Error> {
        if self.gone.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        expired(self.deadline)
    }
}

fn expired(deadline: Instant) -> Result<(), Error> {
    if Instant::now() >= deadline {
        return Err(Error::DeadlineExceeded);
    }
    Ok(())
}

/// Every limit of a request can be within bounds and the reply still over the message limit (many concepts with
/// f32 logits and a threshold of 0, RLE of a large photo): tonic would fail it with a bare OUT_OF_RANGE.
fn fits(response: &pb::SegmentResponse, limit: usize) -> Result<(), Error> {
    let bytes = prost::Message::encoded_len(response);
    if bytes > limit {
        return Err(Error::ReplyTooLarge { bytes, limit });
    }
    Ok(())
}

/// Longest `request_id`, in bytes (the orchestrator's are `{jobId}/{idx}`: at most 139).
pub const MAX_REQUEST_ID_BYTES: usize = 256;

/// `text` cut to at most `max` bytes, at a character boundary.
fn within(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Every field is checked and every violation reported, so a caller fixes a request in one round trip.
fn check(shared: &Shared, request: &pb::SegmentRequest) -> Result<Checked, Error> {
    let mut violations = Vec::new();
    match request.image.as_ref().and_then(|i| i.source.as_ref()) {
        None => violations.push(Violation::new(
            "image",
            "an image (encoded bytes or raw RGB) is required",
        )),
        Some(pb::image::Source::Encoded(bytes)) if bytes.is_empty() => {
            violations.push(Violation::new("image.encoded", "no image bytes"))
        }
        // Raw RGB's size checks cost nothing (an encoded image's wait for its decode).
        Some(pb::image::Source::Rgb(rgb)) => violations.extend(shared.preprocessor.rgb_violations(
            rgb.width,
            rgb.height,
            rgb.data.len(),
        )),
        Some(_) => {}
    }
    if request.request_id.len() > MAX_REQUEST_ID_BYTES {
        violations.push(Violation::new(
            "request_id",
            format!(
                "{} bytes, at most {MAX_REQUEST_ID_BYTES}",
                request.request_id.len()
            ),
        ));
    }
    if request.concepts.is_empty() {
        violations.push(Violation::new(
            "concepts",
            "at least one concept phrase is required",
        ));
    }
    if request.concepts.len() > shared.max_concepts {
        violations.push(Violation::new(
            "concepts",
            format!(
                "{} concepts given, at most {} per request",
                request.concepts.len(),
                shared.max_concepts
            ),
        ));
    }
    // Per-phrase checks dedupe against the phrases seen so far: quadratic in the list. A list over the limit is
    // refused on its length alone, before any of that work (a 64 MiB request can carry millions of phrases).
    let phrases = if request.concepts.len() > shared.max_concepts {
        &[][..]
    } else {
        &request.concepts[..]
    };
    let mut requested = Vec::with_capacity(phrases.len());
    let mut distinct: Vec<(String, Tokens)> = Vec::new();
    for (i, raw) in phrases.iter().enumerate() {
        let field = format!("concepts[{i}]");
        let phrase = match normalise_phrase(raw, shared.max_concept_chars) {
            Ok(phrase) => phrase,
            Err(why) => {
                violations.push(Violation::new(field, why));
                continue;
            }
        };
        if !distinct.iter().any(|(p, _)| *p == phrase) {
            match phrases::tokens(&shared.tokenizer, &phrase) {
                Err(why) => violations.push(Violation::new(field, why)),
                Ok(tokens) => distinct.push((phrase.clone(), tokens)),
            }
        }
        requested.push(phrase);
    }
    let threshold = request.score_threshold.unwrap_or(shared.default_threshold);
    if !(0.0..1.0).contains(&threshold) {
        violations.push(Violation::new("score_threshold", "must be within [0, 1)"));
    }
    if request.max_instances_per_concept > shared.max_instances {
        violations.push(Violation::new(
            "max_instances_per_concept",
            format!(
                "at most {} (0 means the server default)",
                shared.max_instances
            ),
        ));
    }
    let format = pb::MaskFormat::try_from(request.mask_format).unwrap_or_else(|_| {
        violations.push(Violation::new(
            "mask_format",
            format!("unknown value {}", request.mask_format),
        ));
        pb::MaskFormat::Unspecified
    });
    if request.include_semantic && format == pb::MaskFormat::None {
        // The semantic map comes in mask_format: with none, the caller would get nothing and no error.
        violations.push(Violation::new(
            "include_semantic",
            "the semantic map comes in mask_format, which is MASK_FORMAT_NONE: choose a mask format",
        ));
    }
    if !violations.is_empty() {
        return Err(Error::InvalidArgument(violations));
    }
    let max_instances = match request.max_instances_per_concept {
        0 => shared.max_instances,
        n => n,
    } as usize;
    Ok(Checked {
        requested,
        distinct,
        filter: FilterParams {
            threshold,
            max_instances,
            keep_semantic: request.include_semantic,
        },
        format,
        include_rle: request.include_rle,
    })
}

/// What preparing the photo took, as the reply's timings report it: the wait for a pre-processing slot (in
/// `queue_ms`, with the wait for the inference thread), the decode with its EXIF orientation (`decode_ms`; for raw
/// RGB, its checks), the resize and, for float-input exports, normalisation (`preprocess_ms`).
struct PrepTimes {
    wait: Duration,
    decode: Duration,
    resize: Duration,
}

async fn prepare(
    shared: Arc<Shared>,
    image: Option<pb::Image>,
    deadline: Instant,
) -> Result<(Prepared, PrepTimes), Error> {
    let source = image
        .and_then(|i| i.source)
        .ok_or_else(|| Error::invalid("image", "required"))?;
    let waiting = Instant::now();
    let permit = cpu_slot(&shared, deadline, Line::Bounded).await?;
    let wait = waiting.elapsed();
    // The queue may have filled during the wait: a request it has no room for now is refused before its decode,
    // which would be thrown away, and its slot goes to the next at once. The wait itself is bounded by the deadline
    // only: while the queue has room a decode is not wasted, and refusing it after a fixed wait would send clients
    // (which retry RESOURCE_EXHAUSTED a few times, on one replica as well as many) away from work about to be done.
    shared.admissible()?;
    let prepared = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let decoding = Instant::now();
        let rgb = match source {
            pb::image::Source::Encoded(bytes) => shared.preprocessor.decode(&bytes),
            pb::image::Source::Rgb(rgb) => shared.preprocessor.rgb(rgb.width, rgb.height, rgb.data),
        };
        let decode = decoding.elapsed();
        metrics::histogram!("segmenter_preprocess_seconds", "stage" => "decode")
            .record(decode.as_secs_f64());
        let resizing = Instant::now();
        let prepared = shared.preprocessor.prepare(rgb?)?;
        let resize = resizing.elapsed();
        metrics::histogram!("segmenter_preprocess_seconds", "stage" => "resize")
            .record(resize.as_secs_f64());
        Ok((
            prepared,
            PrepTimes {
                wait,
                decode,
                resize,
            },
        ))
    });
    by_deadline(deadline, prepared)
        .await?
        .map_err(|e| Error::Inference(format!("pre-processing task failed: {e}")))?
}

/// `work` (a blocking task) until `deadline`: DEADLINE_EXCEEDED past it. The handler needs a timer of its own while it
/// waits on a blocking thread: tonic's (from `grpc-timeout`) ended the call first, as CANCELLED ("Timeout expired").
async fn by_deadline<T>(deadline: Instant, work: impl Future<Output = T>) -> Result<T, Error> {
    tokio::time::timeout_at(deadline.into(), work)
        .await
        .map_err(|_| Error::DeadlineExceeded)
}

fn encode(
    checked: &Checked,
    output: JobOutput,
    mask_size: usize,
    (width, height): (u32, u32),
    stop: &Stop,
) -> Result<(Vec<pb::ConceptResult>, pb::StageTimings), Error> {
    let started = Instant::now();
    // A plane in the requested form: a u8 export's codes pass through; its logits are reconstructed (mask_plane.rs).
    let tensor = |plane: &MaskPlane| -> Option<pb::Tensor> {
        let shape = vec![mask_size as u32, mask_size as u32];
        match checked.format {
            pb::MaskFormat::None => None,
            pb::MaskFormat::LogitsF32 => Some(pb::Tensor {
                shape,
                dtype: pb::DataType::Float32 as i32,
                data: to_le_bytes(&plane.logits()),
            }),
            pb::MaskFormat::Unspecified | pb::MaskFormat::ProbabilityU8 => Some(pb::Tensor {
                shape,
                dtype: pb::DataType::Uint8 as i32,
                data: plane.probability_u8().into_owned(),
            }),
        }
    };
    // Nobody reads a reply past the deadline (tonic's timer ends the call) or once the caller has gone: asked
    // before each instance's RLE, the costly part (proportional to the instance's box on the photo).
    let rle = |inst: &crate::postprocess::KeptInstance| -> Result<Option<pb::CocoRle>, Error> {
        if !checked.include_rle {
            return Ok(None);
        }
        stop.check()?;
        Ok(Some(pb::CocoRle {
            height,
            width,
            counts: rle_from_logits(&inst.mask.logits(), mask_size, inst.bbox, width, height),
        }))
    };
    let encode_concept = |phrase: &str, kept: &KeptConcept, hit: bool| {
        let instances = kept
            .instances
            .iter()
            .map(|inst| {
                Ok(pb::Instance {
                    score: inst.score,
                    r#box: Some(pb::Box {
                        x0: inst.bbox[0],
                        y0: inst.bbox[1],
                        x1: inst.bbox[2],
                        y1: inst.bbox[3],
                    }),
                    mask: tensor(&inst.mask),
                    rle: rle(inst)?,
                    query_index: inst.query,
                })
            })
            .collect::<Result<_, Error>>()?;
        Ok::<_, Error>(pb::ConceptResult {
            concept: phrase.to_string(),
            presence_score: kept.presence,
            instances,
            semantic: kept.semantic.as_ref().and_then(tensor),
            text_cache_hit: hit,
        })
    };
    // Each distinct phrase is encoded once (its RLE is the costly part: proportional to the photo) and a phrase the
    // request repeats gets copies of that, the last use taking it.
    let index: Vec<usize> = checked
        .requested
        .iter()
        .map(|phrase| {
            checked
                .distinct
                .iter()
                .position(|(p, _)| p == phrase)
                .expect("every requested phrase is distinct-listed")
        })
        .collect();
    let mut uses_left = vec![0usize; checked.distinct.len()];
    for &i in &index {
        uses_left[i] += 1;
    }
    let mut encoded: Vec<Option<pb::ConceptResult>> = vec![None; checked.distinct.len()];
    let mut concepts = Vec::with_capacity(index.len());
    for i in index {
        let (phrase, _) = &checked.distinct[i];
        if encoded[i].is_none() {
            stop.check()?;
            encoded[i] = Some(encode_concept(
                phrase,
                &output.concepts[i],
                output.cache_hits[i],
            )?);
        }
        let done = encoded[i].as_mut().expect("just encoded");
        uses_left[i] -= 1;
        concepts.push(if uses_left[i] == 0 {
            encoded[i].take().expect("just encoded")
        } else {
            done.clone()
        });
    }
    let timings = pb::StageTimings {
        queue_ms: ms(output.queue),
        decode_ms: 0.0,
        preprocess_ms: 0.0,
        vision_ms: ms(output.vision),
        text_ms: ms(output.text),
        decoder_ms: ms(output.decoder),
        postprocess_ms: ms(output.filter + started.elapsed()),
        total_ms: 0.0,
        vision_batch_size: output.vision_batch as u32,
    };
    Ok((concepts, timings))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The client's deadline from the `grpc-timeout` header ("100m", "5S", ...), as the gRPC spec encodes it.
fn grpc_timeout<T>(request: &Request<T>) -> Option<Duration> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    parse_grpc_timeout(value)
}

pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts the bytes each thread allocates: a test measures what one call costs on its own thread.
    #[allow(unsafe_code)] // a GlobalAlloc is unsafe to implement; this one only forwards to the system allocator
    mod counting {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        thread_local! {
            static ALLOCATED: Cell<usize> = const { Cell::new(0) };
        }

        fn count(bytes: usize) {
            let _ = ALLOCATED.try_with(|a| a.set(a.get().saturating_add(bytes)));
        }

        pub struct Counting;

        // SAFETY: every call is forwarded to `System` with the caller's arguments, unchanged.
        unsafe impl GlobalAlloc for Counting {
            unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
                count(layout.size());
                unsafe { System.alloc(layout) }
            }
            unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
                count(layout.size());
                unsafe { System.alloc_zeroed(layout) }
            }
            unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
                count(new_size);
                unsafe { System.realloc(ptr, layout, new_size) }
            }
            unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
                unsafe { System.dealloc(ptr, layout) }
            }
        }

        #[global_allocator]
        static COUNTING: Counting = Counting;

        /// Bytes allocated by this thread so far.
        pub fn allocated() -> usize {
            ALLOCATED.with(Cell::get)
        }
    }

    /// `encode` of one "wall" instance on a 4000 x 3000 photo, asked `times` times, as RLE only: the reply and the
    /// bytes its encoding allocated on this thread.
    fn encode_wall(times: usize) -> (Vec<pb::ConceptResult>, usize) {
        let stop = Stop {
            deadline: Instant::now() + Duration::from_secs(600),
            gone: Default::default(),
        };
        let (concepts, bytes) = encode_wall_by(times, &stop);
        (concepts.unwrap(), bytes)
    }

    /// `encode_wall` with the request's deadline and whether its caller has gone.
    fn encode_wall_by(times: usize, stop: &Stop) -> (Result<Vec<pb::ConceptResult>, Error>, usize) {
        let mask_size = 64;
        let checked = Checked {
            requested: vec!["wall".to_string(); times],
            distinct: vec![(
                "wall".to_string(),
                Tokens {
                    ids: vec![1, 2],
                    mask: vec![1, 1],
                    full_len: 2,
                },
            )],
            filter: FilterParams {
                threshold: 0.5,
                max_instances: 20,
                keep_semantic: false,
            },
            format: pb::MaskFormat::None,
            include_rle: true,
        };
        // The whole photo: a two-number RLE to copy, whose making still reads every column and row.
        let plane = vec![255u8; mask_size * mask_size];
        let output = JobOutput {
            concepts: vec![KeptConcept {
                presence: 0.9,
                instances: vec![crate::postprocess::KeptInstance {
                    query: 3,
                    score: 0.8,
                    bbox: [0.0, 0.0, 4000.0, 3000.0],
                    mask: MaskPlane::ProbabilityU8(plane),
                }],
                semantic: None,
            }],
            cache_hits: vec![true],
            queue: Duration::ZERO,
            text: Duration::ZERO,
            vision: Duration::ZERO,
            decoder: Duration::ZERO,
            filter: Duration::ZERO,
            vision_batch: 1,
        };
        let before = counting::allocated();
        let concepts = encode(&checked, output, mask_size, (4000, 3000), stop).map(|(c, _)| c);
        (concepts, counting::allocated() - before)
    }

    /// A request whose deadline has passed by the time its reply is built gets no RLE made for it.
    #[test]
    fn no_rle_is_made_past_the_deadline() {
        let stop = Stop {
            deadline: Instant::now(),
            gone: Default::default(),
        };
        let (concepts, _) = encode_wall_by(1, &stop);
        assert!(
            matches!(concepts, Err(Error::DeadlineExceeded)),
            "{concepts:?}"
        );
    }

    /// Nor one whose caller has gone (the handler's future dropped: the client reset the call).
    #[test]
    fn no_rle_is_made_for_a_caller_that_has_gone() {
        let gone = Arc::new(AtomicBool::new(false));
        drop(SetOnDrop(gone.clone()));
        let stop = Stop {
            deadline: Instant::now() + Duration::from_secs(600),
            gone,
        };
        let (concepts, _) = encode_wall_by(1, &stop);
        assert!(matches!(concepts, Err(Error::Cancelled)), "{concepts:?}");
    }

    /// A phrase repeated in a request is encoded once: 32 x "wall" with RLE on a large photo cost 32 encodings.
    #[test]
    fn a_repeated_phrase_is_encoded_once_and_copied() {
        let (once, once_bytes) = encode_wall(1);
        let (repeated, repeated_bytes) = encode_wall(32);
        assert_eq!(once.len(), 1);
        assert!(once[0].instances[0].rle.is_some());
        assert_eq!(repeated.len(), 32);
        assert!(repeated.iter().all(|c| *c == once[0]));
        assert!(
            repeated_bytes < 2 * once_bytes,
            "32 copies allocated {repeated_bytes} bytes, one {once_bytes}"
        );
    }

    #[test]
    fn phrases_are_normalised_and_measured_after_normalising() {
        assert_eq!(
            normalise_phrase("  Red\t  SOFA \n", 200).as_deref(),
            Ok("red sofa")
        );
        // The limit is on the phrase the model reads: padding does not count, the spaces between words do.
        let padded = format!("{}wall{}", " ".repeat(500), "\t".repeat(500));
        assert_eq!(normalise_phrase(&padded, 4).as_deref(), Ok("wall"));
        assert_eq!(normalise_phrase("red  sofa", 8).as_deref(), Ok("red sofa"));
        assert_eq!(
            normalise_phrase("red sofa", 7),
            Err("longer than 7 characters".to_string())
        );
        assert_eq!(
            normalise_phrase(" \t\n", 200),
            Err("empty phrase".to_string())
        );
        assert_eq!(normalise_phrase("", 200), Err("empty phrase".to_string()));
    }

    /// A phrase far over the limit is refused without copying it: before, 16 MiB of one-letter words became a
    /// 128 MiB word list and two 16 MiB copies on a tokio worker before its length was looked at.
    #[test]
    fn an_over_long_phrase_is_refused_without_allocating_for_it() {
        for raw in ["a ".repeat(8 << 20), "A".repeat(16 << 20)] {
            let before = counting::allocated();
            let result = normalise_phrase(&raw, 200);
            let spent = counting::allocated() - before;
            assert_eq!(result, Err("longer than 200 characters".to_string()));
            assert!(spent < 4096, "{spent} bytes allocated to refuse the phrase");
        }
    }

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
    }
}
