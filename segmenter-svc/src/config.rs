//! Configuration: every field from a flag or an environment variable (the seed's names where the seed had one).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};

/// Where the graphs run. `auto` picks CUDA when it registers and says so in the log; `cuda` fails loudly when it
/// cannot register: there is never a silent fallback from a requested GPU to the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Device {
    Cuda,
    Cpu,
    Auto,
}

/// cuDNN's convolution algorithm choice on CUDA (ONNX Runtime's `cudnn_conv_algo_search`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ConvSearch {
    Heuristic,
    Exhaustive,
    Default,
}

/// Which fused attention kernels ONNX Runtime's CUDA provider may pick for MultiHeadAttention (its `sdpa_kernel`
/// option; one setting per process). Every choice keeps the unfused kernel as the last resort.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AttentionKernels {
    /// ONNX Runtime's own choice: FlashAttention 2 where it applies (no attention bias), then its other fused
    /// kernels; cuDNN's off.
    Default,
    /// cuDNN's fused attention (cuDNN's flash attention) instead of FlashAttention 2, the others as by default.
    Cudnn,
    /// Only the memory-efficient (CUTLASS) kernel, which also takes an attention bias.
    Efficient,
}

#[derive(Clone, Debug, Parser)]
#[command(
    name = "segmenter-svc",
    version,
    about = "SAM3 concept segmentation over gRPC"
)]
pub struct Config {
    /// gRPC listen address (Segment, health, reflection).
    #[arg(long, env = "GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,

    /// Reflection, TLS, bearer tokens and the health-only port: the same settings on both services.
    #[command(flatten)]
    pub serve: palette_service_kit::ServeArgs,

    /// Prometheus metrics listen address; empty disables the exporter. One that cannot be listened on stops the
    /// start.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9091")]
    pub metrics_addr: String,

    /// The seed's model cache root. The model folder defaults to `$MODEL_CACHE_DIR/sam3`.
    #[arg(long, env = "MODEL_CACHE_DIR", default_value = "/models")]
    pub model_cache_dir: PathBuf,

    /// Folder with manifest.json, the three graphs and tokenizer.json (written by export_sam3.py).
    /// Default: `$MODEL_CACHE_DIR/sam3`.
    #[arg(long, env = "MODEL_DIR")]
    pub model_dir: Option<PathBuf>,

    /// Execution provider: cuda | cpu | auto.
    #[arg(long, env = "SEGMENTER_DEVICE", value_enum, default_value = "auto")]
    pub device: Device,

    /// CUDA device ordinal.
    #[arg(long, env = "CUDA_DEVICE_ID", default_value_t = 0)]
    pub cuda_device_id: i32,

    /// Path of libonnxruntime.so. A relative path is resolved against the current directory.
    #[arg(long, env = "ORT_DYLIB_PATH", default_value = "libonnxruntime.so")]
    pub ort_dylib_path: PathBuf,

    /// Folder with the CUDA 13 runtime libraries (pip layout) to preload; unset: the system loader's search path.
    #[arg(long, env = "ORT_GPU_CUDA_LIB_DIR")]
    pub cuda_lib_dir: Option<PathBuf>,

    /// Folder with the cuDNN 9 libraries (pip layout) to preload; unset: the system loader's search path.
    #[arg(long, env = "ORT_GPU_CUDNN_LIB_DIR")]
    pub cudnn_lib_dir: Option<PathBuf>,

    /// ONNX Runtime intra-op threads per session; 0 = automatic: 2 with CUDA (the GPU computes; CPU threads only
    /// run the few shape nodes), ONNX Runtime's default (one per core) on the CPU.
    #[arg(long, env = "ORT_INTRA_THREADS", default_value_t = 0)]
    pub intra_threads: usize,

    /// Let ONNX Runtime's threads spin between runs (lower latency when nothing else needs the cores).
    #[arg(long, env = "ORT_ALLOW_SPINNING", default_value_t = false, action = clap::ArgAction::Set)]
    pub ort_allow_spinning: bool,

    /// Cap on the CUDA provider's memory arena, in MiB; 0 = no cap. The arena grows by what each run asks for
    /// (`SameAsRequested`), not by powers of two. Each ONNX Runtime session has its own arena, so the cap is per
    /// session: vision, text, the decoder and each static decoder variant (DECODER_STATIC_BATCHES) may each reach it.
    #[arg(long, env = "CUDA_MEM_LIMIT_MB", default_value_t = 0)]
    pub cuda_mem_limit_mb: usize,

