//! Benchmark client: p50/p99 latency and throughput per stage and end to end, for 1 image x N concepts at several
//! client concurrencies, against a reference measured in the same run.
//!
//! With `--engine-reference` the reference is the engine called in-process (same sessions, no gRPC, no image
//! decoding), so the printed ratio is what the service adds on top of the model (off by default: a second set of
//! sessions). `--reference-json` adds a reference measured elsewhere in the same run (the GPU script passes HF
//! PyTorch bf16 timings) and prints the ratio against it too.
//!
//!   segmenter-bench --model-dir segmenter-svc/models/sam3-tiny --concepts 1,3,8 --concurrency 1,4 --requests 40 \
//!       --engine-reference
//!   segmenter-bench --addr http://127.0.0.1:50051 ...   (an already running server; no in-process reference)
//!
//! Precision agreement (the GPU procedure's fp16 vs fp32 step): `--masks-out FILE` saves the reply to one request
//! after the timed runs; `--compare-masks FP32_FILE,FP16_FILE` compares two saved replies and loads no model.
//!
//!   segmenter-bench --model-dir M32 --masks-out fp32.pb ...; segmenter-bench --model-dir M16 --masks-out fp16.pb ...
//!   segmenter-bench --compare-masks fp32.pb,fp16.pb --json-out agreement.json

use anyhow::Context;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use palette_proto::segmenter::v1 as pb;
use segmenter_svc::Config;
use segmenter_svc::engine::{Health, Job};
use segmenter_svc::postprocess::FilterParams;
use serde_json::json;

mod mask_agreement;
mod sections;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum SendAs {
    Encoded,
    Rgb,
}

/// The request's image: the file's bytes, or its pixels decoded here (`--send rgb`).
fn image_source(bytes: &[u8], send: SendAs) -> anyhow::Result<pb::image::Source> {
    Ok(match send {
        SendAs::Encoded => pb::image::Source::Encoded(bytes.to_vec()),
        SendAs::Rgb => {
            let rgb = image::load_from_memory(bytes)
                .context("decoding --image for --send rgb")?
                .into_rgb8();
            pb::image::Source::Rgb(pb::RgbImage {
                width: rgb.width(),
                height: rgb.height(),
                data: rgb.into_raw(),
            })
        }
    })
}

