//! When the inference thread's current run began, for the health watchdog: a run that never returns (a GPU fault
//! that hangs a stream synchronisation instead of failing it, a deadlock in ONNX Runtime) changes nothing else, so
//! health would say SERVING while every request waits for its deadline.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Shared between the inference threads (each stamps its runs in its own slot: ENGINE_INSTANCES) and the health
/// follower (which reads the longest run in progress).
#[derive(Clone, Debug)]
pub struct Busy {
    stamps: Arc<[AtomicU64]>,
    /// The slot this handle's `running` stamps.
    index: usize,
}

impl Default for Busy {
    fn default() -> Self {
        Self::with_instances(1)
    }
}

/// Clears the stamp when the run ends, however it ends.
pub(super) struct Running<'a>(&'a Busy);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.stamps[self.0.index].store(0, Ordering::SeqCst);
    }
}

/// Microseconds since a process-wide origin, never 0 (0 means idle).
fn now_us() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(origin.elapsed().as_micros())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl Busy {
    /// One slot per inference thread; this handle stamps the first.
    pub fn with_instances(instances: usize) -> Self {
        Self {
            stamps: (0..instances.max(1)).map(|_| AtomicU64::new(0)).collect(),
            index: 0,
        }
    }

    /// The handle inference thread `index` stamps its runs with.
    pub(super) fn instance(&self, index: usize) -> Self {
        assert!(
            index < self.stamps.len(),
            "instance {index} of {}",
            self.stamps.len()
        );
        Self {
            stamps: self.stamps.clone(),
            index,
        }
    }

    /// Stamps the start of a run (a batch with its probes, or a recovery probe) until the guard is dropped.
    pub(super) fn running(&self) -> Running<'_> {
        self.stamps[self.index].store(now_us(), Ordering::SeqCst);
        Running(self)
    }

    /// Whether this handle's own slot has a run in progress.
    pub(super) fn is_running(&self) -> bool {
        self.stamps[self.index].load(Ordering::SeqCst) != 0
    }

    /// How long the longest run in progress (of any inference thread) has taken; None when all are idle.
    pub fn running_for(&self) -> Option<Duration> {
        let now = now_us();
        self.stamps
            .iter()
            .map(|stamp| stamp.load(Ordering::SeqCst))
            .filter(|&since| since != 0)
            .map(|since| Duration::from_micros(now.saturating_sub(since)))
            .max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_timed_while_it_lasts() {
        let busy = Busy::default();
        assert_eq!(busy.running_for(), None);
        {
            let _running = busy.running();
            std::thread::sleep(Duration::from_millis(20));
            assert!(busy.running_for().unwrap() >= Duration::from_millis(20));
        }
        assert_eq!(busy.running_for(), None);
    }

    #[test]
    fn the_longest_run_of_any_instance_counts() {
        let busy = Busy::with_instances(2);
        let (first, second) = (busy.instance(0), busy.instance(1));
        let _long = first.running();
        std::thread::sleep(Duration::from_millis(20));
        {
            let _short = second.running();
            assert!(busy.running_for().unwrap() >= Duration::from_millis(20));
        }
        assert!(
            busy.running_for().unwrap() >= Duration::from_millis(20),
            "the first still runs"
        );
        drop(_long);
        assert_eq!(busy.running_for(), None);
    }
}
