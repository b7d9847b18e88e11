//! How an item ended, and which item and job states are terminal.

use palette_proto::orchestrator::v1::{ItemState, Job, JobState, MaskKey, RuleOutput};

/// How one item ended.
#[derive(Debug, Clone)]
pub enum ItemOutcome {
    Completed(ItemResult),
    Failed { code: &'static str, message: String },
    Cancelled,
}

#[derive(Debug, Clone, Default)]
pub struct ItemResult {
    pub outputs: Vec<RuleOutput>,
    pub masks: Vec<MaskKey>,
    pub preview_key: String,
    pub masks_reused: bool,
}

pub fn is_terminal(state: i32) -> bool {
    state == ItemState::Completed as i32
        || state == ItemState::Failed as i32
        || state == ItemState::Cancelled as i32
}

pub fn job_is_terminal(job: &Job) -> bool {
    job.state == JobState::Done as i32 || job.state == JobState::Cancelled as i32
}
