//! Benchmark: every rule on a synthetic room at 1008² and 12 MP, one thread and all cores, against the NumPy/OpenCV
//! reference (bench/reference.py) run in the same process tree, plus the machine's memcpy bandwidth.
//!
//! cargo run --release -p palette-rules --example bench_rules [-- --quick] [--python PATH] [--full-fill]
//! --full-fill also times the NumPy fill port at 12 MP (about 5 extra minutes).
//! The reference needs a venv with numpy + opencv-python-headless (default: <repo>/.venv-bench/bin/python);
//! without one, the Rust numbers are still printed.

use palette_rules::rule::{Rule, parse_rule};
use palette_rules::{GrayImage, RegionParams, RgbImage, apply, color, region, swatch, synth};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Bytes a rule moves per pixel: photo clone (read 3 + write 3), statistics pass (3 + alpha 1), blend pass
/// (3 + 1 read, 3 written) = 17; a cut-out reads 4 and writes 4. A lower bound: tables and cache misses are extra.
fn bytes_per_px(rule: &str) -> f64 {
    if rule == "cutout" { 8.0 } else { 17.0 }
}

fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// memcpy bandwidth (read + write bytes per second) on a buffer far larger than the caches.
fn memcpy_gbps(threads: usize) -> f64 {
    let n = 256 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let chunk = n / threads;
    let secs = best_of(5, || {
        std::thread::scope(|s| {
            for (d, c) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
                s.spawn(move || d.copy_from_slice(c));
            }
        });
    });
    std::hint::black_box(&dst);
    2.0 * n as f64 / secs / 1e9
}

fn rules() -> Vec<(&'static str, Rule)> {
    let p = |t: &str, v: serde_json::Value| parse_rule(t, v.as_object().unwrap(), None).unwrap();
    vec![
        ("recolor", p("recolor", json!({"color": "#1f3a5f"}))),
        (
            "tone",
            p(
                "tone",
                json!({"brightness": 0.3, "contrast": 0.2, "saturation": 0.1, "warmth": 0.5}),
            ),
        ),
        (
            "texture",
            p("texture", json!({"builtin": "linen", "rotation": 20})),
        ),
        ("cutout", p("remove", json!({"mode": "cutout"}))),
        ("fill", p("remove", json!({"mode": "fill"}))),
    ]
}

struct Scene {
    photo: RgbImage,
    wall: GrayImage,
    sofa: GrayImage,
    region: GrayImage,
}

fn write_inputs(dir: &Path, s: &Scene) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("photo.rgb"), s.photo.as_raw()).unwrap();
    std::fs::write(dir.join("region.gray"), s.region.as_raw()).unwrap();
    std::fs::write(dir.join("wall.gray"), s.wall.as_raw()).unwrap();
    std::fs::write(dir.join("sofa.gray"), s.sofa.as_raw()).unwrap();
    std::fs::write(
        dir.join("swatch.rgb"),
        swatch::generate(palette_rules::rule::Builtin::Linen).as_raw(),
    )
    .unwrap();
}

/// Runs the reference; returns rule -> seconds (empty when Python or its packages are missing).
fn reference(
    python: &Path,
    dir: &Path,
    (w, h): (u32, u32),
    threads: usize,
    reps: usize,
    full_fill: bool,
    write_outputs: bool,
) -> BTreeMap<String, f64> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/reference.py");
    let out = Command::new(python)
        .arg(script)
        .args([
            "--dir",
            dir.to_str().unwrap(),
            "--width",
            &w.to_string(),
            "--height",
            &h.to_string(),
        ])
        .args([
            "--threads",
            &threads.to_string(),
            "--reps",
            &reps.to_string(),
        ])
        .args(full_fill.then_some("--fill-any-size"))
        .args(write_outputs.then_some("--write-outputs"))
        .env("OMP_NUM_THREADS", threads.to_string())
        .env("OPENBLAS_NUM_THREADS", threads.to_string())
        .output();
    let mut m = BTreeMap::new();
    match out {
        Ok(o) if o.status.success() => {
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                    m.insert(
                        v["rule"].as_str().unwrap_or("").to_string(),
                        v["seconds"].as_f64().unwrap_or(f64::NAN),
                    );
                }
            }
        }
        Ok(o) => eprintln!("reference failed: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => eprintln!("reference not run ({}): {e}", python.display()),
    }
    m
}

