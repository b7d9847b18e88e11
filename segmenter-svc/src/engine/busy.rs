//! When the inference thread's current run began, for the health watchdog: a run that never returns (a GPU fault
//! that hangs a stream synchronisation instead of failing it, a deadlock in ONNX Runtime) changes nothing else, so
//! health would say SERVING while every request waits for its deadline.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Shared between the inference thread (which stamps its runs) and the health follower (which reads them).
#[derive(Clone, Debug, Default)]
pub struct Busy(Arc<AtomicU64>);

/// Clears the stamp when the run ends, however it ends.
pub(super) struct Running<'a>(&'a Busy);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        (self.0).0.store(0, Ordering::SeqCst);
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
    /// Stamps the start of a run (a batch with its probes, or a recovery probe) until the guard is dropped.
    pub(super) fn running(&self) -> Running<'_> {
        self.0.store(now_us(), Ordering::SeqCst);
        Running(self)
    }

    /// How long the run in progress has taken; None when idle.
    pub fn running_for(&self) -> Option<Duration> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            since => Some(Duration::from_micros(now_us().saturating_sub(since))),
        }
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
}
