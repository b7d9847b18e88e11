//! Session I/O at fixed addresses, what CUDA graphs need (SEGMENTER_CUDA_GRAPHS).
//!
//! A captured CUDA graph replays the device addresses of its capture run, so every input and output of a captured
//! session must live in a buffer allocated once. With one image per vision run (MAX_BATCH_IMAGES=1) the FPN levels
//! need no copy for that: the vision graph writes them into three fixed [1, C, H, W] tensors (its outputs are bound
//! there) and every static-shape decoder session reads those same tensors (bound as its `fpn_*` inputs). A captured
//! vision session (SEGMENTER_VISION_STATIC) also reads its photo from one fixed device tensor, which each run copies
//! the photo's bytes into. A decoder run copies the chunk's text rows into its fixed text tensors, runs, and copies
//! its fixed outputs into host tensors that the filter reads.
//!
//! Copies use ort's `copy_into` with owned sources only: with a borrowed view (`TensorRef`) as the source it
//! deadlocks in ort 2.0.0-rc.15 (`bind_input` clones the view through the identity-session lock `copy_into` holds).
//!
//! Built for either provider: on the CPU the "device" tensors are host tensors, which is how the tests run this path
//! on the real ONNX Runtime (`Config::fixed_decoder_io`); only `with_cuda_graph` itself needs a GPU.

use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session};
use ort::value::{DynTensor, Outlet, PrimitiveTensorElementType, Tensor};

use crate::model::host_outputs::{self, HostOutputs, Placement};
use crate::model::manifest::VISION_OUTPUTS;
use crate::model::runtime::Provider;

/// A static-shape decoder session (DECODER_STATIC_BATCHES) and, with fixed I/O, its bound tensors; without them,
/// with SEGMENTER_PINNED_OUTPUTS, its preallocated outputs.
pub struct StaticDecoder {
    pub session: Session,
    pub fixed: Option<FixedDecoder>,
    pub outputs: Option<HostOutputs>,
}

/// A one-image vision run's outputs at fixed addresses on the provider's device and, when the vision session is
/// captured, its input too.
pub struct FixedVision {
    /// The photo, [1, S, S, 3] u8 or [1, 3, S, S] f32 on the device: only for a captured vision session (the others
    /// read the photo from host memory, which ONNX Runtime copies in itself).
    image: Option<(String, DynTensor)>,
    levels: Vec<(&'static str, DynTensor)>,
}

impl FixedVision {
    /// `fixed_input`: the vision session is captured, so its photo needs a fixed tensor as well.
    pub fn new(vision: &Session, provider: &Provider, fixed_input: bool) -> ort::Result<Self> {
        let allocator = allocator(vision, provider)?;
        let levels = VISION_OUTPUTS
            .iter()
            .map(|&name| {
                let tensor = fixed_tensor(&allocator, vision.outputs(), name, "B", 1)?;
                Ok((name, tensor))
            })
            .collect::<ort::Result<_>>()?;
        let image = match (fixed_input, vision.inputs()) {
            (false, _) => None,
            (true, [input]) => {
                let name = input.name().to_string();
                let tensor = fixed_tensor(&allocator, vision.inputs(), &name, "B", 1)?;
                Some((name, tensor))
            }
            (true, inputs) => {
                return Err(ort::Error::new(format!(
                    "the vision graph takes {} inputs, not the one image",
                    inputs.len()
                )));
            }
        };
        Ok(Self { image, levels })
    }

    /// Whether the photo goes through a fixed input tensor (the vision session is captured).
    pub fn has_fixed_input(&self) -> bool {
        self.image.is_some()
    }

    /// Binds a one-image vision run: `pixels` (the one input `name`, of `shape`) copied into the fixed input tensor
    /// when there is one, else bound where they are; the outputs to the fixed FPN tensors.
    pub fn bind<T: PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static>(
        &mut self,
        binding: &mut IoBinding,
        name: &str,
        shape: [usize; 4],
        pixels: Vec<T>,
    ) -> ort::Result<()> {
        match &mut self.image {
            Some((fixed_name, tensor)) if fixed_name == name => {
                copy_in(pixels, tensor)?;
                binding.bind_input(name, &*tensor)?;
            }
            Some((fixed_name, _)) => {
                return Err(ort::Error::new(format!(
                    "the vision graph's input is {fixed_name:?}, not {name:?}"
                )));
            }
            None => binding.bind_input(name, &Tensor::from_array((shape, pixels))?)?,
        }
        for (name, tensor) in &mut self.levels {
            binding.bind_output(*name, &mut *tensor)?;
        }
        Ok(())
    }
}

/// One static-shape decoder session's inputs and outputs, bound once.
pub struct FixedDecoder {
    binding: IoBinding,
    /// [n, L, D] f32 and [n, L] i64 on the device.
    text_features: DynTensor,
    text_mask: DynTensor,
    /// Each output on the device (bound) and its host copy.
    outputs: Vec<(String, DynTensor, DynTensor)>,
}

impl FixedDecoder {
    /// `host`: where the outputs' host copies live (pinned with SEGMENTER_PINNED_OUTPUTS).
    pub fn new(
        session: &Session,
        phrases: usize,
        fpn: &FixedVision,
        provider: &Provider,
        host: Placement,
    ) -> ort::Result<Self> {
        let device = allocator(session, provider)?;
        let host = host_outputs::allocator(session, host)?;
        let mut binding = session.create_binding()?;
        for (name, tensor) in &fpn.levels {
            binding.bind_input(*name, tensor)?;
        }
        let text_features = fixed_tensor(&device, session.inputs(), "text_features", "N", phrases)?;
        let text_mask = fixed_tensor(&device, session.inputs(), "text_mask", "N", phrases)?;
        binding.bind_input("text_features", &text_features)?;
        binding.bind_input("text_mask", &text_mask)?;
        let mut outputs = Vec::with_capacity(session.outputs().len());
        for outlet in session.outputs() {
            let name = outlet.name();
            let mut on_device = fixed_tensor(&device, session.outputs(), name, "N", phrases)?;
            let on_host = fixed_tensor(&host, session.outputs(), name, "N", phrases)?;
            binding.bind_output(name, &mut on_device)?;
            outputs.push((name.to_string(), on_device, on_host));
        }
        Ok(Self {
            binding,
            text_features,
            text_mask,
            outputs,
        })
    }

