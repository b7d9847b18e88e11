//! The first record of an item that just ended: written only where none exists, so the first end recorded is the
//! item's (see `claim`).

use bytes::Bytes;
use palette_proto::orchestrator::v1::Item;
use tokio_util::sync::CancellationToken;

use super::{AGAIN_AFTER, Read, encode, put, read_at, record_keys};
use crate::error::Report;
use crate::jobs::job::JobHandle;
use crate::storage::SharedStore;

/// What `claim` found.
#[derive(Debug)]
pub enum Claim {
    /// The record is this run's end. `written`: false when storage failed throughout the waits (the callback goes
    /// out all the same, and the record is written again after it).
    Ours { written: bool },
    /// Another run of the job recorded the item's end first: that end stands, this run's is neither recorded nor
    /// called back. Boxed: an Item is ~0.2 KB.
    Theirs(Box<Item>),
    /// A record is there that this process cannot use: one this release does not read (a newer release's, whose
    /// writer tells its end), or one not readable before the stop (left to the job's next delivery, which resends
    /// it if its callback is pending). Nothing is sent from here.
    Unread,
}

/// Records item `idx` of the job as it is now (it just ended here), first writer wins: only if no record of it
/// exists (`ObjectStore::put_new`) under the first key `write` uses, then the other copy as `write` does. Written
/// before its callback (callback pending; or the only record, callbacks off). `stop`: a record found there is read
/// for as long as storage is down, unless this is cancelled.
///
/// Two runs of one job can be at work at once: a worker cut off from NATS past its lease keeps running the job while
/// the redelivery runs it elsewhere, and both can end an item that neither had recorded when it started (maybe
/// otherwise: COMPLETED there, FAILED here as the segmenter went down). With plain writes the last writer's record
/// stood and both callbacks went out: two ends of one item. With this, the first end recorded is the one that
/// stands, and the other run takes it (`Theirs`).
pub async fn claim(
    store: &SharedStore,
    job: &JobHandle,
    idx: u32,
    stop: &CancellationToken,
) -> Claim {
    let Some(item) = job.item(idx) else {
        return Claim::Ours { written: true };
    };
    let mut keys = record_keys(job, idx);
    let first = keys.remove(0);
    let claim = claim_key(store, &first, &item, stop).await;
    // The other copy (an older release's key) of whichever end stands.
    let standing = match &claim {
        Claim::Ours { written: true } => Some(&item),
        Claim::Theirs(recorded) => Some(recorded.as_ref()),
        Claim::Ours { written: false } | Claim::Unread => None,
    };
    if let Some(standing) = standing {
        for key in keys {
            put(store, &key, standing).await;
        }
    }
    claim
}

/// `claim` at one key (a refused job's items have one).
pub async fn claim_key(
    store: &SharedStore,
    key: &str,
    item: &Item,
    stop: &CancellationToken,
) -> Claim {
    let body = Bytes::from(encode(item));
    let mut waits = AGAIN_AFTER.iter();
    loop {
        let failed = match store.put_new(key, body.clone(), "application/json").await {
            Ok(true) => return Claim::Ours { written: true },
            Ok(false) => {
                let read = tokio::select! {
                    read = read_at(store, key, true) => read,
                    () = stop.cancelled() => return Claim::Unread,
                };
                match read {
                    // This very write, whose first answer was lost (the SDK asked again and found it).
                    Read::Found(Some(recorded)) if encode(&recorded) == body => {
                        return Claim::Ours { written: true };
                    }
                    Read::Found(Some(recorded)) => return Claim::Theirs(recorded),
                    // Not a record this release reads: left alone, as a refused job's items leave it.
                    Read::Found(None) => return Claim::Unread,
                    // Deleted since (a lifecycle rule), or a refusal to say: claimed again.
                    Read::Missing | Read::Failed => "the record there is gone".to_string(),
                }
            }
            Err(e) if e.is_outage() => Report(&e).to_string(),
            // Refused, or a key no store takes: asking again will not change it.
            Err(e) => {
                tracing::warn!(%key, error = %Report(&e), "item record not written; a rerun of the job would run the item again");
                return Claim::Ours { written: false };
            }
        };
        let Some(&wait) = waits.next() else {
            tracing::warn!(
                %key, error = %failed,
                "item record not written before its callback; sent all the same (a rerun after a crash now could run the item again)"
            );
            return Claim::Ours { written: false };
        };
        tokio::time::sleep(wait).await;
    }
}
