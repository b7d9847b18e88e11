//! `--time-sections DIR`: the cumulative prefixes that bench/graph_sections.py cut from one graph, each timed on the
//! serving settings (model/graph_timing.rs), and each section's share: its prefix's p50 minus the one before; then
//! its ablations (the whole graph with one family of nodes passed through), each family's cost: the whole graph's
//! p50 minus the ablation's. Tables per phrase count (the decoder) or for one image (vision); JSON with --json-out.

use std::path::{Path, PathBuf};

use anyhow::Context;
use segmenter_svc::config::Config;
use segmenter_svc::model::graph_timing::{GraphTiming, time_graph};
use segmenter_svc::model::manifest::Manifest;

#[derive(serde::Deserialize)]
struct SectionsFile {
    graph: String,
    model_dir: PathBuf,
    sections: Vec<Section>,
    /// Absent in listings cut before ablations existed.
    #[serde(default)]
    ablations: Vec<Ablation>,
}

#[derive(serde::Deserialize)]
struct Ablation {
    /// The family passed through, e.g. "LayerNorm".
    without: String,
    /// Relative to the sections folder.
    file: PathBuf,
    /// How many nodes were passed through.
    replaced: usize,
}

#[derive(serde::Deserialize)]
struct Section {
    section: String,
    /// Relative to the sections folder, or absolute (the last one: the graph itself).
    file: PathBuf,
    nodes: usize,
}

#[derive(serde::Serialize)]
struct Row {
    section: String,
    nodes: usize,
    cumulative: GraphTiming,
    /// This prefix's p50 minus the previous one's.
    section_p50_ms: f64,
}

#[derive(serde::Serialize)]
struct AblationRow {
    without: String,
    replaced: usize,
    timing: GraphTiming,
    /// The whole graph's p50 minus this one's: what the family's kernels cost in place.
    cost_p50_ms: f64,
}

/// Times every prefix at each of `sizes` (phrases; vision is timed at one image whatever is asked) and prints a
/// table per size; then every ablation, and a table per size of each family's cost. The section tables are printed
/// before the ablations are timed, and an ablation that fails is reported and skipped: a later failure or the
/// step's timeout keeps what was measured in the log.
pub fn run(
    config: &Config,
    dir: &Path,
    sizes: &[usize],
    warmup: usize,
    runs: usize,
    json_out: Option<&Path>,
) -> anyhow::Result<()> {
    let listing = dir.join("sections.json");
    let file: SectionsFile = serde_json::from_slice(
        &std::fs::read(&listing).with_context(|| format!("reading {}", listing.display()))?,
    )
    .with_context(|| format!("parsing {}", listing.display()))?;
    let manifest = Manifest::load(&file.model_dir)?;
    let sizes: Vec<usize> = if file.graph == "vision" {
        vec![1]
    } else {
        sizes.to_vec()
    };
    let unit = if file.graph == "vision" {
        "image"
    } else {
        "phrases"
    };
    // Each prefix's session is built once and timed at every size.
    let mut timings = Vec::with_capacity(file.sections.len());
    for section in &file.sections {
        let path = if section.file.is_absolute() {
            section.file.clone()
        } else {
            dir.join(&section.file)
        };
        timings.push(
            time_graph(config, &manifest, &path, &sizes, warmup, runs)
                .with_context(|| format!("timing {}", path.display()))?,
        );
    }
    let mut rows = Vec::new();
    // The whole graph's p50 per size: the last "prefix" is the graph itself.
    let mut whole = Vec::with_capacity(sizes.len());
    for (i, &size) in sizes.iter().enumerate() {
        println!(
            "\n{} sections, {} ({}), {size} {unit}, p50 of {runs} runs after {warmup}:",
            file.graph,
            file.model_dir.display(),
            manifest.precision,
        );
        println!(
            "{:<28} {:>6} {:>10} {:>10} {:>10} {:>9}",
            "through", "nodes", "prefix p50", "prefix min", "section", "build s"
        );
        let mut before = 0.0;
        for (section, timing) in file.sections.iter().zip(&timings) {
            let timing = timing[i].clone();
            let own = timing.p50_ms - before;
            println!(
                "{:<28} {:>6} {:>10.2} {:>10.2} {:>10.2} {:>9.1}",
                section.section,
                section.nodes,
                timing.p50_ms,
                timing.min_ms,
                own,
                timing.build_ms / 1e3
            );
            before = timing.p50_ms;
            rows.push(Row {
                section: section.section.clone(),
                nodes: section.nodes,
                cumulative: timing,
                section_p50_ms: own,
            });
        }
        whole.push(before);
    }
    let ablations = time_ablations(
        config,
        &manifest,
        dir,
        &file.ablations,
        &sizes,
        warmup,
        runs,
    );
    let mut ablation_rows = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        if ablations.is_empty() {
            break;
        }
        println!(
            "\n{} at {size} {unit}: whole graph {:.2} ms; each family's cost = the whole graph's p50 minus the \
             graph's without it:",
            file.graph, whole[i]
        );
        println!(
            "{:<42} {:>7} {:>11} {:>8} {:>6}",
            "without", "passed", "p50 without", "cost", "share"
        );
        for (ablation, timing) in &ablations {
            let Some(timing) = timing.as_ref().map(|t| t[i].clone()) else {
                println!(
                    "{:<42} {:>7} {:>11}",
                    ablation.without, ablation.replaced, "failed"
                );
                continue;
            };
            let cost = whole[i] - timing.p50_ms;
            println!(
                "{:<42} {:>7} {:>11.2} {:>8.2} {:>5.0}%",
                ablation.without,
                ablation.replaced,
                timing.p50_ms,
                cost,
                100.0 * cost / whole[i].max(f64::MIN_POSITIVE)
            );
            ablation_rows.push(AblationRow {
                without: ablation.without.clone(),
                replaced: ablation.replaced,
                timing,
                cost_p50_ms: cost,
            });
        }
    }
    if let Some(path) = json_out {
        let json = serde_json::json!({
            "graph": file.graph,
            "model_dir": file.model_dir,
            "precision": manifest.precision,
            "sections": rows,
            "ablations": ablation_rows,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&json)?)?;
    }
    Ok(())
}

/// Each ablation timed at every size; one that fails (a graph the provider refuses, say) is logged and left out.
fn time_ablations<'a>(
    config: &Config,
    manifest: &Manifest,
    dir: &Path,
    ablations: &'a [Ablation],
    sizes: &[usize],
    warmup: usize,
    runs: usize,
) -> Vec<(&'a Ablation, Option<Vec<GraphTiming>>)> {
    ablations
        .iter()
        .map(|ablation| {
            let path = dir.join(&ablation.file);
            let timing = time_graph(config, manifest, &path, sizes, warmup, runs)
                .map_err(|e| {
                    eprintln!(
                        "ablation {:?} ({}) failed: {e}",
                        ablation.without,
                        path.display()
                    )
                })
                .ok();
            (ablation, timing)
        })
        .collect()
}
