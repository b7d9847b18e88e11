use super::*;
use palette_proto::orchestrator::v1::JobSpec;

fn job() -> Arc<JobHandle> {
    job_of(1)
}

fn job_of(image_count: u32) -> Arc<JobHandle> {
    Arc::new(JobHandle::new(
        JobPlan {
            user_id: "u".into(),
            job_id: "j".into(),
            image_count,
            concepts: vec!["wall".into()],
            rules: vec![],
            effective_spec: JobSpec::default(),
            durable_items: false,
            message_hash: None,
            source: None,
            preset: None,
        },
        1,
    ))
}

#[test]
fn a_job_is_counted_finished_once_and_settled_when_its_callbacks_are() {
    let job = job();
    assert!(!job.first_time_terminal() && !job.is_settled());
    assert!(job.finish_item(0, ItemOutcome::Cancelled, true).is_some());
    assert!(
        job.first_time_terminal() && !job.first_time_terminal(),
        "once"
    );
    assert!(!job.is_settled(), "its callback is pending");
    job.record_callback(0, false, 6, Some("gave up".into()));
    assert!(job.is_settled(), "failed for good is settled");
}

/// A cancel that comes as the last item finishes (or a restart reading its record) ends no item: the job, DONE and
/// told so, stays DONE when a later change (its callback settling) counts it again; it used to turn CANCELLED.
#[test]
fn a_cancel_that_ended_no_item_leaves_a_done_job_done() {
    let job = job();
    drop(job.finish_item(0, ItemOutcome::Completed(Default::default()), true));
    assert_eq!(job.snapshot().state, JobState::Done as i32);
    job.cancel.cancel();
    assert!(job.cancel_pending(true).is_empty());
    job.record_callback(0, true, 1, None);
    assert_eq!(job.snapshot().state, JobState::Done as i32);
}

/// The last item's end and its report's guard are one step: with callbacks off the item is settled the moment it
/// ends, but its record is still to be written, and retention must not forget the job before the report holds it.
#[test]
fn a_job_is_not_settled_while_an_item_it_just_ended_is_not_handed_to_its_report() {
    let job = job_of(2);
    drop(job.finish_item(0, ItemOutcome::Cancelled, false));
    let ended = job.cancel_pending(false);
    assert!(job.is_terminal());
    assert!(
        !job.is_settled(),
        "the cancelled item's report is still to come"
    );
    drop(ended);
    assert!(job.is_settled());
}

