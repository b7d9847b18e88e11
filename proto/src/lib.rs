//! Generated gRPC types and services of the palette services, and the descriptor set for server reflection.
//!
//! Packages are versioned (`palette.segmenter.v1`, `palette.orchestrator.v1`): a breaking change gets a new package,
//! served beside the old one until its clients have moved.

pub mod segmenter {
    pub mod v1 {
        tonic::include_proto!("palette.segmenter.v1");

        /// `google.rpc.ErrorInfo` the segmenter attaches where the status code alone is ambiguous.
        pub mod error_info {
            /// The ErrorInfo domain of the segmenter's reasons.
            pub const DOMAIN: &str = "palette.segmenter.v1";
            /// RESOURCE_EXHAUSTED because the reply would exceed MAX_MESSAGE_BYTES: the same request gets the same
            /// answer, so unlike a full queue (RESOURCE_EXHAUSTED without it) it is not worth retrying.
            pub const REPLY_TOO_LARGE: &str = "REPLY_TOO_LARGE";
        }
    }
}

pub mod orchestrator {
    pub mod v1 {
        tonic::include_proto!("palette.orchestrator.v1");
    }
}

/// Every file of the workspace's packages, with their imports, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("palette_descriptor");