    /// How cuDNN picks each convolution's algorithm on CUDA: `heuristic` (its own ranking, no trial runs: a quick
    /// warm-up), `exhaustive` (every algorithm timed once per input shape, at warm-up, which on a GPU runs every
    /// vision batch size and every phrase count up to DECODER_CHUNK: a slower start, possibly faster convolutions; the decoder's mask head runs 3x3 convolutions over 288x288 maps per phrase) or `default`
    /// (one fixed algorithm). Measured by the device bench before any change of default.
    #[arg(long, env = "CUDNN_CONV_SEARCH", value_enum, default_value_t = ConvSearch::Heuristic)]
    pub cudnn_conv_search: ConvSearch,

    /// Let the CUDA provider run convolutions in NHWC layout (ONNX Runtime's `prefer_nhwc`), the layout fp16
    /// tensor-core convolution kernels work in; ONNX Runtime adds the layout transposes. Off until measured.
    #[arg(long, env = "CUDA_PREFER_NHWC", default_value_t = false, action = clap::ArgAction::Set)]
    pub cuda_prefer_nhwc: bool,

    /// Which fused attention kernels the CUDA provider may use for MultiHeadAttention (ONNX Runtime's
    /// `sdpa_kernel`): `default` (its own choice: FlashAttention 2 where it applies), `cudnn` (cuDNN's fused
    /// attention instead of FlashAttention 2) or `efficient` (the memory-efficient kernel only). The unfused kernel
    /// stays the last resort. Measured by the device bench before any change of default.
    #[arg(long, env = "CUDA_ATTENTION_KERNELS", value_enum, default_value_t = AttentionKernels::Default)]
    pub cuda_attention_kernels: AttentionKernels,

    /// Write one ONNX Runtime profile (Chrome trace JSON) per session into this folder when the engine stops.
    /// Measurement only: profiling slows every run.
    #[arg(long, env = "ORT_PROFILE_DIR")]
    pub ort_profile_dir: Option<PathBuf>,

    /// Verify the graphs' SHA-256 against the manifest at startup (a few seconds for the full-size model).
    #[arg(long, env = "VERIFY_MODEL_CHECKSUMS", default_value_t = true, action = clap::ArgAction::Set)]
    pub verify_checksums: bool,

    /// Most images one vision-encoder run takes from concurrent requests; 0 = automatic: 1 with CUDA (a batch of 4
    /// costs ~3.7x one image on an H200, so batching only adds latency), 4 on the CPU.
    #[arg(long, env = "MAX_BATCH_IMAGES", default_value_t = 0)]
    pub max_batch_images: usize,

    /// Inference threads, each with its own set of ONNX Runtime sessions, queue (QUEUE_CAPACITY each) and text
    /// cache (Triton's instance count). A request runs on the one with the least work waiting. On a GPU two
    /// instances overlap the kernel launches of concurrent requests (throughput under load; one request's latency
    /// is unchanged), at the cost of another set of sessions each: build time and device memory. 1 to 8; on the CPU
    /// one instance already uses every core. Not with SEGMENTER_CUDA_GRAPHS (startup stops: a capture is
    /// process-wide). On an H200, 2 gave 1.14x the images per second at concurrency 4 with a worse p99.
    #[arg(long, env = "ENGINE_INSTANCES", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub engine_instances: u32,

    /// How long the batcher waits for more images after the first one arrives, in milliseconds, 0 to 10000.
    #[arg(long, env = "MAX_QUEUE_DELAY_MS", default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub max_queue_delay_ms: u64,

    /// Requests waiting for the inference thread beyond which new ones get RESOURCE_EXHAUSTED, at once: before
    /// their image is decoded (requests whose client left or whose deadline passed do not count). 0 is taken as 1
    /// (one request may wait while a batch runs). As many may wait for a pre-processing slot
    /// (PREPROCESS_CONCURRENCY), each holding its image; past that too, RESOURCE_EXHAUSTED.
    #[arg(long, env = "QUEUE_CAPACITY", default_value_t = 32)]
    pub queue_capacity: usize,

    /// Phrases per decoder run. The decoder's memory grows with it (≈3.7 GB per phrase on the CPU at full size),
    /// so the CPU default is small. 0: 2 on the CPU, 8 on CUDA (the warm-up covers every count up to the chunk on
    /// CUDA; 1, 3, 8 and the chunk on the CPU).
    #[arg(long, env = "DECODER_CHUNK", default_value_t = 0)]
    pub decoder_chunk: usize,

