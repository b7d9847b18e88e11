//! The bounded queue between the request handlers and the inference thread. A plain bounded channel counted a
//! request whose client had left (or whose deadline had passed) as occupying its place until the inference thread
//! reached it: under overload, when clients give up, the queue filled with work nobody waited for and live requests
//! were refused RESOURCE_EXHAUSTED while it drained. Here a full queue first drops such jobs, then decides.
//!
//! The inference thread closes the queue as it ends (a stop or a panic): the jobs still in it and any pushed later
//! are answered UNAVAILABLE at once (a client retries them on another replica), not left to wait for their deadline.
//! A channel told its senders the same when its receiver went; a queue shared by reference has to be told.
//!
//! segmenter_queue_depth moves by what each change adds or takes (never set to one queue's length): with
//! ENGINE_INSTANCES > 1 every inference thread has a queue, and the gauge is their sum.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::Job;

/// Why `push` did not take a job.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Full of jobs someone still waits for.
    Full,
    /// The inference thread has ended, with this reason.
    Closed(String),
}

/// Why `take` returned no job.
#[derive(Debug, PartialEq, Eq)]
pub enum TakeError {
    Timeout,
    /// Every `EngineHandle` is gone: no job will come.
    Disconnected,
}

/// Shared by every `EngineHandle` (the senders) and the inference thread (the one receiver).
pub struct JobQueue {
    jobs: Mutex<Queued>,
    arrived: Condvar,
    /// How many jobs it holds: QUEUE_CAPACITY, at least 1 (0 would refuse every job the inference thread is not
    /// already waiting for).
    capacity: usize,
}

struct Queued {
    jobs: VecDeque<Job>,
    /// Set once by `close`: why no job will be taken any more.
    closed: Option<String>,
}

