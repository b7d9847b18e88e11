//! The exported SAM3 split: its manifest, the runtime that runs it, and the tokenizer that feeds it.
pub mod cuda;
pub mod fixed_io;
pub mod graph_timing;
pub mod host_outputs;
mod io_settings;
pub mod manifest;
pub mod runtime;
pub mod tokenizer;
