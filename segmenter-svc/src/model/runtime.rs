//! Loading ONNX Runtime, choosing the execution provider and building the three sessions.
//!
//! `ort` is built with `load-dynamic`: the same binary runs against the CPU library in tests and the CUDA build in
//! production. The CUDA provider is registered with `error_on_failure`, never the default fail-silently: a GPU
//! deployment that quietly runs on the CPU is the failure mode this module exists to prevent.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use ort::environment::Environment;
use ort::ep;
use ort::logging::LogLevel;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorElementType;

use crate::config::{AttentionKernels, Config, ConvSearch, Device};
use crate::error::ModelError;
use crate::mask_plane::MaskOutput;
use crate::model::cuda;
use crate::model::fixed_io::{FixedDecoder, FixedVision, StaticDecoder};
use crate::model::host_outputs::{HostOutputs, Placement};
use crate::model::io_settings::{
    fixed_io_error, fixed_io_wanted, output_placement, pinned_error, vision_static_batch,
};
use crate::model::manifest::{self, ImageInput, Manifest};

/// Where the sessions actually run, as reported by ModelInfo and the logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Provider {
    Cuda(i32),
    Cpu,
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Provider::Cuda(id) => write!(f, "cuda:{id}"),
            Provider::Cpu => f.write_str("cpu"),
        }
    }
}

impl Provider {
    /// `ORT_INTRA_THREADS=0`: with CUDA the GPU computes and the intra-op pool only runs the few nodes ONNX Runtime
    /// keeps on the CPU (shapes, indices), so 2 threads; on the CPU, ONNX Runtime's own default (None).
    pub fn intra_threads(&self, configured: usize) -> Option<usize> {
        match (configured, self) {
            (0, Provider::Cuda(_)) => Some(2),
            (0, Provider::Cpu) => None,
            (n, _) => Some(n),
        }
    }

    /// `MAX_BATCH_IMAGES=0`: 1 with CUDA (on an H200 the vision encoder takes ~3.7x as long for 4 images as for
    /// one, so a batch saves little GPU time and makes every request in it wait for the whole batch), 4 on the CPU.
    pub fn max_batch_images(&self, configured: usize) -> usize {
        match (configured, self) {
            (0, Provider::Cuda(_)) => 1,
            (0, Provider::Cpu) => 4,
            (n, _) => n,
        }
    }
}

pub struct Sessions {
    pub vision: Session,
    pub text: Session,
    pub decoder: Session,
    /// The dynamic decoder's preallocated outputs (SEGMENTER_PINNED_OUTPUTS).
    pub decoder_outputs: Option<HostOutputs>,
    /// The decoder with its phrase count N fixed (DECODER_STATIC_BATCHES), ascending by N.
    pub decoder_static: Vec<(usize, StaticDecoder)>,
    /// With SEGMENTER_CUDA_GRAPHS: where a one-image vision run leaves its FPN levels (the tensors every captured
    /// decoder session reads) and, when the vision session is captured, where its photo is copied.
    pub fixed_vision: Option<FixedVision>,
    pub provider: Provider,
    /// Sessions were built with ORT_PROFILE_DIR: `end_profiling` writes their profiles.
    pub profiling: bool,
}

impl Sessions {
    /// Writes each session's ONNX Runtime profile (when profiling is on) and logs where.
    pub fn end_profiling(&mut self) {
        if !self.profiling {
            return;
        }
        self.profiling = false;
        for (graph, session) in [
            ("vision", &mut self.vision),
            ("text", &mut self.text),
            ("decoder", &mut self.decoder),
        ] {
            match session.end_profiling() {
                Ok(file) => tracing::info!(graph, file, "ONNX Runtime profile written"),
                Err(e) => tracing::warn!(graph, error = %e, "ONNX Runtime profile not written"),
            }
        }
    }
}

