//! PreviewEdit benchmark: latency of one recolour preview (1024 px, JPEG, through gRPC) cold (photo and masks read
//! from storage and decoded) and warm (another colour on the same wall), from a 1 MP and a 12 MP source photo,
//! against an EditJob of the same photo and rule measured in the same run.
//!
//!   cargo build --release -p palette-e2e --bin preview-bench
//!   RAYON_NUM_THREADS=1 taskset -c 1 target/release/preview-bench
//!
//! Goals (issue 14, one core): warm 1 MP p50 <= 15 ms; cold <= 60 ms from 1 MP, <= 200 ms from 12 MP. Both services
//! run in this process (segmenter on the bundled tiny model for the source jobs); the cold figures come from a
//! second orchestrator on the same storage with PREVIEW_CACHE_MB=0, so every one of its previews is cold. CPU
//! milliseconds per preview (this process, all threads) are printed next to the wall times: on a loaded machine
//! they are the steadier figure.

use std::time::Instant;

use clap::Parser;
use metrics_exporter_prometheus::PrometheusHandle;
use palette_proto::orchestrator::v1::jobs_client::JobsClient;
use palette_proto::orchestrator::v1::{
    EditJobRequest, GetJobRequest, JobSpec, JobState, PreviewEditRequest, Rule,
};
use prost_types::value::Kind;
use tonic::transport::Channel;

const USER: &str = "bench-user";
const STAGES: &str = "orchestrator_preview_stage_seconds";

// The orchestrator binary's allocator and its settings, so the figures are the service's.
orchestrator_svc::use_jemalloc!();

#[derive(Parser)]
struct Args {
    /// Measured previews per configuration.
    #[arg(long, default_value_t = 30)]
    requests: usize,
    /// Cold previews from the 12 MP photo (each decodes 12 MP).
    #[arg(long, default_value_t = 8)]
    cold_12mp: usize,
    #[arg(long, default_value_t = 1024)]
    max_side: u32,
}

fn paint(color: &str) -> Rule {
    Rule {
        rule_id: "paint".into(),
        concept: "wall".into(),
        r#type: "recolor".into(),
        params: palette_e2e::rule_params(&[("color", Kind::StringValue(color.into()))]),
    }
}

/// A distinct colour per request, so nothing but the region can be reused.
fn colour(i: usize) -> String {
    format!(
        "#{:02X}{:02X}{:02X}",
        40 + (i * 37) % 200,
        60 + (i * 53) % 180,
        90 + (i * 29) % 160
    )
}

struct Timing {
    p50_ms: f64,
    p99_ms: f64,
    cpu_ms: f64,
    /// Milliseconds per preview in each stage the orchestrator timed (`orchestrator_preview_stage_seconds`).
    stages: Vec<(String, f64)>,
}

async fn previews(
    client: &mut JobsClient<Channel>,
    metrics: &PrometheusHandle,
    job_id: &str,
    n: usize,
    side: u32,
) -> Timing {
    let mut wall = Vec::with_capacity(n);
    let before = palette_e2e::stage_sums(&metrics.render(), STAGES);
    let cpu0 = palette_e2e::process_cpu_seconds();
    for i in 0..n {
        let started = Instant::now();
        let answer = client
            .preview_edit(PreviewEditRequest {
                user_id: USER.into(),
                job_id: job_id.into(),
                idx: 0,
                rules: vec![paint(&colour(i))],
                preset: String::new(),
                max_side: side,
                format: String::new(),
            })
            .await
            .expect("preview")
            .into_inner();
        wall.push(started.elapsed().as_secs_f64() * 1e3);
        assert!(answer.rules[0].applied && !answer.image.is_empty());
    }
    let cpu_ms = (palette_e2e::process_cpu_seconds() - cpu0) / n as f64 * 1e3;
    let stages = palette_e2e::stage_sums(&metrics.render(), STAGES)
        .into_iter()
        .map(|(stage, sum)| {
            let prev = before
                .iter()
                .find(|(s, _)| *s == stage)
                .map_or(0.0, |b| b.1);
            (stage, (sum - prev) / n as f64 * 1e3)
        })
        .filter(|(_, ms)| *ms > 0.0)
        .collect();
    wall.sort_by(f64::total_cmp);
    let at = |q: f64| wall[((wall.len() as f64 - 1.0) * q).round() as usize];
    Timing {
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        cpu_ms,
        stages,
    }
}

/// Where a preview's time went, as the orchestrator timed it (wall ms per preview; the rest is gRPC and storage).
fn print_stages(t: &Timing) {
    let stages: Vec<String> = t
        .stages
        .iter()
        .map(|(s, ms)| format!("{s} {ms:.1}"))
        .collect();
    println!("{:<26} {}", "  stages (ms each)", stages.join(", "));
}

