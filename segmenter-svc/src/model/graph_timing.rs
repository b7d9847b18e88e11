//! Times one graph file on the serving settings: a graph of the export, or one of the cumulative prefixes that
//! `bench/graph_sections.py` cuts from it (segmenter-bench --time-sections). The difference between two prefixes'
//! times is what the section between them costs inside the real graph, without the per-node synchronisation that
//! makes ONNX Runtime's CUDA profile no measure of time.
//!
//! Inputs are made once on the provider's device (symbolic first dimension = `size`: phrases for the decoder, images
//! for vision), filled with fixed pseudo-random values (i64 inputs, the text masks, with their first four tokens
//! on); outputs stay on the device. Each timed run is `run_binding` + `synchronize_outputs`: wall time until the
//! device is done, as the worker's vision run.

use std::path::Path;
use std::time::Instant;

use ort::session::Session;
use ort::value::{DynTensor, TensorElementType};

use crate::config::Config;
use crate::error::ModelError;
use crate::model::fixed_io::{allocator, copy_in, device_memory, fixed_tensor};
use crate::model::manifest::Manifest;
use crate::model::runtime::{Provider, standalone_session};

/// How long one graph took at one size.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GraphTiming {
    /// The symbolic first dimension the inputs were made with (phrases, images).
    pub size: usize,
    /// Building the session (once for all sizes).
    pub build_ms: f64,
    pub runs: usize,
    pub p50_ms: f64,
    pub min_ms: f64,
}

/// Builds one session of `path`, then at each of `sizes` runs it `warmup` times and `runs` timed times.
pub fn time_graph(
    config: &Config,
    manifest: &Manifest,
    path: &Path,
    sizes: &[usize],
    warmup: usize,
    runs: usize,
) -> Result<Vec<GraphTiming>, ModelError> {
    let started = Instant::now();
    let (mut session, provider) = standalone_session(config, manifest, path, "timing")?;
    let build_ms = started.elapsed().as_secs_f64() * 1e3;
    let fail = |e: ort::Error| ModelError::Session {
        graph: "timing",
        detail: format!("{}: {e}", path.display()),
    };
    sizes
        .iter()
        .map(|&size| {
            let (runs, p50_ms, min_ms) =
                time_at(&mut session, &provider, size, warmup, runs).map_err(fail)?;
            Ok(GraphTiming {
                size,
                build_ms,
                runs,
                p50_ms,
                min_ms,
            })
        })
        .collect()
}

/// Timed runs at one size: (runs, p50 ms, min ms).
fn time_at(
    session: &mut Session,
    provider: &Provider,
    size: usize,
    warmup: usize,
    runs: usize,
) -> ort::Result<(usize, f64, f64)> {
    let device = allocator(session, provider)?;
    let inputs = session
        .inputs()
        .iter()
        .map(|outlet| {
            let mut tensor = fixed_tensor(&device, session.inputs(), outlet.name(), "N", size)?;
            fill(&mut tensor)?;
            Ok((outlet.name().to_string(), tensor))
        })
        .collect::<ort::Result<Vec<(String, DynTensor)>>>()?;
    let memory = device_memory(provider)?;
    let outputs: Vec<String> = session
        .outputs()
        .iter()
        .map(|o| o.name().to_string())
        .collect();
    let mut times = Vec::with_capacity(runs);
    for i in 0..warmup + runs.max(1) {
        let mut binding = session.create_binding()?;
        for (name, tensor) in &inputs {
            binding.bind_input(name, tensor)?;
        }
        for name in &outputs {
            binding.bind_output_to_device(name, &memory)?;
        }
        let t = Instant::now();
        let out = session.run_binding(&binding)?;
        binding.synchronize_outputs()?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        drop(out);
        if i >= warmup {
            times.push(ms);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok((times.len(), times[times.len() / 2], times[0]))
}

/// Fixed pseudo-random values (xorshift): f32 in [-1, 1), u8 bytes; i64 as text masks (first four tokens on).
fn fill(tensor: &mut DynTensor) -> ort::Result<()> {
    let shape: Vec<usize> = tensor.shape().iter().map(|&d| d as usize).collect();
    let count: usize = shape.iter().product();
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    match tensor.data_type() {
        TensorElementType::Float32 => {
            let values: Vec<f32> = (0..count)
                .map(|_| (next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
                .collect();
            copy_in(values, tensor)
        }
        TensorElementType::Uint8 => {
            let values: Vec<u8> = (0..count).map(|_| (next() >> 56) as u8).collect();
            copy_in(values, tensor)
        }
        TensorElementType::Int64 => {
            let row = shape.last().copied().unwrap_or(1).max(1);
            let values: Vec<i64> = (0..count).map(|i| i64::from(i % row < 4)).collect();
            copy_in(values, tensor)
        }
        other => Err(ort::Error::new(format!(
            "graph timing feeds f32, u8 and i64 inputs, not {other:?}"
        ))),
    }
}
