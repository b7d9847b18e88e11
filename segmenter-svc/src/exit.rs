//! When the segmenter gives up and exits (EXIT_AFTER_FAILURE_SEC), for its supervisor to start it again: a process
//! that stays up NOT_SERVING is restarted only where something probes its health (Kubernetes' liveness probe);
//! docker compose (`restart: unless-stopped`) and a Runpod pod restart a process that exits.
//!
//! - Broken (a failed warm-up, a panic of the inference thread): no probe can bring it back. The server drains as
//!   on a shutdown signal and `run` returns the reason.
//! - A model run that has not returned for RUN_STALL_SEC and EXIT_AFTER_FAILURE_SEC more (a GPU stream that hangs
//!   instead of failing): nothing will answer the requests it holds, and joining the inference thread would hang
//!   too. The server closes without waiting for them, leaves the thread behind, and `run` returns `StalledRun`,
//!   which `main` ends with an abort: a normal exit runs the libraries' exit handlers, which may wait on the hung
//!   device as well.

use std::time::Duration;

use crate::engine::{Busy, Health};

/// Why the server is giving up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Broken(String),
    Stalled(Duration),
}

/// `run`'s error when a model run never returned (see the module): `main` aborts on it.
#[derive(Debug, thiserror::Error)]
#[error(
    "a model run has not returned for {} s (RUN_STALL_SEC, then EXIT_AFTER_FAILURE_SEC): exiting so that the \
     segmenter is started again (the device may need a reset if it happens again)",
    .0.as_secs()
)]
pub struct StalledRun(pub Duration);

/// How often the engine's state is looked at.
const EVERY: Duration = Duration::from_millis(250);

/// Resolves when the server should give up (see the module); never without `after` (EXIT_AFTER_FAILURE_SEC=0) or
/// once the engine has stopped.
pub async fn failure(
    mut health: tokio::sync::watch::Receiver<Health>,
    busy: Busy,
    stall_limit: Duration,
    after: Option<Duration>,
) -> Failure {
    let Some(after) = after else {
        return std::future::pending().await;
    };
    let mut broken_since: Option<(tokio::time::Instant, String)> = None;
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Closed once the inference thread has ended: after a panic (Broken, its last word) or a shutdown.
        let closed = health.has_changed().is_err();
        let broken = match &*health.borrow_and_update() {
            Health::Broken(reason) => Some(reason.clone()),
            _ => None,
        };
        if closed && broken.is_none() {
            // A shutdown is under way: nothing to give up on.
            return std::future::pending().await;
        }
        match (broken, &broken_since) {
            (Some(reason), None) => {
                tracing::error!(
                    reason,
                    exit_in_s = after.as_secs(),
                    "the model cannot serve and no probe can bring it back: NOT_SERVING, then exiting for the \
                     supervisor to start the segmenter again (EXIT_AFTER_FAILURE_SEC)"
                );
                broken_since = Some((tokio::time::Instant::now(), reason));
            }
            (Some(_), Some((since, reason))) if since.elapsed() >= after => {
                return Failure::Broken(reason.clone());
            }
            _ => {}
        }
        if let Some(running) = busy.running_for()
            && running >= stall_limit + after
        {
            tracing::error!(
                running_s = running.as_secs(),
                "a model run has not returned past RUN_STALL_SEC + EXIT_AFTER_FAILURE_SEC: exiting without \
                 waiting for it"
            );
            return Failure::Stalled(running);
        }
    }
}