#[test]
fn the_echo_of_a_first_write_does_not_undo_a_settled_callback() {
    let job = job();
    let first = job
        .finish_item(0, ItemOutcome::Cancelled, true)
        .unwrap()
        .item;
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

/// The counts and state `change_item` keeps, as counting every item gives them.
fn counted_over_every_item(job: &JobHandle) -> (u32, u32, u32, i32, bool) {
    let snapshot = job.snapshot();
    let count = |s: ItemState| {
        snapshot
            .items
            .iter()
            .filter(|i| i.state == s as i32)
            .count() as u32
    };
    let (completed, failed, cancelled) = (
        count(ItemState::Completed),
        count(ItemState::Failed),
        count(ItemState::Cancelled),
    );
    let terminal = (completed + failed + cancelled) as usize;
    let state = if terminal == snapshot.items.len() {
        if job.cancel.is_cancelled() && cancelled > 0 {
            JobState::Cancelled
        } else {
            JobState::Done
        }
    } else if terminal > 0 || count(ItemState::Running) > 0 {
        JobState::Running
    } else {
        JobState::Queued
    };
    let settled = terminal == snapshot.items.len()
        && !snapshot
            .items
            .iter()
            .any(|i| i.callback_state == CallbackState::Pending as i32);
    (completed, failed, cancelled, state as i32, settled)
}

#[test]
fn counts_kept_at_each_change_match_counting_every_item() {
    const ITEMS: u32 = 40;
    let job = job_of(ITEMS);
    // A fixed pseudo-random walk through every way an item changes (xorshift: no dependency, same walk each run).
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let failed = || ItemOutcome::Failed {
        code: "x",
        message: "y".into(),
    };
    let mut seen = std::collections::BTreeSet::new();
    let mut changes = 0;
    for step in 0..2_000 {
        let idx = next(u64::from(ITEMS)) as u32;
        let callbacks_on = next(2) == 0;
        let changed = match next(9) {
            0 => job.start_item(idx),
            1 => job.start_held_item(idx),
            2 => job
                .finish_item(
                    idx,
                    ItemOutcome::Completed(Default::default()),
                    callbacks_on,
                )
                .is_some(),
            3 => job.finish_item(idx, failed(), callbacks_on).is_some(),
            4 => job
                .finish_item_if_pending(idx, ItemOutcome::Cancelled, callbacks_on)
                .is_some(),
            5 => job.record_callback(idx, next(2) == 0, 1, None).is_some(),
            6 => {
                let mut recorded = job.snapshot().items[next(u64::from(ITEMS)) as usize].clone();
                recorded.callback_state = next(5) as i32;
                job.apply_record(idx, recorded)
            }
            7 => job.restore_item(
                idx,
                Item {
                    state: ItemState::Completed as i32,
                    callback_state: CallbackState::Pending as i32,
                    ..Default::default()
                },
            ),
            _ => job
                .finish_item_if_pending(idx, failed(), callbacks_on)
                .is_some(),
        };
        changes += usize::from(changed);
        let snapshot = job.snapshot();
        let kept = (
            snapshot.completed,
            snapshot.failed,
            snapshot.cancelled,
            snapshot.state,
            job.is_settled(),
        );
        assert_eq!(kept, counted_over_every_item(&job), "step {step}");
        seen.insert((kept.3, kept.4));
    }
    assert!(changes > 300, "{changes} of 2,000 steps changed an item");
    // The walk went through the states that matter: running, done, settled or not.
    for state in [JobState::Running, JobState::Done] {
        assert!(
            seen.iter().any(|s| s.0 == state as i32),
            "{state:?}: {seen:?}"
        );
    }
    assert!(
        seen.iter().any(|s| s.1) && seen.iter().any(|s| !s.1),
        "{seen:?}"
    );

    // A cancel ends every open item at once: counted as it goes, settled once every callback is.
    let job = job_of(ITEMS);
    for idx in 0..10 {
        job.start_item(idx);
    }
    assert!(
        job.finish_item(0, ItemOutcome::Completed(Default::default()), true)
            .is_some()
    );
    assert_eq!(job.cancel_pending(true).len(), ITEMS as usize - 1);
    let snapshot = job.snapshot();
    let kept = (snapshot.cancelled, snapshot.state, job.is_settled());
    assert_eq!(kept, (ITEMS - 1, JobState::Cancelled as i32, false));
    let counted = counted_over_every_item(&job);
    assert_eq!(kept, (counted.2, counted.3, counted.4));
    for idx in 0..ITEMS {
        job.record_callback(idx, true, 1, None);
        assert_eq!(job.is_settled(), counted_over_every_item(&job).4);
    }
    assert!(job.is_settled());
}

/// `progress` gives the counts a follower needs without copying the items: as counted over a snapshot.
#[test]
fn progress_matches_the_items() {
    let job = job_of(4);
    let counted = |job: &JobHandle| {
        let j = job.snapshot();
        let count = |f: &dyn Fn(&Item) -> bool| j.items.iter().filter(|i| f(i)).count() as u32;
        Progress {
            state: j.state,
            items: j.items.len() as u32,
            completed: j.completed,
            failed: j.failed,
            cancelled: j.cancelled,
            running: count(&|i| i.state == ItemState::Running as i32),
            callbacks_pending: count(&|i| i.callback_state == CallbackState::Pending as i32),
        }
    };
    assert_eq!(job.progress(), counted(&job));
    assert!(job.start_item(0) && job.start_item(1));
    assert_eq!(job.progress().running, 2);
    drop(job.finish_item(0, ItemOutcome::Cancelled, true));
    drop(job.finish_item(2, ItemOutcome::Cancelled, false));
    let progress = job.progress();
    assert_eq!(progress, counted(&job));
    assert_eq!(
        (
            progress.running,
            progress.ended(),
            progress.callbacks_pending
        ),
        (1, 2, 1)
    );
    assert!(!progress.is_terminal());
}
