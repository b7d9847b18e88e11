//! Process configuration: every field comes from a flag or the environment variable named beside it. The seed's
//! variable names (R2_*, WORKERS_API_URL, GPU_CALLBACK_SECRET, BATCH_CONCURRENCY, CALLBACK_TIMEOUT_SEC, LOG_LEVEL,
//! ADAPTER) are kept so an existing `.env` keeps working.
//!
//! Not here: the OpenTelemetry variables (`OTEL_EXPORTER_OTLP_ENDPOINT` turns OTLP span export on; the other
//! standard `OTEL_EXPORTER_OTLP_*` / `OTEL_BSP_*` tune it), read by the SDK itself (`telemetry::init_from_env`), and
//! `GRPC_ADDR` as read by `orchestrator-svc healthcheck` (only its port is used, against 127.0.0.1).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::error::BoxError;

/// A setting that cannot work; names the environment variable, so the operator knows what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Required by another setting's choice (`reason`: "for ADAPTER=runpod", "with WORKERS_API_URL").
    #[error("{setting} must be set {reason}")]
    Missing {
        setting: &'static str,
        reason: &'static str,
    },
    #[error("{setting} must not be empty")]
    Empty { setting: &'static str },
    /// Set, but unusable; `source` says why.
    #[error("{setting} {value:?}")]
    Invalid {
        setting: &'static str,
        value: String,
        #[source]
        source: BoxError,
    },
}

impl ConfigError {
    pub fn invalid(
        setting: &'static str,
        value: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        ConfigError::Invalid {
            setting,
            value: value.into(),
            source: source.into(),
        }
    }
}

/// Where objects live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StorageBackend {
    /// Cloudflare R2 (`https://{R2_ACCOUNT_ID}.r2.cloudflarestorage.com`, region `auto`).
    R2,
    /// Any S3-compatible endpoint (`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, region `AWS_REGION`).
    S3,
    /// A directory on this machine (development and tests).
    Local,
}

/// How jobs reach this process. The gRPC server always runs; `runpod` also takes jobs from a Runpod serverless queue
/// (`adapters::runpod`); `queue_pull` also takes them from a NATS JetStream work queue (`adapters::queue_pull`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Adapter {
    Grpc,
    Runpod,
    #[value(name = "queue_pull")]
    QueuePull,
}