/// Seconds from EditJob to its one photo done: the job path for the same photo and rule.
async fn edit_job(client: &mut JobsClient<Channel>, source: &str, n: usize) -> f64 {
    let mut total = 0.0;
    for i in 0..n {
        let job_id = format!("{source}-edit-{i}");
        let started = Instant::now();
        client
            .edit_job(EditJobRequest {
                user_id: USER.into(),
                job_id: job_id.clone(),
                source_job_id: source.into(),
                rules: vec![paint(&colour(i))],
                preset: String::new(),
                output_format: String::new(),
            })
            .await
            .expect("edit");
        loop {
            let job = client
                .get_job(GetJobRequest {
                    job_id: job_id.clone(),
                    user_id: USER.into(),
                })
                .await
                .unwrap()
                .into_inner();
            if job.state == JobState::Done as i32 {
                assert_eq!(job.completed, 1, "{job:?}");
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        total += started.elapsed().as_secs_f64();
    }
    total / n as f64
}

async fn source_job(
    client: &mut JobsClient<Channel>,
    storage: &std::path::Path,
    job_id: &str,
    size: (u32, u32),
) {
    let dir = storage.join(format!("inputs/{USER}/{job_id}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("0.jpg"),
        palette_e2e::synthetic_room(size.0, size.1, 7),
    )
    .unwrap();
    client
        .submit_job(JobSpec {
            user_id: USER.into(),
            job_id: job_id.into(),
            concepts: vec!["wall".into(), "floor".into(), "sofa".into()],
            rules: vec![],
            image_count: 1,
            preset: String::new(),
            output_format: String::new(),
        })
        .await
        .unwrap();
    loop {
        let job = client
            .get_job(GetJobRequest {
                job_id: job_id.into(),
                user_id: USER.into(),
            })
            .await
            .unwrap()
            .into_inner();
        if job.state == JobState::Done as i32 {
            assert_eq!(job.completed, 1, "{job:?}");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    segmenter_svc::telemetry::fix_mmap_threshold();
    let rayon = std::env::var("RAYON_NUM_THREADS").unwrap_or_default();
    if rayon != "1" {
        eprintln!(
            "note: RAYON_NUM_THREADS is {rayon:?}, not 1: the rules may use more than one core"
        );
    }
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    let mut segmenter = palette_e2e::start_segmenter().await;
    let storage = tempfile::tempdir()?;
    let config = |cache_mb: usize| {
        let mut c = orchestrator_svc::Config::for_tests(storage.path(), segmenter.url());
        c.limits.preview_cache_mb = cache_mb;
        c
    };
    let mut warm = palette_e2e::start_orchestrator(config(256)).await;
    let mut cold = palette_e2e::start_orchestrator(config(0)).await;
    let mut client = JobsClient::connect(warm.url()).await?;
    let mut cold_client = JobsClient::connect(cold.url()).await?;

    println!(
        "PreviewEdit, recolour of the wall, {} px JPEG through gRPC (RAYON_NUM_THREADS={rayon:?})",
        args.max_side
    );
    println!(
        "{:<26} {:>9} {:>9} {:>12}",
        "configuration", "p50 ms", "p99 ms", "CPU ms/each"
    );
    for (label, size, cold_n) in [
        ("1 MP (1152x864)", (1152, 864), args.requests),
        ("12 MP (4032x3024)", (4032, 3024), args.cold_12mp),
    ] {
        let job_id = format!("src-{}", size.0);
        source_job(&mut client, storage.path(), &job_id, size).await;
        let c = previews(&mut cold_client, &metrics, &job_id, cold_n, args.max_side).await;
        println!(
            "{:<26} {:>9.1} {:>9.1} {:>12.1}",
            format!("{label} cold"),
            c.p50_ms,
            c.p99_ms,
            c.cpu_ms
        );
        print_stages(&c);
        previews(&mut client, &metrics, &job_id, 1, args.max_side).await; // fills the cache
        let w = previews(&mut client, &metrics, &job_id, args.requests, args.max_side).await;
        println!(
            "{:<26} {:>9.1} {:>9.1} {:>12.1}",
            format!("{label} warm"),
            w.p50_ms,
            w.p99_ms,
            w.cpu_ms
        );
        print_stages(&w);
        let edit = edit_job(&mut client, &job_id, 3).await;
        println!(
            "{:<26} {:>9.1} {:>9} {:>12}   warm preview {:.1}x faster than an EditJob of the same photo",
            format!("{label} EditJob (ref)"),
            edit * 1e3,
            "-",
            "-",
            edit * 1e3 / w.p50_ms
        );
    }
    println!(
        "\ngoals (one core): warm 1 MP p50 <= 15 ms; cold <= 60 ms from 1 MP, <= 200 ms from 12 MP"
    );
    cold.stop().await?;
    warm.stop().await?;
    segmenter.stop().await?;
    Ok(())
}
