//! Benchmark client: p50/p99 latency and throughput per stage and end to end, for 1 image x N concepts at several
//! client concurrencies, against a reference measured in the same run.
//!
//! The reference is the engine called in-process (same sessions, no gRPC, no image decoding), so the printed ratio
//! is what the service adds on top of the model. `--reference-json` adds a second reference measured elsewhere in the
//! same run (the GPU script passes HF PyTorch bf16 timings) and prints the ratio against it too.
//!
//!   segmenter-bench --model-dir segmenter-svc/models/sam3-tiny --concepts 1,3,8 --concurrency 1,4 --requests 40
//!   segmenter-bench --addr http://127.0.0.1:50051 ...   (an already running server; no in-process reference)

use anyhow::Context;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use palette_proto::segmenter::v1 as pb;
use segmenter_svc::Config;
use segmenter_svc::engine::{Health, Job};
use segmenter_svc::postprocess::FilterParams;
use serde_json::json;

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
    /// Max images per vision batch for the in-process server.
    #[arg(long, default_value_t = 4)]
    max_batch_images: usize,
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
    let image = std::fs::read(&args.image)
        .with_context(|| format!("reading --image {}", args.image.display()))?;
    let ort = std::env::var("ORT_DYLIB_PATH").context(
        "ORT_DYLIB_PATH must name libonnxruntime.so (bash .ci/setup installs one under .tools/)",
    )?;
    let mut config = Config::for_tests(args.model_dir.clone(), ort.into());
    config.device = match args.device.as_str() {
        "cuda" => segmenter_svc::Device::Cuda,
        "auto" => segmenter_svc::Device::Auto,
        _ => segmenter_svc::Device::Cpu,
    };
    config.max_batch_images = args.max_batch_images;
    config.log_level = "warn".into();
    config.queue_capacity = 256;
    segmenter_svc::telemetry::init_logs("warn", "text");

    let (addr, mut server) = match &args.addr {
        Some(addr) => (addr.clone(), None),
        None => {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = format!("http://{}", listener.local_addr()?);
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(segmenter_svc::run(config.clone(), listener, async move {
                let _ = stopped.await;
            }));
            (addr, Some((stop, task)))
        }
    };
    let channel = connect_when_serving(&addr, server.as_mut().map(|(_, task)| task)).await?;
    let client = pb::segmenter_client::SegmenterClient::new(channel)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    let info = client
        .clone()
        .get_model_info(pb::GetModelInfoRequest {})
        .await?
        .into_inner();
    println!(
        "model {} ({}), provider {}, image {}x{} -> {}², {} concepts sets, concurrency {:?}, {} requests each",
        info.model_id,
        if info.random_init.is_empty() {
            "real weights"
        } else {
            "RANDOM weights"
        },
        info.execution_provider,
        image_dims(&image).0,
        image_dims(&image).1,
        info.image_size,
        args.concepts.len(),
        args.concurrency,
        args.requests
    );

    // Reference: the engine in-process, fed pre-processed pixels, one request at a time.
    let mut engine_ref = std::collections::BTreeMap::new();
    if args.addr.is_none() {
        let shared = segmenter_svc::server::load(&config).await?;
        shared
            .engine
            .health()
            .wait_for(|h| *h == Health::Serving)
            .await?;
        for &n in &args.concepts {
            let mut times = Vec::new();
            for i in 0..args.warmup + args.requests {
                let prepared = shared
                    .preprocessor
                    .from_encoded(&image)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                let phrases = concepts(n)
                    .into_iter()
                    .map(|c| {
                        let t = shared.tokenizer.encode(&c).unwrap();
                        (c, t)
                    })
                    .collect();
                let (reply, answer) = tokio::sync::oneshot::channel();
                let t = Instant::now();
                shared.engine.submit(Job {
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
                })?;
                answer.await?.map_err(|e| anyhow::anyhow!("{e}"))?;
                if i >= args.warmup {
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            engine_ref.insert(n, pct(&times, 50.0));
        }
    }
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
    let mut results = Vec::new();
    for &n in &args.concepts {
        for &c in &args.concurrency {
            let samples = run_config(&client, &image, n, c, args.warmup, args.requests).await?;
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
    if let Some((stop, task)) = server {
        let _ = stop.send(());
        task.await??;
    }
    Ok(())
}

async fn run_config(
    client: &pb::segmenter_client::SegmenterClient<tonic::transport::Channel>,
    image: &[u8],
    n: usize,
    concurrency: usize,
    warmup: usize,
    requests: usize,
) -> anyhow::Result<(Samples, f64)> {
    let request = pb::SegmentRequest {
        image: Some(pb::Image {
            source: Some(pb::image::Source::Encoded(image.to_vec())),
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
                    s.decode.push(tm.decode_ms);
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
        if let Ok(channel) = tonic::transport::Endpoint::from_shared(addr.to_string())?
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