#[derive(Clone, Parser)]
#[command(
    name = "orchestrator-svc",
    version,
    about = "Jobs in, edited images and signed callbacks out."
)]
pub struct Config {
    /// gRPC listen address. Default 0.0.0.0:50052.
    #[arg(long, env = "GRPC_ADDR", default_value = "0.0.0.0:50052")]
    pub grpc_addr: SocketAddr,
    /// Prometheus scrape address (`/metrics`). Default 0.0.0.0:9092; empty turns the exporter off.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9092")]
    pub metrics_addr: String,
    /// Job intake adapter: grpc (default) | runpod (also a Runpod serverless queue worker; needs the RUNPOD_*
    /// variables) | queue_pull (also takes jobs from a NATS JetStream work queue; needs NATS_URL).
    #[arg(
        long,
        env = "ADAPTER",
        value_enum,
        default_value = "grpc",
        ignore_case = true
    )]
    pub adapter: Adapter,
    /// Log filter: DEBUG, INFO, WARNING, ERROR or a tracing filter directive. Default INFO.
    #[arg(long, env = "LOG_LEVEL", default_value = "INFO")]
    pub log_level: String,

    /// Segmenter gRPC endpoint(s): comma-separated `http://host:port` or `dns:///host:port`. A host name is
    /// resolved to ALL its addresses (a Kubernetes headless Service gives one per ready Pod) and calls are balanced
    /// over them; a replica that stops answering is left out until it accepts connections again. Default
    /// http://127.0.0.1:50051.
    #[arg(long, env = "SEGMENTER_URL", default_value = "http://127.0.0.1:50051")]
    pub segmenter_url: String,
    /// How often SEGMENTER_URL's host names are looked up again (replicas added or gone), in seconds; 0 = only at
    /// start and after a failed call. Default 10.
    #[arg(long, env = "SEGMENTER_RESOLVE_INTERVAL_SEC", default_value_t = 10)]
    pub segmenter_resolve_interval_sec: u64,
    /// Deadline of one Segment call, in seconds. Default 120.
    #[arg(long, env = "SEGMENTER_TIMEOUT_SEC", default_value_t = 120)]
    pub segmenter_timeout_sec: u64,
    /// Attempts per Segment call while the segmenter answers UNAVAILABLE. Default 4.
    #[arg(long, env = "SEGMENTER_ATTEMPTS", default_value_t = 4)]
    pub segmenter_attempts: u32,
    /// Memory for segmentation results reused across jobs on the same input bytes, in MiB. Default 256; 0 = off.
    #[arg(long, env = "MASK_CACHE_MB", default_value_t = 256)]
    pub mask_cache_mb: usize,

    /// Object storage: r2 | s3 | local. Default local.
    #[arg(
        long,
        env = "STORAGE_BACKEND",
        value_enum,
        default_value = "local",
        ignore_case = true
    )]
    pub storage_backend: StorageBackend,
    /// Root directory of the local backend. Default ./.data/storage.
    #[arg(long, env = "LOCAL_STORAGE_DIR", default_value = "./.data/storage")]
    pub local_storage_dir: PathBuf,
    /// Cloudflare account id (r2 only; builds the endpoint URL).
    #[arg(long, env = "R2_ACCOUNT_ID")]
    pub r2_account_id: Option<String>,
    /// Access key id (r2 and s3).
    #[arg(long, env = "R2_ACCESS_KEY_ID")]
    pub r2_access_key_id: Option<String>,
    /// Secret access key (r2 and s3).
    #[arg(long, env = "R2_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub r2_secret_access_key: Option<String>,
    /// Bucket name (r2 and s3).
    #[arg(long, env = "R2_BUCKET_NAME")]
    pub r2_bucket_name: Option<String>,
    /// S3 endpoint URL (s3 only). Falls back to AWS_ENDPOINT_URL, then to the SDK's AWS endpoint.
    #[arg(long, env = "AWS_ENDPOINT_URL_S3")]
    pub s3_endpoint_url: Option<String>,
    /// Generic endpoint URL, used when AWS_ENDPOINT_URL_S3 is unset (s3 only).
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub aws_endpoint_url: Option<String>,
    /// S3 region (s3 only). Default us-east-1.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub aws_region: String,
    /// Timeout of one storage request attempt, in seconds. Default 30.
    #[arg(long, env = "STORAGE_TIMEOUT_SEC", default_value_t = 30)]
    pub storage_timeout_sec: u64,

    /// Upstream API base URL; callbacks go to {WORKERS_API_URL}/jobs/{jobId}/callback. Unset: no callbacks.
    #[arg(long, env = "WORKERS_API_URL")]
    pub workers_api_url: Option<String>,
    /// Shared secret: sent as X-GPU-Callback-Secret and the HMAC key of webhook-signature.
    #[arg(long, env = "GPU_CALLBACK_SECRET", hide_env_values = true)]
    pub gpu_callback_secret: Option<String>,
    /// Timeout of one callback attempt, in seconds. Default 30.
    #[arg(long, env = "CALLBACK_TIMEOUT_SEC", default_value_t = 30)]
    pub callback_timeout_sec: u64,
    /// Callback attempts before giving up (first try included). Default 6.
    #[arg(long, env = "CALLBACK_MAX_ATTEMPTS", default_value_t = 6)]
    pub callback_max_attempts: u32,
    /// Base of the exponential callback backoff, in milliseconds (full jitter). Default 1000.
    #[arg(long, env = "CALLBACK_BASE_DELAY_MS", default_value_t = 1000)]
    pub callback_base_delay_ms: u64,
    /// Longest wait between two callback attempts, Retry-After included, in seconds. Default 300.
    #[arg(long, env = "CALLBACK_MAX_DELAY_SEC", default_value_t = 300)]
    pub callback_max_delay_sec: u64,

    /// Images in flight over the whole process (download to callback). Default 4.
    #[arg(long, env = "BATCH_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub batch_concurrency: u32,
    /// Directory of domain presets (*.json, loaded by palette-rules). Default ./presets; missing = no presets.
    #[arg(long, env = "PRESETS_DIR", default_value = "./presets")]
    pub presets_dir: PathBuf,
    /// Most images (imageCount) per job. Default 500.
    #[arg(long, env = "MAX_IMAGES_PER_JOB", default_value_t = 500)]
    pub max_images_per_job: u32,
    /// Most rules per job. Default 16.
    #[arg(long, env = "MAX_RULES_PER_JOB", default_value_t = 16)]
    pub max_rules_per_job: usize,
    /// Most concepts segmented per job (listed, rule and occluder concepts together). Default 32: the segmenter's
    /// own limit, and the interior preset alone lists 17.
    #[arg(long, env = "MAX_CONCEPTS_PER_JOB", default_value_t = 32)]
    pub max_concepts_per_job: usize,
    /// Jobs kept in memory (for GetJob, WatchJob and idempotency); beyond it the oldest finished ones are
    /// forgotten, and when none is finished SubmitJob answers RESOURCE_EXHAUSTED. Default 10000.
    #[arg(long, env = "MAX_RETAINED_JOBS", default_value_t = 10_000)]
    pub max_retained_jobs: usize,
    /// Memory for the job records kept in memory, in MB (estimated from what they hold: a finished image's record
    /// is mostly its mask keys, ~5 KB with 20-odd instances). Beyond it the oldest finished jobs are forgotten,
    /// when a job ends or another is submitted; running jobs are never forgotten. Default 256.
    #[arg(long, env = "RETAINED_JOBS_MB", default_value_t = 256)]
    pub retained_jobs_mb: usize,
    /// Largest input object, in bytes. Default 40000000 (40 MB).
    #[arg(long, env = "MAX_INPUT_BYTES", default_value_t = 40_000_000)]
    pub max_input_bytes: u64,
    /// Largest input image, in pixels (width x height after decoding). Default 50000000 (50 MP). Sides are also
    /// limited to 65535 px, JPEG's limit (the outputs are JPEGs).
    #[arg(long, env = "MAX_INPUT_PIXELS", default_value_t = 50_000_000)]
    pub max_input_pixels: u64,

    /// ADAPTER=runpod: the job-take URL (GET); `$ID` is replaced by RUNPOD_POD_ID. Set by Runpod.
    #[arg(long, env = "RUNPOD_WEBHOOK_GET_JOB")]
    pub runpod_webhook_get_job: Option<String>,
    /// ADAPTER=runpod: the result URL (POST, progress and final output); `$ID` is replaced by the Runpod job id and
    /// `$RUNPOD_POD_ID` by RUNPOD_POD_ID. Set by Runpod.
    #[arg(long, env = "RUNPOD_WEBHOOK_POST_OUTPUT")]
    pub runpod_webhook_post_output: Option<String>,
    /// ADAPTER=runpod: the heartbeat URL (GET); `$RUNPOD_POD_ID` is replaced. Unset: no heartbeat. Set by Runpod.
    #[arg(long, env = "RUNPOD_WEBHOOK_PING")]
    pub runpod_webhook_ping: Option<String>,
    /// ADAPTER=runpod: this worker's id. Set by Runpod.
    #[arg(long, env = "RUNPOD_POD_ID")]
    pub runpod_pod_id: Option<String>,
    /// ADAPTER=runpod: sent as `Authorization` on every Runpod request. Set by Runpod.
    #[arg(long, env = "RUNPOD_AI_API_KEY", hide_env_values = true)]
    pub runpod_ai_api_key: Option<String>,
    /// ADAPTER=runpod: heartbeat interval, in milliseconds. Default 10000.
    #[arg(long, env = "RUNPOD_PING_INTERVAL", default_value_t = 10_000)]
    pub runpod_ping_interval: u64,

    /// ADAPTER=queue_pull: the NATS server(s), e.g. `nats://127.0.0.1:4222` (comma-separated for several).
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<String>,
    /// ADAPTER=queue_pull: the JetStream stream of jobs, created (work-queue retention) if missing. Default
    /// palette-jobs.
    #[arg(long, env = "NATS_STREAM", default_value = "palette-jobs")]
    pub nats_stream: String,
    /// ADAPTER=queue_pull: the subject jobs are published on (the stream's subject). Default palette.jobs.
    #[arg(long, env = "NATS_SUBJECT", default_value = "palette.jobs")]
    pub nats_subject: String,
    /// ADAPTER=queue_pull: the durable pull consumer every orchestrator shares. Default orchestrators.
    #[arg(long, env = "NATS_CONSUMER", default_value = "orchestrators")]
    pub nats_consumer: String,
    /// ADAPTER=queue_pull: seconds without an ack (or in-progress ack, sent every third of this while a job runs)
    /// before JetStream redelivers a job to another orchestrator. Applied when the consumer is created. Default 60.
    #[arg(long, env = "NATS_ACK_WAIT_SEC", default_value_t = 60)]
    pub nats_ack_wait_sec: u64,
}