/// How far the reference's outputs are from ours, in 8-bit codes: the ratios compare like with like only if the
/// two compute the same thing. Over the edited pixels (region > 0), every channel; the region over all pixels.
fn print_agreement(dir: &Path, s: &Scene) {
    let mut rows = Vec::new();
    let edited: Vec<bool> = s.region.as_raw().iter().map(|&a| a > 0).collect();
    for (name, rule) in rules().into_iter().filter(|(n, _)| *n != "fill") {
        let ours = match apply(&s.photo, &s.region, &rule, None).unwrap() {
            palette_rules::Edited::Rgb(i) => i.into_raw(),
            palette_rules::Edited::Rgba(i) => i.into_raw(),
        };
        rows.push((name, ours, Some(&edited)));
    }
    let region = region::build_region(
        &s.photo,
        std::slice::from_ref(&s.wall),
        std::slice::from_ref(&s.sofa),
        &RegionParams::default(),
    );
    rows.push(("region", region.into_raw(), None));
    let mut printed_header = false;
    for (name, ours, mask) in rows {
        let Ok(theirs) = std::fs::read(dir.join(format!("ref_{name}.raw"))) else {
            continue;
        };
        if theirs.len() != ours.len() {
            println!(
                "agreement {name}: reference output has {} bytes, ours {}",
                theirs.len(),
                ours.len()
            );
            continue;
        }
        let channels = ours.len() / edited.len();
        let mut diffs: Vec<u8> = ours
            .iter()
            .zip(&theirs)
            .enumerate()
            .filter(|(i, _)| mask.is_none_or(|m| m[i / channels]))
            .map(|(_, (a, b))| a.abs_diff(*b))
            .collect();
        if diffs.is_empty() {
            continue;
        }
        diffs.sort_unstable();
        let mean = diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len() as f64;
        let p99 = diffs[(diffs.len() - 1) * 99 / 100];
        if !printed_header {
            println!(
                "agreement with the reference (|Rust - reference| in codes, edited pixels): mean / p99 / max"
            );
            printed_header = true;
        }
        println!(
            "  {name:<8} {mean:>6.2} / {p99:>3} / {:>3}",
            diffs[diffs.len() - 1]
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let full_fill = args.iter().any(|a| a == "--full-fill");
    let python = args
        .iter()
        .position(|a| a == "--python")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv-bench/bin/python")
        });
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    color::warm_tables();
    let bw1 = memcpy_gbps(1);
    let bwn = memcpy_gbps(cores);
    println!("memcpy bandwidth: {bw1:.1} GB/s (1 thread), {bwn:.1} GB/s ({cores} threads)");
    let sizes: &[(u32, u32)] = if quick {
        &[(1008, 1008)]
    } else {
        &[(1008, 1008), (4000, 3000)]
    };
    let tmp = std::env::temp_dir().join(format!("palette-bench-{}", std::process::id()));
    for &(w, h) in sizes {
        let mp = (w * h) as f64 / 1e6;
        let room = synth::room(w, h);
        let region = region::build_region(
            &room.photo,
            std::slice::from_ref(&room.wall),
            std::slice::from_ref(&room.sofa),
            &RegionParams::default(),
        );
        let scene = Scene {
            photo: room.photo,
            wall: room.wall,
            sofa: room.sofa,
            region,
        };
        write_inputs(&tmp, &scene);
        let reps = if mp > 4.0 { 2 } else { 4 };
        println!(
            "\n{w}x{h} ({mp:.1} MP); MP/s over the whole image; ratio = Rust / reference at the same thread count"
        );
        println!(
            "{:<9} {:>7} {:>10} {:>9} {:>7} | {:>7} {:>10} {:>9} {:>7} | {:>9}",
            "rule",
            "threads",
            "Rust MP/s",
            "ref MP/s",
            "ratio",
            "threads",
            "Rust MP/s",
            "ref MP/s",
            "ratio",
            "GB/s(%bw)"
        );
        let mut results: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
        // OpenCV Telea per thread count: a different (diffusion) algorithm, shown next to the fill for context.
        let mut telea: Vec<(usize, f64)> = Vec::new();
        for threads in [1, cores] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let refs = reference(
                &python,
                &tmp,
                (w, h),
                threads,
                reps,
                full_fill,
                threads == 1,
            );
            if let Some(&t) = refs.get("fill-telea") {
                telea.push((threads, t));
            }
            let mut time = |name: &'static str, f: &mut (dyn FnMut() + Send)| {
                let secs = pool.install(|| best_of(reps, &mut *f));
                let r = refs.get(name).copied().unwrap_or(f64::NAN);
                results.entry(name).or_default().push((secs, r));
            };
            time("region", &mut || {
                std::hint::black_box(region::build_region(
                    &scene.photo,
                    std::slice::from_ref(&scene.wall),
                    std::slice::from_ref(&scene.sofa),
                    &RegionParams::default(),
                ));
            });
            for (name, rule) in rules() {
                // Fill removes the sofa (a wall-sized hole is a job for a learned inpainter). At 12 MP the NumPy
                // port takes minutes a run, so that row has no reference unless --full-fill.
                if name == "fill" {
                    time(name, &mut || {
                        std::hint::black_box(
                            apply(&scene.photo, &scene.sofa, &rule, None).unwrap(),
                        );
                    });
                    continue;
                }
                time(name, &mut || {
                    std::hint::black_box(apply(&scene.photo, &scene.region, &rule, None).unwrap());
                });
            }
        }
        for (name, v) in &results {
            let cell = |(s, r): (f64, f64), t: usize| {
                if r.is_nan() {
                    format!("{:>7} {:>10.1} {:>9} {:>7}", t, mp / s, "-", "-")
                } else {
                    format!("{:>7} {:>10.1} {:>9.1} {:>6.1}x", t, mp / s, mp / r, r / s)
                }
            };
            let bw = if *name == "region" || *name == "fill" {
                "-".to_string()
            } else {
                let gbps = mp * 1e6 * bytes_per_px(name) / v[v.len() - 1].0 / 1e9;
                format!("{gbps:.1} ({:.0}%)", 100.0 * gbps / bwn)
            };
            println!(
                "{:<9} {} | {} | {:>9}",
                name,
                cell(v[0], 1),
                cell(v[v.len() - 1], cores),
                bw
            );
        }
        print_agreement(&tmp, &scene);
        if let Some(fill) = results.get("fill") {
            for ((threads, t), (secs, _)) in telea.iter().zip(fill) {
                println!(
                    "fill vs cv2 Telea (diffusion, a cheaper and different algorithm), {threads} thread(s): Rust {:.1} MP/s, Telea {:.1} MP/s, {:.2}x",
                    mp / secs,
                    mp / t,
                    t / secs
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
