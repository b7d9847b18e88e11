//! What keeps retention from forgetting a job while an ended item's report is still to be written.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use palette_proto::orchestrator::v1::Item;

use super::JobHandle;

impl JobHandle {
    /// Held by an ended item's report (`report::Reporter`) from when it is scheduled until its last record is
    /// written (the terminal record, and the settled one after its callback): in between, retention could forget
    /// the job and delete its records, and a write after that would leave an item record with no job, which a later
    /// job with the same spec would take as its own. Callbacks off included: the item is NOT_CONFIGURED (settled) at
    /// once, but its record is still to be written.
    pub fn settling(self: &Arc<Self>) -> Settling {
        self.settling.fetch_add(1, Ordering::SeqCst);
        Settling(self.clone())
    }
}

/// See `JobHandle::settling`.
pub struct Settling(Arc<JobHandle>);

/// An item that this call ended, with its report's `settling` guard, taken under the lock that ended it: between the
/// end and the report taking its own guard, retention could otherwise forget the job (its last item ended, callbacks
/// off: settled at once) and the report's record then be written for no job. Hand it to the `Reporter`
/// (`item_ended`, `item_ended_now`, `items_ended`); dropped, it releases the guard.
#[must_use = "hand it to the Reporter, which reports the item"]
pub struct Ended {
    pub item: Item,
    pub settling: Settling,
}

impl Settling {
    /// The guard of a count already taken (`finish_if` takes it under the state lock, with the item's end).
    pub(super) fn counted(job: Arc<JobHandle>) -> Settling {
        Settling(job)
    }
}

impl Drop for Settling {
    fn drop(&mut self) {
        self.0.settling.fetch_sub(1, Ordering::SeqCst);
    }
}
