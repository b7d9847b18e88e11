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
}
