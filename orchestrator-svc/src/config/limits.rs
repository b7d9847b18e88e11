//! How much work the process takes on: images in flight, jobs and their size, inputs, retained records; and the
//! presets jobs may name.

use std::path::PathBuf;

use clap::Args;

#[derive(Clone, Debug, Args)]
pub struct LimitArgs {
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
    /// Largest input object (photos and uploaded swatches), in bytes, checked from its Content-Length before the
    /// body is read and again while reading. Default 40000000 (40 MB).
    #[arg(long, env = "MAX_INPUT_BYTES", default_value_t = 40_000_000)]
    pub max_input_bytes: u64,
    /// Memory for PreviewEdit's cache (photos, masks and rule regions at preview size), in MiB. Default 256.
    #[arg(long, env = "PREVIEW_CACHE_MB", default_value_t = 256)]
    pub preview_cache_mb: usize,
    /// Largest input image, in pixels (width x height after decoding). Default 50000000 (50 MP). Sides are also
    /// limited to 65535 px, JPEG's limit (the outputs are JPEGs).
    #[arg(long, env = "MAX_INPUT_PIXELS", default_value_t = 50_000_000)]
    pub max_input_pixels: u64,
}