/// Loads the ONNX Runtime library and creates the process's one environment (ONNX Runtime allows one per process;
/// tests that start several servers share it). The first path wins for the life of the process.
pub fn load_runtime(path: &Path) -> Result<Environment, ModelError> {
    static ENV: std::sync::OnceLock<Result<Environment, String>> = std::sync::OnceLock::new();
    let env = ENV.get_or_init(|| {
        let builder = ort::init_from(path).map_err(|e| e.to_string())?;
        builder
            .with_name("segmenter")
            .with_telemetry(false)
            .build()
            .map_err(|e| e.to_string())
    });
    env.clone().map_err(|detail| ModelError::Runtime {
        path: path.to_path_buf(),
        detail,
    })
}

/// The sessions of inference thread `instance` (0-based, ENGINE_INSTANCES).
pub fn build_sessions(
    config: &Config,
    manifest: &Manifest,
    dir: &Path,
    instance: u32,
) -> Result<Sessions, ModelError> {
    let env = load_runtime(&config.ort_dylib_path)?;
    let provider = choose_provider(config)?;
    let fixed_io = fixed_io_wanted(config, &provider)?;
    let outputs = output_placement(config, &provider)?;
    let vision_images = vision_static_batch(config, &provider)?;
    if let Some(dir) = &config.ort_profile_dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| ModelError::Invalid(format!("ORT_PROFILE_DIR {}: {e}", dir.display())))?;
    }
    // The manifest says what the graphs take and return; a graph whose tensors differ (another export, a hand-edited
    // folder) is refused here, at startup, not by the first request.
    // `fixed`: the graph's one symbolic dimension (B images for vision, N phrases for the decoder) and its size, for
    // a static-shape session.
    let build = |graph: &'static str,
                 spec: &manifest::GraphSpec,
                 fixed: Option<usize>|
     -> Result<Session, ModelError> {
        let path = manifest::safe_join(dir, &spec.file)?;
        let started = Instant::now();
        // ONNX Runtime appends `_<timestamp>.json` to this prefix; the instance (past the first) names its own.
        let profile = config.ort_profile_dir.as_ref().map(|d| match instance {
            0 => d.join(graph),
            i => d.join(format!("{graph}-instance{i}")),
        });
        let session = new_session(
            &env,
            config,
            manifest,
            &provider,
            (graph, profile.as_deref()),
            &path,
            fixed,
        )
        .map_err(|e| ModelError::Session {
            graph,
            detail: e.to_string(),
        })?;
        tracing::info!(
            graph,
            provider = %provider,
            fixed_size = fixed.unwrap_or(0),
            build_ms = started.elapsed().as_millis() as u64,
            "ONNX Runtime session built"
        );
        check_io(graph, &session, spec, manifest.mask_output())?;
        check_sizes(graph, &session, manifest)?;
        Ok(session)
    };
    let vision = build("vision", &manifest.graphs.vision, vision_images)?;
    let text = build("text", &manifest.graphs.text, None)?;
    let decoder = build("decoder", &manifest.graphs.decoder, None)?;
    let preallocate = |session: &Session| {
        outputs
            .map(|placement| HostOutputs::new(session, placement))
            .transpose()
            .map_err(pinned_error)
    };
    let decoder_outputs = preallocate(&decoder)?;
    let mut counts = config.decoder_static_batches.clone();
    counts.sort_unstable();
    counts.dedup();
    if counts.contains(&0) {
        return Err(ModelError::Invalid(
            "DECODER_STATIC_BATCHES: phrase counts start at 1".into(),
        ));
    }
    let fixed_vision = fixed_io
        .fpn()
        .then(|| FixedVision::new(&vision, &provider, fixed_io.vision))
        .transpose()
        .map_err(|e| fixed_io_error("vision", e))?;
    let decoder_static = counts
        .into_iter()
        .map(|n| {
            let session = build("decoder", &manifest.graphs.decoder, Some(n))?;
            let host = outputs.unwrap_or(Placement::Host);
            let fixed = fixed_vision
                .as_ref()
                .filter(|_| fixed_io.decoders)
                .map(|fpn| FixedDecoder::new(&session, n, fpn, &provider, host))
                .transpose()
                .map_err(|e| fixed_io_error("decoder", e))?;
            // Fixed I/O copies its outputs into host tensors of its own (pinned as well when asked).
            let outputs = if fixed.is_some() {
                None
            } else {
                preallocate(&session)?
            };
            Ok((
                n,
                StaticDecoder {
                    session,
                    fixed,
                    outputs,
                },
            ))
        })
        .collect::<Result<Vec<_>, ModelError>>()?;
    if fixed_io.fpn() {
        tracing::info!(
            cuda_graphs = config.cuda_graphs,
            vision = fixed_io.vision,
            static_batches = ?config.decoder_static_batches.iter().filter(|_| fixed_io.decoders).collect::<Vec<_>>(),
            "sessions bound to fixed-address inputs and outputs"
        );
    }
    if let Some(placement) = outputs {
        tracing::info!(?placement, "decoder outputs preallocated in host memory");
    }
    Ok(Sessions {
        vision,
        text,
        decoder,
        decoder_outputs,
        decoder_static,
        fixed_vision,
        provider,
        profiling: config.ort_profile_dir.is_some(),
    })
}

