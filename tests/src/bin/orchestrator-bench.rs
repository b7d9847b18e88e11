//! Orchestrator benchmark: what one image costs around the model (download, decode, mask upsampling, rules, encode,
//! upload, callback) against the segmenter's own time, images per second per core, and peak memory for a large job
//! against a small one (flat memory whatever the job size is a requirement).
//!
//!   cargo run --release -p palette-e2e --bin orchestrator-bench -- --images 100
//!
//! After the 1 MP jobs, a few 12 MP phone photos (`--phone-images`, 0 skips them) go through the same way. For both
//! sizes the same photos also go through `tests/bench/pipeline_reference.py` (NumPy + OpenCV, one core, our rules'
//! maths) when a Python with numpy and opencv-python-headless is found (`--python`, default .venv-bench/bin/python),
//! and the bench prints "orchestrator vs Python pipeline per core".
//!
//! Both services run in this process (segmenter on the bundled tiny model, CPU; orchestrator on local storage), so
//! the peak-memory figures are for the pair. With the tiny model the segmenter's share is far smaller than with the
//! real one (about 70 ms per image and 3 concepts on an H200): read the ratio as "orchestration cost per image".

use std::time::Instant;

use clap::Parser;
use orchestrator_svc::config::{ItemThreads, MaskLayout};

use palette_proto::orchestrator::v1::jobs_client::JobsClient;
use palette_proto::orchestrator::v1::{JobSpec, JobState, Rule, WatchJobRequest};
use prost_types::value::Kind;

// The orchestrator binary's allocator and its settings, so the figures are the service's.
orchestrator_svc::use_jemalloc!();

#[derive(Parser)]
struct Args {
    /// Images in the large job.
    #[arg(long, default_value_t = 100)]
    images: u32,
    /// Images in the small job the large one's peak memory is compared with.
    #[arg(long, default_value_t = 10)]
    small: u32,
    #[arg(long, default_value_t = 1008)]
    width: u32,
    #[arg(long, default_value_t = 756)]
    height: u32,
    /// Orchestrator BATCH_CONCURRENCY.
    #[arg(long, default_value_t = 2)]
    batch_concurrency: u32,
    /// Further large jobs after the measured one, each printing the peak and current resident set: a memory leak or
    /// allocator creep keeps climbing round after round, a bounded process levels off.
    #[arg(long, default_value_t = 0)]
    extra_rounds: u32,
    /// Orchestrator RETAINED_JOBS_MB (finished jobs' records beyond it are forgotten).
    #[arg(long, default_value_t = 256)]
    retained_jobs_mb: usize,
    /// 12 MP (4032x3024) photos in a second job after the others; 0 skips it.
    #[arg(long, default_value_t = 3)]
    phone_images: u32,
    /// Python for the reference pipeline (needs numpy and opencv-python-headless).
    #[arg(long)]
    python: Option<std::path::PathBuf>,
    /// Copies every job's outputs here at the end (`outputs/...` as stored), for `tests/bench/compare_outputs.py`
    /// to check that a change left them within 1 code of a run before it.
    #[arg(long)]
    keep_outputs: Option<std::path::PathBuf>,
    /// Orchestrator MAX_INFLIGHT_MEGAPIXELS (unset: its default from this machine's cgroup memory limit). The
    /// memory check of issue 13: `--width 8000 --height 6000 --images 4 --small 1 --batch-concurrency 4
    /// --phone-images 0 --inflight-megapixels 100` prints the peak RSS against the budget in bytes.
    #[arg(long)]
    inflight_megapixels: Option<u64>,
    /// Orchestrator ITEM_THREADS: `one` thread per image, or `shared` (every image's loops over all cores).
    #[arg(long, value_enum, default_value_t = ItemThreads::One)]
    item_threads: ItemThreads,
    /// Orchestrator MASK_LAYOUT: `grid` (the model's masks as answered, the default) or `crop` (photo-resolution
    /// crops: the PNG encoding of every interpolated pixel).
    #[arg(long, value_enum, default_value_t = MaskLayout::Grid)]
    mask_layout: MaskLayout,
    /// The jobs' `output_format`: jpeg (the default) or png (every rule's output a PNG, written a row at a time:
    /// its encoded bytes are held while it encodes).
    #[arg(long, default_value = "jpeg")]
    output_format: String,
    /// Input photos as PNGs whose right quarter is transparent (a product on a transparent page) instead of opaque
    /// JPEGs: each photo's alpha plane is held beside its RGB, and with `--output-format png` every output keeps it.
    #[arg(long)]
    transparent: bool,
    /// Where the masks come from: `model`, the segmenter on the bundled random-weights model (soft noise over the
    /// whole frame for every concept: the largest, least compressible masks there are; issue 13's goals are
    /// measured on it), or `room`, a stand-in that is NOT a model and answers each surface of the synthetic room as
    /// one instance shaped like a real SAM3 mask (palette_e2e::room_segmenter): what the orchestrator costs on
    /// masks like a real model's.
    #[arg(long, value_enum, default_value_t = Masks::Model)]
    masks: Masks,
    /// Where the orchestrator's local storage goes (a fresh folder inside, deleted at the end). Default: /dev/shm
    /// where there is one, else the temporary folder. A job stores ~28 files per photo; on ext4 their creation
    /// (inode allocation, which scans recently deleted inodes, temp file + rename) cost 0.015-0.03 CPU-s per 1 MP
    /// photo and grew run after run as earlier runs' files were deleted: a property of the disk the bench happened
    /// to run on, not of the orchestrator, whose deployments store to S3/R2 (the PUTs' CPU is measured in
    /// orchestrator-svc/tests/storage_s3.rs). Pass a disk folder to include it.
    #[arg(long)]
    store_dir: Option<std::path::PathBuf>,
    /// The texture rule's swatch is a 1024² JPEG uploaded to `swatches/bench-linen.jpg` instead of the built-in
    /// linen: what reading, decoding and converting an uploaded swatch adds to a photo.
    #[arg(long)]
    uploaded_swatch: bool,
}

