//! Item records written in groups: every `put_item` that arrives while a write transaction is committing waits for
//! the next one, which stores them all with one fsync. An item record costs a few milliseconds alone (the fsync of
//! `Durability::Immediate`), and records come in bursts: a large job's cancel ends every open item at once, and each
//! item is written twice (ended, then its callback settled). One at a time, a 10,000-image cancel took about a
//! minute to record and call back; grouped, a few hundred records share each commit.
//!
//! Every record of a group is decided on its own inside the shared transaction (first terminal state wins, as
//! alone); a failure of the transaction fails each record of the group, none of which was then stored.

use std::sync::Mutex;

use palette_proto::orchestrator::v1::Item;
use tokio::sync::oneshot;

use super::{ITEMS, LocalJobStore, stored_bytes};
use crate::jobs::durable;
use crate::jobs::store::{StoreError, Written};

/// Records one transaction takes at most: bounds the transaction (and the wait of the last record in it).
const MAX_GROUP: usize = 512;

type Answer = oneshot::Sender<Result<Written, StoreError>>;

/// The records waiting for the next transaction.
#[derive(Default)]
pub(super) struct Pending {
    state: Mutex<PendingState>,
}

#[derive(Default)]
struct PendingState {
    records: Vec<(String, Item, Answer)>,
    /// A task is writing groups; it takes what arrives until nothing waits.
    writing: bool,
}

impl Pending {
    /// Queues a record; true when the caller must start the writing task (none is running).
    fn push(&self, key: String, item: Item, answer: Answer) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.records.push((key, item, answer));
        !std::mem::replace(&mut state.writing, true)
    }

    /// The next group, or None (and the writing task ends) when nothing waits.
    fn next_group(&self) -> Option<Vec<(String, Item, Answer)>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.records.is_empty() {
            state.writing = false;
            return None;
        }
        let n = state.records.len().min(MAX_GROUP);
        Some(state.records.drain(..n).collect())
    }
}

impl LocalJobStore {
    /// `JobStore::put_item`, in the next group.
    pub(super) async fn put_item_grouped(
        &self,
        key: String,
        item: Item,
    ) -> Result<Written, StoreError> {
        let (answer, answered) = oneshot::channel();
        if self.pending.push(key, item, answer) {
            // A task of its own: a caller that stops waiting must not stop the writes of the others.
            let this = self.clone();
            tokio::spawn(async move { this.write_groups().await });
        }
        answered
            .await
            .map_err(|_| StoreError::unavailable("the job store's writer stopped"))?
    }

    async fn write_groups(&self) {
        // Should this task end early (a panic), the next record starts another instead of waiting for ever.
        let _restart = Restart(&self.pending);
        while let Some(group) = self.pending.next_group() {
            let records: Vec<(String, Item)> = group
                .iter()
                .map(|(key, item, _)| (key.clone(), item.clone()))
                .collect();
            metrics::histogram!("orchestrator_job_store_group_records")
                .record(records.len() as f64);
            let written = self
                .write(move |txn| {
                    let mut items = txn.open_table(ITEMS).map_err(StoreError::unavailable)?;
                    records
                        .iter()
                        .map(|(key, item)| put_one(&mut items, key, item))
                        .collect::<Result<Vec<Written>, StoreError>>()
                })
                .await;
            match written {
                Ok(outcomes) => {
                    for ((_, _, answer), outcome) in group.into_iter().zip(outcomes) {
                        let _ = answer.send(Ok(outcome));
                    }
                }
                Err(e) => {
                    let why = crate::error::Report(&e).to_string();
                    for (_, _, answer) in group {
                        let _ = answer.send(Err(StoreError::unavailable(why.clone())));
                    }
                }
            }
        }
    }
}

/// Marks the writing task gone when a panic ends it (a normal end already did, in `next_group`; doing it again
/// here could clear the mark of a task started since).
struct Restart<'a>(&'a Pending);

impl Drop for Restart<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut state = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
            state.writing = false;
        }
    }
}

/// One record in the group's transaction: the first terminal state recorded wins; the same state may be written
/// again (its callback settled).
fn put_one(
    items: &mut redb::Table<&'static str, &'static [u8]>,
    key: &str,
    item: &Item,
) -> Result<Written, StoreError> {
    let existing = stored_bytes(items, key)?;
    match existing.as_deref().map(durable::decode) {
        Some(Some(recorded)) if recorded.state != item.state => {
            return Ok(Written::Conflict(Box::new(recorded)));
        }
        // One this version cannot read (skipped at load: the item ran again here): replaced by this run's end, or
        // the item would run again and be called back again at every start.
        Some(None) => tracing::warn!(key, "job store: an unreadable item record is replaced"),
        _ => {}
    }
    // Two records of one item in one group: the second reads the first (same transaction), as it would alone.
    items
        .insert(key, durable::encode(item).as_slice())
        .map_err(StoreError::unavailable)?;
    Ok(Written::Stored)
}