    /// One run: the chunk's text rows in (`features` [n·L·D], `mask` [n·L], padded to the session's count), the
    /// outputs copied to the host, where `host` reads them.
    pub fn run(
        &mut self,
        session: &mut Session,
        features: Vec<f32>,
        mask: Vec<i64>,
    ) -> ort::Result<()> {
        copy_in(features, &mut self.text_features)?;
        copy_in(mask, &mut self.text_mask)?;
        // The outputs are the bound tensors; the returned handles to them are not needed.
        drop(session.run_binding(&self.binding)?);
        for (_, on_device, on_host) in &mut self.outputs {
            on_device.copy_into(&mut *on_host)?;
        }
        Ok(())
    }

    /// The last run's output `name`, on the host.
    pub fn host<T: PrimitiveTensorElementType + std::fmt::Debug>(
        &self,
        name: &str,
    ) -> ort::Result<&[T]> {
        let (_, _, on_host) = self
            .outputs
            .iter()
            .find(|(n, _, _)| n == name)
            .ok_or_else(|| ort::Error::new(format!("the decoder has no output {name:?}")))?;
        Ok(on_host.try_extract_tensor::<T>()?.1)
    }
}

/// Copies host values into a fixed tensor of the same shape and element type (an owned source: see the module docs).
pub(crate) fn copy_in<T: PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static>(
    values: Vec<T>,
    target: &mut DynTensor,
) -> ort::Result<()> {
    let shape = target.shape().to_vec();
    let source = Tensor::from_array((shape, values))?;
    source.upcast().copy_into(target)
}

/// The provider's device memory: CUDA device memory, or the host's (where outputs bound "to the device" go).
pub(crate) fn device_memory(provider: &Provider) -> ort::Result<MemoryInfo<'static>> {
    match provider {
        Provider::Cuda(id) => MemoryInfo::new(
            AllocationDevice::CUDA,
            *id,
            AllocatorType::Device,
            MemoryType::Default,
        ),
        Provider::Cpu => Ok(MemoryInfo::default()),
    }
}

/// The allocator of the provider's device memory for `session`: CUDA device memory, or the host's.
pub(crate) fn allocator(session: &Session, provider: &Provider) -> ort::Result<Allocator> {
    match provider {
        Provider::Cuda(_) => Allocator::new(session, device_memory(provider)?),
        Provider::Cpu => Ok(Allocator::default()),
    }
}

/// A tensor for the graph's input or output `name`, its one symbolic dimension `symbol` set to `size`.
pub(crate) fn fixed_tensor(
    allocator: &Allocator,
    outlets: &[Outlet],
    name: &str,
    symbol: &str,
    size: usize,
) -> ort::Result<DynTensor> {
    let outlet = outlets
        .iter()
        .find(|o| o.name() == name)
        .ok_or_else(|| ort::Error::new(format!("the graph has no tensor {name:?}")))?;
    let dtype = outlet.dtype();
    let (Some(ty), Some(shape)) = (dtype.tensor_type(), dtype.tensor_shape()) else {
        return Err(ort::Error::new(format!("{name:?} is not a tensor")));
    };
    let dims: Vec<i64> = shape
        .iter()
        .enumerate()
        .map(|(axis, &d)| match d {
            d if d >= 0 => Ok(d),
            _ if axis == 0 => Ok(size as i64),
            _ => Err(ort::Error::new(format!(
                "{name:?} has a dynamic dimension besides {symbol} (axis {axis}): fixed I/O needs every other \
                 dimension known (re-export with this version's export_sam3.py)"
            ))),
        })
        .collect::<ort::Result<_>>()?;
    DynTensor::new(allocator, ty, dims)
}