impl Config {
    /// Defaults for in-process tests: local storage under `storage_dir`, ephemeral addresses, metrics off, no
    /// callbacks, fast callback retries, the workspace's presets. Reads no environment variable, so tests cannot
    /// leak into each other.
    pub fn for_tests(storage_dir: impl Into<PathBuf>, segmenter_url: impl Into<String>) -> Self {
        Config {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_addr: String::new(),
            adapter: Adapter::Grpc,
            log_level: "INFO".into(),
            segmenter_url: segmenter_url.into(),
            segmenter_resolve_interval_sec: 1,
            segmenter_timeout_sec: 30,
            segmenter_attempts: 3,
            mask_cache_mb: 16,
            storage_backend: StorageBackend::Local,
            local_storage_dir: storage_dir.into(),
            r2_account_id: None,
            r2_access_key_id: None,
            r2_secret_access_key: None,
            r2_bucket_name: None,
            s3_endpoint_url: None,
            aws_endpoint_url: None,
            aws_region: "us-east-1".into(),
            storage_timeout_sec: 10,
            workers_api_url: None,
            gpu_callback_secret: None,
            callback_timeout_sec: 5,
            callback_max_attempts: 6,
            callback_base_delay_ms: 10,
            callback_max_delay_sec: 1,
            batch_concurrency: 2,
            presets_dir: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../presets")),
            max_images_per_job: 500,
            max_rules_per_job: 16,
            max_concepts_per_job: 32,
            max_retained_jobs: 10_000,
            retained_jobs_mb: 256,
            max_input_bytes: 40_000_000,
            max_input_pixels: 50_000_000,
            runpod_webhook_get_job: None,
            runpod_webhook_post_output: None,
            runpod_webhook_ping: None,
            runpod_pod_id: None,
            runpod_ai_api_key: None,
            runpod_ping_interval: 10_000,
            nats_url: None,
            nats_stream: "palette-jobs".into(),
            nats_subject: "palette.jobs".into(),
            nats_consumer: "orchestrators".into(),
            nats_ack_wait_sec: 60,
        }
    }

