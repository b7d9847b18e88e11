//! The waits between Runpod requests: an empty answer waits IDLE_POLL, a failure waits a jittered exponential
//! backoff. The jitter is injected (`run_with`), and the schedule runs on tokio's clock, so the tests below fix the
//! jitter and check the waits on the paused clock instead of sleeping.

use std::future::Future;
use std::time::Duration;

use rand::Rng;

/// Pause after an empty answer (no job), as rp_job.py's `asyncio.sleep(1)`.
pub(super) const IDLE_POLL: Duration = Duration::from_secs(1);
/// Backoff of failed Runpod requests: base and cap (full jitter).
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Picks the actual wait below a backoff cap. Injected (`run_with`) so that tests can fix it.
pub type Jitter = fn(Duration) -> Duration;

/// Full jitter: uniform in [0, cap].
pub fn full_jitter(cap: Duration) -> Duration {
    Duration::from_millis(rand::rng().random_range(0..=cap.as_millis() as u64))
}

/// The cap of the wait after `attempt` failures: BACKOFF_BASE doubled per attempt, at most BACKOFF_MAX.
fn backoff_cap(attempt: u32) -> Duration {
    BACKOFF_BASE
        .saturating_mul(1u32 << attempt.min(10))
        .min(BACKOFF_MAX)
}

/// Runs `request` at most `attempts` times, waiting `jitter(backoff_cap(n))` after failed attempt n (from 0; no wait
/// after the last). `failed(n, error)` hears of each failure. The first success, or None.
pub(super) async fn retried<T, E, Fut>(
    attempts: u32,
    jitter: Jitter,
    mut request: impl FnMut() -> Fut,
    mut failed: impl FnMut(u32, &E),
) -> Option<T>
where
    Fut: Future<Output = Result<T, E>>,
{
    for attempt in 0..attempts {
        match request().await {
            Ok(done) => return Some(done),
            Err(e) => {
                failed(attempt, &e);
                if attempt + 1 < attempts {
                    tokio::time::sleep(jitter(backoff_cap(attempt))).await;
                }
            }
        }
    }
    None
}

/// What a take request came back with, as far as the wait before the next one goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Took {
    /// A job (run before the next take) or a malformed one (answered at once).
    Job,
    Nothing,
    Failed,
}

/// The take loop's waits: consecutive failures back off, anything else starts over.
#[derive(Debug)]
pub(super) struct TakePacer {
    jitter: Jitter,
    failures: u32,
}

impl TakePacer {
    pub(super) fn new(jitter: Jitter) -> Self {
        TakePacer {
            jitter,
            failures: 0,
        }
    }

    /// Failures in a row so far.
    pub(super) fn failures(&self) -> u32 {
        self.failures
    }

    /// The wait before the next take, after `took`.
    pub(super) fn after(&mut self, took: Took) -> Option<Duration> {
        match took {
            Took::Job => {
                self.failures = 0;
                None
            }
            Took::Nothing => {
                self.failures = 0;
                Some(IDLE_POLL)
            }
            Took::Failed => {
                self.failures = self.failures.saturating_add(1);
                Some((self.jitter)(backoff_cap(self.failures)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::time::Instant;

    use super::*;

    /// The jitter that always waits the whole cap, so the schedule is exact.
    fn whole_cap(cap: Duration) -> Duration {
        cap
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_jitter_stays_below_it() {
        let caps: Vec<u64> = (0..8).map(|a| backoff_cap(a).as_millis() as u64).collect();
        assert_eq!(
            caps,
            [500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000]
        );
        assert_eq!(backoff_cap(u32::MAX), BACKOFF_MAX);
        for attempt in 0..12 {
            let cap = backoff_cap(attempt);
            assert!(full_jitter(cap) <= cap);
        }
    }

    /// Runs `retried` against a request failing its first `failures` attempts; the (paused) times of the attempts.
    async fn attempt_times(attempts: u32, failures: usize) -> (Option<usize>, Vec<u64>) {
        let start = Instant::now();
        let times = Mutex::new(Vec::new());
        let outcome = retried(
            attempts,
            whole_cap,
            || {
                let mut times = times.lock().unwrap();
                times.push(start.elapsed().as_millis() as u64);
                let n = times.len();
                std::future::ready(if n > failures { Ok(n) } else { Err("down") })
            },
            |_, _: &&str| {},
        )
        .await;
        (outcome, times.into_inner().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn a_post_is_retried_after_doubling_waits_until_it_passes() {
        let (outcome, times) = attempt_times(6, 3).await;
        assert_eq!(outcome, Some(4));
        assert_eq!(times, [0, 500, 1_500, 3_500]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_post_gives_up_after_its_attempts_without_a_last_wait() {
        let started = Instant::now();
        let (outcome, times) = attempt_times(6, usize::MAX).await;
        assert_eq!(outcome, None);
        assert_eq!(times, [0, 500, 1_500, 3_500, 7_500, 15_500]);
        assert_eq!(started.elapsed(), Duration::from_millis(15_500));
    }

    #[tokio::test(start_paused = true)]
    async fn the_take_loop_backs_off_on_failures_and_starts_over_after_an_answer() {
        let mut pacer = TakePacer::new(whole_cap);
        let start = Instant::now();
        let mut waited = Vec::new();
        for took in [
            Took::Failed,
            Took::Failed,
            Took::Failed,
            Took::Nothing,
            Took::Failed,
            Took::Job,
        ] {
            if let Some(pause) = pacer.after(took) {
                tokio::time::sleep(pause).await;
            }
            waited.push(start.elapsed().as_millis() as u64);
        }
        // 1 s, 2 s, 4 s after the failures (the first failure waits the doubled base); IDLE_POLL after an empty
        // answer; a failure after it starts again at 1 s; a job is taken at once.
        assert_eq!(waited, [1_000, 3_000, 7_000, 8_000, 9_000, 9_000]);
        assert_eq!(pacer.failures(), 0);
    }
}
