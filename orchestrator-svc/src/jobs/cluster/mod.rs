//! JOB_STORE=nats: replicas that share one job state on NATS JetStream (docs/architecture.md, "Replicas on NATS").
//!
//! - Records: the key-value bucket of `store::NatsJobStore` (`job.*` records, `item.*` terminal items; every write
//!   a compare-and-set, so the first terminal state of an item wins, whichever replica wrote it; `run.*` claims of
//!   the items running, so every replica shows them RUNNING).
//! - Views: every replica follows the bucket's watch (`mirror`) into its registry, so GetJob/WatchJob/CancelJob
//!   answer for any job on any replica, and a cancel recorded anywhere stops the items running here.
//! - Work: SubmitJob publishes one task per item to a work-queue stream; every replica pulls from one shared
//!   durable consumer as its BATCH_CONCURRENCY permits free up (`work`). The ack wait is the lease: in-progress
//!   acks keep it while the item runs, and a replica that dies holding an item loses it to another one.
//! - Backlog: every replica exports the shared consumer's count of tasks not yet handed out (`backlog`), the work
//!   waiting that the autoscaler adds to the items running.

mod backlog;
mod held;
mod late;
mod markers;
mod mirror;
mod orphans;
mod patience;
mod unrunnable;
mod work;

use std::sync::Arc;

use async_nats::jetstream::{self, consumer::PullConsumer};
use serde::{Deserialize, Serialize};

use super::store::{NatsJobStore, RecordKey, StoreError};
pub use crate::config::ClusterSettings;
use crate::config::{adopt_consumer_limits, max_deliver_for};
pub(in crate::jobs) use mirror::{Fetched, read_items};

/// One item to run: what the work stream carries.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ItemTask {
    pub user_id: String,
    pub job_id: String,
    pub spec_hash: String,
    pub idx: u32,
}

impl ItemTask {
    /// Item `idx` of user "u"'s job "j" (spec "h"): the unit tests' task.
    #[cfg(test)]
    fn for_tests(idx: u32) -> ItemTask {
        ItemTask {
            user_id: "u".into(),
            job_id: "j".into(),
            spec_hash: "h".into(),
            idx,
        }
    }

    fn job(&self) -> RecordKey {
        RecordKey {
            user_id: self.user_id.clone(),
            job_id: self.job_id.clone(),
            spec_hash: self.spec_hash.clone(),
        }
    }
}

/// What becomes of an item task (`work`).
enum TaskEnd {
    /// The item's terminal state is recorded: acknowledged, gone from the stream.
    Done,
    /// Offered again after the delay (to any replica).
    Again(std::time::Duration),
    /// Not a task of any job: terminated.
    Drop,
}

/// Item tasks published before their acks are awaited (`Cluster::publish_items`).
const PUBLISH_WINDOW: usize = 128;

/// The shared state's handles: the bucket (as the job store) and the work stream.
#[derive(Debug)]
pub struct Cluster {
    store: Arc<NatsJobStore>,
    js: jetstream::Context,
    settings: ClusterSettings,
    /// This process among the replicas, as its item claims name it: the host name (the pod's, in Kubernetes) and
    /// a random suffix, so a restarted pod is another replica.
    replica_id: String,
    /// Jobs whose tasks came before (or without) their records (`work`).
    orphans: orphans::Orphans,
    /// Tasks that end their item without running it (`work::ENDING_SLOTS`).
    ending: Arc<tokio::sync::Semaphore>,
    /// The items whose tasks are held here, so that another task of one waits for the first (`held`).
    held: held::HeldTasks,
}

