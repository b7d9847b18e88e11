//! Decoder outputs in host memory the segmenter allocates once (SEGMENTER_PINNED_OUTPUTS).
//!
//! Without it, each decoder run on CUDA ends in ONNX Runtime allocating ordinary (pageable) host memory for its
//! outputs and copying the masks into it, which the driver stages through a page-locked buffer of its own. With it,
//! the mask outputs (instance masks, semantic maps: all but a few kilobytes of a run's outputs) are preallocated in
//! page-locked ("pinned") memory from the CUDA provider's allocator, once per session and phrase count, and each
//! run's copy lands there directly; the filter reads the same buffers.
//!
//! Only the large outputs: pinning pays for long copies, and the small ones (boxes, scores, query indices,
//! presence) come out of TopK, Gather and Reshape nodes, which ONNX Runtime may run in place or place in host
//! memory itself. With every output preallocated, the first H200 run failed warm-up in a host-to-host copy onto
//! itself (`GPUDataTransfer::CopyTensorAsync`: `dst_data != src_data`), which only such an output can need; the
//! mask outputs come out of plain Cast nodes on the device.
//!
//! One set of buffers per phrase count a session runs (a static session: its one count; the dynamic graph: each
//! chunk size it has seen, at most DECODER_CHUNK sets). A run's outputs are read before the next run of the same
//! session starts (one inference thread), so reusing the buffers is safe.
//!
//! Built for either provider: with `Placement::Host` the buffers are ordinary host memory, which is how the tests
//! run this path on the real ONNX Runtime (`Config::preallocated_decoder_outputs`).

use std::collections::HashMap;

use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{HasSelectedOutputs, OutputSelector, RunOptions, Session};
use ort::value::Outlet;

use crate::model::fixed_io;
use crate::model::manifest::MASK_PLANES;

/// Where preallocated outputs live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Page-locked host memory of the CUDA provider on this device.
    CudaPinned(i32),
    /// Ordinary host memory (tests and the CPU dry run).
    Host,
}

/// One decoder session's preallocated outputs, by phrase count.
pub struct HostOutputs {
    allocator: Allocator,
    by_rows: HashMap<usize, RunOptions<HasSelectedOutputs>>,
}

impl HostOutputs {
    pub fn new(session: &Session, placement: Placement) -> ort::Result<Self> {
        Ok(Self {
            allocator: allocator(session, placement)?,
            by_rows: HashMap::new(),
        })
    }

    /// Run options whose large outputs are buffers of this set for `rows` phrases, allocated on first use (ONNX
    /// Runtime allocates the others per run, as without preallocation).
    pub fn options(
        &mut self,
        session: &Session,
        rows: usize,
    ) -> ort::Result<&RunOptions<HasSelectedOutputs>> {
        if !self.by_rows.contains_key(&rows) {
            let mut selector = OutputSelector::default();
            for name in large_outputs(session.outputs()) {
                let tensor =
                    fixed_io::fixed_tensor(&self.allocator, session.outputs(), name, "N", rows)?;
                selector = selector.preallocate(name, tensor);
            }
            let options = RunOptions::new()?.with_outputs(selector);
            self.by_rows.insert(rows, options);
        }
        Ok(&self.by_rows[&rows])
    }
}

/// The outputs worth a preallocated buffer: the mask planes (manifest::MASK_PLANES), per phrase tens of thousands
/// of values against at most 80 for any other output.
pub fn large_outputs(outlets: &[Outlet]) -> Vec<&str> {
    outlets
        .iter()
        .map(|o| o.name())
        .filter(|name| MASK_PLANES.contains(name))
        .collect()
}

/// The allocator of `placement` for `session`'s outputs.
pub fn allocator(session: &Session, placement: Placement) -> ort::Result<Allocator> {
    match placement {
        Placement::CudaPinned(device) => Allocator::new(
            session,
            MemoryInfo::new(
                AllocationDevice::CUDA_PINNED,
                device,
                AllocatorType::Device,
                MemoryType::CPUOutput,
            )?,
        ),
        Placement::Host => Ok(Allocator::default()),
    }
}
