//! Where the segmenter is and how it is called.

use clap::Args;

#[derive(Clone, Debug, Args)]
pub struct SegmenterArgs {
    /// Segmenter gRPC endpoint(s): comma-separated `http://host:port` or `dns:///host:port`. A host name is
    /// resolved to ALL its addresses (a Kubernetes headless Service gives one per ready Pod) and calls are balanced
    /// over them; a replica that stops answering or reports NOT_SERVING on grpc.health.v1 is left out until a
    /// later resolver round finds it SERVING again. Default http://127.0.0.1:50051.
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
}
