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
    /// Most images (imageCount) per job, 1 to 100000. Default 500.
    #[arg(long, env = "MAX_IMAGES_PER_JOB", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_images_per_job: u32,
    /// Most rules per job, 1 to 1000. Default 16.
    #[arg(long, env = "MAX_RULES_PER_JOB", default_value_t = 16, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    pub max_rules_per_job: usize,
    /// Most concepts segmented per job (listed, rule and occluder concepts together). Default 32: the segmenter's
    /// own limit (MAX_CONCEPTS; a segmenter that takes fewer gets them in several calls), and the interior preset
    /// alone lists 17.
    #[arg(long, env = "MAX_CONCEPTS_PER_JOB", default_value_t = 32, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    pub max_concepts_per_job: usize,
    /// Jobs kept in memory (for GetJob, WatchJob and idempotency); beyond it the oldest finished ones whose
    /// callbacks are settled are forgotten, and when there is none SubmitJob answers RESOURCE_EXHAUSTED. Default
    /// 10000; at least 1.
    #[arg(long, env = "MAX_RETAINED_JOBS", default_value_t = 10_000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_retained_jobs: usize,
    /// Memory for the job records kept in memory, in MB (estimated from what they hold: a finished image's record
    /// is mostly its mask keys, ~5 KB with 20-odd instances). Beyond it the oldest finished jobs are forgotten,
    /// when a job ends or another is submitted; running jobs, and finished ones with callbacks still being retried,
    /// are never forgotten. Default 256.
    #[arg(long, env = "RETAINED_JOBS_MB", default_value_t = 256, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub retained_jobs_mb: usize,
    /// Largest input object (photos and uploaded swatches), in bytes, checked from its Content-Length before the
    /// body is read and again while reading. Default 40000000 (40 MB).
    #[arg(long, env = "MAX_INPUT_BYTES", default_value_t = 40_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_input_bytes: u64,
    /// Memory for PreviewEdit's cache (photos, masks and rule regions at preview size), in MiB. Default 256.
    #[arg(long, env = "PREVIEW_CACHE_MB", default_value_t = 256)]
    pub preview_cache_mb: usize,
    /// Largest input image, in pixels (width x height after decoding). Default 50000000 (50 MP), at most
    /// 1000000000 (the pixel code indexes a photo's pixels in 32 bits). Sides are also limited to 65535 px, JPEG's
    /// limit (the outputs are JPEGs).
    #[arg(long, env = "MAX_INPUT_PIXELS", default_value_t = 50_000_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    pub max_input_pixels: u64,
    /// Megapixels of photos in flight over the whole process: an image starts once its pixels fit (BATCH_CONCURRENCY
    /// still caps the count); one larger than the whole budget runs alone. A job with a remove in fill mode counts four
    /// times its photos' pixels, one whose rules use more than 8 concepts 1/24 more per concept past 8; PreviewEdit's
    /// decodes, unions, renders and texture swatches count too. Unset: half the container's memory limit
    /// (cgroup v2 memory.max) at 24 bytes per pixel (4 GiB: 89 MP), or 200 MP where no limit is set.
    #[arg(long, env = "MAX_INFLIGHT_MEGAPIXELS", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_inflight_megapixels: Option<u64>,
    /// How an image's CPU work (mask upsampling, regions, rules, encoding) uses the cores: `one` runs each image on
    /// one thread and lets the images in flight share the cores; `shared` splits every image's loops over a pool of
    /// all cores. Default one (fewer CPU-seconds per image; see docs/operations.md, sizing).
    #[arg(long, env = "ITEM_THREADS", value_enum, default_value_t = ItemThreads::One)]
    pub item_threads: ItemThreads,
}

/// See `LimitArgs::item_threads`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ItemThreads {
    One,
    Shared,
}

/// What one image in flight holds, per pixel of its photo, at its peak: the decoded photo (3 bytes), a union plane
/// per rule concept (1 each), a rule's working planes over the region's box and its edited copy (3). Measured with
/// orchestrator-bench on 48 MP photos (see docs/operations.md, sizing); rounded up.
pub const BYTES_PER_PIXEL_IN_FLIGHT: u64 = 24;

/// Without a memory limit: 200 MP (four 48 MP photos at once, ~4.8 GB at `BYTES_PER_PIXEL_IN_FLIGHT`).
const UNLIMITED_MEGAPIXELS: u64 = 200;

/// The default budget of megapixels in flight for a container limited to `memory_max` bytes (None: no limit): half
/// of it for images, the rest for the process itself (runtime, mask cache, retained jobs, encoded bodies).
pub fn default_inflight_megapixels(memory_max: Option<u64>) -> u64 {
    match memory_max {
        Some(bytes) => (bytes / 2 / BYTES_PER_PIXEL_IN_FLIGHT / 1_000_000).max(1),
        None => UNLIMITED_MEGAPIXELS,
    }
}

/// The cgroup v2 memory limit of this process's container (`/sys/fs/cgroup/memory.max`), None when unlimited
/// ("max") or not readable (not in a cgroup v2 container, other OS).
pub fn cgroup_memory_max() -> Option<u64> {
    std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()?
        .trim()
        .parse()
        .ok()
}

impl LimitArgs {
    /// MAX_INFLIGHT_MEGAPIXELS, or its default from the container's memory limit.
    pub fn inflight_megapixels(&self) -> u64 {
        self.max_inflight_megapixels
            .unwrap_or_else(|| default_inflight_megapixels(cgroup_memory_max()))
    }
}
