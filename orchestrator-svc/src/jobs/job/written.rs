//! Durable jobs (`jobs::durable`: ADAPTER=queue_pull, unless JOB_STORE=nats): how many of a job's items have their
//! record in object storage, written once the item's callback settled (`report`; counted once the write was tried,
//! as a failed write leaves the item to run again all the same) or found there from an earlier run (`restore_item`'s
//! callers). The job's queue message is acknowledged only once every item's is: acknowledged once the callbacks
//! settled (with callbacks off, at once), a failed ack let the redelivery run again, and call back again, the items
//! whose record was still being written.

use tokio::sync::watch;

#[derive(Debug)]
pub struct DurableWritten(watch::Sender<u32>);

impl Default for DurableWritten {
    fn default() -> Self {
        DurableWritten(watch::Sender::new(0))
    }
}

impl DurableWritten {
    /// One more item's record written (or its write tried), or found from an earlier run.
    pub fn one_more(&self) {
        self.0.send_modify(|n| *n += 1);
    }

    /// The count now, and each time it grows.
    pub fn watch(&self) -> watch::Receiver<u32> {
        self.0.subscribe()
    }
}
