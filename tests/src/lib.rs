//! End-to-end test support: both services in-process on 127.0.0.1:0 with the bundled tiny model, and the example
//! photos the README's quick start uses.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub mod s3;

/// A rule's `params` as the protobuf Struct the Jobs API takes, from (name, value) pairs.
pub fn rule_params(pairs: &[(&str, prost_types::value::Kind)]) -> Option<prost_types::Struct> {
    Some(prost_types::Struct {
        fields: pairs
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    prost_types::Value {
                        kind: Some(v.clone()),
                    },
                )
            })
            .collect(),
    })
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn tiny_model_dir() -> PathBuf {
    repo_root().join("segmenter-svc/models/sam3-tiny")
}

/// The bundled example photos (room, product, a phone shot with EXIF orientation), as JPEG bytes.
pub fn example_photos() -> Vec<(String, Vec<u8>)> {
    let dir = repo_root().join("segmenter-svc/tests/fixtures/reference/images");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .expect("example images")
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap();
            // Input keys are .jpg by contract: re-encode anything else (EXIF-carrying JPEGs stay untouched).
            let jpeg = if bytes.starts_with(&[0xFF, 0xD8]) {
                bytes
            } else {
                let img = image::load_from_memory(&bytes).unwrap().into_rgb8();
                let mut out = Vec::new();
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 92)
                    .encode_image(&img)
                    .unwrap();
                out
            };
            (
                path.file_name().unwrap().to_string_lossy().to_string(),
                jpeg,
            )
        })
        .collect()
}

/// A service task started in-process, stopped on request.
pub struct Running {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("service task")
                .expect("service stopped cleanly");
        }
    }
}

/// The segmenter with the tiny model on the CPU, SERVING when this returns. `addr` picks the port (None: any).
pub async fn start_segmenter(addr: Option<SocketAddr>) -> Running {
    let ort =
        PathBuf::from(std::env::var("ORT_DYLIB_PATH").expect("ORT_DYLIB_PATH (run .ci/setup)"));
    let mut config = segmenter_svc::Config::for_tests(tiny_model_dir(), ort);
    config.intra_threads = 1;
    config.log_level = "warn".into();
    let listener = tokio::net::TcpListener::bind(addr.unwrap_or(([127, 0, 0, 1], 0).into()))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(segmenter_svc::run(config, listener, async move {
        let _ = stopped.await;
    }));
    wait_serving(addr, "palette.segmenter.v1.Segmenter").await;
    Running {
        addr,
        stop: Some(stop),
        task: Some(task),
    }
}

/// The orchestrator with `config` (its grpc_addr is ignored: port 0), SERVING when this returns.
pub async fn start_orchestrator(config: orchestrator_svc::Config) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        orchestrator_svc::run(config, listener, async move {
            let _ = stopped.await;
        })
        .await
        .map_err(anyhow::Error::from)
    });
    wait_serving(addr, "").await;
    Running {
        addr,
        stop: Some(stop),
        task: Some(task),
    }
}

async fn wait_serving(addr: SocketAddr, service: &str) {
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    for _ in 0..600 {
        if let Ok(channel) = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
            if let Ok(r) = client
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.into(),
                })
                .await
                && r.into_inner().status == serving
            {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{addr} did not become SERVING");
}