    /// Phrase counts that get a decoder session of their own with that count fixed (comma-separated, e.g.
    /// `1,2,4,8`; empty, the default: the dynamic graph only). ONNX Runtime then folds the graph's shape
    /// arithmetic (the tiny decoder: 2091 nodes, 483 with N fixed, no Shape/If/Size left), the form CUDA graphs
    /// need. A chunk of n phrases runs on the smallest count >= n, padded by repeating its last phrase (the padded
    /// rows are dropped); chunks larger than every count run on the dynamic graph. Each count costs one more
    /// session (its build time and, on CUDA, its arena).
    #[arg(long, env = "DECODER_STATIC_BATCHES", value_delimiter = ',')]
    pub decoder_static_batches: Vec<usize>,

    /// Capture every session whose shapes are all fixed in a CUDA graph (ONNX Runtime's `enable_cuda_graph`): the
    /// one-image vision session (SEGMENTER_VISION_STATIC) and each static-shape decoder session
    /// (DECODER_STATIC_BATCHES). After its first runs, a run is one graph launch instead of hundreds (decoder) or
    /// about two thousand (vision) kernel launches. Needs the CUDA provider, at least one of those two settings and
    /// MAX_BATCH_IMAGES=1 (startup stops otherwise): the captured sessions' inputs and outputs then live at fixed
    /// device addresses (the photo is copied into one, the vision graph writes its FPN levels where the decoders read
    /// them). Off by default until measured on a GPU (docs/operations.md, "Serving settings on CUDA").
    #[arg(long, env = "SEGMENTER_CUDA_GRAPHS", default_value_t = false, action = clap::ArgAction::Set)]
    pub cuda_graphs: bool,

    /// Build the vision session for one image per run (its batch dimension fixed at 1): ONNX Runtime then knows every
    /// shape in the graph when the session is built and folds the shape arithmetic of the windowed attention
    /// (~1,600 small CPU nodes per run at full size) away. Needs MAX_BATCH_IMAGES=1 (startup stops otherwise; the
    /// CUDA default). Off by default until measured on a GPU (docs/operations.md, "Serving settings on CUDA").
    #[arg(long, env = "SEGMENTER_VISION_STATIC", default_value_t = false, action = clap::ArgAction::Set)]
    pub vision_static: bool,

    /// The decoder's mask outputs land in page-locked ("pinned") host memory the segmenter allocates once per
    /// session and phrase count, instead of memory ONNX Runtime allocates per run: the device-to-host copy of the
    /// masks is then a direct DMA rather than staged through a driver buffer. Needs the CUDA provider (startup stops
    /// otherwise); with SEGMENTER_CUDA_GRAPHS the fixed decoders' host copies are pinned too. Off by default until
    /// measured on a GPU (docs/operations.md, "Serving settings on CUDA").
    #[arg(long, env = "SEGMENTER_PINNED_OUTPUTS", default_value_t = false, action = clap::ArgAction::Set)]
    pub pinned_outputs: bool,

    /// For tests and the bench's CPU dry run: SEGMENTER_PINNED_OUTPUTS's preallocated decoder outputs in ordinary
    /// host memory, on any provider, so that path runs without a GPU. Not settable from the server's flags or the
    /// environment.
    #[arg(skip)]
    pub preallocated_decoder_outputs: bool,

    /// For tests and the bench's CPU dry run: the fixed-address decoder I/O of SEGMENTER_CUDA_GRAPHS without the
    /// CUDA graphs, on any provider (host buffers on the CPU), so its bindings and copies run without a GPU. Not
    /// settable from the server's flags or the environment.
    #[arg(skip)]
    pub fixed_decoder_io: bool,

    /// For tests and the bench's CPU dry run: the fixed-address vision input of SEGMENTER_CUDA_GRAPHS with
    /// SEGMENTER_VISION_STATIC (the photo copied into one tensor allocated once, the FPN levels written to fixed
    /// tensors), without the CUDA graph. Not settable from the server's flags or the environment.
    #[arg(skip)]
    pub fixed_vision_io: bool,

    /// Distinct phrases whose text features are kept (32 x 256 floats = 32 KB each at full size). At least
    /// MAX_CONCEPTS x MAX_BATCH_IMAGES (one batch's phrases), or startup stops.
    #[arg(long, env = "TEXT_CACHE_ENTRIES", default_value_t = 4096)]
    pub text_cache_entries: usize,