impl JobQueue {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(JobQueue {
            jobs: Mutex::new(Queued {
                jobs: VecDeque::with_capacity(capacity.max(1)),
                closed: None,
            }),
            arrived: Condvar::new(),
            capacity: capacity.max(1),
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Jobs waiting, gone ones included until a full queue or the inference thread drops them.
    pub fn len(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Queues `job`, or refuses it: the queue is full of jobs someone still waits for, or it has been closed.
    #[cfg(test)]
    pub fn push(&self, job: Job) -> Result<(), Refused> {
        self.push_or_return(job).map_err(|(refused, _)| refused)
    }

    /// Queues `job`, or refuses it (the queue is full of jobs someone still waits for, or it has been closed) and
    /// hands it back: another instance's queue may take it.
    #[allow(clippy::result_large_err)] // the job moves back to the caller, as it moved in: no allocation per refusal
    pub fn push_or_return(&self, job: Job) -> Result<(), (Refused, Job)> {
        let mut queued = self.lock();
        if let Some(why) = &queued.closed {
            return Err((Refused::Closed(why.clone()), job));
        }
        let jobs = &mut queued.jobs;
        let gone = if jobs.len() >= self.capacity {
            drain_gone(jobs)
        } else {
            Vec::new()
        };
        let result = if jobs.len() < self.capacity {
            jobs.push_back(job);
            metrics::gauge!("segmenter_queue_depth").increment(1.0);
            self.arrived.notify_one();
            Ok(())
        } else {
            Err((Refused::Full, job))
        };
        drop(queued);
        gone.into_iter().for_each(drop_gone);
        result
    }

    /// No job will be taken any more (the inference thread is ending, `why`): the jobs in the queue are answered
    /// NOT_SERVING now, and `push` refuses from here on. The first reason stays.
    pub fn close(&self, why: &str) {
        let mut queued = self.lock();
        queued.closed.get_or_insert_with(|| why.to_owned());
        let why = queued.closed.clone().unwrap_or_default();
        let left = std::mem::take(&mut queued.jobs);
        metrics::gauge!("segmenter_queue_depth").decrement(left.len() as f64);
        drop(queued);
        if !left.is_empty() {
            tracing::warn!(jobs = left.len(), reason = %why, "inference thread ended: queued requests answered UNAVAILABLE");
        }
        for job in left {
            if is_gone(&job) {
                drop_gone(job);
            } else {
                super::worker::answer(job, Err(crate::error::Error::NotServing(why.clone())));
            }
        }
    }

    /// Whether `push` would take a job now (it may not by the time it is asked: advisory). A full queue drops its
    /// gone jobs first, as `push` does.
    pub fn has_room(&self) -> bool {
        let mut queued = self.lock();
        if queued.jobs.len() < self.capacity {
            return true;
        }
        let gone = drain_gone(&mut queued.jobs);
        let room = queued.jobs.len() < self.capacity;
        drop(queued);
        gone.into_iter().for_each(drop_gone);
        room
    }

    /// The oldest job, waiting up to `timeout` for one. `Disconnected` once the queue is empty and this (the
    /// inference thread's) reference is the last one.
    pub fn take(self: &Arc<Self>, timeout: Duration) -> Result<Job, TakeError> {
        let until = Instant::now() + timeout;
        let mut queued = self.lock();
        loop {
            if let Some(job) = queued.jobs.pop_front() {
                metrics::gauge!("segmenter_queue_depth").decrement(1.0);
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
            queued = self
                .arrived
                .wait_timeout(queued, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queued> {
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
        metrics::gauge!("segmenter_queue_depth").decrement(gone.len() as f64);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::JobOutput;
    use crate::model::tokenizer::Tokens;
    use crate::postprocess::FilterParams;
    use crate::preprocess::Pixels;
    use tokio::sync::oneshot;

    type Answer = oneshot::Receiver<Result<JobOutput, crate::error::Error>>;

    /// A job named by its image height, due in `within`.
    fn job(name: u32, within: Duration) -> (Job, Answer) {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            pixels: Pixels::U8Hwc(Vec::new()),
            image_size: (1, name),
            phrases: vec![(
                "wall".into(),
                Tokens {
                    ids: vec![1],
                    mask: vec![1],
                    full_len: 1,
                },
            )],
            filter: FilterParams {
                threshold: 0.5,
                max_instances: 1,
                keep_semantic: false,
            },
            deadline: Instant::now() + within,
            enqueued: Instant::now(),
            reply,
            span: tracing::Span::none(),
        };
        (job, answer)
    }

    const LATER: Duration = Duration::from_secs(60);

    #[test]
    fn a_full_queue_drops_only_the_gone_and_keeps_the_order_of_the_rest() {
        let queue = JobQueue::new(3);
        // A handle stays: an empty queue without one is disconnected, not just empty.
        let _handle = queue.clone();
        let (first, _first) = job(1, LATER);
        let (left, left_answer) = job(2, LATER);
        let (third, _third) = job(3, LATER);
        for j in [first, left, third] {
            assert!(queue.push(j).is_ok());
        }
        let (refused, _refused) = job(4, LATER);
        assert!(queue.push(refused).is_err(), "full of live jobs");
        assert!(!queue.has_room());
        drop(left_answer);
        assert!(queue.has_room(), "the job whose client left is dropped");
        let (fourth, _fourth) = job(4, LATER);
        assert!(queue.push(fourth).is_ok());
        let order: Vec<u32> = (0..3)
            .map(|_| queue.take(Duration::ZERO).unwrap().image_size.1)
            .collect();
        assert_eq!(order, [1, 3, 4]);
        assert!(matches!(
            queue.take(Duration::ZERO),
            Err(TakeError::Timeout)
        ));
    }

    #[test]
    fn a_job_past_its_deadline_is_told_when_a_full_queue_drops_it() {
        let queue = JobQueue::new(1);
        let (late, mut late_answer) = job(1, Duration::ZERO);
        assert!(queue.push(late).is_ok());
        let (next, _next) = job(2, LATER);
        assert!(queue.push(next).is_ok());
        assert!(matches!(
            late_answer.try_recv(),
            Ok(Err(crate::error::Error::DeadlineExceeded))
        ));
        assert_eq!(queue.len(), 1);
    }

    #[test]
    fn take_waits_for_a_job_and_ends_once_every_handle_is_gone() {
        let queue = JobQueue::new(2);
        let sender = queue.clone();
        let pusher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let (j, answer) = job(7, LATER);
            assert!(sender.push(j).is_ok());
            // Dropped with the sender: the queue's last handle goes.
            drop(answer);
        });
        let taken = queue.take(Duration::from_secs(10)).unwrap();
        assert_eq!(taken.image_size.1, 7, "woken by the push, not the timeout");
        pusher.join().unwrap();
        assert!(matches!(
            queue.take(Duration::from_secs(10)),
            Err(TakeError::Disconnected)
        ));
    }

    #[test]
    fn a_closed_queue_answers_its_jobs_and_refuses_new_ones() {
        let queue = JobQueue::new(4);
        let _handle = queue.clone();
        let (waiting, mut waiting_answer) = job(1, LATER);
        assert!(queue.push(waiting).is_ok());
        queue.close("the server is shutting down");
        queue.close("a later reason is not the one told");
        match waiting_answer.try_recv() {
            Ok(Err(crate::error::Error::NotServing(why))) => {
                assert_eq!(why, "the server is shutting down")
            }
            other => panic!("answered {other:?}"),
        }
        assert_eq!(queue.len(), 0);
        let (late, _late) = job(2, LATER);
        assert_eq!(
            queue.push(late).unwrap_err(),
            Refused::Closed("the server is shutting down".into())
        );
    }
}