    pub fn callback_timeout(&self) -> Duration {
        Duration::from_secs(self.callback_timeout_sec)
    }

    /// The metrics address, or None when the exporter is switched off (empty METRICS_ADDR).
    pub fn metrics_socket(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let addr = self.metrics_addr.trim();
        if addr.is_empty() {
            return Ok(None);
        }
        addr.parse()
            .map(Some)
            .map_err(|e| ConfigError::invalid("METRICS_ADDR", addr, e))
    }
}

fn redact(secret: &Option<String>) -> &'static str {
    if secret.is_some() {
        "<redacted>"
    } else {
        "<unset>"
    }
}

/// A URL without its user info (`nats://user:pass@host` carries credentials).
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}<redacted>@{}", &url[..scheme + 3], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

// Hand-written so that secrets never reach logs or panic messages.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("grpc_addr", &self.grpc_addr)
            .field("metrics_addr", &self.metrics_addr)
            .field("adapter", &self.adapter)
            .field("log_level", &self.log_level)
            .field("segmenter_url", &self.segmenter_url)
            .field(
                "segmenter_resolve_interval_sec",
                &self.segmenter_resolve_interval_sec,
            )
            .field("segmenter_timeout_sec", &self.segmenter_timeout_sec)
            .field("segmenter_attempts", &self.segmenter_attempts)
            .field("mask_cache_mb", &self.mask_cache_mb)
            .field("storage_backend", &self.storage_backend)
            .field("local_storage_dir", &self.local_storage_dir)
            .field("r2_account_id", &self.r2_account_id)
            .field("r2_access_key_id", &self.r2_access_key_id)
            .field("r2_secret_access_key", &redact(&self.r2_secret_access_key))
            .field("r2_bucket_name", &self.r2_bucket_name)
            .field("s3_endpoint_url", &self.s3_endpoint_url)
            .field("aws_endpoint_url", &self.aws_endpoint_url)
            .field("aws_region", &self.aws_region)
            .field("storage_timeout_sec", &self.storage_timeout_sec)
            .field("workers_api_url", &self.workers_api_url)
            .field("gpu_callback_secret", &redact(&self.gpu_callback_secret))
            .field("callback_timeout_sec", &self.callback_timeout_sec)
            .field("callback_max_attempts", &self.callback_max_attempts)
            .field("callback_base_delay_ms", &self.callback_base_delay_ms)
            .field("callback_max_delay_sec", &self.callback_max_delay_sec)
            .field("batch_concurrency", &self.batch_concurrency)
            .field("presets_dir", &self.presets_dir)
            .field("max_images_per_job", &self.max_images_per_job)
            .field("max_rules_per_job", &self.max_rules_per_job)
            .field("max_concepts_per_job", &self.max_concepts_per_job)
            .field("max_retained_jobs", &self.max_retained_jobs)
            .field("retained_jobs_mb", &self.retained_jobs_mb)
            .field("max_input_bytes", &self.max_input_bytes)
            .field("max_input_pixels", &self.max_input_pixels)
            .field("runpod_webhook_get_job", &self.runpod_webhook_get_job)
            .field(
                "runpod_webhook_post_output",
                &self.runpod_webhook_post_output,
            )
            .field("runpod_webhook_ping", &self.runpod_webhook_ping)
            .field("runpod_pod_id", &self.runpod_pod_id)
            .field("runpod_ai_api_key", &redact(&self.runpod_ai_api_key))
            .field("runpod_ping_interval", &self.runpod_ping_interval)
            .field("nats_url", &self.nats_url.as_deref().map(redact_url))
            .field("nats_stream", &self.nats_stream)
            .field("nats_subject", &self.nats_subject)
            .field("nats_consumer", &self.nats_consumer)
            .field("nats_ack_wait_sec", &self.nats_ack_wait_sec)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_seed() {
        let c = Config::try_parse_from(["orchestrator-svc", "--log-level", "INFO"]).unwrap();
        assert_eq!(c.grpc_addr.port(), 50052);
        assert_eq!(c.storage_backend, StorageBackend::Local);
        assert_eq!(c.callback_timeout_sec, 30);
        assert_eq!(c.batch_concurrency, 4);
        assert_eq!(c.adapter, Adapter::Grpc);
        assert_eq!(c.segmenter_resolve_interval_sec, 10);
    }

    #[test]
    fn reserved_adapters_parse() {
        let c = Config::try_parse_from(["x", "--adapter", "queue_pull"]).unwrap();
        assert_eq!(c.adapter, Adapter::QueuePull);
        let c = Config::try_parse_from(["x", "--adapter", "RUNPOD"]).unwrap();
        assert_eq!(c.adapter, Adapter::Runpod);
    }

    #[test]
    fn debug_redacts_secrets() {
        let mut c = Config::for_tests("/tmp/x", "http://127.0.0.1:1");
        c.gpu_callback_secret = Some("supersecret123".into());
        c.r2_secret_access_key = Some("wJalrXUtnFEMI".into());
        c.runpod_ai_api_key = Some("rpa_KEY42".into());
        let shown = format!("{c:?}");
        assert!(!shown.contains("supersecret123"), "{shown}");
        assert!(!shown.contains("wJalrXUtnFEMI"), "{shown}");
        assert!(!shown.contains("rpa_KEY42"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn env_example_names_only_known_variables() {
        use clap::CommandFactory;
        let known: Vec<String> = Config::command()
            .get_arguments()
            .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
            .collect();
        let example = include_str!("../.env.example");
        let listed: Vec<&str> = example
            .lines()
            .filter(|l| !l.trim_start().starts_with('#') && l.contains('='))
            .map(|l| l.split('=').next().unwrap().trim())
            .collect();
        for name in &listed {
            assert!(
                known.iter().any(|k| k == name),
                "{name} is in .env.example but not in Config"
            );
        }
        for name in &known {
            assert!(
                listed.contains(&name.as_str()),
                "{name} is in Config but not in .env.example"
            );
        }
    }

    #[test]
    fn empty_metrics_addr_turns_metrics_off() {
        let c = Config::for_tests("/tmp/x", "http://127.0.0.1:1");
        assert_eq!(c.metrics_socket().unwrap(), None);
    }
}
