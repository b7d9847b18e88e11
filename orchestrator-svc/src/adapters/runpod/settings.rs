//! The Runpod endpoints, from the RUNPOD_* variables.

use std::time::Duration;

use crate::config::{Config, ConfigError};

/// The Runpod endpoints, resolved from the RUNPOD_* variables.
#[derive(Clone)]
pub struct RunpodSettings {
    pub get_job_url: String,
    pub post_output_url: String,
    pub ping_url: Option<String>,
    pub pod_id: String,
    pub api_key: String,
    pub ping_interval: Duration,
}

impl std::fmt::Debug for RunpodSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunpodSettings")
            .field("get_job_url", &self.get_job_url)
            .field("post_output_url", &self.post_output_url)
            .field("ping_url", &self.ping_url)
            .field("pod_id", &self.pod_id)
            .field("api_key", &"<redacted>")
            .field("ping_interval", &self.ping_interval)
            .finish()
    }
}

fn required(value: &Option<String>, setting: &'static str) -> Result<String, ConfigError> {
    value
        .as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .ok_or(ConfigError::Missing {
            setting,
            reason: "for ADAPTER=runpod",
        })
}

impl RunpodSettings {
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let pod_id = required(&config.runpod_pod_id, "RUNPOD_POD_ID")?;
        let get_job_url = required(&config.runpod_webhook_get_job, "RUNPOD_WEBHOOK_GET_JOB")?
            .replace("$RUNPOD_POD_ID", &pod_id)
            .replace("$ID", &pod_id);
        let post_output_url = required(
            &config.runpod_webhook_post_output,
            "RUNPOD_WEBHOOK_POST_OUTPUT",
        )?
        .replace("$RUNPOD_POD_ID", &pod_id);
        let ping_url = config
            .runpod_webhook_ping
            .as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(|v| v.replace("$RUNPOD_POD_ID", &pod_id));
        if ping_url.is_none() {
            tracing::warn!("RUNPOD_WEBHOOK_PING unset: no heartbeat");
        }
        Ok(RunpodSettings {
            get_job_url,
            post_output_url,
            ping_url,
            api_key: required(&config.runpod_ai_api_key, "RUNPOD_AI_API_KEY")?,
            pod_id,
            ping_interval: Duration::from_millis(config.runpod_ping_interval.max(100)),
        })
    }

    pub(super) fn take_url(&self, in_progress: bool) -> String {
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

    pub(super) fn output_url(&self, job_id: &str) -> String {
        self.post_output_url.replace("$ID", job_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn urls_substitute_ids() {
        let mut c = Config::for_tests("/tmp/x", "http://127.0.0.1:1");
        c.runpod_pod_id = Some("pod1".into());
        c.runpod_ai_api_key = Some("k".into());
        c.runpod_webhook_get_job = Some("http://h/take/$ID?gpu=x".into());
        c.runpod_webhook_post_output = Some("http://h/done/$RUNPOD_POD_ID/$ID".into());
        c.runpod_webhook_ping = Some("http://h/ping/$RUNPOD_POD_ID".into());
        let s = RunpodSettings::from_config(&c).unwrap();
        assert_eq!(
            s.take_url(false),
            "http://h/take/pod1?gpu=x&job_in_progress=0"
        );
        assert_eq!(s.output_url("job9"), "http://h/done/pod1/job9");
        assert_eq!(s.ping_url.as_deref(), Some("http://h/ping/pod1"));
        assert!(!format!("{s:?}").contains("\"k\""));
        c.runpod_ai_api_key = None;
        assert!(RunpodSettings::from_config(&c).is_err());
    }
}
