//! Purge markers of forgotten jobs (`NatsJobStore::forget` leaves one per job record, so every watcher learns the
//! job is gone: `mirror` drops it from the registry). Left alone they stay for ever, one per job ever forgotten, and
//! every replica's watch replays them all at start (and `load` reads each): months of jobs made startup slow. Each
//! replica notes the markers its watch delivers and, once every watcher has had time to see them, removes them
//! (`NatsJobStore::drop_marker`, which keeps any later write of the key). Every replica does it; removing a marker
//! twice is harmless.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

/// How long a marker stays after this replica saw it. A watcher minutes behind that never delivers it keeps the
/// job until its own retention forgets it: nothing is lost, the job only shows a little longer there.
pub const MARKER_KEEP: Duration = Duration::from_secs(600);
/// How often due markers are removed.
pub const MARKER_SWEEP: Duration = Duration::from_secs(30);
/// Markers waiting, at most (~100 bytes each). A backlog larger than this (written before markers were removed) is
/// worked off a part per replica start.
const MAX_WAITING: usize = 100_000;

#[derive(Default)]
pub struct Markers {
    waiting: VecDeque<(String, u64, Instant)>,
    /// Keys waiting, so a watch started again (NATS restarted) does not queue its history twice.
    keys: HashSet<String>,
}

impl Markers {
    /// `key`'s marker, at `revision`, was delivered now.
    pub fn seen(&mut self, key: &str, revision: u64) {
        if self.waiting.len() >= MAX_WAITING || self.keys.contains(key) {
            return;
        }
        self.keys.insert(key.to_string());
        self.waiting
            .push_back((key.to_string(), revision, Instant::now() + MARKER_KEEP));
    }

    /// The markers due for removal, oldest first, taken out of the queue.
    pub fn due(&mut self) -> Vec<(String, u64)> {
        let now = Instant::now();
        let mut due = Vec::new();
        while let Some((_, _, at)) = self.waiting.front()
            && *at <= now
        {
            let (key, revision, _) = self.waiting.pop_front().expect("front exists");
            self.keys.remove(&key);
            due.push((key, revision));
        }
        due
    }

    /// Markers whose removal failed (NATS unreachable): tried again at the next sweep.
    pub fn retry(&mut self, failed: Vec<(String, u64)>) {
        for (key, revision) in failed.into_iter().rev() {
            if self.keys.insert(key.clone()) {
                self.waiting.push_front((key, revision, Instant::now()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn markers_are_due_after_every_watcher_had_time_to_see_them() {
        let mut markers = Markers::default();
        markers.seen("job.a", 7);
        tokio::time::advance(Duration::from_secs(60)).await;
        markers.seen("job.b", 9);
        markers.seen("job.a", 7);
        assert!(markers.due().is_empty(), "kept MARKER_KEEP");
        tokio::time::advance(MARKER_KEEP - Duration::from_secs(60)).await;
        assert_eq!(
            markers.due(),
            [("job.a".to_string(), 7)],
            "once, oldest first"
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        let due = markers.due();
        assert_eq!(due, [("job.b".to_string(), 9)]);
        markers.retry(due);
        assert_eq!(
            markers.due(),
            [("job.b".to_string(), 9)],
            "a failed removal is tried again"
        );
        assert!(markers.due().is_empty());
    }
}
