//! ADAPTER=queue_pull: the NATS JetStream work queue.

use std::time::Duration;

use clap::Args;

use super::ConfigError;
use super::secret::UrlWithCredentials;

#[derive(Clone, Debug, Args)]
pub struct NatsArgs {
    /// ADAPTER=queue_pull: the NATS server(s), e.g. `nats://127.0.0.1:4222` (comma-separated for several).
    #[arg(long, env = "NATS_URL", hide_env_values = true)]
    pub nats_url: Option<UrlWithCredentials>,
    /// ADAPTER=queue_pull: the JetStream stream of jobs, created (work-queue retention) if missing. Default
    /// palette-jobs.
    #[arg(long, env = "NATS_STREAM", default_value = "palette-jobs")]
    pub nats_stream: String,
    /// ADAPTER=queue_pull: the subject jobs are published on (the stream's subject). Default palette.jobs.
    #[arg(long, env = "NATS_SUBJECT", default_value = "palette.jobs")]
    pub nats_subject: String,
    /// ADAPTER=queue_pull: the durable pull consumer every orchestrator shares. Default orchestrators.
    #[arg(long, env = "NATS_CONSUMER", default_value = "orchestrators")]
    pub nats_consumer: String,
    /// ADAPTER=queue_pull: seconds without an ack (or in-progress ack, sent every third of this while a job runs)
    /// before JetStream redelivers a job to another orchestrator. Applied when the consumer is created. Default 60.
    #[arg(long, env = "NATS_ACK_WAIT_SEC", default_value_t = 60)]
    pub nats_ack_wait_sec: u64,
    /// ADAPTER=queue_pull: deliveries of one job that may run it. A job delivered once more (its runners kept dying)
    /// is given up: its open items end FAILED (`too_many_deliveries`) with their callbacks. The consumer is created
    /// with max_deliver one above it, so JetStream itself stops there. Default 5.
    #[arg(long, env = "NATS_MAX_DELIVERIES", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub nats_max_deliveries: u64,
}

/// The queue to take jobs from, validated.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    pub url: UrlWithCredentials,
    pub stream: String,
    pub subject: String,
    pub consumer: String,
    pub ack_wait: Duration,
    /// Deliveries that run the job; the next one gives it up.
    pub max_deliveries: u64,
}

impl NatsArgs {
    /// NATS_URL, required `reason` ("for ADAPTER=queue_pull", "for JOB_STORE=nats").
    pub(super) fn url(&self, reason: &'static str) -> Result<String, ConfigError> {
        self.nats_url
            .as_ref()
            .map(|u| u.expose().trim())
            .filter(|v| !v.is_empty())
            .map(str::to_string)
            .ok_or(ConfigError::Missing {
                setting: "NATS_URL",
                reason,
            })
    }

    pub fn settings(&self) -> Result<QueueSettings, ConfigError> {
        let url = self.url("for ADAPTER=queue_pull")?;
        Ok(QueueSettings {
            url: url.into(),
            stream: non_empty(&self.nats_stream, "NATS_STREAM")?,
            subject: non_empty(&self.nats_subject, "NATS_SUBJECT")?,
            consumer: non_empty(&self.nats_consumer, "NATS_CONSUMER")?,
            ack_wait: Duration::from_secs(self.nats_ack_wait_sec.max(1)),
            max_deliveries: self.nats_max_deliveries,
        })
    }
}

impl QueueSettings {
    /// In-progress acks go out this often while a job runs.
    pub fn progress_every(&self) -> Duration {
        (self.ack_wait / 3).max(Duration::from_millis(100))
    }
}

/// A name setting (stream, subject, consumer, bucket), trimmed; empty is refused naming it.
pub(super) fn non_empty(value: &str, setting: &'static str) -> Result<String, ConfigError> {
    let value = value.trim();
    if value.is_empty() {
        Err(ConfigError::Empty { setting })
    } else {
        Ok(value.to_string())
    }
}

/// Whether some subject matches both NATS subject filters (`*`: one token, `>`: one or more trailing tokens).
pub fn subjects_overlap(a: &str, b: &str) -> bool {
    let (mut a, mut b) = (a.split('.'), b.split('.'));
    loop {
        match (a.next(), b.next()) {
            (None, None) => return true,
            // `>` needs at least one more token, which the other has (or is `>` itself).
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some(x), Some(y)) if x == y || x == "*" || y == "*" => {}
            _ => return false,
        }
    }
}

/// The lease and delivery limit a JetStream consumer really has. A consumer is created once, by the first replica,
/// and kept as it is after (`get_or_create_consumer` does not change an existing one): an ack wait or delivery
/// limit changed later in the settings would otherwise have this replica renew leases at a third of a wait the
/// consumer does not have (raised from 30 to 300 s: renewals every 100 s against a 30 s lease, every long item or
/// job delivered again while it runs) or give up at a count the consumer never reaches. So every replica adopts the
/// consumer's, and says so when they differ from its settings. `max_deliver` is the consumer's (one past the
/// deliveries that run the work: the one that gives it up; -1 or 0: unlimited).
pub fn adopt_consumer_limits(
    consumer: &str,
    ack_wait: &mut Duration,
    max_deliveries: &mut u64,
    actual_ack_wait: Duration,
    max_deliver: i64,
) {
    let actual_max = if max_deliver > 1 {
        (max_deliver - 1) as u64
    } else {
        u64::MAX
    };
    if actual_ack_wait != *ack_wait || actual_max != *max_deliveries {
        tracing::warn!(
            consumer,
            configured_ack_wait = ?*ack_wait,
            ack_wait = ?actual_ack_wait,
            configured_max_deliveries = *max_deliveries,
            max_deliveries = actual_max,
            "the consumer was created with other limits; using its limits (to change them, edit the consumer, e.g. \
             `nats consumer edit`, or delete it while no replica runs)"
        );
        *ack_wait = actual_ack_wait;
        *max_deliveries = actual_max;
    }
}

/// `max_deliver` for a new consumer: one past the deliveries that run the work; -1 (none) for an adopted unlimited.
pub fn max_deliver_for(max_deliveries: u64) -> i64 {
    i64::try_from(max_deliveries.saturating_add(1)).unwrap_or(-1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn settings_need_a_url() {
        let mut c = Config::for_tests("/tmp/x", "http://127.0.0.1:1");
        assert!(c.nats.settings().is_err());
        c.nats.nats_url = Some("nats://127.0.0.1:4222".into());
        c.nats.nats_ack_wait_sec = 30;
        let s = c.nats.settings().unwrap();
        assert_eq!(s.stream, "palette-jobs");
        assert_eq!(s.subject, "palette.jobs");
        assert_eq!(s.consumer, "orchestrators");
        assert_eq!(s.progress_every(), Duration::from_secs(10));
    }

    #[test]
    fn the_consumers_limits_replace_the_settings() {
        let (mut wait, mut max) = (Duration::from_secs(300), 9);
        adopt_consumer_limits("c", &mut wait, &mut max, Duration::from_secs(30), 6);
        assert_eq!(
            (wait, max),
            (Duration::from_secs(30), 5),
            "one delivery gives up"
        );
        adopt_consumer_limits("c", &mut wait, &mut max, Duration::from_secs(30), -1);
        assert_eq!(max, u64::MAX, "no limit");
        assert_eq!(max_deliver_for(max), -1, "and none again when creating");
        assert_eq!(max_deliver_for(5), 6);
    }
}
