use super::*;
use palette_proto::orchestrator::v1::JobSpec;

fn job() -> JobHandle {
    JobHandle::new(
        JobPlan {
            user_id: "u".into(),
            job_id: "j".into(),
            image_count: 1,
            concepts: vec!["wall".into()],
            rules: vec![],
            effective_spec: JobSpec::default(),
            durable_items: false,
            source: None,
            preset: None,
        },
        1,
    )
}

#[test]
fn a_job_is_counted_finished_once_and_settled_when_its_callbacks_are() {
    let job = job();
    assert!(!job.first_time_terminal() && !job.is_settled());
    job.finish_item(0, ItemOutcome::Cancelled, true).unwrap();
    assert!(
        job.first_time_terminal() && !job.first_time_terminal(),
        "once"
    );
    assert!(!job.is_settled(), "its callback is pending");
    job.record_callback(0, false, 6, Some("gave up".into()));
    assert!(job.is_settled(), "failed for good is settled");
}

#[test]
fn the_echo_of_a_first_write_does_not_undo_a_settled_callback() {
    let job = job();
    let first = job.finish_item(0, ItemOutcome::Cancelled, true).unwrap();
    assert_eq!(first.callback_state, CallbackState::Pending as i32);
    let settled = job.record_callback(0, true, 1, None).unwrap();
    assert_eq!(settled.callback_state, CallbackState::Delivered as i32);
    // The bucket's watch brings the first write (callback pending) only now.
    assert!(!job.apply_record(0, first.clone()));
    assert_eq!(job.snapshot().items[0], settled);
    // The settled record applies, and a different terminal state recorded elsewhere still stands over ours.
    assert!(!job.apply_record(0, settled.clone()));
    let failed = Item {
        state: ItemState::Failed as i32,
        ..first
    };
    assert!(job.apply_record(0, failed.clone()));
    assert_eq!(job.snapshot().items[0], failed);
}
