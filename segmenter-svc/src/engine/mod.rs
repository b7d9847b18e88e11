//! The inference engine: one dedicated thread owns the ONNX Runtime sessions (`Session::run` needs `&mut`) and is
//! fed by a bounded queue. Requests that arrive together share one vision-encoder run (dynamic batching with a
//! maximum batch and a maximum queue delay); each image's concepts go through the decoder together, in chunks.
//!
//! Admission is fail-fast: a full queue answers RESOURCE_EXHAUSTED at once instead of growing latency without bound.
//! Requests whose client has gone or whose deadline has passed are dropped before any compute is spent on them.

mod faults;
mod text_cache;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use crate::error::Error;
use crate::model::tokenizer::Tokens;
use crate::postprocess::{FilterParams, KeptConcept};
use crate::preprocess::Pixels;

pub use faults::Faults;
pub use worker::{EngineSettings, EngineThread, spawn};

/// One image and its distinct phrases, ready for the model.
pub struct Job {
    /// The photo resized to S x S, as the vision graph takes it.
    pub pixels: Pixels,
    pub image_size: (u32, u32),
    /// Distinct phrases with their tokens, in first-seen order.
    pub phrases: Vec<(String, Tokens)>,
    pub filter: FilterParams,
    pub deadline: Instant,
    pub enqueued: Instant,
    pub reply: oneshot::Sender<Result<JobOutput, Error>>,
    /// The request's span: the inference thread works on this job inside it, so its trace shows the compute.
    pub span: tracing::Span,
}

/// What the engine hands back: kept instances per phrase (same order as `Job::phrases`) and what it cost.
#[derive(Debug)]
pub struct JobOutput {
    pub concepts: Vec<KeptConcept>,
    pub cache_hits: Vec<bool>,
    pub queue: Duration,
    pub text: Duration,
    pub vision: Duration,
    pub decoder: Duration,
    pub filter: Duration,
    pub vision_batch: usize,
}

/// Cheap to clone; every gRPC handler holds one.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Job>,
    depth: Arc<AtomicUsize>,
    capacity: usize,
    health: watch::Receiver<Health>,
}

/// What the engine knows about its own state; health checks and the gRPC service read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    WarmingUp,
    Serving,
    /// The execution provider failed a probe after a run error (e.g. a CUDA fault): requests are refused, and the
    /// engine probes again every `reprobe_interval` until one passes. Also a failed warm-up or a panic of the
    /// inference thread, which are final: never probed again.
    Failed(String),
    Stopped,
}

impl EngineHandle {
    /// Queues a job or refuses it at once.
    pub fn submit(&self, job: Job) -> Result<(), Error> {
        self.serving()?;
        self.depth.fetch_add(1, Ordering::SeqCst);
        let result = self.tx.try_send(job);
        match result {
            Ok(()) => {
                metrics::gauge!("segmenter_queue_depth")
                    .set(self.depth.load(Ordering::SeqCst) as f64);
                Ok(())
            }
            Err(e) => {
                self.depth.fetch_sub(1, Ordering::SeqCst);
                match e {
                    TrySendError::Full(_) => Err(Error::Overloaded {
                        capacity: self.capacity,
                    }),
                    TrySendError::Disconnected(_) => {
                        Err(Error::NotServing("the inference thread has stopped".into()))
                    }
                }
            }
        }
    }

    /// Whether a job could be taken now (the engine is serving), asked before the image is decoded so that a
    /// NOT_SERVING server refuses at once instead of after up to a second of CPU per large photo. Advisory: `submit`
    /// decides. Queue room is left to `submit`: `depth` also counts jobs already taken into the batch being
    /// collected, so comparing it with the capacity here refused calls the queue still had room for.
    pub fn admissible(&self) -> Result<(), Error> {
        self.serving()
    }

    fn serving(&self) -> Result<(), Error> {
        match &*self.health.borrow() {
            Health::Serving => Ok(()),
            Health::WarmingUp => Err(Error::NotServing("the model is warming up".into())),
            Health::Failed(why) => Err(Error::NotServing(why.clone())),
            Health::Stopped => Err(Error::NotServing("the server is shutting down".into())),
        }
    }

    pub fn health(&self) -> watch::Receiver<Health> {
        self.health.clone()
    }

    pub fn queue_depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }
}
