//! Purge markers of forgotten jobs (`NatsJobStore::forget` leaves one per job record, so every watcher learns the
//! job is gone: `mirror` drops it from the registry). Left alone they stay for ever, one per job ever forgotten, and
//! every replica's watch replays them all at start: months of jobs made startup slow. Each
//! replica notes the markers its watch delivers and, once live watchers have had time to see them, removes them
//! (`NatsJobStore::drop_marker`, which keeps any later write of the key), a bounded number per sweep, in a task of
//! its own so the watch never waits for it. Every replica does it; removing a marker twice is harmless.
//!
//! A replica whose watch is more than MARKER_KEEP behind (or cut off from NATS that long) may miss a marker: it
//! keeps that finished job until its own retention forgets it, and shows it meanwhile. The same held before for a
//! replica that missed a marker's delivery; the window is now bounded by MARKER_KEEP instead of none.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Cluster;
use crate::error::Report;

/// How long a marker stays after this replica saw it. A watcher minutes behind that never delivers it keeps the
/// job until its own retention forgets it: nothing is lost, the job only shows a little longer there.
pub const MARKER_KEEP: Duration = Duration::from_secs(600);
/// How often due markers are removed.
pub const MARKER_SWEEP: Duration = Duration::from_secs(30);
/// Markers waiting, at most (~100 bytes each). A backlog larger than this (written before markers were removed) is
/// worked off a part per replica start.
const MAX_WAITING: usize = 100_000;
/// Markers removed per sweep, at most (one stream purge each): an old backlog goes at ~1000 a minute per replica
/// instead of in one burst of 100k requests from every replica at once.
const MAX_PER_SWEEP: usize = 500;

#[derive(Default)]
pub struct Markers {
    waiting: VecDeque<(String, u64, Instant)>,
    /// Markers waiting, so a watch started again (NATS restarted) does not queue its history twice. By revision:
    /// a key forgotten, recorded and forgotten again has a second marker to remove.
    keys: HashSet<(String, u64)>,
}

impl Markers {
    /// `key`'s marker, at `revision`, was delivered now.
    pub fn seen(&mut self, key: &str, revision: u64) {
        if self.waiting.len() >= MAX_WAITING || !self.keys.insert((key.to_string(), revision)) {
            return;
        }
        self.waiting
            .push_back((key.to_string(), revision, Instant::now() + MARKER_KEEP));
    }

    /// The markers due for removal, oldest first, at most `limit`, taken out of the queue.
    pub fn due(&mut self, limit: usize) -> Vec<(String, u64)> {
        let now = Instant::now();
        let mut due = Vec::new();
        while due.len() < limit
            && let Some((_, _, at)) = self.waiting.front()
            && *at <= now
        {
            let (key, revision, _) = self.waiting.pop_front().expect("front exists");
            self.keys.remove(&(key.clone(), revision));
            due.push((key, revision));
        }
        due
    }

    /// Markers whose removal failed (NATS unreachable): tried again at the next sweep.
    pub fn retry(&mut self, failed: Vec<(String, u64)>) {
        for (key, revision) in failed.into_iter().rev() {
            if self.keys.insert((key.clone(), revision)) {
                self.waiting.push_front((key, revision, Instant::now()));
            }
        }
    }
}

/// Removes due markers every MARKER_SWEEP until `stop`; what fails is tried again at the next sweep.
pub async fn sweep(markers: Arc<Mutex<Markers>>, cluster: Arc<Cluster>, stop: CancellationToken) {
    let lock = || markers.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        tokio::select! {
            () = tokio::time::sleep(MARKER_SWEEP) => {}
            () = stop.cancelled() => return,
        }
        let mut due = lock().due(MAX_PER_SWEEP).into_iter();
        while let Some((key, revision)) = due.next() {
            if stop.is_cancelled() {
                return;
            }
            if let Err(e) = cluster.store().drop_marker(&key, revision).await {
                tracing::warn!(key = %key, error = %Report(&e), "purge marker not removed; trying again later");
                lock().retry(std::iter::once((key, revision)).chain(due).collect());
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn markers_are_due_after_every_watcher_had_time_to_see_them() {
        let due = |markers: &mut Markers, limit| markers.due(limit);
        let mut markers = Markers::default();
        markers.seen("job.a", 7);
        tokio::time::advance(Duration::from_secs(60)).await;
        markers.seen("job.b", 9);
        markers.seen("job.a", 7);
        markers.seen("job.a", 12);
        assert!(due(&mut markers, 10).is_empty(), "kept MARKER_KEEP");
        tokio::time::advance(MARKER_KEEP - Duration::from_secs(60)).await;
        let first = due(&mut markers, 10);
        assert_eq!(first, [("job.a".to_string(), 7)], "once, oldest first");
        tokio::time::advance(Duration::from_secs(60)).await;
        let limited = due(&mut markers, 1);
        assert_eq!(limited, [("job.b".to_string(), 9)], "at most the limit");
        let later = due(&mut markers, 10);
        assert_eq!(
            later,
            [("job.a".to_string(), 12)],
            "a key's later marker too"
        );
        markers.retry(later);
        let again = due(&mut markers, 10);
        assert_eq!(
            again,
            [("job.a".to_string(), 12)],
            "a failed removal is tried again"
        );
        assert!(due(&mut markers, 10).is_empty());
    }
}
