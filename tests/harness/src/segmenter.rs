//! The segmenter with the bundled tiny model on the real ONNX Runtime (CPU), in-process on 127.0.0.1:0.

use std::net::SocketAddr;
use std::path::PathBuf;

use palette_proto::segmenter::v1 as pb;
use segmenter_svc::Config;
use tonic::transport::{Channel, Endpoint};

use crate::server::{Running, health, repo_root, start, wait_serving, wait_serving_on};

const SERVICE: &str = "palette.segmenter.v1.Segmenter";

pub fn tiny_model_dir() -> PathBuf {
    repo_root().join("segmenter-svc/models/sam3-tiny")
}

pub fn fixtures_dir() -> PathBuf {
    repo_root().join("segmenter-svc/tests/fixtures/reference")
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
    server: Running<anyhow::Error>,
}

impl TestServer {
    /// Starts `run` with `config`; returns once health says SERVING.
    pub async fn start(config: Config) -> Self {
        Self::start_checked_by(config, |addr| {
            Endpoint::from_shared(format!("http://{addr}")).unwrap()
        })
        .await
    }

    /// `start` for a server with TLS on: health is asked through `endpoint(addr)`.
    pub async fn start_checked_by(
        config: Config,
        endpoint: impl Fn(SocketAddr) -> Endpoint,
    ) -> Self {
        let server =
            start(|listener, shutdown| segmenter_svc::run(config, listener, shutdown)).await;
        wait_serving_on(endpoint(server.addr), SERVICE).await;
        Self {
            addr: server.addr,
            server,
        }
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
        health(self.addr, SERVICE).await
    }

    /// Waits up to `within` for `run` to return on its own; its result, None when it is still running.
    pub async fn ended_within(
        &mut self,
        within: std::time::Duration,
    ) -> Option<anyhow::Result<()>> {
        self.server.ended_within(within).await
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.server.stop().await
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

/// The segmenter with the tiny model on the CPU (one intra-op thread, quiet logs), SERVING when this returns.
pub async fn start_default() -> Running<anyhow::Error> {
    let server =
        start(|listener, shutdown| segmenter_svc::run(test_config(), listener, shutdown)).await;
    wait_serving(server.addr, SERVICE).await;
    server
}
