//! A stand-in segmenter for FAULT INJECTION only (down, UNAVAILABLE, slow) and for counting calls; real masks
//! come from segmenter-svc in the workspace's end-to-end tests (tests/). Each concept gets one instance whose
//! mask covers the left half of the image, at 32x32 "model resolution".

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use palette_proto::segmenter::v1::segmenter_server::{Segmenter, SegmenterServer};
use palette_proto::segmenter::v1::{
    Box as PixelBox, ConceptResult, GetModelInfoRequest, Instance, ModelInfo, SegmentRequest,
    SegmentResponse, Tensor, image::Source,
};
use tonic::{Request, Response, Status};

pub const MODEL_ID: &str = "fake-model-1";
const MASK: u32 = 32;

#[derive(Default)]
pub struct Faults {
    /// Answer UNAVAILABLE to this many Segment calls first.
    pub unavailable_first: AtomicU32,
    /// Sleep this long (ms) in every Segment call.
    pub delay_ms: AtomicU32,
    /// Also return a second instance per concept: the bottom quarter of the image.
    pub second_instance: std::sync::atomic::AtomicBool,
    /// Find nothing for these concepts (a real model finds nothing for a concept absent from the photo; the tiny
    /// random-weight model cannot be made to, so this is the one non-fault the fake stands in for).
    pub nothing_for: std::sync::Mutex<Vec<String>>,
    /// Answer with NaN scores (a broken model's reply), which the orchestrator must refuse and not cache.
    pub nan_scores: std::sync::atomic::AtomicBool,
    /// Answer every Segment call as the real segmenter answers a reply over MAX_MESSAGE_BYTES: RESOURCE_EXHAUSTED
    /// with the REPLY_TOO_LARGE ErrorInfo (a full queue is RESOURCE_EXHAUSTED without it).
    pub reply_too_large: std::sync::atomic::AtomicBool,
    /// The model input size GetModelInfo reports (`image_size`); 0, the default, as a segmenter that does not say
    /// (the orchestrator then sends every upload as it is).
    pub input_size: AtomicU32,
    /// Phrases CheckConcepts says the model cannot read. Empty, the default: CheckConcepts is UNIMPLEMENTED, as on
    /// a segmenter from before it (callers then accept every phrase).
    pub unreadable: std::sync::Mutex<Vec<String>>,
}