/// One session of any graph file with the serving settings of `config` (provider, arena, attention kernels, threads,
/// the manifest's hints) and every dimension left dynamic: what `graph_timing` times (a graph of the export, or a
/// prefix of one that bench/graph_sections.py cut). `label` names it in ONNX Runtime's log lines.
pub fn standalone_session(
    config: &Config,
    manifest: &Manifest,
    path: &Path,
    label: &'static str,
) -> Result<(Session, Provider), ModelError> {
    let env = load_runtime(&config.ort_dylib_path)?;
    let provider = choose_provider(config)?;
    let session = new_session(&env, config, manifest, &provider, (label, None), path, None)
        .map_err(|e| ModelError::Session {
            graph: label,
            detail: format!("{}: {e}", path.display()),
        })?;
    Ok((session, provider))
}

fn choose_provider(config: &Config) -> Result<Provider, ModelError> {
    match config.device {
        Device::Cpu => Ok(Provider::Cpu),
        Device::Cuda => cuda_available(config).map(|()| Provider::Cuda(config.cuda_device_id)),
        Device::Auto => match cuda_available(config) {
            Ok(()) => Ok(Provider::Cuda(config.cuda_device_id)),
            Err(e) => {
                tracing::warn!(reason = %e, "SEGMENTER_DEVICE=auto: CUDA is not usable here, running on the CPU");
                Ok(Provider::Cpu)
            }
        },
    }
}

/// Asks ONNX Runtime whether its CUDA provider is compiled in, preloads the CUDA/cuDNN libraries when their folders
/// are configured, and checks that the host's driver is new enough for the CUDA version that provider was built for.
/// Registration itself is checked again when each session is built.
fn cuda_available(config: &Config) -> Result<(), ModelError> {
    use ort::ep::ExecutionProvider;
    let err = |detail: String| ModelError::ExecutionProvider {
        provider: "cuda".into(),
        detail,
    };
    match ep::CUDA::is_available() {
        Ok(true) => {}
        Ok(false) => {
            return Err(err(
                "this ONNX Runtime library has no CUDA provider (the CPU wheel?)".into(),
            ));
        }
        Err(e) => return Err(err(e.to_string())),
    }
    let needed = cuda::provider_library(&config.ort_dylib_path)
        .and_then(|lib| cuda::provider_cuda_major(&lib));
    // Preloading needs no driver: a missing library is reported as such even on a machine without a GPU.
    if config.cuda_lib_dir.is_some() || config.cudnn_lib_dir.is_some() {
        cuda::preload(
            config.cuda_lib_dir.as_deref(),
            config.cudnn_lib_dir.as_deref(),
            needed,
        )
        .map_err(err)?;
    }
    cuda::check_driver(needed, config.cuda_device_id).map_err(err)
}

