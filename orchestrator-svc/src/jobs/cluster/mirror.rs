//! Every replica's view of every job: the bucket's watch (history first, then each change as it is written)
//! applied to the registry. WatchJob streams on any replica see an item turn RUNNING when its holder claims it, and
//! its terminal state as soon as it is recorded, whoever ran it; a cancel recorded by any replica stops the items
//! running here. Applying an entry twice changes nothing, so after a lost watch (NATS restarted) the watch simply
//! starts over from the history.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv::{Entry, Operation};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::Cluster;
use super::markers::{self, Markers};
use crate::error::Report;
use crate::jobs::job::JobHandle;
use crate::jobs::store::{self, JobRecord, KeyOf, RecordKey, StoreError};
use crate::jobs::{JobKey, JobService, durable};

/// Pause before watching again after the watch failed or ended.
const REWATCH_PAUSE: Duration = Duration::from_secs(1);

impl JobService {
    /// Follows the bucket until `stop`.
    pub async fn follow_store(self: Arc<Self>, cluster: Arc<Cluster>, stop: CancellationToken) {
        let markers = Arc::new(Mutex::new(Markers::default()));
        tokio::spawn(markers::sweep(
            markers.clone(),
            cluster.clone(),
            stop.clone(),
        ));
        while !stop.is_cancelled() {
            let watch = tokio::select! {
                watch = cluster.store().bucket().watch_with_history(">") => watch,
                () = stop.cancelled() => return,
            };
            match watch {
                Ok(mut watch) => loop {
                    let entry = tokio::select! {
                        entry = watch.next() => entry,
                        () = stop.cancelled() => return,
                    };
                    match entry {
                        Some(Ok(entry)) => {
                            if entry.operation != Operation::Put
                                && matches!(store::parse_key(&entry.key), Some(KeyOf::Job { .. }))
                            {
                                markers
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .seen(&entry.key, entry.revision);
                            }
                            self.apply_entry(&cluster, entry).await
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %Report(&e), "job store watch failed; watching again");
                            break;
                        }
                        None => break,
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %Report(&e), "job store watch not started; trying again")
                }
            }
            tokio::select! {
                () = tokio::time::sleep(REWATCH_PAUSE) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    async fn apply_entry(&self, cluster: &Cluster, entry: Entry) {
        let put = entry.operation == Operation::Put;
        match store::parse_key(&entry.key) {
            Some(KeyOf::Job { user_id, job_id }) if put => {
                let Some(record) = JobRecord::decode(&entry.value) else {
                    tracing::warn!(key = %entry.key, "unreadable job record ignored");
                    return;
                };
                let known = self
                    .registry
                    .get(&JobKey { user_id, job_id })
                    .is_ok_and(|j| j.spec_hash == record.spec_hash && j.seq == record.seq);
                let (record_key, image_count) = (record.key(), record.spec.image_count);
                // A record rewritten by a cancel comes after some of its items and claims in the bucket's history
                // (one value per key, at its last write): a job first seen so has them read here.
                let rewritten = record.cancelled;
                if let Ok(job) = self.adopt_record(&record)
                    && !known
                    && rewritten
                    && let Err(e) = read_items(cluster, &job, &record_key, image_count).await
                {
                    tracing::warn!(key = %entry.key, error = %Report(&e), "items of a cancelled job not read");
                }
            }
            Some(KeyOf::Job { user_id, job_id }) => {
                self.registry.drop_deleted(&JobKey { user_id, job_id });
            }
            Some(KeyOf::Item { job, idx }) if put => {
                let key = JobKey {
                    user_id: job.user_id,
                    job_id: job.job_id,
                };
                let Ok(handle) = self.registry.get(&key) else {
                    return;
                };
                if handle.spec_hash != job.spec_hash {
                    return;
                }
                let Some(item) = durable::decode(&entry.value) else {
                    tracing::warn!(key = %entry.key, "unreadable item record ignored");
                    return;
                };
                if handle.apply_record(idx, item) && handle.is_terminal() {
                    // Retention applies as when a job ends on a single orchestrator.
                    self.registry.trim();
                    self.forget_in_store().await;
                }
            }
            Some(KeyOf::Run { job, idx }) if put => {
                let key = JobKey {
                    user_id: job.user_id,
                    job_id: job.job_id,
                };
                if let Ok(handle) = self.registry.get(&key)
                    && handle.spec_hash == job.spec_hash
                {
                    handle.show_running(idx);
                }
            }
            _ => {}
        }
    }

    /// The recorded job in this replica's registry (the handle already there when it is the same job); a recorded
    /// cancel stops its items running here. Err says why the job does not validate here (presets differ).
    pub(in crate::jobs) fn adopt_record(
        &self,
        record: &JobRecord,
    ) -> Result<Arc<JobHandle>, String> {
        let plan = match self.replan(record) {
            Ok(plan) => plan,
            Err(why) => {
                // Presets or limits differ between replicas.
                tracing::error!(job_id = %record.job_id, reason = %why, "recorded job cannot be planned here");
                return Err(why);
            }
        };
        let job = self
            .registry
            .adopt(plan, record.seq, record.spec_hash.clone());
        if record.cancelled && !job.cancel.is_cancelled() {
            // Items running here stop and end CANCELLED; the replica that took CancelJob ends the others.
            job.cancel.cancel();
        }
        Ok(job)
    }

    /// The job as recorded in the bucket, with its recorded items, when this replica has not seen it yet (its
    /// record was written an instant ago by another replica).
    pub(in crate::jobs) async fn fetch_recorded(
        &self,
        cluster: &Cluster,
        key: &JobKey,
    ) -> Result<Fetched, StoreError> {
        let Some(record) = cluster.store().job(&key.user_id, &key.job_id).await? else {
            return Ok(Fetched::NotRecorded);
        };
        let job = match self.adopt_record(&record) {
            Ok(job) => job,
            Err(why) => {
                return Ok(Fetched::Unplannable {
                    record: Box::new(record),
                    why,
                });
            }
        };
        read_items(cluster, &job, &record.key(), record.spec.image_count).await?;
        Ok(Fetched::Job(job))
    }
}

/// What `fetch_recorded` found.
#[derive(Debug)]
pub(in crate::jobs) enum Fetched {
    Job(Arc<JobHandle>),
    NotRecorded,
    /// Recorded, but not plannable here (`why`): presets or limits differ between replicas, during a rolling config
    /// change. Not the same as never recorded: the job's items must still end (`unrunnable`).
    Unplannable {
        record: Box<JobRecord>,
        why: String,
    },
}

/// The job's recorded items (terminal records, and claims of the items running on some replica) read into `job`.
/// One that does not decode is left out of the view (as the watch leaves it), not made the whole job's error: the
/// job itself is readable, and its other items are.
pub(in crate::jobs) async fn read_items(
    cluster: &Cluster,
    job: &JobHandle,
    record_key: &RecordKey,
    image_count: u32,
) -> Result<(), StoreError> {
    for idx in 0..image_count.min(job.plan.image_count) {
        let read = match cluster.store().item(record_key, idx).await {
            Ok(Some(item)) => {
                job.apply_record(idx, item);
                continue;
            }
            Ok(None) => cluster
                .store()
                .claim_of(record_key, idx)
                .await
                .map(|c| c.is_some()),
            Err(e) => Err(e),
        };
        match read {
            Ok(claimed) => {
                if claimed {
                    job.show_running(idx);
                }
            }
            Err(e @ StoreError::Corrupt { .. }) => {
                tracing::warn!(job_id = %record_key.job_id, idx, error = %Report(&e), "unreadable item record ignored");
            }
            Err(e @ StoreError::Unavailable(_)) => return Err(e),
        }
    }
    Ok(())
}