#[derive(Parser, Debug)]
#[command(
    about = "Benchmark the segmenter: latency per stage, throughput, ratio against references"
)]
struct Args {
    /// A running server. Without it the bench starts one in-process on 127.0.0.1:0 from --model-dir.
    #[arg(long)]
    addr: Option<String>,
    /// Model folder for the in-process server and the engine reference.
    #[arg(long, default_value = "segmenter-svc/models/sam3-tiny")]
    model_dir: PathBuf,
    /// cpu | cuda | auto, for the in-process server.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Image to send (JPEG/PNG/WebP).
    #[arg(
        long,
        default_value = "segmenter-svc/tests/fixtures/reference/images/room_640x480.jpg"
    )]
    image: PathBuf,
    /// How the image travels: `encoded` (the file's bytes: the server decodes them) or `rgb` (decoded here, sent as
    /// raw RGB, as the orchestrator sends every photo larger than the model's square: the server neither decodes
    /// nor, at the model's size, resizes). EXIF orientation is not applied in `rgb` mode.
    #[arg(long, value_enum, default_value_t = SendAs::Encoded)]
    send: SendAs,
    /// Concept counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,3,8")]
    concepts: Vec<usize>,
    /// Client concurrencies to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    concurrency: Vec<usize>,
    /// Measured requests per configuration (after warm-up).
    #[arg(long, default_value_t = 30)]
    requests: usize,
    /// Warm-up requests per configuration (first runs at a new shape are slow).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// JSON with reference timings measured in the same run: {"name": "...", "e2e_ms": {"1": p50, "3": p50, ...}}.
    #[arg(long)]
    reference_json: Option<PathBuf>,
    /// Write the results here as JSON.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Max images per vision batch for the in-process server (0: the server's default for the provider, 1 on CUDA,
    /// 4 on the CPU).
    #[arg(long, default_value_t = 0)]
    max_batch_images: usize,
    /// Phrase counts with a static-shape decoder session of their own (the server's DECODER_STATIC_BATCHES;
    /// empty: the dynamic decoder only).
    #[arg(long, value_delimiter = ',')]
    decoder_static_batches: Vec<usize>,
    /// CUDA graphs on every fixed-shape session (the server's SEGMENTER_CUDA_GRAPHS: the one-image vision session of
    /// --vision-static, the static decoder sessions of --decoder-static-batches; needs --device cuda, at least one of
    /// those and one image per vision batch).
    #[arg(long)]
    cuda_graphs: bool,
    /// Decoder outputs preallocated in pinned host memory (the server's SEGMENTER_PINNED_OUTPUTS; needs --device
    /// cuda).
    #[arg(long)]
    pinned_outputs: bool,
    /// --pinned-outputs' preallocated decoder outputs in ordinary host memory, on any device (the CPU dry run).
    #[arg(long)]
    preallocated_outputs: bool,
    /// The fixed-address decoder I/O of --cuda-graphs without the graphs, on any device (how the CPU dry run
    /// exercises that path).
    #[arg(long)]
    fixed_decoder_io: bool,
    /// The fixed-address vision input of --cuda-graphs with --vision-static, without the graph, on any device (how
    /// the CPU dry run exercises that path).
    #[arg(long)]
    fixed_vision_io: bool,
    /// The vision session built for one image per run (the server's SEGMENTER_VISION_STATIC; needs
    /// --max-batch-images 1).
    #[arg(long)]
    vision_static: bool,
    /// cuDNN's convolution algorithm choice (the server's CUDNN_CONV_SEARCH).
    #[arg(long, value_enum, default_value_t = segmenter_svc::config::ConvSearch::Heuristic)]
    conv_search: segmenter_svc::config::ConvSearch,
    /// Convolutions in NHWC layout on CUDA (the server's CUDA_PREFER_NHWC).
    #[arg(long)]
    prefer_nhwc: bool,
    /// The fused attention kernels the CUDA provider may use (the server's CUDA_ATTENTION_KERNELS).
    #[arg(long, value_enum, default_value_t = segmenter_svc::config::AttentionKernels::Default)]
    attention_kernels: segmenter_svc::config::AttentionKernels,
    /// Inference threads with their own sessions (the server's ENGINE_INSTANCES).
    #[arg(long, default_value_t = 1)]
    engine_instances: u32,
    /// Also measure the engine called in-process (a second set of sessions, loaded after the gRPC runs): the
    /// `x engine` column.
    #[arg(long)]
    engine_reference: bool,
    /// After the gRPC runs, load the model once more with ONNX Runtime profiling on, send --profile-requests
    /// requests of --profile-concepts phrases, and write one profile per session (vision, text, decoder) here.
    #[arg(long)]
    profile_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 3)]
    profile_concepts: usize,
    #[arg(long, default_value_t = 3)]
    profile_requests: usize,
    /// Log filter for the in-process server (e.g. `warn,segmenter_svc=info` adds session build and warm-up times).
    #[arg(long, default_value = "warn")]
    log_level: String,
    /// After the timed runs, save the reply to one request of --masks-concepts phrases (every top-k instance, the
    /// semantic maps, u8 probabilities) here, for --compare-masks.
    #[arg(long)]
    masks_out: Option<PathBuf>,
    #[arg(long, default_value_t = 3)]
    masks_concepts: usize,
    /// Time the graph prefixes bench/graph_sections.py wrote to this folder (sections.json) on --device with the
    /// serving settings, at each of --concepts phrases (decoder) or one image (vision), --warmup then --requests
    /// runs each; print what each section costs and write --json-out; nothing else runs.
    #[arg(long)]
    time_sections: Option<PathBuf>,
    /// REFERENCE,OTHER: compare two replies saved by --masks-out (mask IoU, score deltas), print one line and write
    /// --json-out; nothing else runs.
    #[arg(long, value_delimiter = ',')]
    compare_masks: Vec<PathBuf>,
}

#[derive(Default, Clone)]
struct Samples {
    e2e: Vec<f64>,
    queue: Vec<f64>,
    decode: Vec<f64>,
    vision: Vec<f64>,
    text: Vec<f64>,
    decoder: Vec<f64>,
    post: Vec<f64>,
    batch: Vec<f64>,
}

