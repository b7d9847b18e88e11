//! The worker's posts to Runpod's `done` endpoint: a job's progress (best effort) and its result (retried).

use serde_json::{Value as Json, json};

use crate::jobs::job::Progress;

use super::backoff::retried;
use super::output::progress_json;
use super::{POST_TIMEOUT, RESULT_ATTEMPTS, RunpodError, Worker};
use crate::error::Report;

impl Worker {
    async fn post_once(&self, job_id: &str, body: &Json) -> Result<(), RunpodError> {
        let response = self
            .http
            .post(self.settings.output_url(job_id))
            .header("Authorization", self.settings.api_key.expose())
            .header("Content-Type", "application/x-www-form-urlencoded")
            .header("charset", "utf-8")
            // As runpod-python sends it (its "legacy" request id: the job's).
            .header("X-Request-ID", job_id)
            .timeout(POST_TIMEOUT)
            .body(body.to_string())
            .send()
            .await
            .map_err(|source| RunpodError::Http {
                request: "post",
                source,
            })?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(RunpodError::Status {
                request: "post",
                status: response.status().as_u16(),
            })
        }
    }

    /// The final result, retried with backoff; a result that cannot be delivered is logged. A refusal (4xx other
    /// than 408 and 429) is not retried: the same body is refused again.
    pub(super) async fn post_result(&self, job_id: &str, body: &Json) {
        let sent = retried(
            RESULT_ATTEMPTS,
            self.jitter,
            || async {
                match self.post_once(job_id, body).await {
                    Err(RunpodError::Status { status, .. })
                        if (400..500).contains(&status) && status != 408 && status != 429 =>
                    {
                        Ok(Err(status))
                    }
                    posted => posted.map(Ok),
                }
            },
            |attempt, e| {
                tracing::warn!(runpod_job = %job_id, attempt, error = %Report(e), "runpod: result post failed");
            },
        )
        .await;
        match sent {
            Some(Ok(())) => tracing::info!(runpod_job = %job_id, "runpod: result sent"),
            Some(Err(status)) => {
                tracing::error!(runpod_job = %job_id, status, "runpod: result refused; not sent again")
            }
            None => tracing::error!(runpod_job = %job_id, "runpod: result not delivered"),
        }
    }

    /// Progress is best effort: one attempt, logged on failure.
    pub(super) async fn post_progress(&self, job_id: &str, followed_job_id: &str, job: &Progress) {
        let body = json!({"status": "IN_PROGRESS", "output": progress_json(followed_job_id, job)});
        if let Err(e) = self.post_once(job_id, &body).await {
            tracing::warn!(runpod_job = %job_id, error = %Report(&e), "runpod: progress post failed");
        }
    }
}
