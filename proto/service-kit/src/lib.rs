//! What both palette services set up the same way, so both tiers get it the same way: the serving settings
//! (`args`: reflection, TLS, tokens, the plaintext health port), the gRPC server around a service's API (`server`:
//! health, reflection, TLS, the bearer-token layer, TCP options), `tls` and `auth` themselves, logs, traces and
//! metrics (`telemetry`), the shutdown signal (`shutdown`), the `healthcheck` subcommand of the images, and what both
//! do the same way with an uploaded photo (`image_input`: a cut-off JPEG refused, transparency on white), so masks and
//! outputs are of the same picture.
//!
//! Not here: what only one service does (the segmenter's model, the orchestrator's jobs), and the listen addresses'
//! defaults, which differ per service (GRPC_ADDR 50051 and 50052).

pub mod args;
pub mod auth;
pub mod health;
pub mod healthcheck;
pub mod http2;
pub mod image_input;
pub mod secret;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod tls;

pub use args::ServeArgs;
pub use auth::{Authenticator, BearerToken};
pub use secret::Secret;
pub use server::{Serving, SetupError};
