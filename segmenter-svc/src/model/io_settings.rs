//! Which of the sessions' shape and I/O options a configuration asks for (SEGMENTER_CUDA_GRAPHS' fixed addresses,
//! SEGMENTER_PINNED_OUTPUTS' preallocated outputs, SEGMENTER_VISION_STATIC's one-image vision session), refused at
//! startup where they cannot work, and how their failures read.

use crate::config::Config;
use crate::error::ModelError;
use crate::model::host_outputs::Placement;
use crate::model::runtime::Provider;

/// Whether the static decoder sessions get fixed-address I/O: for CUDA graphs (which need the CUDA provider, static
/// sessions and one image per vision run; refused at startup otherwise), or the tests' internal switch.
pub(crate) fn fixed_io_wanted(config: &Config, provider: &Provider) -> Result<bool, ModelError> {
    if !config.cuda_graphs && !config.fixed_decoder_io {
        return Ok(false);
    }
    let refuse = |why: String| Err(ModelError::Settings(why));
    if config.cuda_graphs && *provider == Provider::Cpu {
        return refuse(format!(
            "SEGMENTER_CUDA_GRAPHS=true needs the CUDA provider, and the sessions would run on the CPU here \
             (SEGMENTER_DEVICE={:?}): unset SEGMENTER_CUDA_GRAPHS or run on a GPU",
            config.device
        ));
    }
    if config.decoder_static_batches.is_empty() {
        return refuse(
            "SEGMENTER_CUDA_GRAPHS=true needs DECODER_STATIC_BATCHES (e.g. 1,2,4,8): only static-shape decoder \
             sessions can be captured"
                .into(),
        );
    }
    let batch = provider.max_batch_images(config.max_batch_images);
    if batch != 1 {
        return refuse(format!(
            "SEGMENTER_CUDA_GRAPHS=true needs MAX_BATCH_IMAGES=1 (it is {batch}): the decoder reads one image's \
             FPN levels from the fixed tensors the vision graph writes"
        ));
    }
    Ok(true)
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