fn new_session(
    env: &Environment,
    config: &Config,
    manifest: &Manifest,
    provider: &Provider,
    (graph, profile): (&'static str, Option<&Path>),
    path: &Path,
    fixed_size: Option<usize>,
) -> ort::Result<Session> {
    let mut builder = Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::Level3)?
        .with_log_id(graph)?
        // ONNX Runtime's warnings name what costs speed on a GPU: nodes left on the CPU ("Some nodes were not
        // assigned to the preferred execution providers"), Memcpy nodes added between devices. ort's default level
        // (error) hides them; they are logged once per session build, with the graph's name.
        .with_log_level(LogLevel::Warning)?
        .with_logger(Arc::new(
            move |level, _category, _id, _location, message| match level {
                LogLevel::Error | LogLevel::Fatal => {
                    tracing::error!(graph, "onnxruntime: {message}")
                }
                LogLevel::Warning => tracing::warn!(graph, "onnxruntime: {message}"),
                LogLevel::Info | LogLevel::Verbose => {
                    tracing::debug!(graph, "onnxruntime: {message}")
                }
            },
        ))?;
    if let Some(threads) = provider.intra_threads(config.intra_threads) {
        builder = builder.with_intra_threads(threads)?;
    }
    let static_decoder = graph == "decoder" && fixed_size.is_some();
    let static_vision = graph == "vision" && fixed_size.is_some();
    if let Some(n) = fixed_size {
        // The decoder's phrase dimension is the symbol N, the vision graph's image dimension B (the manifest's
        // contract): fixed, every shape in the graph is known when the session is built and ONNX Runtime folds the
        // Shape/Gather/Concat arithmetic away.
        let symbol = if graph == "decoder" { "N" } else { "B" };
        builder = builder.with_dimension_override(symbol, n as i64)?;
    }
    if let Some(prefix) = profile.filter(|_| !static_decoder) {
        // Static decoder sessions are not profiled.
        builder = builder.with_profiling(prefix)?;
    }
    // ONNX Runtime's pool threads spin after each run by default. In a server the same cores also decode images and
    // answer gRPC: spinning starved those tasks and added ~25 ms per request on 2 cores (measured with
    // segmenter-bench), so it is off unless asked for.
    if !config.ort_allow_spinning {
        builder = builder.with_config_entry("session.intra_op.allow_spinning", "0")?;
    }
    if manifest.session_hints.disable_memory_pattern {
        builder = builder.with_memory_pattern(false)?;
    }
    if let Provider::Cuda(device_id) = provider {
        // The arena grows by what a run asks for, not to the next power of two: the default doubling reserved
        // device memory no run needed (several GB at full size, per session), which a co-tenant or a larger
        // decoder chunk then could not get.
        let mut cuda = ep::CUDA::default()
            .with_device_id(*device_id)
            .with_arena_extend_strategy(ep::ArenaExtendStrategy::SameAsRequested)
            .with_conv_algorithm_search(match config.cudnn_conv_search {
                ConvSearch::Heuristic => ep::cuda::ConvAlgorithmSearch::Heuristic,
                ConvSearch::Exhaustive => ep::cuda::ConvAlgorithmSearch::Exhaustive,
                ConvSearch::Default => ep::cuda::ConvAlgorithmSearch::Default,
            })
            .with_prefer_nhwc(config.cuda_prefer_nhwc)
            .with_tf32(true);
        if let Some(kernels) = attention_backend(config.cuda_attention_kernels) {
            cuda = cuda.with_attention_backend(kernels);
        }
        if config.cuda_mem_limit_mb > 0 {
            cuda = cuda.with_memory_limit(config.cuda_mem_limit_mb << 20);
        }
        // Only the sessions whose shapes are all fixed are captured (the one-image vision session, the static
        // decoder sessions); their I/O is bound at fixed addresses (model/fixed_io.rs). ONNX Runtime refuses the
        // session if a node is not on the CUDA EP.
        if config.cuda_graphs && (static_decoder || static_vision) {
            cuda = cuda.with_cuda_graph(true);
        }
        builder = builder.with_execution_providers([cuda.build().error_on_failure()])?;
    }
    builder.commit_from_file(path)
}