impl Cluster {
    /// Connects, and opens (creating if missing) the bucket, the work stream and its shared consumer.
    pub async fn connect(settings: ClusterSettings) -> Result<Self, StoreError> {
        let client = async_nats::connect(settings.url.expose())
            .await
            .map_err(StoreError::unavailable)?;
        let js = jetstream::new(client);
        let store = NatsJobStore::open_on(&js, &settings.bucket, settings.replicas).await?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "orchestrator".to_string());
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let mut cluster = Cluster {
            store: Arc::new(store),
            js,
            settings,
            replica_id: format!("{host}-{}", &suffix[..8]),
            orphans: orphans::Orphans::default(),
            ending: Arc::new(tokio::sync::Semaphore::new(work::ENDING_SLOTS)),
            held: held::HeldTasks::default(),
        };
        // As the server has it: created now, or as it was created before.
        let consumer = cluster.consumer().await?;
        let config = &consumer.cached_info().config;
        let s = &mut cluster.settings;
        adopt_consumer_limits(
            &s.consumer,
            &mut s.ack_wait,
            &mut s.max_deliveries,
            config.ack_wait,
            config.max_deliver,
        );
        Ok(cluster)
    }

    pub fn store(&self) -> &Arc<NatsJobStore> {
        &self.store
    }

    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    pub fn replica_id(&self) -> &str {
        &self.replica_id
    }

    /// The work stream's shared consumer, created with the stream if missing.
    async fn consumer(&self) -> Result<PullConsumer, StoreError> {
        let s = &self.settings;
        let stream = self
            .js
            .get_or_create_stream(jetstream::stream::Config {
                name: s.stream.clone(),
                subjects: vec![s.subject.clone()],
                retention: jetstream::stream::RetentionPolicy::WorkQueue,
                storage: jetstream::stream::StorageType::File,
                num_replicas: s.replicas.max(1),
                ..Default::default()
            })
            .await
            .map_err(StoreError::unavailable)?;
        stream
            .get_or_create_consumer(
                &s.consumer,
                jetstream::consumer::pull::Config {
                    durable_name: Some(s.consumer.clone()),
                    filter_subject: s.subject.clone(),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: s.ack_wait,
                    // One past the deliveries that run the item: the delivery that gives it up (`work`).
                    max_deliver: max_deliver_for(s.max_deliveries),
                    ..Default::default()
                },
            )
            .await
            .map_err(StoreError::unavailable)
    }

    /// Publishes one task per item of the job, each confirmed by the stream before this returns. Each carries the W3C
    /// trace context of a `job` span in its headers, so the items, on whichever replica takes them, are spans of
    /// one trace per job (headers, not the payload: older replicas refuse unknown payload fields).
    pub async fn publish_items(&self, job: &RecordKey, image_count: u32) -> Result<(), StoreError> {
        let span =
            tracing::info_span!(parent: None, "job", job_id = %job.job_id, images = image_count);
        let mut headers = async_nats::HeaderMap::new();
        for (name, value) in crate::telemetry::trace_headers(&span) {
            headers.insert(name.as_str(), value.as_str());
        }
        // Acks are awaited a window at a time, not one before the next publish: one round trip per window instead of
        // per item. One by one, a 500-image job on a degraded server (120 ms per ack) took a minute to publish,
        // while replicas that had fetched its first tasks gave them up as orphans (`work::ORPHAN_AFTER`).
        let mut pending = Vec::with_capacity(PUBLISH_WINDOW);
        for idx in 0..image_count {
            let task = ItemTask {
                user_id: job.user_id.clone(),
                job_id: job.job_id.clone(),
                spec_hash: job.spec_hash.clone(),
                idx,
            };
            let payload = serde_json::to_vec(&task).map_err(StoreError::unavailable)?;
            let ack = self
                .js
                .publish_with_headers(
                    self.settings.subject.clone(),
                    headers.clone(),
                    payload.into(),
                )
                .await
                .map_err(StoreError::unavailable)?;
            pending.push(ack.into_future());
            if pending.len() == PUBLISH_WINDOW || idx + 1 == image_count {
                futures::future::try_join_all(pending.drain(..))
                    .await
                    .map_err(StoreError::unavailable)?;
            }
        }
        Ok(())
    }
}
