//! ADAPTER=runpod: the Runpod endpoints, from the RUNPOD_* variables (set by Runpod).

use std::time::Duration;

use clap::Args;

use super::ConfigError;
use super::secret::Secret;

#[derive(Clone, Debug, Args)]
pub struct RunpodArgs {
    /// ADAPTER=runpod: the job-take URL (GET); `$ID` is replaced by RUNPOD_POD_ID. Set by Runpod.
    #[arg(long, env = "RUNPOD_WEBHOOK_GET_JOB")]
    pub runpod_webhook_get_job: Option<String>,
    /// ADAPTER=runpod: the result URL (POST, progress and final output); `$ID` is replaced by the Runpod job id and
    /// `$RUNPOD_POD_ID` by RUNPOD_POD_ID. Set by Runpod.
    #[arg(long, env = "RUNPOD_WEBHOOK_POST_OUTPUT")]
    pub runpod_webhook_post_output: Option<String>,
    /// ADAPTER=runpod: the heartbeat URL (GET); `$RUNPOD_POD_ID` is replaced. Unset: no heartbeat. Set by Runpod.
    #[arg(long, env = "RUNPOD_WEBHOOK_PING")]
    pub runpod_webhook_ping: Option<String>,
    /// ADAPTER=runpod: this worker's id. Set by Runpod.
    #[arg(long, env = "RUNPOD_POD_ID")]
    pub runpod_pod_id: Option<String>,
    /// ADAPTER=runpod: sent as `Authorization` on every Runpod request. Set by Runpod.
    #[arg(long, env = "RUNPOD_AI_API_KEY", hide_env_values = true)]
    pub runpod_ai_api_key: Option<Secret>,
    /// ADAPTER=runpod: heartbeat interval, in milliseconds. Default 10000.
    #[arg(long, env = "RUNPOD_PING_INTERVAL", default_value_t = 10_000)]
    pub runpod_ping_interval: u64,
}

/// The Runpod endpoints, `$ID`/`$RUNPOD_POD_ID` substituted where they are known.
#[derive(Clone, Debug)]
pub struct RunpodSettings {
    pub get_job_url: String,
    pub post_output_url: String,
    pub ping_url: Option<String>,
    pub pod_id: String,
    pub api_key: Secret,
    pub ping_interval: Duration,
    /// After SIGTERM, the job in progress gets its result by then at the latest: an error result listing what is
    /// done when images are still running (the drain's grace period ends soon after, and a job without a result
    /// stays IN_PROGRESS at Runpod). Set from SHUTDOWN_GRACE_SEC (`RunpodSettings::within_grace`).
    pub result_within: Duration,
}

fn required(value: Option<&str>, setting: &'static str) -> Result<String, ConfigError> {
    value
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .ok_or(ConfigError::Missing {
            setting,
            reason: "for ADAPTER=runpod",
        })
}

impl RunpodArgs {
    pub fn settings(&self) -> Result<RunpodSettings, ConfigError> {
        let pod_id = required(self.runpod_pod_id.as_deref(), "RUNPOD_POD_ID")?;
        let get_job_url = required(
            self.runpod_webhook_get_job.as_deref(),
            "RUNPOD_WEBHOOK_GET_JOB",
        )?
        .replace("$RUNPOD_POD_ID", &pod_id)
        .replace("$ID", &pod_id);
        let post_output_url = required(
            self.runpod_webhook_post_output.as_deref(),
            "RUNPOD_WEBHOOK_POST_OUTPUT",
        )?
        .replace("$RUNPOD_POD_ID", &pod_id);
        let ping_url = self
            .runpod_webhook_ping
            .as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(|v| v.replace("$RUNPOD_POD_ID", &pod_id));
        if ping_url.is_none() {
            tracing::warn!("RUNPOD_WEBHOOK_PING unset: no heartbeat");
        }
        let api_key = required(
            self.runpod_ai_api_key.as_ref().map(Secret::expose),
            "RUNPOD_AI_API_KEY",
        )?;
        Ok(RunpodSettings {
            get_job_url,
            post_output_url,
            ping_url,
            api_key: api_key.into(),
            pod_id,
            ping_interval: Duration::from_millis(self.runpod_ping_interval.max(100)),
            result_within: Duration::from_secs(22),
        })
    }
}

impl RunpodSettings {
    /// `result_within` a little before the end of a `grace` period: a quarter of it earlier, at most 10 s, so the
    /// result post has time to go out.
    pub fn within_grace(mut self, grace: Duration) -> Self {
        self.result_within = grace.saturating_sub(super::results_margin(grace));
        self
    }

    /// The take URL, telling Runpod whether a job is in progress here.
    pub fn take_url(&self, in_progress: bool) -> String {
        let sep = if self.get_job_url.contains('?') {
            '&'
        } else {
            '?'
        };
        format!(
            "{}{sep}job_in_progress={}",
            self.get_job_url,
            u8::from(in_progress)
        )
    }

    /// Where a job's progress and result go, marked not streamed as runpod-python's posts are (`isStream=false`).
    pub fn output_url(&self, job_id: &str) -> String {
        let url = self.post_output_url.replace("$ID", job_id);
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}isStream=false")
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn urls_substitute_ids() {
        let mut c = Config::for_tests("/tmp/x", "http://127.0.0.1:1");
        c.runpod.runpod_pod_id = Some("pod1".into());
        c.runpod.runpod_ai_api_key = Some("k".into());
        c.runpod.runpod_webhook_get_job = Some("http://h/take/$ID?gpu=x".into());
        c.runpod.runpod_webhook_post_output = Some("http://h/done/$RUNPOD_POD_ID/$ID".into());
        c.runpod.runpod_webhook_ping = Some("http://h/ping/$RUNPOD_POD_ID".into());
        let s = c.runpod.settings().unwrap();
        assert_eq!(
            s.take_url(false),
            "http://h/take/pod1?gpu=x&job_in_progress=0"
        );
        assert_eq!(
            s.output_url("job9"),
            "http://h/done/pod1/job9?isStream=false"
        );
        assert_eq!(s.ping_url.as_deref(), Some("http://h/ping/pod1"));
        assert!(!format!("{s:?}").contains("\"k\""));
        c.runpod.runpod_ai_api_key = None;
        assert!(c.runpod.settings().is_err());
    }
}
