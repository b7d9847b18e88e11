//! Job intake besides gRPC: adapters that take jobs from elsewhere and run them through the same `JobService`.

pub mod queue_pull;
pub mod runpod;
