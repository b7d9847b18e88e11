//! Orchestrator: takes jobs over gRPC, runs each input image through object storage, the segmenter and the rule
//! engine, stores outputs, masks and previews under the seed's keys, and reports every item with a signed callback.

pub mod adapters;
pub mod allocator;
pub mod byte_lru;
pub mod callback;
pub mod config;
pub mod drain;
pub mod error;
pub mod grpc;
pub mod jobs;
pub mod jpeg;
pub mod keys;
pub mod mask_png;
pub mod png_rows;
pub mod resize;
pub mod segmenter;
pub mod server;
pub mod spec_json;
pub mod storage;
pub mod tasks;
pub mod telemetry;

pub use config::Config;
pub use server::{StartupError, run};
