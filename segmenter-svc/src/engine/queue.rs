//! The bounded queue between the request handlers and the inference thread. A plain bounded channel counted a
//! request whose client had left (or whose deadline had passed) as occupying its place until the inference thread
//! reached it: under overload, when clients give up, the queue filled with work nobody waited for and live requests
//! were refused RESOURCE_EXHAUSTED while it drained. Here a full queue first drops such jobs, then decides.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::Job;

/// `push` found no room.
#[derive(Debug)]
pub struct QueueFull;

/// Why `take` returned no job.
#[derive(Debug, PartialEq, Eq)]
pub enum TakeError {
    Timeout,
    /// Every `EngineHandle` is gone: no job will come.
    Disconnected,
}

/// Shared by every `EngineHandle` (the senders) and the inference thread (the one receiver).
pub struct JobQueue {
    jobs: Mutex<VecDeque<Job>>,
    arrived: Condvar,
    /// How many jobs it holds: QUEUE_CAPACITY, at least 1 (0 would refuse every job the inference thread is not
    /// already waiting for).
    capacity: usize,
}

impl JobQueue {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(JobQueue {
            jobs: Mutex::new(VecDeque::with_capacity(capacity.max(1))),
            arrived: Condvar::new(),
            capacity: capacity.max(1),
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Jobs waiting, gone ones included until a full queue or the inference thread drops them.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Queues `job`, or drops it when the queue is full of jobs someone still waits for.
    pub fn push(&self, job: Job) -> Result<(), QueueFull> {
        let mut jobs = self.lock();
        let gone = if jobs.len() >= self.capacity {
            drain_gone(&mut jobs)
        } else {
            Vec::new()
        };
        let result = if jobs.len() < self.capacity {
            jobs.push_back(job);
            metrics::gauge!("segmenter_queue_depth").set(jobs.len() as f64);
            self.arrived.notify_one();
            Ok(())
        } else {
            Err(QueueFull)
        };
        drop(jobs);
        gone.into_iter().for_each(drop_gone);
        result
    }

    /// Whether `push` would take a job now (it may not by the time it is asked: advisory). A full queue drops its
    /// gone jobs first, as `push` does.
    pub fn has_room(&self) -> bool {
        let mut jobs = self.lock();
        if jobs.len() < self.capacity {
            return true;
        }
        let gone = drain_gone(&mut jobs);
        let room = jobs.len() < self.capacity;
        drop(jobs);
        gone.into_iter().for_each(drop_gone);
        room
    }

    /// The oldest job, waiting up to `timeout` for one. `Disconnected` once the queue is empty and this (the
    /// inference thread's) reference is the last one.
    pub fn take(self: &Arc<Self>, timeout: Duration) -> Result<Job, TakeError> {
        let until = Instant::now() + timeout;
        let mut jobs = self.lock();
        loop {
            if let Some(job) = jobs.pop_front() {
                metrics::gauge!("segmenter_queue_depth").set(jobs.len() as f64);
                return Ok(job);
            }
            // Handles are only cloned from handles: once none is left, none comes back.
            if Arc::strong_count(self) == 1 {
                return Err(TakeError::Disconnected);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TakeError::Timeout);
            }
            // A dropped handle does not wake this wait: the inference thread's waits are short (its stop poll, the
            // batch delay), so it sees the disconnection within one of them.
            jobs = self
                .arrived
                .wait_timeout(jobs, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Job>> {
        // A panic while holding the lock leaves the queue itself consistent (every change is one call).
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Takes the gone jobs out of the queue, in their order; answered after the lock is released.
fn drain_gone(jobs: &mut VecDeque<Job>) -> Vec<Job> {
    let mut gone = Vec::new();
    let mut kept = VecDeque::with_capacity(jobs.capacity());
    for job in jobs.drain(..) {
        if is_gone(&job) {
            gone.push(job);
        } else {
            kept.push_back(job);
        }
    }
    *jobs = kept;
    if !gone.is_empty() {
        metrics::gauge!("segmenter_queue_depth").set(jobs.len() as f64);
        tracing::debug!(
            dropped = gone.len(),
            "full queue: dropped requests nobody waits for"
        );
    }
    gone
}

/// A job nobody waits for any more: its client left, or its deadline passed.
pub fn is_gone(job: &Job) -> bool {
    job.reply.is_closed() || job.deadline <= Instant::now()
}

/// Drops a gone job, answering DEADLINE_EXCEEDED when someone still listens. The deadline is looked at first: at
/// the deadline the handler's own timeout (or tonic's, from `grpc-timeout`) drops the receiver, so a closed reply
/// past the deadline is a deadline, not a client that left.
pub fn drop_gone(job: Job) {
    if job.deadline <= Instant::now() {
        metrics::counter!("segmenter_dropped_total", "reason" => "deadline").increment(1);
        if !job.reply.is_closed() {
            super::worker::answer(job, Err(crate::error::Error::DeadlineExceeded));
        }
    } else {
        metrics::counter!("segmenter_dropped_total", "reason" => "cancelled").increment(1);
    }
}
