//! Which of the sessions' shape and I/O options a configuration asks for (SEGMENTER_CUDA_GRAPHS' fixed addresses,
//! SEGMENTER_PINNED_OUTPUTS' preallocated outputs, SEGMENTER_VISION_STATIC's one-image vision session), refused at
//! startup where they cannot work, and how their failures read.

use crate::config::Config;
use crate::error::ModelError;
use crate::model::host_outputs::Placement;
use crate::model::runtime::Provider;

/// Which sessions get fixed-address I/O (what a captured CUDA graph replays).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct FixedIo {
    /// The vision session's photo: the one-image vision session (SEGMENTER_VISION_STATIC) is captured.
    pub vision: bool,
    /// The static decoder sessions' inputs and outputs (DECODER_STATIC_BATCHES): they are captured.
    pub decoders: bool,
}

impl FixedIo {
    /// The FPN levels a one-image vision run writes are fixed whenever either side is captured: a captured vision
    /// session writes to fixed addresses, a captured decoder reads from them.
    pub fn fpn(self) -> bool {
        self.vision || self.decoders
    }
}

/// Which sessions get fixed-address I/O: SEGMENTER_CUDA_GRAPHS captures every session whose shapes are all fixed (the
/// one-image vision session, the static decoder sessions), which needs the CUDA provider, at least one such session
/// and one image per vision run (refused at startup otherwise); the tests' switches ask for either side alone.
pub(crate) fn fixed_io_wanted(config: &Config, provider: &Provider) -> Result<FixedIo, ModelError> {
    let statics = !config.decoder_static_batches.is_empty();
    let wanted = FixedIo {
        vision: (config.cuda_graphs && config.vision_static) || config.fixed_vision_io,
        decoders: (config.cuda_graphs && statics) || config.fixed_decoder_io,
    };
    if !config.cuda_graphs && !wanted.fpn() {
        return Ok(wanted);
    }
    let refuse = |why: String| Err(ModelError::Settings(why));
    if config.cuda_graphs && !config.vision_static && !statics {
        return refuse(
            "SEGMENTER_CUDA_GRAPHS=true needs SEGMENTER_VISION_STATIC=true or DECODER_STATIC_BATCHES (e.g. 1,2,4,8), \
             or both: only sessions whose shapes are all fixed can be captured"
                .into(),
        );
    }
    if config.cuda_graphs && config.engine_instances > 1 {
        return refuse(format!(
            "SEGMENTER_CUDA_GRAPHS=true needs ENGINE_INSTANCES=1 (it is {}): ONNX Runtime captures a CUDA graph in the \
             process-wide capture mode, and another instance's run during a capture fails it (measured on an H200: \
             every warm-up with 2 instances failed)",
            config.engine_instances
        ));
    }
    if config.fixed_decoder_io && !statics {
        return refuse(
            "fixed-address decoder I/O needs DECODER_STATIC_BATCHES: only static-shape decoder sessions have it".into(),
        );
    }
    if config.fixed_vision_io && !config.vision_static {
        return refuse(
            "a fixed-address vision input needs SEGMENTER_VISION_STATIC=true: only the one-image vision session has it"
                .into(),
        );
    }
    if config.cuda_graphs && *provider == Provider::Cpu {
        return refuse(format!(
            "SEGMENTER_CUDA_GRAPHS=true needs the CUDA provider, and the sessions would run on the CPU here \
             (SEGMENTER_DEVICE={:?}): unset SEGMENTER_CUDA_GRAPHS or run on a GPU",
            config.device
        ));
    }
    let batch = provider.max_batch_images(config.max_batch_images);
    if batch != 1 {
        return refuse(format!(
            "SEGMENTER_CUDA_GRAPHS=true needs MAX_BATCH_IMAGES=1 (it is {batch}): a captured session reads or writes \
             one image's FPN levels in fixed tensors"
        ));
    }
    Ok(wanted)
}

/// The vision session's fixed batch size: 1 with SEGMENTER_VISION_STATIC (which needs one image per vision run:
/// refused at startup otherwise), none (the batch dimension stays dynamic) without it.
pub(crate) fn vision_static_batch(
    config: &Config,
    provider: &Provider,
) -> Result<Option<usize>, ModelError> {
    if !config.vision_static {
        return Ok(None);
    }
    let batch = provider.max_batch_images(config.max_batch_images);
    if batch != 1 {
        return Err(ModelError::Settings(format!(
            "SEGMENTER_VISION_STATIC=true needs MAX_BATCH_IMAGES=1 (it is {batch}{}): the vision session is built \
             for one image per run",
            if config.max_batch_images == 0 {
                ", the CPU default"
            } else {
                ""
            }
        )));
    }
    Ok(Some(1))
}

/// Where the decoder's outputs are preallocated: pinned memory with SEGMENTER_PINNED_OUTPUTS (the CUDA provider
/// only), ordinary host memory with the tests' switch, or nowhere (ONNX Runtime allocates them per run).
pub(crate) fn output_placement(
    config: &Config,
    provider: &Provider,
) -> Result<Option<Placement>, ModelError> {
    match (config.pinned_outputs, provider) {
        (true, Provider::Cuda(id)) => Ok(Some(Placement::CudaPinned(*id))),
        (true, Provider::Cpu) => Err(ModelError::Settings(format!(
            "SEGMENTER_PINNED_OUTPUTS=true needs the CUDA provider, and the sessions would run on the CPU here \
             (SEGMENTER_DEVICE={:?}): unset SEGMENTER_PINNED_OUTPUTS or run on a GPU",
            config.device
        ))),
        (false, _) => Ok(config
            .preallocated_decoder_outputs
            .then_some(Placement::Host)),
    }
}

pub(crate) fn pinned_error(e: ort::Error) -> ModelError {
    ModelError::Session {
        graph: "decoder",
        detail: format!("preallocated outputs for SEGMENTER_PINNED_OUTPUTS: {e}"),
    }
}

pub(crate) fn fixed_io_error(graph: &'static str, e: ort::Error) -> ModelError {
    ModelError::Session {
        graph,
        detail: format!("fixed-address I/O for SEGMENTER_CUDA_GRAPHS: {e}"),
    }
}