fn pct(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[rank.min(v.len() - 1)]
}

fn concepts(n: usize) -> Vec<String> {
    const WORDS: [&str; 12] = [
        "wall", "floor", "sofa", "table", "chair", "lamp", "rug", "window", "plant", "ceiling",
        "curtain", "cabinet",
    ];
    (0..n)
        .map(|i| WORDS[i % WORDS.len()].to_string() + if i >= WORDS.len() { " two" } else { "" })
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        matches!(args.compare_masks.len(), 0 | 2),
        "--compare-masks takes two files, REFERENCE,OTHER"
    );
    if let [reference, other] = args.compare_masks.as_slice() {
        let agreement = mask_agreement::compare(
            &mask_agreement::load(reference)?,
            &mask_agreement::load(other)?,
        )?;
        let label = format!("{} vs {}", other.display(), reference.display());
        println!("{}", mask_agreement::line(&label, &agreement));
        if let Some(path) = &args.json_out {
            std::fs::write(path, serde_json::to_vec_pretty(&agreement)?)?;
        }
        return Ok(());
    }
    let image = std::fs::read(&args.image)
        .with_context(|| format!("reading --image {}", args.image.display()))?;
    let source = image_source(&image, args.send)?;
    let ort = std::env::var("ORT_DYLIB_PATH").context(
        "ORT_DYLIB_PATH must name libonnxruntime.so (bash .ci/setup installs one under .tools/)",
    )?;
    let mut config = Config::for_tests(args.model_dir.clone(), ort.into());
    config.device = match args.device.as_str() {
        "cuda" => segmenter_svc::Device::Cuda,
        "auto" => segmenter_svc::Device::Auto,
        _ => segmenter_svc::Device::Cpu,
    };
    // Read here, not left to the configuration's defaults: a test configuration does not read the environment.
    config.cuda_lib_dir = std::env::var_os("ORT_GPU_CUDA_LIB_DIR").map(PathBuf::from);
    config.cudnn_lib_dir = std::env::var_os("ORT_GPU_CUDNN_LIB_DIR").map(PathBuf::from);
    // Hashing 1-3 GB of graphs at every load buys nothing in a benchmark.
    config.verify_checksums = false;
    config.max_batch_images = args.max_batch_images;
    config.decoder_static_batches = args.decoder_static_batches.clone();
    config.cuda_graphs = args.cuda_graphs;
    config.fixed_decoder_io = args.fixed_decoder_io;
    config.fixed_vision_io = args.fixed_vision_io;
    config.pinned_outputs = args.pinned_outputs;
    config.vision_static = args.vision_static;
    config.cudnn_conv_search = args.conv_search;
    config.cuda_prefer_nhwc = args.prefer_nhwc;
    config.cuda_attention_kernels = args.attention_kernels;
    config.engine_instances = args.engine_instances.clamp(1, 8);
    config.preallocated_decoder_outputs = args.preallocated_outputs;
    config.log_level = args.log_level.clone();
    config.queue_capacity = 256;
    // A failed warm-up must end the bench at once: no recovery probes that would keep it NOT_SERVING-but-trying.
    config.reprobe_interval_sec = 0;
    segmenter_svc::telemetry::init_logs(&args.log_level, "text");
    if let Some(dir) = &args.time_sections {
        return sections::run(
            &config,
            dir,
            &args.concepts,
            args.warmup,
            args.requests,
            args.json_out.as_deref(),
        );
    }

    let (addr, mut server) = match &args.addr {
        Some(addr) => (addr.clone(), None),
        None => {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = format!("http://{}", listener.local_addr()?);
            let started = Instant::now();
            let shared = segmenter_svc::server::load(&config)
                .await
                .context("the in-process segmenter failed to load the model")?;
            let health = wait_warm(&shared).await?;
            println!(
                "in-process server: model loaded and warm in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(segmenter_svc::server::serve(
                config.clone(),
                shared,
                listener,
                async move {
                    let _ = stopped.await;
                },
            ));
            (addr, Some((stop, task, health)))
        }
    };
    let channel = connect_when_serving(&addr, server.as_mut().map(|(_, task, _)| task)).await?;
    let client = pb::segmenter_client::SegmenterClient::new(channel)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    let info = client
        .clone()
        .get_model_info(pb::GetModelInfoRequest {})
        .await?
        .into_inner();
    println!(
        "model {} ({}), provider {}, image {}x{} sent {:?} -> {}², {} concepts sets, concurrency {:?}, {} requests each",
        info.model_id,
        if info.random_init.is_empty() {
            "real weights"
        } else {
            "RANDOM weights"
        },
        info.execution_provider,
        image_dims(&image).0,
        image_dims(&image).1,
        args.send,
        info.image_size,
        args.concepts.len(),
        args.concurrency,
        args.requests
    );

    let external: Option<serde_json::Value> = match &args.reference_json {
        Some(p) => Some(serde_json::from_slice(&std::fs::read(p)?)?),
        None => None,
    };

    println!(
        "\n{:>8} {:>5} | {:>9} {:>9} | {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} | {:>7} {:>6} | {:>9} {:>9}",
        "concepts",
        "conc",
        "e2e p50",
        "e2e p99",
        "queue",
        "decode",
        "vision",
        "text",
        "decoder",
        "post",
        "img/s",
        "batch",
        "x engine",
        "x ext"
    );
    let mut grpc = Vec::new();
    for &n in &args.concepts {
        for &c in &args.concurrency {
            let samples = run_config(&client, &source, n, c, args.warmup, args.requests).await?;
            grpc.push((n, c, samples));
        }
    }
    if let Some(path) = &args.masks_out {
        let request = mask_agreement::request(source.clone(), concepts(args.masks_concepts));
        let reply = client.clone().segment(request).await?.into_inner();
        mask_agreement::save(path, &reply)?;
        println!(
            "reply to {} concepts saved to {}",
            args.masks_concepts,
            path.display()
        );
    }
    // The server's sessions are released before another set is loaded (the engine reference, the profile).
    if let Some((stop, task, health)) = server.take() {
        let _ = stop.send(());
        task.await??;
        wait_stopped(health).await;
    }
    let mut engine_ref = std::collections::BTreeMap::new();
    if args.engine_reference && args.addr.is_none() {
        engine_ref = engine_reference(&config, &image, &args).await?;
    }
    let mut results = Vec::new();
    for (n, c, samples) in grpc {
        {
            let wall = samples.1;
            let s = samples.0;
            let p50 = pct(&s.e2e, 50.0);
            let throughput = s.e2e.len() as f64 / wall;
            let vs_engine = engine_ref.get(&n).map(|r| p50 / r);
            let vs_ext = external
                .as_ref()
                .and_then(|e| e["e2e_ms"][n.to_string()].as_f64())
                .map(|r| p50 / r);
            let fmt = |v: Option<f64>| v.map(|v| format!("{v:.2}x")).unwrap_or_else(|| "-".into());
            println!(
                "{:>8} {:>5} | {:>9.2} {:>9.2} | {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} | {:>7.1} {:>6.2} | {:>9} {:>9}",
                n,
                c,
                p50,
                pct(&s.e2e, 99.0),
                pct(&s.queue, 50.0),
                pct(&s.decode, 50.0),
                pct(&s.vision, 50.0),
                pct(&s.text, 50.0),
                pct(&s.decoder, 50.0),
                pct(&s.post, 50.0),
                throughput,
                s.batch.iter().sum::<f64>() / s.batch.len().max(1) as f64,
                fmt(vs_engine),
                fmt(vs_ext)
            );
            results.push(json!({
                "concepts": n, "concurrency": c,
                "e2e_ms": {"p50": p50, "p99": pct(&s.e2e, 99.0)},
                "stage_p50_ms": {"queue": pct(&s.queue, 50.0), "decode": pct(&s.decode, 50.0), "vision": pct(&s.vision, 50.0),
                                  "text": pct(&s.text, 50.0), "decoder": pct(&s.decoder, 50.0), "post": pct(&s.post, 50.0)},
                "stage_p99_ms": {"vision": pct(&s.vision, 99.0), "decoder": pct(&s.decoder, 99.0)},
                "images_per_s": throughput,
                "engine_reference_p50_ms": engine_ref.get(&n),
                "ratio_vs_engine": vs_engine,
                "ratio_vs_external": vs_ext,
            }));
        }
    }
    println!(
        "\nx engine: gRPC end-to-end p50 / the in-process engine's p50 for the same work (1.00x = no service overhead).\
         \nx ext: against --reference-json ({}).",
        external
            .as_ref()
            .and_then(|e| e["name"].as_str())
            .unwrap_or("none given")
    );
    if let Some(path) = &args.json_out {
        let out = json!({"model": info.model_id, "provider": info.execution_provider, "random_init": info.random_init,
                         "reference": external, "results": results});
        std::fs::write(path, serde_json::to_vec_pretty(&out)?)?;
    }
    if let Some(dir) = &args.profile_dir {
        profile(&config, &image, &args, dir).await?;
    }
    Ok(())
}

