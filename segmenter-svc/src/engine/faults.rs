//! Fault injection for tests: makes the engine's ONNX Runtime calls fail the way a broken execution provider does (a
//! lost CUDA context, device memory exhausted by a co-tenant). Nothing in the configuration or the environment can
//! arm it: only code that builds a `Config` (the integration tests) holds the handle.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

#[derive(Clone, Debug, Default)]
pub struct Faults(Arc<State>);

#[derive(Debug, Default)]
struct State {
    fail_next: AtomicUsize,
    broken: AtomicBool,
    failed: AtomicUsize,
    runs: AtomicUsize,
    panic_next: AtomicBool,
    delay_next_ms: AtomicU64,
    slow_decoder_ms: AtomicU64,
    /// Runs left before the provider breaks for good (0: not armed); each run that passes counts one.
    break_after: AtomicUsize,
}

impl Faults {
    /// The next `n` session runs fail, then runs succeed again (a transient fault).
    pub fn fail_next_runs(&self, n: usize) {
        self.0.fail_next.store(n, Ordering::SeqCst);
    }

    /// Every session run fails until this is called with `false` (a provider that stays broken, or recovers).
    /// The next `n` runs that pass pass, then the provider is broken (`set_broken(true)`): a fault that starts in
    /// the middle of a recovery.
    pub fn break_after_runs(&self, n: usize) {
        self.0.break_after.store(n, Ordering::SeqCst);
    }

    pub fn set_broken(&self, broken: bool) {
        self.0.broken.store(broken, Ordering::SeqCst);
    }

    /// The next session run panics (a bug in the inference thread, as a manifest size that disagreed with its
    /// graph once was).
    pub fn panic_next_run(&self) {
        self.0.panic_next.store(true, Ordering::SeqCst);
    }

    /// The next session run takes `delay` longer (a slow run: the inference thread is busy while deadlines pass).
    pub fn delay_next_run(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.0.delay_next_ms.store(ms, Ordering::SeqCst);
    }

    /// Every decoder run takes `delay` longer from now on (a model whose decoder runs are slow, as on the CPU at
    /// full size: seconds each).
    pub fn slow_decoder_runs(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.0.slow_decoder_ms.store(ms, Ordering::SeqCst);
    }

    /// How many session runs have failed by injection so far: tests wait for it to grow (a recovery probe ran and
    /// hit the fault) instead of sleeping through the probe interval.
    pub fn failed_runs(&self) -> usize {
        self.0.failed.load(Ordering::SeqCst)
    }

    /// How many checked session runs were attempted (injected failures included; warm-up's are not counted): tests
    /// see work skipped or done.
    pub fn runs(&self) -> usize {
        self.0.runs.load(Ordering::SeqCst)
    }

    /// Called before each session run of the probe and of requests (warm-up's runs are not checked).
    pub(crate) fn check(&self, stage: &str) -> ort::Result<()> {
        self.0.runs.fetch_add(1, Ordering::SeqCst);
        let mut delay = self.0.delay_next_ms.swap(0, Ordering::SeqCst);
        if stage == "decoder" {
            delay += self.0.slow_decoder_ms.load(Ordering::SeqCst);
        }
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        if self.0.panic_next.swap(false, Ordering::SeqCst) {
            panic!("injected panic in the {stage} run");
        }
        let transient = self
            .0
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if transient || self.0.broken.load(Ordering::SeqCst) {
            self.0.failed.fetch_add(1, Ordering::SeqCst);
            return Err(ort::Error::new(format!(
                "injected fault in the {stage} run"
            )));
        }
        // This run passes; the provider breaks after the last of those `break_after_runs` allowed.
        if self
            .0
            .break_after
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            == Ok(1)
        {
            self.0.broken.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_faults_count_down_and_broken_holds() {
        let f = Faults::default();
        assert!(f.check("vision").is_ok());
        f.fail_next_runs(2);
        assert!(f.check("vision").is_err());
        assert!(f.check("decoder").is_err());
        assert!(f.check("vision").is_ok());
        f.set_broken(true);
        assert!(f.check("text").is_err() && f.check("text").is_err());
        f.set_broken(false);
        assert!(f.check("text").is_ok());
        assert_eq!(f.failed_runs(), 4);
    }
}