    /// Most concept phrases per request (reported in GetModelInfo: the orchestrator sends more in several calls).
    #[arg(long, env = "MAX_CONCEPTS", default_value_t = 32)]
    pub max_concepts: usize,

    /// Most characters per concept phrase (the model sees at most 30 tokens of it).
    #[arg(long, env = "MAX_CONCEPT_CHARS", default_value_t = 200)]
    pub max_concept_chars: usize,

    /// Largest decoded image, in pixels (decompression-bomb guard). 50 MP by default. Sides are also limited to
    /// 65535 px (a very long, thin image costs by its side, not its pixels).
    #[arg(long, env = "MAX_IMAGE_PIXELS", default_value_t = 50_000_000)]
    pub max_image_pixels: u64,

    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env = "MAX_MESSAGE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Default score threshold when a request does not set one (Meta's reference uses 0.5).
    #[arg(long, env = "DEFAULT_SCORE_THRESHOLD", default_value_t = 0.5, value_parser = score_threshold)]
    pub default_score_threshold: f32,

    /// Default and maximum instances returned per concept; capped at the export's `decoder_topk` (20 by default).
    #[arg(long, env = "MAX_INSTANCES_PER_CONCEPT", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_instances_per_concept: u32,

    /// Requests decoding and pre-processing images at once (CPU work before the inference thread), or making a
    /// reply's RLE masks (after it).
    #[arg(long, env = "PREPROCESS_CONCURRENCY", default_value_t = 4)]
    pub preprocess_concurrency: usize,

    /// Deadline applied when the client sends none, in seconds.
    #[arg(long, env = "DEFAULT_DEADLINE_SEC", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=MAX_DEFAULT_DEADLINE_SEC))]
    pub default_deadline_sec: u64,

    /// After a provider failure (NOT_SERVING), seconds between probes that bring the segmenter back to SERVING when
    /// the fault was transient. 0 disables them: stay NOT_SERVING until restarted.
    #[arg(long, env = "REPROBE_INTERVAL_SEC", default_value_t = 15)]
    pub reprobe_interval_sec: u64,

    /// After a failure no probe can undo (a failed warm-up, a panic of the inference thread), seconds of NOT_SERVING
    /// (the reason in health logs and in every refusal) before the process exits with an error, so that a
    /// supervisor without health checks restarts it: docker compose's `restart: unless-stopped`, a Runpod pod. A
    /// model run that has not returned for RUN_STALL_SEC plus this long ends the process too, without waiting for it
    /// (an abort). 0: never exit, stay NOT_SERVING for a liveness probe (Kubernetes restarts the pod either way). At
    /// most 86400.
    #[arg(long, env = "EXIT_AFTER_FAILURE_SEC", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub exit_after_failure_sec: u64,

    /// A model run (a batch, a recovery probe) taking longer than this many seconds turns health NOT_SERVING until
    /// it ends: a GPU fault that hangs a run instead of failing it changes nothing else, and the replica would keep
    /// its traffic while every request waits for its deadline (EXIT_AFTER_FAILURE_SEC later the process exits, or a
    /// liveness probe restarts it). 0 (default): 60
    /// on CUDA, 1800 on the CPU (a full-size batch takes minutes there); at most 86400.
    #[arg(long, env = "RUN_STALL_SEC", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub run_stall_sec: u64,

    /// How long graceful shutdown waits for in-flight requests, in seconds. Then the inference thread stops: a batch
    /// still running ends before its next decoder run (its requests answered UNAVAILABLE), a warm-up step or probe
    /// in progress is finished first, so exit can come one model run later.
    #[arg(long, env = "SHUTDOWN_GRACE_SEC", default_value_t = 30)]
    pub shutdown_grace_sec: u64,

    /// Log level or tracing filter (the seed's LOG_LEVEL: DEBUG, INFO, WARNING, ERROR).
    #[arg(long, env = "LOG_LEVEL", default_value = "INFO")]
    pub log_level: String,

    /// Log format: json | text.
    #[arg(long, env = "LOG_FORMAT", default_value = "json")]
    pub log_format: String,

    /// Test-only fault injection; not settable from flags or the environment.
    #[arg(skip)]
    pub faults: crate::engine::Faults,
}

/// DEFAULT_DEADLINE_SEC's upper bound: an hour is far beyond any request (a full-size CPU request takes minutes), and
/// a deadline of years would overflow the clock (`Instant + Duration` panics).
pub const MAX_DEFAULT_DEADLINE_SEC: u64 = 3600;