/// The uploaded swatch of `--uploaded-swatch`.
const UPLOADED_SWATCH: &str = "swatches/bench-linen.jpg";

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Masks {
    Model,
    Room,
}

/// The segmenter the bench runs: the real one on the tiny model, or the room stand-in.
enum SegmenterUnderTest {
    Model(palette_e2e::Running<anyhow::Error>),
    Room(palette_e2e::room_segmenter::RoomSegmenter),
}

impl SegmenterUnderTest {
    async fn start(masks: Masks) -> Self {
        match masks {
            Masks::Model => Self::Model(palette_e2e::start_segmenter().await),
            Masks::Room => Self::Room(palette_e2e::room_segmenter::start().await),
        }
    }

    fn url(&self) -> String {
        match self {
            Self::Model(running) => running.url(),
            Self::Room(room) => room.url.clone(),
        }
    }

    /// Mask resolution, for the Python reference's synthetic masks.
    fn mask_size(&self) -> Option<u64> {
        match self {
            Self::Model(_) => {
                let manifest: serde_json::Value = serde_json::from_slice(
                    &std::fs::read(
                        palette_e2e::repo_root()
                            .join("segmenter-svc/models/sam3-tiny/manifest.json"),
                    )
                    .ok()?,
                )
                .ok()?;
                manifest["mask_size"].as_u64()
            }
            Self::Room(_) => Some(288),
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Self::Model(_) => "tiny model on the CPU",
            Self::Room(_) => "room stand-in masks (NOT a model: one SAM-like instance per surface)",
        }
    }

    async fn stop(self) {
        match self {
            Self::Model(mut running) => running.stop().await.unwrap(),
            Self::Room(room) => room.stop().await,
        }
    }
}

/// What one measured job cost, per image.
struct Cost {
    /// CPU seconds of this process (both services) per image.
    cpu: f64,
    /// Of which inside the segmenter's own stages (the tiny model on the CPU).
    segmenter: f64,
}