#[derive(Default)]
pub struct Counters {
    pub segment_calls: AtomicUsize,
    /// The concepts of each Segment call, in order.
    pub requests: std::sync::Mutex<Vec<Vec<String>>>,
    /// The `traceparent` metadata of each Segment call ("" when absent), in order.
    pub traceparents: std::sync::Mutex<Vec<String>>,
    /// The `grpc-timeout` metadata of each Segment call ("" when absent), in order: the deadline the client sent.
    pub grpc_timeouts: std::sync::Mutex<Vec<String>>,
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    /// grpc.health.v1 Check calls received (the orchestrator's replica probes): the event a test waits for
    /// instead of sleeping through probe intervals.
    pub health_checks: AtomicUsize,
    /// The image of each Segment call, in order: "encoded" or "rgb", and the size it decoded to.
    pub images: std::sync::Mutex<Vec<(&'static str, u32, u32)>>,
}

#[derive(Clone)]
pub struct FakeSegmenter {
    pub faults: Arc<Faults>,
    pub counters: Arc<Counters>,
    pub url: String,
    /// grpc.health.v1 as the real segmenter serves it (SERVING from the start); tests flip it to inject a
    /// replica that is up but NOT_SERVING.
    health: tonic_health::server::HealthReporter,
    stop: Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>>,
    server: Arc<tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl FakeSegmenter {
    /// Reports the Segmenter service SERVING (true) or NOT_SERVING (false) on grpc.health.v1.
    pub async fn set_serving(&self, serving: bool) {
        let status = if serving {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        self.health
            .set_service_status(SEGMENTER_SERVICE, status)
            .await;
    }

    /// Stops serving: the listener closes (new connections are refused), calls in flight finish, open
    /// connections are closed.
    pub async fn stop(&self) {
        if let Some(stop) = self.stop.lock().unwrap().take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.lock().await.take() {
            server.await.unwrap();
        }
    }
}

struct Service(FakeSegmenter);

#[tonic::async_trait]
impl Segmenter for Service {
    async fn segment(
        &self,
        request: Request<SegmentRequest>,
    ) -> Result<Response<SegmentResponse>, Status> {
        let fake = &self.0;
        fake.counters.segment_calls.fetch_add(1, Ordering::SeqCst);
        let traceparent = request
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        fake.counters.traceparents.lock().unwrap().push(traceparent);
        let timeout = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        fake.counters.grpc_timeouts.lock().unwrap().push(timeout);
        fake.counters
            .requests
            .lock()
            .unwrap()
            .push(request.get_ref().concepts.clone());
        let now = fake.counters.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        fake.counters.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let result = answer(fake, request.into_inner()).await;
        fake.counters.in_flight.fetch_sub(1, Ordering::SeqCst);
        result.map(Response::new)
    }

    async fn get_model_info(
        &self,
        _: Request<GetModelInfoRequest>,
    ) -> Result<Response<ModelInfo>, Status> {
        Ok(Response::new(ModelInfo {
            model_id: MODEL_ID.into(),
            mask_size: MASK,
            image_size: self.0.faults.input_size.load(Ordering::SeqCst),
            ..Default::default()
        }))
    }

    /// With no `unreadable` phrases, a segmenter from before CheckConcepts: callers accept the phrases and let
    /// Segment judge them.
    async fn check_concepts(
        &self,
        request: Request<palette_proto::segmenter::v1::CheckConceptsRequest>,
    ) -> Result<Response<palette_proto::segmenter::v1::CheckConceptsResponse>, Status> {
        use palette_proto::segmenter::v1::{CheckConceptsResponse, ConceptCheck};
        let unreadable = self.0.faults.unreadable.lock().unwrap().clone();
        if unreadable.is_empty() {
            return Err(Status::unimplemented("CheckConcepts"));
        }
        let concepts = request
            .into_inner()
            .concepts
            .into_iter()
            .map(|concept| ConceptCheck {
                problem: if unreadable.contains(&concept) {
                    "fake: more tokens than the model reads".into()
                } else {
                    String::new()
                },
                tokens: 3,
                concept,
            })
            .collect();
        Ok(Response::new(CheckConceptsResponse { concepts }))
    }
}

async fn answer(fake: &FakeSegmenter, req: SegmentRequest) -> Result<SegmentResponse, Status> {
    let delay = fake.faults.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay.into())).await;
    }
    let left = fake.faults.unavailable_first.load(Ordering::SeqCst);
    if left > 0 {
        fake.faults
            .unavailable_first
            .store(left - 1, Ordering::SeqCst);
        return Err(Status::unavailable("fake: warming up"));
    }
    if fake.faults.reply_too_large.load(Ordering::SeqCst) {
        use palette_proto::segmenter::v1::error_info::{DOMAIN, REPLY_TOO_LARGE};
        use tonic_types::{ErrorDetails, StatusExt};
        let details = ErrorDetails::with_error_info(
            REPLY_TOO_LARGE,
            DOMAIN,
            std::collections::HashMap::<String, String>::new(),
        );
        return Err(Status::with_error_details(
            tonic::Code::ResourceExhausted,
            "fake: the reply would be over the message limit",
            details,
        ));
    }
    let (form, (w, h)) = match req.image.and_then(|i| i.source) {
        Some(Source::Encoded(bytes)) => {
            // Upright, as the real segmenter reads it (EXIF orientation applied).
            let mut img = image::load_from_memory(&bytes)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let orientation = image::ImageReader::new(std::io::Cursor::new(&bytes))
                .with_guessed_format()
                .ok()
                .and_then(|r| r.into_decoder().ok())
                .and_then(|mut d| image::ImageDecoder::orientation(&mut d).ok());
            if let Some(orientation) = orientation {
                img.apply_orientation(orientation);
            }
            ("encoded", (img.width(), img.height()))
        }
        Some(Source::Rgb(rgb)) if rgb.data.len() == (rgb.width * rgb.height * 3) as usize => {
            ("rgb", (rgb.width, rgb.height))
        }
        _ => return Err(Status::invalid_argument("fake: no image, or bad raw RGB")),
    };
    fake.counters.images.lock().unwrap().push((form, w, h));
    let probs: Vec<u8> = (0..MASK * MASK)
        .map(|i| if i % MASK < MASK / 2 { 255 } else { 0 })
        .collect();
    let bottom: Vec<u8> = (0..MASK * MASK)
        .map(|i| if i / MASK >= MASK * 3 / 4 { 255 } else { 0 })
        .collect();
    let second = fake.faults.second_instance.load(Ordering::SeqCst);
    let nothing_for = fake.faults.nothing_for.lock().unwrap().clone();
    let nan = fake.faults.nan_scores.load(Ordering::SeqCst);
    let concepts = req
        .concepts
        .iter()
        .map(|c| (c, nothing_for.contains(c)))
        .map(|(c, nothing)| ConceptResult {
            concept: c.clone(),
            presence_score: 0.9,
            instances: [Instance {
                score: if nan { f32::NAN } else { 0.9 },
                r#box: Some(PixelBox {
                    x0: 0.0,
                    y0: 0.0,
                    x1: w as f32 / 2.0,
                    y1: h as f32,
                }),
                mask: Some(Tensor {
                    shape: vec![MASK, MASK],
                    dtype: 1,
                    data: probs.clone(),
                }),
                ..Default::default()
            }]
            .into_iter()
            .chain(second.then(|| Instance {
                score: 0.8,
                r#box: Some(PixelBox {
                    x0: 0.0,
                    y0: h as f32 * 0.75,
                    x1: w as f32,
                    y1: h as f32,
                }),
                mask: Some(Tensor {
                    shape: vec![MASK, MASK],
                    dtype: 1,
                    data: bottom.clone(),
                }),
                ..Default::default()
            }))
            .filter(|_| !nothing)
            .collect(),
            ..Default::default()
        })
        .collect();
    Ok(SegmentResponse {
        concepts,
        image_width: w,
        image_height: h,
        mask_height: MASK,
        mask_width: MASK,
        model_id: MODEL_ID.into(),
        ..Default::default()
    })
}

