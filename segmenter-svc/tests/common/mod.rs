//! Shared test support: the bundled tiny model, the real ONNX Runtime, servers on 127.0.0.1:0.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use palette_proto::segmenter::v1 as pb;
use segmenter_svc::Config;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub fn tiny_model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/sam3-tiny")
}

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference")
}

/// The ONNX Runtime library .ci/setup installs (via .cargo/config.toml) or the one the environment names.
pub fn ort_dylib() -> PathBuf {
    let path =
        PathBuf::from(std::env::var("ORT_DYLIB_PATH").expect("ORT_DYLIB_PATH (run .ci/setup)"));
    assert!(
        path.is_file(),
        "{} does not exist: run .ci/setup",
        path.display()
    );
    path
}

pub fn test_config() -> Config {
    let mut config = Config::for_tests(tiny_model_dir(), ort_dylib());
    config.intra_threads = 1;
    config.log_level = "warn".into();
    config
}

pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start(config: Config) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(segmenter_svc::run(config, listener, async move {
            let _ = stopped.await;
        }));
        let server = Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        };
        server.wait_serving().await;
        server
    }

    pub async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn client(&self) -> pb::segmenter_client::SegmenterClient<Channel> {
        pb::segmenter_client::SegmenterClient::new(self.channel().await)
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20)
    }

    pub async fn health(&self) -> i32 {
        let mut health = tonic_health::pb::health_client::HealthClient::new(self.channel().await);
        health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "palette.segmenter.v1.Segmenter".into(),
            })
            .await
            .map(|r| r.into_inner().status)
            .unwrap_or(-1)
    }

    async fn wait_serving(&self) {
        let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
        for _ in 0..600 {
            if self.health().await == serving {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("segmenter did not become SERVING within 30 s");
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap()
    }
}

pub fn image_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixtures_dir().join("images").join(name)).unwrap()
}

pub fn request(image: Vec<u8>, concepts: &[&str]) -> pb::SegmentRequest {
    pb::SegmentRequest {
        image: Some(pb::Image {
            source: Some(pb::image::Source::Encoded(image)),
        }),
        concepts: concepts.iter().map(|c| c.to_string()).collect(),
        ..Default::default()
    }
}
