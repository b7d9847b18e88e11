//! Every task the orchestrator spawns has a name and an owner: the name is a `task` span around it (so its logs
//! and traces say which task wrote them; tokio's own task names need `tokio_unstable`), and the owner holds its
//! `TaskTracker` or `JoinHandle` and waits for it or stops it at shutdown.

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// `future` inside a span named after the task, a child of the current span (a callback stays in its item's trace).
pub fn named<F: Future>(name: &'static str, future: F) -> tracing::instrument::Instrumented<F> {
    future.instrument(tracing::info_span!("task", task = name))
}

/// Spawns `future` as the task `name`, tracked by `tracker`.
pub fn spawn_tracked<F>(
    tracker: &TaskTracker,
    name: &'static str,
    future: F,
) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tracker.spawn(named(name, future))
}

/// Spawns `future` as the task `name`; the caller keeps the handle (and aborts or awaits it).
pub fn spawn<F>(name: &'static str, future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(named(name, future))
}