/// ONNX Runtime's `sdpa_kernel` flags for CUDA_ATTENTION_KERNELS; None leaves its default. The unfused kernel
/// (MATH) is in every set: ONNX Runtime cannot switch it off and falls back to it where no enabled kernel applies.
fn attention_backend(kernels: AttentionKernels) -> Option<ep::cuda::AttentionBackend> {
    use ep::cuda::AttentionBackend as B;
    match kernels {
        AttentionKernels::Default => None,
        AttentionKernels::Cudnn => Some(
            B::CUDNN_FLASH_ATTENTION
                | B::EFFICIENT_ATTENTION
                | B::TRT_FUSED_ATTENTION
                | B::TRT_FLASH_ATTENTION
                | B::TRT_CROSS_ATTENTION
                | B::MATH,
        ),
        AttentionKernels::Efficient => Some(B::EFFICIENT_ATTENTION | B::MATH),
    }
}

/// The element type the server feeds or reads for each tensor name: f32 everywhere (fp16 exports keep fp32 I/O)
/// except the photo's bytes, token ids, the decoder's query indices and, when the export says so, mask planes.
fn served_dtype(name: &str, masks: MaskOutput) -> TensorElementType {
    match name {
        "image_u8" => TensorElementType::Uint8,
        plane if manifest::MASK_PLANES.contains(&plane) && masks == MaskOutput::ProbabilityU8 => {
            TensorElementType::Uint8
        }
        "input_ids" | "attention_mask" | "text_mask" | "topk_queries" => TensorElementType::Int64,
        _ => TensorElementType::Float32,
    }
}

/// Tensors whose axis 1 is the phrase's token positions (the manifest's text_context_length: what the tokenizer pads
/// every phrase to).
const TOKEN_AXIS_TENSORS: &[&str] = &["input_ids", "attention_mask", "text_features", "text_mask"];

/// Checks the sizes the server takes from the manifest against the graph's static dimensions: the image input's
/// sides (`image_size`), every mask plane's (`mask_size`) and the token axis (`text_context_length`, which the
/// tokenizer pads every phrase to). The server slices the decoder's outputs by the
/// manifest's sizes: one that disagrees with the graph read outside a tensor (a panic of the inference thread) or
/// cut every mask at the wrong offsets. A dimension the graph leaves symbolic is not checked.
fn check_sizes(graph: &str, session: &Session, manifest: &Manifest) -> Result<(), ModelError> {
    let image_sides: &[usize] = match manifest.image_input() {
        ImageInput::U8Hwc => &[1, 2],
        ImageInput::F32Chw => &[2, 3],
    };
    let image_inputs = manifest.image_input().names();
    let wanted = |name: &str, rank: usize| -> Vec<(usize, u32, &'static str)> {
        if image_inputs.contains(&name) {
            image_sides
                .iter()
                .map(|&d| (d, manifest.image_size, "image_size"))
                .collect()
        } else if TOKEN_AXIS_TENSORS.contains(&name) && rank >= 2 {
            vec![(1, manifest.text_context_length, "text_context_length")]
        } else if manifest::MASK_PLANES.contains(&name) && rank >= 2 {
            vec![
                (rank - 2, manifest.mask_size, "mask_size"),
                (rank - 1, manifest.mask_size, "mask_size"),
            ]
        } else {
            Vec::new()
        }
    };
    for outlet in session.inputs().iter().chain(session.outputs()) {
        let Some(shape) = outlet.dtype().tensor_shape() else {
            continue;
        };
        for (dim, size, field) in wanted(outlet.name(), shape.len()) {
            let have = shape.get(dim).copied().unwrap_or(-1);
            if have > 0 && have != i64::from(size) {
                return Err(ModelError::Invalid(format!(
                    "{graph} {:?} has {have} in dimension {dim}, the manifest's {field} is {size} \
                     (a manifest from another export?)",
                    outlet.name()
                )));
            }
        }
    }
    Ok(())
}

