//! Where job state outlives the process (see docs/architecture.md, "Job state").

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::nats::{non_empty, subjects_overlap};
use super::secret::UrlWithCredentials;
use super::{ConfigError, NatsArgs};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum JobStoreKind {
    /// A redb file on local disk: a restarted orchestrator resumes its unfinished jobs.
    Local,
    /// Nothing kept: a restart loses every job (unstarted items fail at shutdown so callers can resubmit).
    Memory,
    /// NATS JetStream, shared by every replica: any replica answers for any job, items spread over all of them.
    Nats,
}

#[derive(Clone, Debug, Args)]
pub struct JobStoreArgs {
    /// Where jobs are kept across restarts: local (default; a redb file at JOB_STORE_PATH, one orchestrator per
    /// file: a restarted orchestrator resumes its unfinished jobs and resends unsettled callbacks) | memory (nothing
    /// kept: a restart loses every job, and unstarted images end FAILED with their callbacks at shutdown; the
    /// default with ADAPTER=runpod, whose worker's disk goes with it) | nats (NATS JetStream at NATS_URL, shared by
    /// every replica: any replica answers for any job and the items of a job spread over all replicas).
    #[arg(
        long,
        env = "JOB_STORE",
        value_enum,
        default_value = "local",
        ignore_case = true
    )]
    pub job_store: JobStoreKind,
    /// JOB_STORE=local: the store's file, created with its directory; on local disk only (the file is memory-mapped
    /// and locked). Default ./.data/jobs.redb.
    #[arg(long, env = "JOB_STORE_PATH", default_value = "./.data/jobs.redb")]
    pub job_store_path: PathBuf,
    /// JOB_STORE=nats: the key-value bucket of job and item records, created if missing. Default palette_jobs.
    #[arg(long, env = "NATS_JOB_BUCKET", default_value = "palette_jobs")]
    pub nats_job_bucket: String,
    /// JOB_STORE=nats: the work-queue stream of item tasks (one message per item to run), created if missing.
    /// Default palette-items.
    #[arg(long, env = "NATS_ITEM_STREAM", default_value = "palette-items")]
    pub nats_item_stream: String,
    /// JOB_STORE=nats: the item stream's subject; must not overlap NATS_SUBJECT (refused at startup). Default
    /// palette.items.
    #[arg(long, env = "NATS_ITEM_SUBJECT", default_value = "palette.items")]
    pub nats_item_subject: String,
    /// JOB_STORE=nats: the durable pull consumer of item tasks every replica shares. Default item-workers.
    #[arg(long, env = "NATS_ITEM_CONSUMER", default_value = "item-workers")]
    pub nats_item_consumer: String,
    /// JOB_STORE=nats: seconds an item's lease lasts without an in-progress ack (sent every third of it while the
    /// item runs): a replica that dies holding an item loses it to another replica this long after. Applied when
    /// the consumer is created. Default 30.
    #[arg(long, env = "NATS_ITEM_ACK_WAIT_SEC", default_value_t = 30)]
    pub nats_item_ack_wait_sec: u64,
    /// JOB_STORE=nats: copies JetStream keeps of the bucket and the item stream (1, or 3 on a 3-node NATS cluster so
    /// losing one node loses nothing). Applied when they are created. Default 1.
    #[arg(long, env = "NATS_STORE_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=5))]
    pub nats_store_replicas: u64,
    /// JOB_STORE=nats: seconds between two reads of the item consumer's backlog, exported by every replica as
    /// `orchestrator_item_queue_pending` (tasks not yet handed to any replica; what the autoscaler adds to the items
    /// running). One consumer-info request each time. Default 15 (Prometheus' and KEDA's usual interval).
    #[arg(long, env = "NATS_ITEM_BACKLOG_SEC", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub nats_item_backlog_sec: u64,
    /// JOB_STORE=nats: seconds an item's record is written again while NATS does not answer before the report gives
    /// up; the task's holder then keeps asking, writes the record once NATS answers, and only then calls the item back
    /// (never without its record, but on a task's last delivery). An outage shorter than both this and the item
    /// lease (NATS_ITEM_ACK_WAIT_SEC) never makes an item run twice.
    /// Default 120.
    #[arg(long, env = "NATS_STORE_PATIENCE_SEC", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub nats_store_patience_sec: u64,
}

