//! The orchestrator in-process on 127.0.0.1:0, with a gRPC client and its local storage.

use std::time::Duration;

use bytes::Bytes;
use orchestrator_svc::Config;
use orchestrator_svc::storage::{LocalStore, ObjectStore};
use palette_proto::orchestrator::v1::jobs_client::JobsClient;
use palette_proto::orchestrator::v1::{Job, JobSpec, Rule, WatchJobRequest};
use prost_types::{Struct, Value, value::Kind};
use tonic::transport::Channel;

use crate::server::Running;

pub struct Orchestrator {
    pub client: JobsClient<Channel>,
    pub channel: Channel,
    pub store: LocalStore,
    pub addr: std::net::SocketAddr,
    server: Running<orchestrator_svc::StartupError>,
    _dir: tempfile::TempDir,
}

/// Starts `run` with `Config::for_tests` adjusted by `tweak`.
pub async fn start(segmenter_url: &str, tweak: impl FnOnce(&mut Config)) -> Orchestrator {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(dir.path().join("storage"), segmenter_url);
    config.limits.presets_dir = dir.path().join("no-presets");
    tweak(&mut config);
    let store = LocalStore::new(&config.storage.local_storage_dir).unwrap();
    let server = crate::server::start(|listener, shutdown| {
        orchestrator_svc::run(config, listener, shutdown)
    })
    .await;
    let addr = server.addr;
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    Orchestrator {
        client: JobsClient::new(channel.clone()),
        channel,
        store,
        addr,
        server,
        _dir: dir,
    }
}

impl Orchestrator {
    /// Signals shutdown and waits until `run` returns.
    pub async fn shutdown(&mut self) {
        self.server.stop().await.unwrap();
    }

    pub async fn put_input(&self, user: &str, job: &str, idx: u32, bytes: Vec<u8>) {
        let key = format!("inputs/{user}/{job}/{idx}.jpg");
        self.store
            .put(&key, Bytes::from(bytes), "image/jpeg")
            .await
            .unwrap();
    }

    /// Follows WatchJob (as the seed user) to its end and returns every event's job.
    pub async fn watch_to_end(&mut self, job_id: &str) -> Vec<(Job, Option<u32>)> {
        let mut stream = self
            .client
            .watch_job(WatchJobRequest {
                job_id: job_id.into(),
                user_id: SEED_USER.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut events = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while let Some(event) = tokio::time::timeout_at(deadline, stream.message())
            .await
            .expect("watch timed out")
            .unwrap()
        {
            events.push((event.job.unwrap(), event.changed_idx));
        }
        events
    }

    /// Waits until `done(job)` (as the seed user): see `jobs::wait_for`.
    pub async fn wait_for(&mut self, job_id: &str, done: impl Fn(&Job) -> bool) -> Job {
        crate::jobs::wait_for(&mut self.client, SEED_USER, job_id, done).await
    }

    /// GetJob as the seed user.
    pub async fn get(&mut self, job_id: &str) -> Job {
        crate::jobs::get(&mut self.client, SEED_USER, job_id).await
    }
}

pub use crate::jobs::is_terminal;

pub fn string_struct(pairs: &[(&str, &str)]) -> Struct {
    Struct {
        fields: pairs
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Value {
                        kind: Some(Kind::StringValue(v.to_string())),
                    },
                )
            })
            .collect(),
    }
}

/// The seed example's user: every job the harness submits is theirs, and its lookups name them.
pub const SEED_USER: &str = "test-user";

/// The seed's example job, verbatim.
pub fn seed_spec(job_id: &str, image_count: u32) -> JobSpec {
    JobSpec {
        user_id: SEED_USER.into(),
        job_id: job_id.into(),
        concepts: vec!["wall".into(), "floor".into(), "furniture".into()],
        rules: vec![Rule {
            rule_id: "rule1".into(),
            concept: "wall".into(),
            r#type: "recolor".into(),
            params: Some(string_struct(&[("color", "#FF5733")])),
        }],
        image_count,
        preset: String::new(),
        output_format: String::new(),
    }
}

/// A small JPEG photo: a grey gradient "wall".
pub fn photo_jpeg(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let v = (120 + (x * 60 / w.max(1)) + (y * 40 / h.max(1))) as u8;
        image::Rgb([v, v, v.saturating_sub(10)])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 92)
        .encode_image(&img)
        .unwrap();
    out
}

/// The orchestrator with `config` (its grpc_addr is ignored: port 0), SERVING when this returns.
pub async fn start_with(config: Config) -> Running<anyhow::Error> {
    let running = crate::server::start(|listener, shutdown| async move {
        orchestrator_svc::run(config, listener, shutdown)
            .await
            .map_err(anyhow::Error::from)
    })
    .await;
    crate::server::wait_serving(running.addr, "").await;
    running
}

/// Writes `images` distinct input photos of `user`'s job into a local storage root (distinct: the mask cache would
/// answer repeats without the segmenter).
pub async fn put_distinct_inputs(storage: &std::path::Path, user: &str, job_id: &str, images: u32) {
    let store = LocalStore::new(storage).unwrap();
    for idx in 0..images {
        let key = format!("inputs/{user}/{job_id}/{idx}.jpg");
        let photo = Bytes::from(photo_jpeg(64 + idx, 48));
        store.put(&key, photo, "image/jpeg").await.unwrap();
    }
}