/// Runs the reference pipeline on the job's photos; its seconds per image (None when it cannot run).
fn python_reference(
    args: &Args,
    photos: &std::path::Path,
    instances: u32,
    mask_size: Option<u64>,
) -> Option<f64> {
    let root = palette_e2e::repo_root();
    let python = args
        .python
        .clone()
        .unwrap_or_else(|| root.join(".venv-bench/bin/python"));
    let mask_size = mask_size?;
    let out = std::process::Command::new(&python)
        .arg(root.join("tests/bench/pipeline_reference.py"))
        .args(["--photos", &photos.display().to_string()])
        .args(["--instances", &instances.to_string()])
        .args(["--mask-size", &mask_size.to_string()])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let line = String::from_utf8_lossy(&o.stdout);
            let v: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
            println!("  python reference per image: {}", v["stages"]);
            v["seconds_per_image"].as_f64()
        }
        Ok(o) => {
            eprintln!(
                "reference pipeline failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            None
        }
        Err(e) => {
            eprintln!("reference pipeline not run ({}): {e}", python.display());
            None
        }
    }
}

/// The per-core comparison line: ours (orchestration only, and both services) against the Python pipeline.
fn print_reference(label: &str, ours: &Cost, reference: Option<f64>) {
    let orchestration = ours.cpu - ours.segmenter;
    match reference {
        Some(py) => println!(
            "{label}: orchestrator vs Python pipeline per core: {:.2}x ({:.3} CPU-s per image around the model vs \
             {py:.3} s in Python; both services {:.3} CPU-s per image = {:.2} images per CPU-second)",
            py / orchestration.max(1e-9),
            orchestration,
            ours.cpu,
            1.0 / ours.cpu.max(1e-9)
        ),
        None => println!(
            "{label}: {:.3} CPU-s per image around the model, {:.3} with the segmenter ({:.2} images per CPU-second); \
             no Python reference",
            orchestration,
            ours.cpu,
            1.0 / ours.cpu.max(1e-9)
        ),
    }
}

/// A distinct "room" per image so no mask reuse kicks in (the same synthetic photos as preview-bench); with
/// `transparent`, as a PNG whose right quarter is transparent (stored under the same `.jpg` key: the orchestrator
/// reads a photo by its bytes, as the seed's worker did).
fn photo(w: u32, h: u32, seed: u32, transparent: bool) -> Vec<u8> {
    let jpeg = palette_e2e::synthetic_room(w, h, seed);
    if !transparent {
        return jpeg;
    }
    let room = image::load_from_memory(&jpeg)
        .expect("our JPEG")
        .into_rgb8();
    let page = image::RgbaImage::from_fn(w, h, |x, y| {
        let [r, g, b] = room.get_pixel(x, y).0;
        image::Rgba([r, g, b, if x >= w / 4 * 3 { 0 } else { 255 }])
    });
    let mut png = std::io::Cursor::new(Vec::new());
    page.write_to(&mut png, image::ImageFormat::Png)
        .expect("in-memory PNG");
    png.into_inner()
}

fn rules(uploaded_swatch: bool) -> Vec<Rule> {
    let swatch = if uploaded_swatch {
        ("swatch", Kind::StringValue(UPLOADED_SWATCH.into()))
    } else {
        ("builtin", Kind::StringValue("linen".into()))
    };
    vec![
        Rule {
            rule_id: "paint".into(),
            concept: "wall".into(),
            r#type: "recolor".into(),
            params: palette_e2e::rule_params(&[("color", Kind::StringValue("#1F3A5F".into()))]),
        },
        Rule {
            rule_id: "tone".into(),
            concept: "floor".into(),
            r#type: "tone".into(),
            params: palette_e2e::rule_params(&[("warmth", Kind::NumberValue(0.3))]),
        },
        Rule {
            rule_id: "linen".into(),
            concept: "sofa".into(),
            r#type: "texture".into(),
            params: palette_e2e::rule_params(&[swatch]),
        },
    ]
}

/// A "Vm...:  123 kB" field of /proc/self/status, in bytes (0 where it cannot be read).
fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// (peak resident set, CPU seconds of this process so far).
fn process_stats() -> (u64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of /proc/self/stat; after the ")" they are at 11 and 12.
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    (status_bytes("VmHWM:"), cpu)
}