/// Waits until the engine has warmed up: Ok when it serves, the warm-up's error when it failed.
async fn wait_warm(
    shared: &segmenter_svc::service::Shared,
) -> anyhow::Result<tokio::sync::watch::Receiver<Health>> {
    let mut health = shared.engine.health();
    let state = health
        .wait_for(|h| *h != Health::WarmingUp)
        .await
        .map(|h| h.clone())
        .map_err(|_| anyhow::anyhow!("the inference thread stopped during warm-up"))?;
    match state {
        Health::Serving => Ok(health),
        other => Err(anyhow::anyhow!(
            "the segmenter did not start serving: {other:?}"
        )),
    }
}

/// Waits until an engine whose handles were all dropped has stopped (its sessions released, profiles written).
async fn wait_stopped(mut health: tokio::sync::watch::Receiver<Health>) {
    let _ = tokio::time::timeout(
        Duration::from_secs(60),
        health.wait_for(|h| *h == Health::Stopped),
    )
    .await;
}

/// One engine job: the image pre-processed as the service does, `n` of the bench's phrases.
fn engine_job(
    shared: &segmenter_svc::service::Shared,
    image: &[u8],
    n: usize,
) -> anyhow::Result<(
    Job,
    tokio::sync::oneshot::Receiver<Result<segmenter_svc::engine::JobOutput, segmenter_svc::Error>>,
)> {
    let prepared = shared
        .preprocessor
        .from_encoded(image)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let phrases = concepts(n)
        .into_iter()
        .map(|c| {
            let t = shared.tokenizer.encode(&c).unwrap();
            (c, t)
        })
        .collect();
    let (reply, answer) = tokio::sync::oneshot::channel();
    let job = Job {
        pixels: prepared.pixels,
        image_size: (prepared.width, prepared.height),
        phrases,
        filter: FilterParams {
            threshold: 0.5,
            max_instances: 20,
            keep_semantic: false,
        },
        deadline: Instant::now() + Duration::from_secs(600),
        enqueued: Instant::now(),
        reply,
        span: tracing::Span::none(),
    };
    Ok((job, answer))
}

