//! Tasks of a job that is recorded but that this replica cannot run (`work`): its record does not decode here (it
//! was written by a newer binary, before a rollback). Waiting changes nothing, and putting the task back only hands
//! it to the next replica like this one until its deliveries run out, leaving the item without an end: the item
//! ends FAILED `job_not_resumable` instead, recorded and called back, as a resumed job that no longer plans does.

use std::sync::Arc;

use palette_proto::orchestrator::v1::JobSpec;

use super::ItemTask;
use crate::jobs::job::{ItemOutcome, JobHandle};
use crate::jobs::resume::JOB_NOT_RESUMABLE;
use crate::jobs::validate::JobPlan;

/// A handle to report the task's item through, kept out of the registry (nothing runs for it, and the views keep
/// showing the job as they can): the task's ids, and a plan that runs nothing.
pub(super) fn stand_in(task: &ItemTask) -> Arc<JobHandle> {
    let plan = JobPlan {
        user_id: task.user_id.clone(),
        job_id: task.job_id.clone(),
        image_count: task.idx + 1,
        concepts: Vec::new(),
        rules: Vec::new(),
        effective_spec: JobSpec {
            user_id: task.user_id.clone(),
            job_id: task.job_id.clone(),
            image_count: task.idx + 1,
            ..Default::default()
        },
        durable_items: false,
        source: None,
    };
    let mut job = JobHandle::new(plan, 0);
    // The record's key, so the item record and the callback's webhook-id are the job's.
    job.spec_hash = task.spec_hash.clone();
    Arc::new(job)
}

/// How the item ends.
pub(super) fn outcome(why: &str) -> ItemOutcome {
    ItemOutcome::Failed {
        code: JOB_NOT_RESUMABLE,
        message: format!(
            "this orchestrator cannot run this job: {why}; submit it again under a new job id"
        ),
    }
}

#[cfg(test)]
mod tests {
    use palette_proto::orchestrator::v1::ItemState;

    use super::*;

    #[test]
    fn the_stand_in_reports_the_tasks_item_under_the_jobs_key() {
        let task = ItemTask {
            user_id: "u".into(),
            job_id: "j".into(),
            spec_hash: "h".into(),
            idx: 3,
        };
        let job = stand_in(&task);
        assert_eq!(job.spec_hash, "h");
        let item = job
            .finish_item(3, outcome("record unreadable"), true)
            .expect("the item ends");
        assert_eq!(item.state, ItemState::Failed as i32);
        assert_eq!(item.error_code, JOB_NOT_RESUMABLE);
    }
}
