//! Process configuration: every field comes from a flag or the environment variable named beside it. The seed's
//! variable names (R2_*, WORKERS_API_URL, GPU_CALLBACK_SECRET, BATCH_CONCURRENCY, CALLBACK_TIMEOUT_SEC, LOG_LEVEL,
//! ADAPTER) are kept so an existing `.env` keeps working.
//!
//! The flags are grouped in sections (`#[command(flatten)]`), each validating itself into the settings its user
//! takes (`StorageArgs::settings`, `CallbackArgs::settings`, ...). Secrets are `Secret`s, whose `Debug` redacts, so
//! every struct here derives `Debug`.
//!
//! Not here: the OpenTelemetry variables (`OTEL_EXPORTER_OTLP_ENDPOINT` turns OTLP span export on; the other
//! standard `OTEL_EXPORTER_OTLP_*` / `OTEL_BSP_*` tune it), read by the SDK itself (`telemetry::init_from_env`), and
//! `GRPC_ADDR` as read by `orchestrator-svc healthcheck` (only its port is used, against 127.0.0.1).

mod callbacks;
mod job_store;
mod limits;
pub(crate) mod nats;
mod runpod;
mod secret;
mod seed_defaults;
mod segmenter;
mod storage;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, ValueEnum};

pub use callbacks::{CallbackArgs, CallbackSettings};
pub use job_store::{ClusterSettings, JobStoreArgs, JobStoreKind};
pub use limits::{BYTES_PER_PIXEL_IN_FLIGHT, ItemThreads, LimitArgs, default_inflight_megapixels};
pub use nats::{NatsArgs, QueueSettings, adopt_consumer_limits, max_deliver_for};
pub use runpod::{RunpodArgs, RunpodSettings};
pub use secret::{Secret, UrlWithCredentials};
pub use segmenter::{SegmenterArgs, SegmenterSecurity};
pub use storage::{MaskLayout, S3Settings, StorageArgs, StorageBackend, StorageSettings};

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
    /// A TLS file that cannot be used (the error names the variable and the file).
    #[error(transparent)]
    Tls(#[from] palette_service_kit::tls::TlsError),
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

/// How jobs reach this process. The gRPC server always runs; `runpod` also takes jobs from a Runpod serverless queue
/// (`adapters::runpod`); `queue_pull` also takes them from a NATS JetStream work queue (`adapters::queue_pull`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Adapter {
    Grpc,
    Runpod,
    #[value(name = "queue_pull")]
    QueuePull,
}

#[derive(Clone, Debug, Parser)]
#[command(
    name = "orchestrator-svc",
    version,
    about = "Jobs in, edited images and signed callbacks out."
)]
pub struct Config {
    /// gRPC listen address. Default 0.0.0.0:50052.
    #[arg(long, env = "GRPC_ADDR", default_value = "0.0.0.0:50052")]
    pub grpc_addr: SocketAddr,
    /// Reflection, TLS, bearer tokens and the health-only port: the same settings on both services.
    #[command(flatten)]
    pub serve: palette_service_kit::ServeArgs,
    /// Prometheus scrape address (`/metrics`). Default 0.0.0.0:9092; empty turns the exporter off. One that cannot
    /// be listened on stops the start.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9092")]
    pub metrics_addr: String,
    /// Job intake adapter: grpc (default; runpod when unset inside a Runpod serverless worker, i.e. with
    /// RUNPOD_WEBHOOK_GET_JOB set, as the seed defaulted to) | runpod (also a Runpod serverless queue worker; needs
    /// the RUNPOD_* variables) | queue_pull (also takes jobs from a NATS JetStream work queue; needs NATS_URL).
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
    /// Seconds from SIGTERM to exit, at most: new items stop at once, WatchJob streams end with UNAVAILABLE
    /// ("draining"), then items in flight and their callbacks get what is left of it (with JOB_STORE=memory, items
    /// still running a quarter of it before the end, at most 10 s, end FAILED with their callbacks, once the queue
    /// worker has stopped, and an eighth before it, at most 5 s, whatever the drain still waits for). Default 30; keep
    /// it under the platform's grace (Kubernetes terminationGracePeriodSeconds, compose stop_grace_period); at most
    /// 86400.
    #[arg(long, env = "SHUTDOWN_GRACE_SEC", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub shutdown_grace_sec: u64,

