//! Orchestrator: takes jobs over gRPC, runs each input image through object storage, the segmenter and the rule
//! engine, stores outputs, masks and previews under the seed's keys, and reports every item with a signed callback.

pub mod callback;
pub mod config;
pub mod error;
pub mod keys;
pub mod segmenter;
pub mod storage;

pub use config::Config;
pub use error::{Error, Result};