/// An unlabelled gauge's value in Prometheus text (0 when absent).
/// Bytes of image the orchestrator sent the segmenter (`orchestrator_segmenter_image_bytes_total`, every form).
fn image_bytes_sent(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("orchestrator_segmenter_image_bytes_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
        .sum()
}

fn gauge(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .find_map(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Writes a job's input photos. Called before a job's CPU time is read: making the synthetic photos (a 12 MP JPEG
/// encode each) is the bench's work, not the services'; inside the measured span it was ~10 % of the 12 MP figure.
fn write_inputs(
    storage: &std::path::Path,
    job_id: &str,
    n: u32,
    size: (u32, u32),
    transparent: bool,
) {
    let dir = storage.join(format!("inputs/bench-user/{job_id}"));
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..n {
        let bytes = photo(size.0, size.1, i, transparent);
        std::fs::write(dir.join(format!("{i}.jpg")), bytes).unwrap();
    }
}

/// Copies `from` to `to` recursively.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// Runs a job on the photos `write_inputs` stored; its wall time.
async fn run_job(url: &str, job_id: &str, n: u32, args: &Args) -> f64 {
    let mut client = JobsClient::connect(url.to_string()).await.unwrap();
    let started = Instant::now();
    client
        .submit_job(JobSpec {
            user_id: "bench-user".into(),
            job_id: job_id.into(),
            concepts: vec!["wall".into(), "floor".into(), "sofa".into()],
            rules: rules(args.uploaded_swatch),
            image_count: n,
            preset: String::new(),
            output_format: args.output_format.clone(),
        })
        .await
        .unwrap();
    let mut stream = client
        .watch_job(WatchJobRequest {
            job_id: job_id.into(),
            user_id: "bench-user".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(event) = stream.message().await.unwrap() {
        last = event.job;
    }
    let job = last.unwrap();
    assert_eq!(job.state, JobState::Done as i32);
    assert_eq!(job.completed, n, "every image completes");
    started.elapsed().as_secs_f64()
}

/// Files and bytes under `dir`, recursively (0 when it does not exist).
fn dir_usage(dir: &std::path::Path) -> (u64, u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (0, 0);
    };
    entries
        .flatten()
        .fold((0, 0), |(n, b), e| match e.metadata() {
            Ok(m) if m.is_dir() => {
                let (n2, b2) = dir_usage(&e.path());
                (n + n2, b + b2)
            }
            Ok(m) => (n + 1, b + m.len()),
            Err(_) => (n, b),
        })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // As both services' binaries do at startup (see their main.rs).
    segmenter_svc::telemetry::fix_mmap_threshold();
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    let segmenter = SegmenterUnderTest::start(args.masks).await;
    let store_parent = args.store_dir.clone().unwrap_or_else(|| {
        let shm = std::path::Path::new("/dev/shm");
        if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        }
    });
    let storage = tempfile::Builder::new()
        .prefix("orchestrator-bench-")
        .tempdir_in(&store_parent)?;
    println!("storage: {}", storage.path().display());
    let mut config = orchestrator_svc::Config::for_tests(storage.path(), segmenter.url());
    config.limits.batch_concurrency = args.batch_concurrency;
    config.limits.retained_jobs_mb = args.retained_jobs_mb;
    config.limits.presets_dir = palette_e2e::repo_root().join("presets");
    config.limits.max_inflight_megapixels = args.inflight_megapixels;
    config.limits.item_threads = args.item_threads;
    config.storage.mask_layout = args.mask_layout;
    let budget_mp = config.limits.inflight_megapixels();
    let mut orchestrator = palette_e2e::start_orchestrator(config).await;
    let url = orchestrator.url();

    let size = (args.width, args.height);
    let (idle_peak, _) = process_stats();
    if args.uploaded_swatch {
        // A 1024² fabric-like photo as a user would upload it (a 2 px weave under fine noise), as a JPEG.
        let big = image::RgbImage::from_fn(1024, 1024, |x, y| {
            let h = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503))
                .wrapping_mul(2_246_822_519)
                >> 27;
            let over = ((x / 2 + y / 2) % 2) as u8 * 18;
            let v = 180 + over + h as u8;
            image::Rgb([v, v - 10, v - 30])
        });
        let mut jpeg = std::io::Cursor::new(Vec::new());
        big.write_to(&mut jpeg, image::ImageFormat::Jpeg)?;
        let path = storage.path().join(UPLOADED_SWATCH);
        std::fs::create_dir_all(path.parent().unwrap())?;
        std::fs::write(path, jpeg.into_inner())?;
    }
    write_inputs(storage.path(), "small", args.small, size, args.transparent);
    write_inputs(storage.path(), "large", args.images, size, args.transparent);
    let (_, cpu0) = process_stats();
    let small_wall = run_job(&url, "small", args.small, &args).await;
    let (small_peak, cpu1) = process_stats();
    let before = recorder.render();
    let large_wall = run_job(&url, "large", args.images, &args).await;
    let (large_peak, cpu2) = process_stats();
    let after = recorder.render();

    let delta = |name: &str| -> Vec<(String, f64)> {
        let b = palette_e2e::stage_sums(&before, name);
        palette_e2e::stage_sums(&after, name)
            .into_iter()
            .map(|(s, v)| {
                let prev = b
                    .iter()
                    .find(|(t, _)| *t == s)
                    .map(|(_, p)| *p)
                    .unwrap_or(0.0);
                (s, v - prev)
            })
            .collect()
    };
    let n = f64::from(args.images);
    let orch = delta("orchestrator_stage_seconds");
    let stage = |name: &str| {
        orch.iter()
            .find(|(s, _)| s == name)
            .map(|(_, v)| *v)
            .unwrap_or(0.0)
    };
    let segment = stage("segment");
    // "item" is the whole item (download to callback); everything in it but the Segment call is orchestration.
    let around = stage("item") - segment;
    println!(
        "{} images of {}x{}, 3 concepts, 3 rules, BATCH_CONCURRENCY {}, {}",
        args.images,
        args.width,
        args.height,
        args.batch_concurrency,
        segmenter.label()
    );
    println!("\nper image (ms, mean over the large job; stages overlap across images in flight):");
    for (stage, secs) in &orch {
        println!("  {stage:<10} {:>8.2}", secs / n * 1e3);
    }
    let seg_own = delta("segmenter_stage_seconds");
    for (stage, secs) in &seg_own {
        println!(
            "  segmenter {stage:<8} {:>6.2}  (inside the segmenter)",
            secs / n * 1e3
        );
    }
    println!(
        "\norchestration cost / segment call: {:.2}x  ({:.1} ms around the model vs {:.1} ms waiting for it)",
        around / segment.max(1e-9),
        around / n * 1e3,
        segment / n * 1e3
    );
    let cpu = cpu2 - cpu1;
    println!(
        "throughput: {:.2} images/s wall, {:.2} images per CPU-second (per core), both services",
        n / large_wall,
        n / cpu.max(1e-9)
    );
    println!(
        "peak RSS: {:.0} MB after {} images, {:.0} MB after {} more: ratio {:.2} (1.00 = flat)",
        small_peak as f64 / 1e6,
        args.small,
        large_peak as f64 / 1e6,
        args.images,
        large_peak as f64 / small_peak.max(1) as f64
    );
    let budget_bytes = budget_mp * orchestrator_svc::config::BYTES_PER_PIXEL_IN_FLIGHT * 1_000_000;
    println!(
        "pixel budget {budget_mp} MP in flight = {:.0} MB at {} bytes per pixel; peak RSS {:.0} MB, {:.0} MB above \
         the idle pair of services ({:.0} MB): {}",
        budget_bytes as f64 / 1e6,
        orchestrator_svc::config::BYTES_PER_PIXEL_IN_FLIGHT,
        large_peak as f64 / 1e6,
        large_peak.saturating_sub(idle_peak) as f64 / 1e6,
        idle_peak as f64 / 1e6,
        if large_peak.saturating_sub(idle_peak) <= budget_bytes {
            "within the budget"
        } else {
            "OVER the budget"
        }
    );
    println!(
        "sent to the segmenter: {:.1} KB of image per image",
        (image_bytes_sent(&after) - image_bytes_sent(&before)) / 1e3 / n
    );
    // What the job leaves in storage, per image: masks are one full-resolution PNG per instance, so their encoding
    // (speed vs size) shows up here and in the "masks" stage above.
    for prefix in ["inputs", "masks", "outputs", "previews"] {
        let (files, bytes) = dir_usage(&storage.path().join(prefix));
        println!(
            "stored {prefix:<8}: {files:>5} files, {:>8.1} KB per image",
            bytes as f64 / 1e3 / f64::from(args.small + args.images)
        );
    }
    for round in 1..=args.extra_rounds {
        let job_id = format!("extra-{round}");
        write_inputs(storage.path(), &job_id, args.images, size, args.transparent);
        run_job(&url, &job_id, args.images, &args).await;
        println!(
            "extra round {round}: {} more images, peak RSS {:.0} MB, RSS now {:.0} MB, job records {:.2} MB (estimate)",
            args.images,
            status_bytes("VmHWM:") as f64 / 1e6,
            status_bytes("VmRSS:") as f64 / 1e6,
            gauge(&recorder.render(), "orchestrator_retained_job_bytes") / 1e6
        );
    }
    let model_seconds = |d: &[(String, f64)]| d.iter().map(|(_, v)| v).sum::<f64>();
    let large = Cost {
        cpu: cpu / n,
        segmenter: model_seconds(&seg_own) / n,
    };
    let instances = |job: &str| {
        let (files, _) = dir_usage(&storage.path().join(format!("masks/bench-user/{job}")));
        files as u32
    };
    let photos = storage.path().join("inputs/bench-user/large");
    let reference = python_reference(
        &args,
        &photos,
        instances("large") / args.images.max(1),
        segmenter.mask_size(),
    );
    println!();
    print_reference(
        &format!("{}x{}", args.width, args.height),
        &large,
        reference,
    );
    if args.phone_images > 0 {
        let (w, h) = (4032, 3024);
        write_inputs(
            storage.path(),
            "phone",
            args.phone_images,
            (w, h),
            args.transparent,
        );
        let before = recorder.render();
        let (_, cpu_a) = process_stats();
        run_job(&url, "phone", args.phone_images, &args).await;
        let (_, cpu_b) = process_stats();
        let after = recorder.render();
        let n = f64::from(args.phone_images);
        let seg = palette_e2e::stage_sums(&after, "segmenter_stage_seconds");
        let seg_before = palette_e2e::stage_sums(&before, "segmenter_stage_seconds");
        let phone = Cost {
            cpu: (cpu_b - cpu_a) / n,
            segmenter: (model_seconds(&seg) - model_seconds(&seg_before)) / n,
        };
        let orch_after = palette_e2e::stage_sums(&after, "orchestrator_stage_seconds");
        let orch_before = palette_e2e::stage_sums(&before, "orchestrator_stage_seconds");
        println!(
            "\n{} phone photos of {w}x{h}, per image (ms):",
            args.phone_images
        );
        for (stage, v) in &orch_after {
            let prev = orch_before
                .iter()
                .find(|(s, _)| s == stage)
                .map_or(0.0, |(_, p)| *p);
            println!("  {stage:<10} {:>8.2}", (v - prev) / n * 1e3);
        }
        let (_, bytes) = dir_usage(&storage.path().join("masks/bench-user/phone"));
        println!("stored masks: {:.1} MB per image", bytes as f64 / 1e6 / n);
        let (_, uploads) = dir_usage(&storage.path().join("inputs/bench-user/phone"));
        println!("uploads: {:.1} KB per image", uploads as f64 / 1e3 / n);
        println!(
            "sent to the segmenter: {:.1} KB of image per image",
            (image_bytes_sent(&after) - image_bytes_sent(&before)) / 1e3 / n
        );
        let photos = storage.path().join("inputs/bench-user/phone");
        let reference = python_reference(
            &args,
            &photos,
            instances("phone") / args.phone_images.max(1),
            segmenter.mask_size(),
        );
        print_reference(&format!("{w}x{h}"), &phone, reference);
    }
    if let Some(dir) = &args.keep_outputs {
        copy_tree(&storage.path().join("outputs"), dir)?;
        println!("outputs copied to {}", dir.display());
    }
    let _ = (cpu0, small_wall);
    orchestrator.stop().await.unwrap();
    segmenter.stop().await;
    Ok(())
}