    #[command(flatten)]
    pub segmenter: SegmenterArgs,
    #[command(flatten)]
    pub storage: StorageArgs,
    #[command(flatten)]
    pub callbacks: CallbackArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub runpod: RunpodArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub jobs: JobStoreArgs,
}

/// What `Config::for_tests` changes from the defaults, by field name (checked by a test).
pub const TEST_OVERRIDES: &[&str] = &[
    "grpc_addr",
    "metrics_addr",
    "segmenter_url",
    "segmenter_resolve_interval_sec",
    "segmenter_timeout_sec",
    "segmenter_attempts",
    "mask_cache_mb",
    "local_storage_dir",
    "storage_timeout_sec",
    "callback_timeout_sec",
    "callback_base_delay_ms",
    "callback_max_delay_sec",
    "batch_concurrency",
    "presets_dir",
    "job_store",
];

impl Config {
    /// The configuration from the command line and environment (what `main` runs with). As the seed's worker, whose
    /// ADAPTER defaulted to runpod: with ADAPTER unset and RUNPOD_WEBHOOK_GET_JOB set (Runpod sets it in every
    /// serverless worker) the adapter is runpod, so a seed deployment relying on that default takes its jobs
    /// instead of starting as a gRPC server nobody calls while Runpod's queue waits. Likewise storage: the seed only
    /// knew R2, so with STORAGE_BACKEND unset and R2_ACCOUNT_ID set the backend is r2 (the local default would
    /// look for every input on this machine's disk and fail each item input_missing). And with ADAPTER=runpod
    /// (given or so defaulted) and JOB_STORE unset the job store is memory (`seed_defaults::job_store`).
    pub fn from_env() -> Self {
        let matches = Config::command().get_matches();
        let mut config = Config::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        config.jobs.job_store = seed_defaults::job_store(&matches, &config);
        config.adapter = seed_defaults::adapter(&matches, &config);
        config.storage.storage_backend = seed_defaults::storage(&matches, &config);
        config
    }

    /// Every flag at its default, whatever the environment says.
    pub fn defaults() -> Self {
        let command = Config::command().mut_args(|arg| arg.env(None::<&str>));
        let matches: ArgMatches = command
            .try_get_matches_from(["orchestrator-svc"])
            .expect("every flag has a default or is optional");
        Config::from_arg_matches(&matches).expect("defaults are valid")
    }

