//! Tasks of a job that is recorded but that this replica cannot run (`work`): its spec does not plan here (presets
//! or limits differ between replicas during a rolling config change), or its record does not decode here (written
//! by a newer binary, before a rollback). The task is put back while deliveries remain (another replica may run it);
//! on the last delivery that may run it, the item ends FAILED `job_not_resumable`, recorded and called back, as a
//! resumed job that no longer plans does (`resume`): dropping the task left the item without an end (no record, no
//! callback, WatchJob never ending).

use std::sync::Arc;

use palette_proto::orchestrator::v1::JobSpec;

use super::ItemTask;
use crate::jobs::job::{ItemOutcome, JobHandle};
use crate::jobs::resume::{JOB_NOT_RESUMABLE, placeholder_plan};
use crate::jobs::store::JobRecord;
use crate::jobs::validate::JobPlan;

/// A handle to report the task's item through, kept out of the registry (nothing runs for it, and the views keep
/// showing the job as they can): a plan that runs nothing, from the job's `record` when it decodes, else from the
/// task's ids. A recorded cancel stands: the item then ends CANCELLED.
pub(super) fn stand_in(task: &ItemTask, record: Option<&JobRecord>) -> Arc<JobHandle> {
    let (mut plan, seq) = match record {
        Some(record) => (placeholder_plan(record), record.seq),
        None => (
            JobPlan {
                user_id: task.user_id.clone(),
                job_id: task.job_id.clone(),
                image_count: 0,
                concepts: Vec::new(),
                rules: Vec::new(),
                effective_spec: JobSpec {
                    user_id: task.user_id.clone(),
                    job_id: task.job_id.clone(),
                    ..Default::default()
                },
                durable_items: false,
                message_hash: None,
                source: None,
                preset: None,
            },
            0,
        ),
    };
    // A task past the recorded count (it cannot be, but a missing item would leave the task held forever).
    plan.image_count = plan.image_count.max(task.idx + 1);
    let mut job = JobHandle::new(plan, seq);
    // The record's key, so the item record and the callback's webhook-id are the job's.
    job.spec_hash = task.spec_hash.clone();
    if record.is_some_and(|r| r.cancelled) {
        job.cancel.cancel();
    }
    Arc::new(job)
}

/// How the item ends.
pub(super) fn outcome(why: &str) -> ItemOutcome {
    ItemOutcome::Failed {
        code: JOB_NOT_RESUMABLE,
        message: format!(
            "no orchestrator that took this image could run its job (here: {why}); submit it again under a new job id"
        ),
    }
}

#[cfg(test)]
mod tests {
    use palette_proto::orchestrator::v1::ItemState;

    use super::*;

    fn task() -> ItemTask {
        ItemTask::for_tests(3)
    }

    #[test]
    fn the_stand_in_reports_the_tasks_item_under_the_jobs_key() {
        let job = stand_in(&task(), None);
        assert_eq!(job.spec_hash, "h");
        let item = job
            .finish_item(3, outcome("record unreadable"), true)
            .expect("the item ends")
            .item;
        assert_eq!(item.state, ItemState::Failed as i32);
        assert_eq!(item.error_code, JOB_NOT_RESUMABLE);
    }

    #[test]
    fn a_recorded_job_stands_in_as_recorded_its_cancel_included() {
        let record = JobRecord {
            user_id: "u".into(),
            job_id: "j".into(),
            spec_hash: "h".into(),
            spec: JobSpec {
                user_id: "u".into(),
                job_id: "j".into(),
                image_count: 5,
                preset: "gone".into(),
                ..Default::default()
            },
            seq: 42,
            cancelled: true,
            source: None,
            preset: None,
        };
        let job = stand_in(&task(), Some(&record));
        assert_eq!((job.plan.image_count, job.spec_hash.as_str()), (5, "h"));
        assert!(job.plan.rules.is_empty(), "runs nothing");
        assert!(job.cancel.is_cancelled());
    }
}
