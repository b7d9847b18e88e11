//! A queued job refused for good (ADAPTER=queue_pull, its last delivery): the caller put it on the queue and hears
//! nothing else (no gRPC answer, no Runpod result), so each of its items is called back FAILED `invalid_job` with
//! the refusal, as the seed's contract has every item end in a state the caller is told about. Only where the
//! callback can name the job: its user id, job id and image count valid (they make the URL, the webhook ids and the
//! items), and a spec refused on its fields (`InvalidArgument`): a job id another spec holds (`JobExists`) would put
//! FAILED callbacks on that other job's URL, and other refusals are not about the job. Items an earlier delivery
//! finished (their record exists: they were called back; e.g. a replica with the job's preset ran part of it and
//! stopped) and jobs that exist under the key are left alone. A message that only names a job (it does not parse
//! here: `refusal_of_unreadable`) is recorded under the hash of what it names: a newer release that read it recorded
//! its items under its full spec's hash, which this one cannot compute (see docs/operations.md, durable intake).

use std::sync::atomic::{AtomicUsize, Ordering};

use futures::StreamExt;
use palette_proto::orchestrator::v1::{CallbackState, Item, ItemState, JobSpec};

use super::report::callback_body;
use super::{JobKey, JobService, durable};
use crate::callback::CallbackJob;
use crate::error::{ApiError, FieldViolation};
use crate::keys;

/// Refused items called back at once (CALLBACK_CONCURRENCY's default).
const SENT_TOGETHER: usize = 16;

/// The spec's fields a callback is made of (its URL, webhook ids and items): a refusal naming one calls nothing back.
const NAMES_THE_JOB: [&str; 3] = ["user_id", "job_id", "image_count"];

/// `error_code` of the items of a queued job refused for good.
pub const INVALID_JOB: &str = "invalid_job";

impl JobService {
    /// The refusal of a queued message that names a job (`spec_json::named_job`) but is not the seed's job JSON:
    /// `reason` (the parse error) on the whole job, plus whatever its ids and image count break, judged as a
    /// submission's are, so that `call_back_refused` calls back only a job they can name, and at most
    /// MAX_IMAGES_PER_JOB items.
    pub fn refusal_of_unreadable(&self, named: &JobSpec, reason: String) -> Vec<FieldViolation> {
        let mut violations: Vec<FieldViolation> =
            match super::validate::validate(named, &self.presets, self.limits) {
                Err(ApiError::InvalidArgument(found)) => found
                    .into_iter()
                    .filter(|v| NAMES_THE_JOB.contains(&v.field.as_str()))
                    .collect(),
                _ => Vec::new(),
            };
        violations.push(FieldViolation::new("job", reason));
        violations
    }

    /// Calls back every item of `spec` FAILED `invalid_job` with `error` (when callbacks are on and the refusal
    /// allows: see the module); how many callbacks were delivered.
    pub async fn call_back_refused(&self, spec: &JobSpec, error: &ApiError) -> usize {
        let ApiError::InvalidArgument(violations) = error else {
            return 0;
        };
        let names_the_job = !violations
            .iter()
            .any(|v| NAMES_THE_JOB.contains(&v.field.as_str()));
        let Some(sender) = self.pipeline.reporter().callbacks().cloned() else {
            return 0;
        };
        if !names_the_job {
            return 0;
        }
        // A job under this key exists (this replica's registry, or the shared job store): its items are its own to
        // report.
        if self.find(&JobKey::of_spec(spec)).await.is_ok() {
            return 0;
        }
        let spec_hash = super::job::spec_hash(spec);
        let store = self.pipeline.object_store();
        let about = CallbackJob {
            user_id: &spec.user_id,
            job_id: &spec.job_id,
            spec_hash: &spec_hash,
        };
        let message = format!("the job was refused: {error}");
        let item_of = |idx| Item {
            idx,
            state: ItemState::Failed as i32,
            input_key: keys::input(&spec.user_id, &spec.job_id, idx),
            error: message.clone(),
            error_code: INVALID_JOB.into(),
            callback_state: CallbackState::Pending as i32,
            ..Default::default()
        };
        // Items an earlier delivery ended have their record, written before their callback: a settled one was told
        // and is left alone; a pending one (its worker died mid-callback, or a shutdown cut this very refusal short)
        // has its recorded end sent again, same webhook-id. Read for as long as storage is down: an item skipped
        // here was never called back. The others are recorded FAILED invalid_job before they are called back and
        // again once settled, as a run's items are: a later delivery to a replica that accepts the job (a rolling
        // deploy finished; the Term lost) takes them as ended instead of running them and calling them back
        // COMPLETED. At most CALLBACK_CONCURRENCY's default at once, not a future per item of a job of any size.
        let (sent, delivered) = (AtomicUsize::new(0), AtomicUsize::new(0));
        // Not cut by a shutdown, as the reads above are not (see `adapters::queue_pull`).
        let never = tokio_util::sync::CancellationToken::new();
        // Set by the first 410 Gone: the job's other callbacks are then not sent.
        let gone = std::sync::atomic::AtomicBool::new(false);
        futures::stream::iter(0..spec.image_count)
            .for_each_concurrent(SENT_TOGETHER, |idx| {
                let (sender, sent, delivered, gone) = (&sender, &sent, &delivered, &gone);
                let key = keys::item_marker(&spec.user_id, &spec.job_id, &spec_hash, idx);
                let (item_of, never) = (&item_of, &never);
                async move {
                    let item = match durable::read_key_patiently(store, &key).await {
                        // Recorded and unreadable here (a newer release's record): its end may not be FAILED.
                        Some(None) => return,
                        Some(Some(recorded))
                            if recorded.callback_state != CallbackState::Pending as i32 =>
                        {
                            return;
                        }
                        Some(Some(recorded)) => recorded,
                        // First writer wins, as for a run's items: a delivery that ended the item meanwhile stands.
                        None => match durable::claim_key(store, &key, &item_of(idx), never).await {
                            durable::Claim::Ours { .. } => item_of(idx),
                            durable::Claim::Theirs(recorded)
                                if recorded.callback_state == CallbackState::Pending as i32 =>
                            {
                                *recorded
                            }
                            durable::Claim::Theirs(_) | durable::Claim::Unread => return,
                        },
                    };
                    sent.fetch_add(1, Ordering::Relaxed);
                    let body = callback_body(about, &item);
                    let outcome = sender.deliver_unless_gone(about, &body, gone).await;
                    let settled = Item {
                        callback_state: if outcome.delivered {
                            CallbackState::Delivered as i32
                        } else {
                            CallbackState::Failed as i32
                        },
                        callback_attempts: outcome.attempts,
                        callback_error: outcome.error.unwrap_or_default(),
                        ..item
                    };
                    durable::put(store, &key, &settled).await;
                    if outcome.delivered {
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
            .await;
        let delivered = delivered.into_inner();
        tracing::warn!(
            job_id = %spec.job_id,
            items = sent.into_inner(),
            delivered,
            "queue_pull: refused job's items called back FAILED invalid_job"
        );
        delivered
    }
}
