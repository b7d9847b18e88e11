//! A Runpod job's submission to the job service. A refusal only for now (`ApiError::submit_again_in`: the registry
//! full of running jobs, the job store unreachable) is waited out in place, as `queue_pull` does, instead of being
//! posted as the job's final error: the heartbeat names the job meanwhile, so Runpod keeps it with this worker.

use std::time::Duration;

use palette_proto::orchestrator::v1::JobSpec;
use tokio::sync::watch;

use crate::error::Report;
use crate::jobs::JobService;

/// Wait between submissions the job store could not record (a full registry says how long itself).
const STORE_PAUSE: Duration = Duration::from_secs(2);

/// Submits `spec` until the job service takes it or refuses it for good; the error to post as the Runpod job's
/// result otherwise, also when `stop` comes while a refusal is being waited out (the job never started).
pub(super) async fn submit_patiently(
    service: &JobService,
    runpod_id: &str,
    spec: &JobSpec,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    loop {
        let refused = match service.submit(spec).await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        let Some(wait) = refused.submit_again_in(STORE_PAUSE) else {
            tracing::warn!(runpod_job = %runpod_id, error = %refused, "runpod: job rejected");
            return Err(refused.to_string());
        };
        tracing::info!(runpod_job = %runpod_id, error = %Report(&refused), ?wait, "runpod: job not taken now; submitting it again");
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|stopped| *stopped) => {
                let error = format!("the worker shut down before the job could start ({refused})");
                tracing::warn!(runpod_job = %runpod_id, %error, "runpod: job not started at shutdown");
                return Err(error);
            }
        }
    }
}
