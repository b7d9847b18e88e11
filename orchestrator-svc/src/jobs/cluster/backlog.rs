//! The shared item queue's backlog as gauges, for the autoscaler: every replica reads the item consumer's info every
//! NATS_ITEM_BACKLOG_SEC and exports
//!
//! - `orchestrator_item_queue_pending`: tasks in the work stream not yet handed to any replica (the consumer's
//!   `num_pending`). This is the work waiting: replicas pull one task per free permit, so a task waits here, not in a
//!   replica, until some replica has room for it.
//! - `orchestrator_item_queue_ack_pending`: tasks handed out and not yet acknowledged (`num_ack_pending`): the items
//!   running (each also in its holder's `orchestrator_items_in_flight`), tasks held until their job's record appears,
//!   and tasks of a replica that died, until their lease runs out and they are handed out again. For dashboards
//!   only: added to the items in flight it would count every running item twice.
//!
//! Both are the same shared numbers on every replica: aggregate them with `max()`, not `sum()`. A read that fails
//! (NATS unreachable) leaves the gauges as they were: no replica can take a task meanwhile, so the last backlog holds
//! the replica count where it was. (NaN would poison the autoscaler's sum, and KEDA's Prometheus scaler read a NaN
//! as a huge negative number, kedacore/keda#7475.) The loop ends with `stop`, at shutdown.

use std::sync::Arc;

use async_nats::jetstream::consumer::PullConsumer;
use tokio_util::sync::CancellationToken;

use super::Cluster;
use crate::error::Report;

impl Cluster {
    /// Reads the item consumer's backlog into the gauges every `backlog_every` until `stop`.
    pub async fn report_backlog(self: Arc<Self>, stop: CancellationToken) {
        let mut every = tokio::time::interval(self.settings.backlog_every);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut consumer: Option<PullConsumer> = None;
        let mut failing = false;
        loop {
            tokio::select! {
                _ = every.tick() => {}
                () = stop.cancelled() => return,
            }
            let read = tokio::select! {
                read = self.read_backlog(&mut consumer) => read,
                () = stop.cancelled() => return,
            };
            match read {
                Ok((pending, ack_pending)) => {
                    metrics::gauge!("orchestrator_item_queue_pending").set(pending as f64);
                    metrics::gauge!("orchestrator_item_queue_ack_pending").set(ack_pending as f64);
                    if failing {
                        tracing::info!(pending, "item queue backlog read again");
                        failing = false;
                    }
                }
                Err(e) => {
                    // Once per outage at WARN: the work loop already says loudly that NATS is gone.
                    if failing {
                        tracing::debug!(error = %e, "item queue backlog not read");
                    } else {
                        tracing::warn!(error = %e, "item queue backlog not read; its gauges keep their last value");
                        failing = true;
                    }
                    consumer = None;
                }
            }
        }
    }

    /// (num_pending, num_ack_pending) of the item consumer: one consumer-info request (two more to find the
    /// consumer the first time, or after a failure).
    async fn read_backlog(
        &self,
        consumer: &mut Option<PullConsumer>,
    ) -> Result<(u64, usize), String> {
        let found = match consumer.take() {
            Some(found) => found,
            None => self.consumer().await.map_err(|e| Report(&e).to_string())?,
        };
        let info = found.get_info().await.map_err(|e| e.to_string());
        *consumer = Some(found);
        let info = info?;
        Ok((info.num_pending, info.num_ack_pending))
    }
}