/// JOB_STORE=nats, validated.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub url: UrlWithCredentials,
    pub bucket: String,
    pub stream: String,
    pub subject: String,
    pub consumer: String,
    /// JetStream copies of the bucket and the stream.
    pub replicas: usize,
    /// An item's lease: how long a replica may hold it without an in-progress ack.
    pub ack_wait: Duration,
    /// Deliveries of one item that may run it (NATS_MAX_DELIVERIES); the next one fails it `too_many_deliveries`.
    pub max_deliveries: u64,
    /// How often the item consumer's backlog is read for the gauges (NATS_ITEM_BACKLOG_SEC).
    pub backlog_every: Duration,
    /// How long an item record is written again while NATS does not answer (NATS_STORE_PATIENCE_SEC).
    pub store_patience: Duration,
}

impl ClusterSettings {
    /// In-progress acks go out this often while an item runs.
    pub fn progress_every(&self) -> Duration {
        (self.ack_wait / 3).max(Duration::from_millis(100))
    }
}

impl JobStoreArgs {
    /// The NATS store's settings (JOB_STORE=nats); NATS_URL and NATS_MAX_DELIVERIES come from the queue's section.
    pub fn cluster_settings(&self, nats: &NatsArgs) -> Result<ClusterSettings, ConfigError> {
        let url = nats.url("for JOB_STORE=nats")?;
        let subject = non_empty(&self.nats_item_subject, "NATS_ITEM_SUBJECT")?;
        // Two streams cannot share a subject: on a fresh server the second could not be created, and the item
        // workers would take job messages for tasks (and drop them as unreadable).
        if subjects_overlap(&subject, nats.nats_subject.trim()) {
            return Err(ConfigError::invalid(
                "NATS_ITEM_SUBJECT",
                subject,
                format!(
                    "overlaps NATS_SUBJECT {:?}: the item stream and the job queue need subjects apart",
                    nats.nats_subject.trim()
                ),
            ));
        }
        Ok(ClusterSettings {
            url: url.into(),
            bucket: non_empty(&self.nats_job_bucket, "NATS_JOB_BUCKET")?,
            stream: non_empty(&self.nats_item_stream, "NATS_ITEM_STREAM")?,
            subject,
            consumer: non_empty(&self.nats_item_consumer, "NATS_ITEM_CONSUMER")?,
            replicas: self.nats_store_replicas as usize,
            ack_wait: Duration::from_secs(self.nats_item_ack_wait_sec.max(1)),
            max_deliveries: nats.nats_max_deliveries,
            backlog_every: Duration::from_secs(self.nats_item_backlog_sec.max(1)),
            store_patience: Duration::from_secs(self.nats_store_patience_sec),
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn the_item_subject_must_not_overlap_the_job_queues() {
        use crate::config::nats::subjects_overlap;
        for (a, b, overlap) in [
            ("palette.items", "palette.jobs", false),
            ("palette.items", "palette.>", true),
            ("palette.*", "palette.jobs", true),
            ("palette.*", "palette.jobs.x", false),
            ("palette.>", "palette", false),
            ("a.>", "*.b.c", true),
            ("a.b", "a.b", true),
            ("a.b", "a.b.c", false),
        ] {
            assert_eq!(subjects_overlap(a, b), overlap, "{a} {b}");
            assert_eq!(subjects_overlap(b, a), overlap, "{b} {a}");
        }
        let mut c = Config::for_tests("/tmp/x", "http://127.0.0.1:1");
        c.nats.nats_url = Some("nats://127.0.0.1:4222".into());
        c.nats.nats_subject = "palette.>".into();
        let err = c.jobs.cluster_settings(&c.nats).unwrap_err();
        assert!(
            crate::error::report(&err).contains("overlaps NATS_SUBJECT"),
            "{}",
            crate::error::report(&err)
        );
    }

    #[test]
    fn the_nats_store_needs_a_url() {
        let mut c = Config::for_tests("/tmp/x", "http://127.0.0.1:1");
        assert!(c.jobs.cluster_settings(&c.nats).is_err());
        c.nats.nats_url = Some("nats://127.0.0.1:4222".into());
        let s = c.jobs.cluster_settings(&c.nats).unwrap();
        assert_eq!(
            (s.bucket.as_str(), s.stream.as_str(), s.subject.as_str()),
            ("palette_jobs", "palette-items", "palette.items")
        );
        assert_eq!(s.progress_every(), std::time::Duration::from_secs(10));
    }
}