/// The engine in-process, fed pre-processed pixels, one request at a time: p50 per concept count.
async fn engine_reference(
    config: &Config,
    image: &[u8],
    args: &Args,
) -> anyhow::Result<std::collections::BTreeMap<usize, f64>> {
    let shared = segmenter_svc::server::load(config).await?;
    let health = wait_warm(&shared).await?;
    let mut engine_ref = std::collections::BTreeMap::new();
    for &n in &args.concepts {
        let mut times = Vec::new();
        for i in 0..args.warmup + args.requests {
            let (job, answer) = engine_job(&shared, image, n)?;
            let t = Instant::now();
            shared.engine.submit(job)?;
            answer.await?.map_err(|e| anyhow::anyhow!("{e}"))?;
            if i >= args.warmup {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        engine_ref.insert(n, pct(&times, 50.0));
    }
    drop(shared);
    wait_stopped(health).await;
    Ok(engine_ref)
}

/// Loads the model with ONNX Runtime profiling on, runs a few requests, and stops the engine so the profiles are
/// written (they include the warm-up runs; the requests' runs are the last ones in each file).
async fn profile(
    config: &Config,
    image: &[u8],
    args: &Args,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let mut config = config.clone();
    config.ort_profile_dir = Some(dir.to_path_buf());
    let shared = segmenter_svc::server::load(&config).await?;
    let health = wait_warm(&shared).await?;
    let mut times = Vec::new();
    for _ in 0..args.profile_requests {
        let (job, answer) = engine_job(&shared, image, args.profile_concepts)?;
        let t = Instant::now();
        shared.engine.submit(job)?;
        answer.await?.map_err(|e| anyhow::anyhow!("{e}"))?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    drop(shared);
    wait_stopped(health).await;
    println!(
        "\nprofile: {} requests x {} concepts with ONNX Runtime profiling on ({:?} ms each; profiling slows runs), \
         files in {}",
        args.profile_requests,
        args.profile_concepts,
        times.iter().map(|t| t.round()).collect::<Vec<_>>(),
        dir.display()
    );
    Ok(())
}

async fn run_config(
    client: &pb::segmenter_client::SegmenterClient<tonic::transport::Channel>,
    source: &pb::image::Source,
    n: usize,
    concurrency: usize,
    warmup: usize,
    requests: usize,
) -> anyhow::Result<(Samples, f64)> {
    let request = pb::SegmentRequest {
        image: Some(pb::Image {
            source: Some(source.clone()),
        }),
        concepts: concepts(n),
        ..Default::default()
    };
    for _ in 0..warmup {
        client.clone().segment(request.clone()).await?;
    }
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let mut client = client.clone();
            let request = request.clone();
            let next = next.clone();
            tokio::spawn(async move {
                let mut s = Samples::default();
                while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < requests {
                    let t = Instant::now();
                    let resp = client.segment(request.clone()).await?.into_inner();
                    s.e2e.push(t.elapsed().as_secs_f64() * 1e3);
                    let tm = resp.timings.unwrap_or_default();
                    s.queue.push(tm.queue_ms);
                    // The column's work as before the reply split it: decode, then resize (the wait for a
                    // pre-processing slot is in queue_ms).
                    s.decode.push(tm.decode_ms + tm.preprocess_ms);
                    s.vision.push(tm.vision_ms);
                    s.text.push(tm.text_ms);
                    s.decoder.push(tm.decoder_ms);
                    s.post.push(tm.postprocess_ms);
                    s.batch.push(f64::from(tm.vision_batch_size));
                }
                anyhow::Ok(s)
            })
        })
        .collect();
    let mut all = Samples::default();
    for w in workers {
        let s = w.await??;
        all.e2e.extend(s.e2e);
        all.queue.extend(s.queue);
        all.decode.extend(s.decode);
        all.vision.extend(s.vision);
        all.text.extend(s.text);
        all.decoder.extend(s.decoder);
        all.post.extend(s.post);
        all.batch.extend(s.batch);
    }
    Ok((all, started.elapsed().as_secs_f64()))
}

/// Waits until `addr` answers SERVING. With the in-process server's task, fails as soon as that task ends: a model
/// that cannot load must stop the bench with its error, not leave it polling for ten minutes (on a device session
/// that burnt the whole step's budget in silence).
async fn connect_when_serving(
    addr: &str,
    mut server: Option<&mut tokio::task::JoinHandle<anyhow::Result<()>>>,
) -> anyhow::Result<tonic::transport::Channel> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(task) = server.as_mut()
            && task.is_finished()
        {
            return match (&mut **task).await? {
                Err(e) => Err(e.context("the in-process segmenter failed to start")),
                Ok(()) => Err(anyhow::anyhow!(
                    "the in-process segmenter stopped before serving"
                )),
            };
        }
        // The orchestrator's settings: what a photo sent as raw RGB crosses with.
        if let Ok(channel) = palette_service_kit::http2::client(
            tonic::transport::Endpoint::from_shared(addr.to_string())?.tcp_nodelay(true),
        )
        .connect()
        .await
        {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
            let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
            if let Ok(r) = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                && r.into_inner().status == serving
            {
                return Ok(channel);
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{addr} did not become SERVING within 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn image_dims(bytes: &[u8]) -> (u32, u32) {
    image::load_from_memory(bytes)
        .map(|i| (i.width(), i.height()))
        .unwrap_or((0, 0))
}