/// DEFAULT_SCORE_THRESHOLD: what a request may set, [0, 1). Refused at startup, not on every request that sends no
/// threshold of its own (as INVALID_ARGUMENT on a field its client never set).
fn score_threshold(value: &str) -> Result<f32, String> {
    let threshold: f32 = value
        .trim()
        .parse()
        .map_err(|e| format!("not a number: {e}"))?;
    if !(0.0..1.0).contains(&threshold) {
        return Err(format!(
            "{threshold} is not within [0, 1), the range a request's score_threshold may take"
        ));
    }
    Ok(threshold)
}

impl Config {
    pub fn model_dir(&self) -> PathBuf {
        self.model_dir
            .clone()
            .unwrap_or_else(|| self.model_cache_dir.join("sam3"))
    }

    pub fn max_queue_delay(&self) -> Duration {
        Duration::from_millis(self.max_queue_delay_ms)
    }

    pub fn reprobe_interval(&self) -> Option<Duration> {
        (self.reprobe_interval_sec > 0).then(|| Duration::from_secs(self.reprobe_interval_sec))
    }

    pub fn exit_after_failure(&self) -> Option<Duration> {
        (self.exit_after_failure_sec > 0).then(|| Duration::from_secs(self.exit_after_failure_sec))
    }

    pub fn default_deadline(&self) -> Duration {
        Duration::from_secs(self.default_deadline_sec)
    }

    /// A configuration for tests and tools: the defaults, then the given model folder and ONNX Runtime library, the
    /// CPU provider, port 0 and no metrics listener. Reads no environment variable.
    pub fn for_tests(model_dir: PathBuf, ort_dylib_path: PathBuf) -> Self {
        // Every flag at its default, whatever the environment says: tests must not depend on the shell they run in.
        let command = Self::command().mut_args(|arg| arg.env(None::<&str>));
        let matches = command
            .try_get_matches_from(["segmenter-svc"])
            .expect("every flag has a default or is optional");
        let mut config = Self::from_arg_matches(&matches).expect("defaults are valid");
        config.model_dir = Some(model_dir);
        config.ort_dylib_path = ort_dylib_path;
        config.device = Device::Cpu;
        config.metrics_addr = String::new();
        config.grpc_addr = "127.0.0.1:0".parse().expect("literal address");
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `flags` over the defaults, whatever the environment says.
    fn parse(flags: &[&str]) -> Result<Config, clap::Error> {
        let command = Config::command().mut_args(|arg| arg.env(None::<&str>));
        let matches = command
            .try_get_matches_from(std::iter::once("segmenter-svc").chain(flags.iter().copied()))?;
        Config::from_arg_matches(&matches)
    }

    #[test]
    fn request_defaults_out_of_range_stop_startup_with_the_setting_named() {
        for (flags, says) in [
            (&["--default-deadline-sec", "0"][..], "0 is not in 1..=3600"),
            (
                &["--default-deadline-sec", "18446744073709551615"],
                "is not in 1..=3600",
            ),
            (&["--default-score-threshold", "1"], "not within [0, 1)"),
            (&["--default-score-threshold=-0.1"], "not within [0, 1)"),
            (&["--default-score-threshold", "NaN"], "not within [0, 1)"),
            (&["--default-score-threshold", "half"], "not a number"),
            (&["--max-instances-per-concept", "0"], "0 is not in 1.."),
            // Instant + Duration would panic the inference thread at its first request.
            (
                &["--max-queue-delay-ms", "18446744073709551615"],
                "is not in 0..=10000",
            ),
        ] {
            let err = parse(flags)
                .expect_err(&format!("{flags:?} accepted"))
                .to_string();
            let flag = flags[0].split('=').next().unwrap_or_default();
            assert!(err.contains(flag), "{flags:?}: {err}");
            assert!(err.contains(says), "{flags:?}: {err}");
        }
    }

    #[test]
    fn request_defaults_within_range_are_taken() {
        let config = parse(&[
            "--default-deadline-sec",
            "3600",
            "--default-score-threshold",
            "0",
            "--max-instances-per-concept",
            "1",
        ])
        .unwrap();
        assert_eq!(config.default_deadline(), Duration::from_secs(3600));
        assert_eq!(config.default_score_threshold, 0.0);
        assert_eq!(config.max_instances_per_concept, 1);
        let defaults = parse(&[]).unwrap();
        assert_eq!(
            (
                defaults.default_deadline_sec,
                defaults.default_score_threshold,
                defaults.max_instances_per_concept
            ),
            (120, 0.5, 20)
        );
    }
}
