//! The inference engine: one dedicated thread owns the ONNX Runtime sessions (`Session::run` needs `&mut`) and is
//! fed by a bounded queue (with ENGINE_INSTANCES > 1, several such threads, each with its own sessions and queue:
//! `instances`). Requests that arrive together share one vision-encoder run (dynamic batching with a
//! maximum batch and a maximum queue delay); each image's concepts go through the decoder together, in chunks.
//!
//! Admission is fail-fast: a full queue answers RESOURCE_EXHAUSTED at once instead of growing latency without bound.
//! The queue holds QUEUE_CAPACITY jobs (0 is taken as 1: one request may wait while a batch runs); a job the inference
//! thread has taken into the batch it is collecting no longer occupies it, and a full queue drops the jobs nobody waits
//! for any more before it decides (`queue`). `submit` decides; `admissible` asks the same question before the image
//! is decoded, so that a request the queue has no room for now costs no decode.
//! Requests whose client has gone or whose deadline has passed are dropped before any compute is spent on them.

mod busy;
mod faults;
mod instances;
mod queue;
mod text_cache;
mod worker;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use crate::error::Error;
use crate::model::tokenizer::Tokens;
use crate::postprocess::{FilterParams, KeptConcept};
use crate::preprocess::Pixels;

pub use busy::Busy;
pub use faults::Faults;
pub use instances::{EngineThread, spawn};
pub use worker::EngineSettings;

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

/// Cheap to clone; every gRPC handler holds one. Requests go to one of the engine's inference threads
/// (ENGINE_INSTANCES, each with its own sessions and queue): the one with the fewest jobs waiting.
#[derive(Clone)]
pub struct EngineHandle {
    instances: Arc<[Instance]>,
    /// The instances' health combined (`instances::combine`); the one instance's own with ENGINE_INSTANCES=1.
    health: watch::Receiver<Health>,
    /// Every instance's run stamp.
    busy: Busy,
}

/// One inference thread's side of the handle.
#[derive(Clone)]
struct Instance {
    /// Jobs waiting for the inference thread; one it has taken into the batch it is collecting no longer occupies
    /// the queue's room.
    queue: Arc<queue::JobQueue>,
    health: watch::Receiver<Health>,
    /// Its run stamp (its slot of the engine's `Busy`).
    busy: Busy,
}

impl Instance {
    /// What a new job would wait behind here: the jobs queued, plus the batch in progress.
    fn load(&self) -> usize {
        self.queue.len() + usize::from(self.busy.is_running())
    }
}

/// What the engine knows about its own state; health checks and the gRPC service read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    WarmingUp,
    Serving,
    /// The execution provider failed a probe after a run error (e.g. a CUDA fault): requests are refused, and the
    /// engine probes again every `reprobe_interval` until one passes.
    Failed(String),
    /// A failure no probe can undo: the warm-up failed (it ran every shape, and one probe passing later would not
    /// show that the others work) or the inference thread panicked. Requests are refused; the server exits
    /// EXIT_AFTER_FAILURE_SEC later, for its supervisor to start it again.
    Broken(String),
    Stopped,
}

/// Why requests are refused once the engine has stopped (health Stopped, or its queue closed at the end).
const SHUTTING_DOWN: &str = "the server is shutting down";

impl EngineHandle {
    /// Queues a job or refuses it at once. A full queue first drops the jobs in it that nobody waits for any more
    /// (client gone, deadline passed; see `queue`).
    pub fn submit(&self, job: Job) -> Result<(), Error> {
        self.serving()?;
        // The least loaded first; one whose queue is full hands the job to the next (`admissible` let the image be
        // decoded because some instance had room).
        let mut order: Vec<&Instance> = self.instances.iter().collect();
        order.sort_by_key(|i| i.load());
        let mut job = job;
        for (n, instance) in order.iter().enumerate() {
            match instance.queue.push_or_return(job) {
                Ok(()) => return Ok(()),
                Err((queue::Refused::Full, back)) if n + 1 < order.len() => job = back,
                Err((queue::Refused::Full, _)) => {
                    return Err(Error::Overloaded {
                        capacity: self.capacity(),
                    });
                }
                Err((queue::Refused::Closed(why), _)) => return Err(Error::NotServing(why)),
            }
        }
        unreachable!("an engine has at least one instance")
    }

    /// Jobs the engine's queues hold together (QUEUE_CAPACITY per instance).
    fn capacity(&self) -> usize {
        self.instances.iter().map(|i| i.queue.capacity()).sum()
    }

    /// Whether `submit` would take a job now: the engine is serving and the queue has room. Asked when a request
    /// arrives and again when it has a pre-processing slot, both before its image is decoded, so that a NOT_SERVING
    /// or overloaded server refuses at once instead of after the wait for a slot and up to a second of CPU per
    /// large photo that would be thrown away.
    ///
    /// Advisory (`submit` decides: the queue may fill or drain meanwhile), and never stricter than `submit` when
    /// nothing else is happening: the same count (jobs in the queue, gone ones dropped when it is full) against the
    /// same size (QUEUE_CAPACITY=0 holds one job).
    pub fn admissible(&self) -> Result<(), Error> {
        self.serving()?;
        if !self.instances.iter().any(|i| i.queue.has_room()) {
            return Err(Error::Overloaded {
                capacity: self.capacity(),
            });
        }
        Ok(())
    }

    fn serving(&self) -> Result<(), Error> {
        match &*self.health.borrow() {
            Health::Serving => Ok(()),
            Health::WarmingUp => Err(Error::NotServing("the model is warming up".into())),
            Health::Failed(why) | Health::Broken(why) => Err(Error::NotServing(why.clone())),
            Health::Stopped => Err(Error::NotServing(SHUTTING_DOWN.into())),
        }
    }

    pub fn health(&self) -> watch::Receiver<Health> {
        self.health.clone()
    }

    /// How long the inference thread's current run has taken (the health watchdog's input).
    pub fn busy(&self) -> Busy {
        self.busy.clone()
    }

    /// Jobs in the queues, waiting for an inference thread to take them.
    pub fn queue_depth(&self) -> usize {
        self.instances.iter().map(|i| i.queue.len()).sum()
    }
}