    /// Defaults for in-process tests: local storage under `storage_dir`, ephemeral addresses, metrics off, no
    /// callbacks, fast callback retries, the workspace's presets, jobs in memory only (every change is in
    /// TEST_OVERRIDES). Reads no environment variable, so tests cannot leak into each other.
    pub fn for_tests(storage_dir: impl Into<PathBuf>, segmenter_url: impl Into<String>) -> Self {
        let mut c = Config::defaults();
        c.grpc_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        c.metrics_addr = String::new();
        c.segmenter.segmenter_url = segmenter_url.into();
        c.segmenter.segmenter_resolve_interval_sec = 1;
        c.segmenter.segmenter_timeout_sec = 30;
        c.segmenter.segmenter_attempts = 3;
        c.segmenter.mask_cache_mb = 16;
        c.storage.local_storage_dir = storage_dir.into();
        c.storage.storage_timeout_sec = 10;
        c.callbacks.callback_timeout_sec = 5;
        c.callbacks.callback_base_delay_ms = 10;
        c.callbacks.callback_max_delay_sec = 1;
        c.limits.batch_concurrency = 2;
        c.limits.presets_dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../presets"));
        c.jobs.job_store = JobStoreKind::Memory;
        c
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

/// The end of the grace period kept for results: items nothing resumes are ended this long before it (their
/// callbacks go out meanwhile), and the Runpod adapter posts its job's result by then. A quarter of it, at most 10 s.
pub fn results_margin(grace: std::time::Duration) -> std::time::Duration {
    (grace / 4).min(std::time::Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_seed() {
        let c = Config::try_parse_from(["orchestrator-svc", "--log-level", "INFO"]).unwrap();
        assert_eq!(c.grpc_addr.port(), 50052);
        assert_eq!(c.storage.storage_backend, StorageBackend::Local);
        assert_eq!(c.callbacks.callback_timeout_sec, 30);
        assert_eq!(c.limits.batch_concurrency, 4);
        assert_eq!(c.adapter, Adapter::Grpc);
        assert_eq!(c.segmenter.segmenter_resolve_interval_sec, 10);
    }

    #[test]
    fn the_pixel_limit_stays_where_32_bit_pixel_indices_hold() {
        let parse = |v: &str| Config::try_parse_from(["x", "--max-input-pixels", v]);
        assert!(parse("1000000000").is_ok());
        assert!(parse("1000000001").is_err());
        assert!(parse("0").is_err());
    }

    #[test]
    fn settings_that_would_break_every_request_are_refused_at_startup() {
        for (flag, value) in [
            ("--max-retained-jobs", "0"),
            ("--retained-jobs-mb", "0"),
            ("--max-images-per-job", "0"),
            ("--max-rules-per-job", "0"),
            ("--max-concepts-per-job", "0"),
            ("--max-input-bytes", "0"),
            ("--callback-base-delay-ms", "0"),
            ("--callback-max-delay-sec", "0"),
            ("--segmenter-timeout-sec", "0"),
            // tonic panics encoding a grpc-timeout this large; Instant + Duration overflows on the others.
            ("--segmenter-timeout-sec", "400000000000"),
            ("--shutdown-grace-sec", "9000000000000000000"),
            ("--segmenter-resolve-interval-sec", "9000000000000000000"),
            ("--segmenter-attempts", "0"),
            ("--storage-timeout-sec", "0"),
        ] {
            assert!(
                Config::try_parse_from(["x", flag, value]).is_err(),
                "{flag} {value} was accepted"
            );
        }
        let zero_means_off = ["--segmenter-resolve-interval-sec", "--shutdown-grace-sec"];
        for flag in zero_means_off {
            assert!(Config::try_parse_from(["x", flag, "0"]).is_ok(), "{flag} 0");
        }
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
        c.callbacks.gpu_callback_secret = Some("supersecret123".into());
        c.callbacks.workers_api_url =
            Some("https://cbuser:cbPa55@api.example.invalid/?t=cbT0k".into());
        c.storage.r2_secret_access_key = Some("wJalrXUtnFEMI".into());
        c.runpod.runpod_ai_api_key = Some("rpa_KEY42".into());
        c.segmenter.segmenter_token = Some("segmenter-token-0123456789".into());
        c.serve.auth_tokens = Some("orchestrator-token-0123456789".into());
        let shown = format!("{c:?}");
        assert!(!shown.contains("supersecret123"), "{shown}");
        assert!(!shown.contains("wJalrXUtnFEMI"), "{shown}");
        assert!(!shown.contains("rpa_KEY42"), "{shown}");
        assert!(!shown.contains("token-0123456789"), "{shown}");
        assert!(
            !shown.contains("cbPa55") && !shown.contains("cbT0k"),
            "{shown}"
        );
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn env_example_names_only_known_variables() {
        use clap::CommandFactory;
        let known: Vec<String> = Config::command()
            .get_arguments()
            .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
            .collect();
        let example = include_str!("../../.env.example");
        let set: Vec<&str> = example
            .lines()
            .filter(|l| !l.trim_start().starts_with('#') && l.contains('='))
            .collect();
        // Loaded as an env file, an empty value is a value: a path or a number set to "" refuses to start. Optional
        // settings without a default are listed commented out, as `# NAME=`.
        for line in &set {
            assert!(!line.trim_end().ends_with('='), "{line}: comment it out");
        }
        let unset = example.lines().filter_map(|l| {
            let name = l.strip_prefix("# ")?.strip_suffix('=')?;
            name.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                .then_some(name)
        });
        let listed: Vec<&str> = set
            .iter()
            .map(|l| l.split('=').next().unwrap().trim())
            .chain(unset)
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

    #[test]
    fn for_tests_differs_from_the_defaults_only_where_it_says() {
        // `{:#?}` puts every field on its own line: a differing line names a field that for_tests changed.
        let defaults = format!("{:#?}", Config::defaults());
        let tests = format!("{:#?}", Config::for_tests("/tmp/x", "http://127.0.0.1:1"));
        let field = |line: &str| line.trim().split(':').next().unwrap_or("").to_string();
        let changed: Vec<String> = defaults
            .lines()
            .zip(tests.lines())
            .filter(|(d, t)| d != t)
            .map(|(d, _)| field(d))
            .collect();
        assert_eq!(defaults.lines().count(), tests.lines().count());
        assert_eq!(
            changed, TEST_OVERRIDES,
            "update TEST_OVERRIDES and the doc of for_tests"
        );
    }
}
