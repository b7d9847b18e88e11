//! Generated gRPC types and services of the palette services, and the descriptor set for server reflection.
//!
//! Packages are versioned (`palette.segmenter.v1`, `palette.orchestrator.v1`): a breaking change gets a new package,
//! served beside the old one until its clients have moved.

pub mod segmenter {
    pub mod v1 {
        tonic::include_proto!("palette.segmenter.v1");
    }
}

pub mod orchestrator {
    pub mod v1 {
        tonic::include_proto!("palette.orchestrator.v1");
    }
}

/// Every file of the workspace's packages, with their imports, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("palette_descriptor");
