//! ENGINE_INSTANCES: several inference threads, each with its own sessions, queue and text cache, behind one
//! `EngineHandle` (Triton's "instance count"). On a GPU whose runs are bound by kernel launches rather than by the
//! device, two threads with their own ONNX Runtime sessions (and CUDA streams) overlap the launch work of concurrent
//! requests: throughput under load, at the cost of one more set of sessions (build time, device memory) each. One
//! request still runs on one thread: its latency does not change.
//!
//! The engine's health is the instances' combined: the worst of them (Broken, then Failed, then WarmingUp, then
//! Stopped), Serving only when every instance serves. A failure of one instance (a CUDA fault) is a failure of the
//! device they share, so the whole engine says so, as with one instance.

use std::time::Duration;

use tokio::sync::watch;

use super::worker::{EngineSettings, InstanceThread, spawn_instance};
use super::{EngineHandle, Health};
use crate::model::runtime::Sessions;

/// How often the combined health looks at the instances' (ENGINE_INSTANCES > 1 only).
const FOLLOW_EVERY: Duration = Duration::from_millis(20);

/// Every inference thread of the engine: stopped and joined when dropped (all asked to stop first, so they stop
/// together), or left behind with `detach`.
pub struct EngineThread {
    threads: Vec<InstanceThread>,
}

impl EngineThread {
    /// Tells every thread to stop and lets them go without waiting: for a run that never returns (`exit`).
    pub fn detach(mut self) {
        for thread in self.threads.drain(..) {
            thread.detach();
        }
    }
}

impl Drop for EngineThread {
    fn drop(&mut self) {
        for thread in &self.threads {
            thread.ask_to_stop();
        }
        // Each joins as it is dropped, in order.
        self.threads.clear();
    }
}

/// Starts one inference thread per set of sessions; `settings.busy` must have a slot for each
/// (`Busy::with_instances`). Each warms its sessions up first; the engine serves when all of them do.
pub fn spawn(
    sessions: Vec<Sessions>,
    settings: EngineSettings,
) -> std::io::Result<(EngineHandle, EngineThread)> {
    assert!(!sessions.is_empty(), "an engine needs one set of sessions");
    let count = sessions.len();
    let busy = settings.busy.clone();
    let mut instances = Vec::with_capacity(count);
    let mut threads = Vec::with_capacity(count);
    for (index, sessions) in sessions.into_iter().enumerate() {
        let settings = EngineSettings {
            busy: busy.instance(index),
            ..settings.clone()
        };
        let name = if count == 1 {
            "inference".to_string()
        } else {
            format!("inference-{index}")
        };
        let (instance, thread) = spawn_instance(name, sessions, settings)?;
        instances.push(instance);
        threads.push(thread);
    }
    let health = if count == 1 {
        instances[0].health.clone()
    } else {
        follow(instances.iter().map(|i| i.health.clone()).collect())?
    };
    Ok((
        EngineHandle {
            instances: instances.into(),
            health,
            busy,
        },
        EngineThread { threads },
    ))
}

/// The instances' health combined, kept up to date by a small thread that ends (closing the combined channel, as
/// one instance's thread closes its own) once every instance's thread has.
fn follow(mut instances: Vec<watch::Receiver<Health>>) -> std::io::Result<watch::Receiver<Health>> {
    let states = |rx: &mut [watch::Receiver<Health>]| -> Vec<Health> {
        rx.iter_mut()
            .map(|r| r.borrow_and_update().clone())
            .collect()
    };
    let (tx, rx) = watch::channel(combine(&states(&mut instances)));
    std::thread::Builder::new()
        .name("engine-health".into())
        .spawn(move || {
            loop {
                let closed = instances.iter().all(|r| r.has_changed().is_err());
                let now = combine(&states(&mut instances));
                tx.send_if_modified(|shown| {
                    let changed = *shown != now;
                    *shown = now;
                    changed
                });
                if closed {
                    return;
                }
                std::thread::sleep(FOLLOW_EVERY);
            }
        })?;
    Ok(rx)
}

/// The engine's health from its instances': the worst one (Broken, Failed, WarmingUp, Stopped, in that order),
/// Serving only when all serve.
pub(super) fn combine(states: &[Health]) -> Health {
    let rank = |h: &Health| match h {
        Health::Broken(_) => 4,
        Health::Failed(_) => 3,
        Health::WarmingUp => 2,
        Health::Stopped => 1,
        Health::Serving => 0,
    };
    states
        .iter()
        .max_by_key(|h| rank(h))
        .cloned()
        .unwrap_or(Health::Stopped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_is_as_healthy_as_its_worst_instance() {
        use Health::*;
        assert_eq!(combine(&[Serving, Serving]), Serving);
        assert_eq!(combine(&[Serving, WarmingUp]), WarmingUp);
        assert_eq!(
            combine(&[Failed("cuda".into()), Serving]),
            Failed("cuda".into())
        );
        assert_eq!(
            combine(&[Failed("a".into()), Broken("b".into())]),
            Broken("b".into())
        );
        assert_eq!(combine(&[Stopped, Serving]), Stopped);
        assert_eq!(combine(&[WarmingUp, Stopped]), WarmingUp);
        assert_eq!(combine(&[Serving]), Serving);
    }
}
