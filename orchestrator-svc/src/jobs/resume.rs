//! At start: the jobs a job store kept come back into the registry as they were recorded, pending callbacks are
//! sent again, and jobs with open items run on. See docs/architecture.md, "Job state".

use std::collections::BTreeMap;
use std::sync::Arc;

use palette_rules::preset::Preset;

use palette_proto::orchestrator::v1::{CallbackState, JobSpec};

use super::JobService;
use super::job::{ItemOutcome, JobHandle, is_terminal};
use super::store::{self, JobRecord, StoreError, StoredJob};
use super::validate::{self, JobLimits, JobPlan};

/// `Item.error_code` of the items of a recorded job that cannot run here: its spec no longer plans (JOB_STORE=local),
/// or no replica that took its task could plan or read its job (JOB_STORE=nats). A local record that does not decode
/// is skipped at load and left in the file (`store::local`), as nothing of its job can be known.
pub(in crate::jobs) const JOB_NOT_RESUMABLE: &str = "job_not_resumable";

/// What `JobService::resume` found, for the log and for tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Resumed {
    pub jobs: usize,
    /// Jobs with items still to run.
    pub unfinished: usize,
    /// Terminal items whose callback was not settled before the process stopped.
    pub callbacks_resent: usize,
}

impl JobService {
    /// Brings back every job the job store kept; a no-op without one. Call once, before serving.
    pub async fn resume(&self) -> Result<Resumed, StoreError> {
        let Some(job_store) = self.pipeline.reporter().job_store().cloned() else {
            return Ok(Resumed::default());
        };
        if self.cluster.is_some() {
            // JOB_STORE=nats: jobs come back through the store's watch, and their items through the work stream.
            return Ok(Resumed::default());
        }
        let mut resumed = Resumed::default();
        for stored in job_store.load().await? {
            resumed.jobs += 1;
            let job = self.restore(stored, &mut resumed);
            if !job.is_terminal() {
                resumed.unfinished += 1;
                self.start(job);
            }
        }
        // Retention applies to what came back as it does to what is submitted.
        self.registry.trim();
        self.forget_in_store().await;
        if resumed.jobs > 0 {
            tracing::info!(
                jobs = resumed.jobs,
                unfinished = resumed.unfinished,
                callbacks_resent = resumed.callbacks_resent,
                "jobs resumed from the job store"
            );
        }
        Ok(resumed)
    }

    /// The recorded job planned again here (`replan_record` with this replica's presets and limits).
    pub(in crate::jobs) fn replan(&self, record: &JobRecord) -> Result<JobPlan, String> {
        replan_record(record, &self.presets, self.limits)
    }

    fn restore(&self, stored: StoredJob, resumed: &mut Resumed) -> Arc<JobHandle> {
        let StoredJob { record, items } = stored;
        let (plan, unplannable) = match self.replan(&record) {
            Ok(plan) => (plan, None),
            Err(why) => (placeholder_plan(&record), Some(why)),
        };
        let job = self
            .registry
            .restore(plan, record.seq, record.spec_hash.clone());
        if record.cancelled {
            // Before the items come back, so a job whose items all ended reads CANCELLED, not DONE.
            job.cancel.cancel();
        }
        let callbacks_on = self.pipeline.reporter().callbacks_on();
        let mut unsettled = Vec::new();
        for mut item in items {
            let idx = item.idx;
            let pending = item.callback_state == CallbackState::Pending as i32;
            if pending && !callbacks_on {
                // Callbacks were turned off (WORKERS_API_URL unset) since: none will be sent, and an item left
                // PENDING would keep its job from ever being settled, so never forgotten (MAX_RETAINED_JOBS).
                item.callback_state = CallbackState::NotConfigured as i32;
            }
            let restored = idx < job.plan.image_count
                && is_terminal(item.state)
                && job.restore_item(idx, item);
            if restored && pending {
                unsettled.push(idx);
            }
        }
        // Callbacks on: sent again, then recorded settled. Off: the NOT_CONFIGURED state recorded.
        resumed.callbacks_resent += if callbacks_on { unsettled.len() } else { 0 };
        let unsettled = unsettled
            .into_iter()
            .filter_map(|idx| job.item(idx))
            .collect();
        self.pipeline.reporter().settle_all(&job, unsettled);
        if record.cancelled {
            self.pipeline.cancel(&job);
        } else if let Some(why) = unplannable {
            tracing::error!(job_id = %record.job_id, reason = %why, "stored job cannot run again; its open items fail");
            let ended = (0..job.plan.image_count)
                .filter_map(|idx| {
                    let outcome = ItemOutcome::Failed {
                        code: JOB_NOT_RESUMABLE,
                        message: format!(
                            "the orchestrator restarted and cannot run this job again: {why}; submit it again under a new job id"
                        ),
                    };
                    job.finish_item(idx, outcome, callbacks_on)
                })
                .collect();
            self.pipeline.reporter().items_ended(&job, ended);
        }
        job
    }
}

/// A plan that runs nothing, for a stored job that no longer validates: enough to report its items.
pub(in crate::jobs) fn placeholder_plan(record: &JobRecord) -> JobPlan {
    let spec = &record.spec;
    JobPlan {
        user_id: spec.user_id.clone(),
        job_id: spec.job_id.clone(),
        image_count: spec.image_count,
        concepts: Vec::new(),
        rules: Vec::new(),
        effective_spec: spec.clone(),
        durable_items: false,
        message_hash: None,
        source: record.source.clone(),
        preset: record.preset.clone(),
    }
}

/// Whether `spec`, planned with the preset `record` kept, is the recorded job: a submission identical to the
/// recorded one after the preset file changed since (its hash with today's presets differs).
pub(in crate::jobs) fn plans_as_recorded(
    spec: &JobSpec,
    record: &JobRecord,
    limits: JobLimits,
) -> bool {
    let Some(preset) = &record.preset else {
        return false;
    };
    let kept = BTreeMap::from([(record.spec.preset.trim().to_string(), preset.clone())]);
    validate::validate(spec, &kept, limits).is_ok_and(|mut plan| {
        plan.source = record.source.clone();
        store::plan_hash(&plan) == record.spec_hash
    })
}

/// A recorded job planned again: its spec validated as at submission, with the preset the record kept (a preset
/// file changed or removed since changes nothing for a job already accepted), or with `presets` for a record
/// written before presets were kept; an edit's source taken from the record. Err says why it cannot be (limits
/// lowered since it was submitted, or, for an older record, its preset changed).
pub(in crate::jobs) fn replan_record(
    record: &JobRecord,
    presets: &BTreeMap<String, Arc<Preset>>,
    limits: JobLimits,
) -> Result<JobPlan, String> {
    let kept;
    let presets = match &record.preset {
        Some(preset) => {
            kept = BTreeMap::from([(record.spec.preset.trim().to_string(), preset.clone())]);
            &kept
        }
        None => presets,
    };
    let mut plan = validate::validate(&record.spec, presets, limits).map_err(|e| e.to_string())?;
    plan.source = record.source.clone();
    if store::plan_hash(&plan) == record.spec_hash {
        Ok(plan)
    } else {
        Err(match record.preset {
            None if !record.spec.preset.trim().is_empty() => {
                "it plans differently here: its preset changed since it was submitted"
            }
            _ => "it plans differently here than where it was submitted",
        }
        .to_string())
    }
}

#[cfg(test)]
mod tests;
