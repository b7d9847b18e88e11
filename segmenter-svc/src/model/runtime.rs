//! Loading ONNX Runtime, choosing the execution provider and building the three sessions.
//!
//! `ort` is built with `load-dynamic`: the same binary runs against the CPU library in tests and the CUDA build in
//! production. The CUDA provider is registered with `error_on_failure`, never the default fail-silently: a GPU
//! deployment that quietly runs on the CPU is the failure mode this module exists to prevent.

use std::path::Path;

use ort::environment::Environment;
use ort::ep;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;

use crate::config::{Config, Device};
use crate::error::ModelError;
use crate::model::manifest::{self, Manifest};

/// Where the sessions actually run, as reported by ModelInfo, health logs and metrics.
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

pub struct Sessions {
    pub vision: Session,
    pub text: Session,
    pub decoder: Session,
    pub provider: Provider,
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

pub fn build_sessions(
    config: &Config,
    manifest: &Manifest,
    dir: &Path,
) -> Result<Sessions, ModelError> {
    let env = load_runtime(&config.ort_dylib_path)?;
    let provider = choose_provider(config)?;
    let build = |graph: &'static str, file: &str| -> Result<Session, ModelError> {
        let path = manifest::safe_join(dir, file)?;
        new_session(&env, config, manifest, &provider, &path).map_err(|e| ModelError::Session {
            graph,
            detail: e.to_string(),
        })
    };
    let sessions = Sessions {
        vision: build("vision", &manifest.graphs.vision.file)?,
        text: build("text", &manifest.graphs.text.file)?,
        decoder: build("decoder", &manifest.graphs.decoder.file)?,
        provider,
    };
    check_io(
        "vision",
        &sessions.vision,
        manifest::VISION_INPUTS,
        manifest::VISION_OUTPUTS,
    )?;
    check_io(
        "text",
        &sessions.text,
        manifest::TEXT_INPUTS,
        manifest::TEXT_OUTPUTS,
    )?;
    check_io(
        "decoder",
        &sessions.decoder,
        manifest::DECODER_INPUTS,
        manifest.decoder_outputs(),
    )?;
    Ok(sessions)
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

/// Preloads the CUDA/cuDNN libraries when their folders are configured, then asks ONNX Runtime whether the CUDA
/// provider is compiled in. Registration itself is checked again when each session is built.
fn cuda_available(config: &Config) -> Result<(), ModelError> {
    use ort::ep::ExecutionProvider;
    let err = |detail: String| ModelError::ExecutionProvider {
        provider: "cuda".into(),
        detail,
    };
    if config.cuda_lib_dir.is_some() || config.cudnn_lib_dir.is_some() {
        ep::cuda::preload_dylibs(
            config.cuda_lib_dir.as_deref(),
            config.cudnn_lib_dir.as_deref(),
        )
        .map_err(|e| err(e.to_string()))?;
    }
    match ep::CUDA::is_available() {
        Ok(true) => Ok(()),
        Ok(false) => Err(err(
            "this ONNX Runtime library has no CUDA provider (the CPU wheel?)".into(),
        )),
        Err(e) => Err(err(e.to_string())),
    }
}

fn new_session(
    env: &Environment,
    config: &Config,
    manifest: &Manifest,
    provider: &Provider,
    path: &Path,
) -> ort::Result<Session> {
    let mut builder =
        Session::builder(env)?.with_optimization_level(GraphOptimizationLevel::Level3)?;
    if config.intra_threads > 0 {
        builder = builder.with_intra_threads(config.intra_threads)?;
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
        builder = builder.with_execution_providers([ep::CUDA::default()
            .with_device_id(*device_id)
            .with_conv_algorithm_search(ep::cuda::ConvAlgorithmSearch::Heuristic)
            .with_tf32(true)
            .build()
            .error_on_failure()])?;
    }
    builder.commit_from_file(path)
}

fn check_io(
    graph: &str,
    session: &Session,
    inputs: &[&str],
    outputs: &[&str],
) -> Result<(), ModelError> {
    let have_in: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
    let have_out: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
    for want in inputs {
        if !have_in.contains(want) {
            return Err(ModelError::Invalid(format!(
                "{graph} graph has no input {want:?} (it has {have_in:?})"
            )));
        }
    }
    for want in outputs {
        if !have_out.contains(want) {
            return Err(ModelError::Invalid(format!(
                "{graph} graph has no output {want:?} (it has {have_out:?})"
            )));
        }
    }
    Ok(())
}