/// The name the segmenter's health service reports its Segment API under.
const SEGMENTER_SERVICE: &str = "palette.segmenter.v1.Segmenter";

pub async fn start() -> FakeSegmenter {
    start_with(None).await
}

/// `start` with TLS on (the server certificate of `pki`, for localhost); its `url` is `https://localhost:<port>`.
pub async fn start_tls(pki: &crate::tls::Pki) -> FakeSegmenter {
    let (tls, _) = palette_service_kit::tls::server_config(
        Some(&pki.path("server.pem")),
        Some(&pki.path("server.key")),
        None,
        palette_service_kit::tls::HANDSHAKE_TIMEOUT,
    )
    .unwrap();
    start_with(tls).await
}

async fn start_with(tls: Option<tonic::transport::ServerTlsConfig>) -> FakeSegmenter {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let url = match tls {
        Some(_) => format!("https://localhost:{port}"),
        None => format!("http://127.0.0.1:{port}"),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(SEGMENTER_SERVICE, tonic_health::ServingStatus::Serving)
        .await;
    let fake = FakeSegmenter {
        faults: Arc::default(),
        counters: Arc::default(),
        url,
        health,
        stop: Arc::new(std::sync::Mutex::new(Some(stop))),
        server: Arc::default(),
    };
    let server = SegmenterServer::new(Service(fake.clone())).max_decoding_message_size(64 << 20);
    let counters = fake.counters.clone();
    let health_service = tonic::service::interceptor::InterceptedService::new(
        health_service,
        move |request: Request<()>| {
            counters.health_checks.fetch_add(1, Ordering::SeqCst);
            Ok(request)
        },
    );
    let task = tokio::spawn(async move {
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls).unwrap();
        }
        builder
            .add_service(health_service)
            .add_service(server)
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .unwrap()
    });
    *fake.server.lock().await = Some(task);
    fake
}
