//! segmenter-svc: SAM3 concept segmentation over gRPC on ONNX Runtime.
//!
//! Module map: `config` (flags and environment) -> `server` (startup, gRPC, health, shutdown) -> `service` (one
//! request: validate, pre-process, submit, encode) -> `engine` (the inference thread: batching, text cache, the
//! three graphs) over `model` (manifest, runtime/provider, tokenizer), with `preprocess` and `postprocess` (and `mask_plane`,
//! the two forms of a mask) as pure functions on either side of the model.

pub mod config;
pub mod engine;
pub mod error;
pub mod exit;
pub mod mask_plane;
pub mod model;
pub mod phrases;
pub mod postprocess;
pub mod preprocess;
pub mod server;
pub mod service;
pub mod telemetry;

pub use config::{Config, Device};
pub use error::{Error, ModelError};
pub use server::run;