fn manifest_dtype(name: &str) -> Option<TensorElementType> {
    Some(match name {
        "float32" | "float" => TensorElementType::Float32,
        "float16" => TensorElementType::Float16,
        "bfloat16" => TensorElementType::Bfloat16,
        "int64" => TensorElementType::Int64,
        "int32" => TensorElementType::Int32,
        "uint8" => TensorElementType::Uint8,
        "bool" => TensorElementType::Bool,
        _ => return None,
    })
}

/// Checks a built session against its manifest entry: the names (the manifest's were checked against what the
/// server uses when it was loaded), and for every tensor that the manifest's dtype, the graph's and the one the
/// server feeds or reads agree.
fn check_io(
    graph: &str,
    session: &Session,
    spec: &manifest::GraphSpec,
    masks: MaskOutput,
) -> Result<(), ModelError> {
    let sides = [
        ("input", session.inputs(), &spec.inputs),
        ("output", session.outputs(), &spec.outputs),
    ];
    for (kind, have, want) in sides {
        for tensor in want {
            let Some(outlet) = have.iter().find(|o| o.name() == tensor.name) else {
                let names: Vec<&str> = have.iter().map(|o| o.name()).collect();
                return Err(ModelError::Invalid(format!(
                    "{graph} graph has no {kind} {:?} (it has {names:?})",
                    tensor.name
                )));
            };
            let declared = manifest_dtype(&tensor.dtype).ok_or_else(|| {
                ModelError::Invalid(format!(
                    "manifest: {graph} {kind} {:?} has unknown dtype {:?}",
                    tensor.name, tensor.dtype
                ))
            })?;
            let actual = outlet.dtype().tensor_type();
            let served = served_dtype(&tensor.name, masks);
            if actual != Some(declared) || declared != served {
                return Err(ModelError::Invalid(format!(
                    "{graph} {kind} {:?}: the graph has {}, the manifest says {}, the server uses {served} \
                     (re-export with this version's export_sam3.py)",
                    tensor.name,
                    actual.map_or_else(|| "a non-tensor".to_string(), |t| t.to_string()),
                    tensor.dtype
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{AttentionKernels, attention_backend};
    use ort::ep::cuda::AttentionBackend as B;

    /// What each CUDA_ATTENTION_KERNELS choice asks of ONNX Runtime: `default` leaves its choice alone, `cudnn` swaps
    /// FlashAttention 2 for cuDNN's kernel and keeps the rest, `efficient` keeps the CUTLASS kernel only. The unfused
    /// fallback is in every set (ONNX Runtime ignores MATH=0 anyway, with a warning).
    #[test]
    fn attention_kernel_choices_map_to_sdpa_kernel_flags() {
        assert_eq!(attention_backend(AttentionKernels::Default), None);
        assert_eq!(
            attention_backend(AttentionKernels::Efficient),
            Some(B::EFFICIENT_ATTENTION | B::MATH)
        );
        let cudnn = attention_backend(AttentionKernels::Cudnn).unwrap();
        assert_eq!(
            cudnn,
            B::CUDNN_FLASH_ATTENTION
                | B::EFFICIENT_ATTENTION
                | B::TRT_FUSED_ATTENTION
                | B::TRT_FLASH_ATTENTION
                | B::TRT_CROSS_ATTENTION
                | B::MATH
        );
        assert_ne!(cudnn | B::FLASH_ATTENTION, cudnn, "FlashAttention 2 is off");
    }
}
