use super::*;
use crate::jobs::job::{ItemOutcome, ItemResult};
use palette_proto::orchestrator::v1::{JobSpec, JobState, MaskKey};

fn plan(job_id: &str) -> JobPlan {
    JobPlan {
        user_id: "u".into(),
        job_id: job_id.into(),
        image_count: 2,
        concepts: vec!["wall".into()],
        rules: vec![],
        effective_spec: JobSpec {
            job_id: job_id.into(),
            ..Default::default()
        },
        durable_items: false,
        message_hash: None,
        source: None,
        preset: None,
    }
}

fn key(job_id: &str) -> JobKey {
    JobKey {
        user_id: "u".into(),
        job_id: job_id.into(),
    }
}

fn jobs_only(max_jobs: usize) -> Retention {
    Retention {
        max_jobs,
        max_bytes: usize::MAX,
    }
}

/// Finishes every item of `job` with `masks` mask keys each, as a segmentation with that many instances does.
fn complete_with_masks(job: &Arc<JobHandle>, masks: usize) {
    for idx in 0..job.plan.image_count {
        let result = ItemResult {
            masks: (0..masks)
                .map(|i| MaskKey {
                    concept: "wall".into(),
                    instance: i as u32,
                    key: format!("masks/u/{}/{idx}/wall_{i}.png", job.plan.job_id),
                    score: 0.9,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        job.finish_item(idx, ItemOutcome::Completed(result), false);
    }
}

fn created(s: Submitted) -> Arc<JobHandle> {
    match s {
        Submitted::Created(j) => j,
        Submitted::Existing(_) => panic!("not created"),
    }
}

#[test]
fn each_item_ends_once() {
    let registry = JobRegistry::new(jobs_only(10));
    let job = created(registry.submit(plan("j")).unwrap());
    assert!(job.start_item(0));
    let done = ItemOutcome::Completed(ItemResult::default());
    assert!(job.finish_item(0, done.clone(), true).is_some());
    assert!(job.finish_item(0, ItemOutcome::Cancelled, true).is_none());
    let cancelled = job.cancel_pending(true);
    assert_eq!(
        cancelled.iter().map(|e| e.item.idx).collect::<Vec<_>>(),
        [1]
    );
    drop(cancelled);
    assert!(!job.start_item(1));
    let snapshot = job.snapshot();
    assert_eq!((snapshot.completed, snapshot.cancelled), (1, 1));
    assert_eq!(snapshot.state, JobState::Cancelled as i32);
    assert!(
        job.cancel_pending(true).is_empty(),
        "a finished job stays finished"
    );
}

#[test]
fn forgets_the_oldest_finished_jobs_and_refuses_when_all_run() {
    let registry = JobRegistry::new(jobs_only(2));
    let a = created(registry.submit(plan("a")).unwrap());
    created(registry.submit(plan("b")).unwrap());
    assert!(matches!(
        registry.submit(plan("c")),
        Err(ApiError::Overloaded { .. })
    ));
    a.cancel_pending(false);
    created(registry.submit(plan("c")).unwrap());
    assert!(matches!(
        registry.get(&key("a")),
        Err(ApiError::JobNotFound { .. })
    ));
    assert!(registry.get(&key("b")).is_ok() && registry.get(&key("c")).is_ok());
}

#[test]
fn jobs_are_scoped_by_user() {
    let registry = JobRegistry::new(jobs_only(10));
    let mine = created(registry.submit(plan("j")).unwrap());
    let theirs = JobPlan {
        user_id: "other".into(),
        ..plan("j")
    };
    let theirs = created(registry.submit(theirs).unwrap());
    assert!(!Arc::ptr_eq(&mine, &theirs), "the same job id, two jobs");
    assert!(Arc::ptr_eq(&registry.get(&key("j")).unwrap(), &mine));
    let stranger = JobKey {
        user_id: "stranger".into(),
        job_id: "j".into(),
    };
    assert!(matches!(
        registry.get(&stranger),
        Err(ApiError::JobNotFound { .. })
    ));
}

#[test]
fn a_job_weighs_what_its_items_hold() {
    let registry = JobRegistry::new(jobs_only(10));
    let job = created(registry.submit(plan("j")).unwrap());
    let pending = job.approx_bytes();
    complete_with_masks(&job, 30);
    let done = job.approx_bytes();
    // 2 items x 30 mask keys of ~30 characters: each key's struct and buffer, at least.
    assert!(done >= pending + 2 * 30 * (30 + 16), "{pending} -> {done}");
    assert!(done < pending + 2 * 30 * 400, "{pending} -> {done}");
}

#[test]
fn forgets_the_oldest_finished_jobs_beyond_the_byte_budget() {
    let probe = JobRegistry::new(jobs_only(10));
    let sample = created(probe.submit(plan("sample")).unwrap());
    complete_with_masks(&sample, 50);
    // Room for two finished jobs of this weight, not three.
    let budget = sample.approx_bytes() * 5 / 2;
    let registry = JobRegistry::new(Retention {
        max_jobs: 100,
        max_bytes: budget,
    });
    let jobs: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|id| created(registry.submit(plan(id)).unwrap()))
        .collect();
    for job in &jobs {
        complete_with_masks(job, 50);
    }
    // Over the budget only because the jobs grew while running: the pipeline trims when a job ends.
    registry.trim();
    assert!(matches!(
        registry.get(&key("a")),
        Err(ApiError::JobNotFound { .. })
    ));
    assert!(registry.get(&key("b")).is_ok() && registry.get(&key("c")).is_ok());
    // Running jobs are never forgotten, even when they alone exceed the budget.
    let tight = JobRegistry::new(Retention {
        max_jobs: 100,
        max_bytes: 1,
    });
    created(tight.submit(plan("x")).unwrap());
    created(tight.submit(plan("y")).unwrap());
    tight.trim();
    assert!(tight.get(&key("x")).is_ok() && tight.get(&key("y")).is_ok());
}

#[test]
fn a_finished_job_whose_callbacks_are_pending_is_kept_until_they_settle() {
    let registry = JobRegistry::new(jobs_only(1));
    let a = created(registry.submit(plan("a")).unwrap());
    for idx in 0..a.plan.image_count {
        a.finish_item(idx, ItemOutcome::Completed(ItemResult::default()), true);
    }
    assert!(a.is_terminal() && !a.is_settled());
    // Over the limit, but the only finished job still has callbacks to send.
    assert!(matches!(
        registry.submit(plan("b")),
        Err(ApiError::Overloaded { .. })
    ));
    for idx in 0..a.plan.image_count {
        a.record_callback(idx, true, 1, None);
    }
    assert!(a.is_settled());
    created(registry.submit(plan("b")).unwrap());
    assert!(matches!(
        registry.get(&key("a")),
        Err(ApiError::JobNotFound { .. })
    ));
}

#[test]
fn what_it_forgets_is_queued_for_the_job_store_and_restored_jobs_keep_their_order() {
    let registry = JobRegistry::new(jobs_only(2));
    let a = registry.restore(plan("a"), 7, "recorded-hash".into());
    assert_eq!(a.seq, 7);
    assert_eq!(
        a.spec_hash, "recorded-hash",
        "the recorded hash, not a new one"
    );
    // Later submissions come after every restored one.
    let b = created(registry.submit(plan("b")).unwrap());
    assert!(b.seq > a.seq);
    a.cancel_pending(false);
    created(registry.submit(plan("c")).unwrap());
    let forgotten = registry.take_forgotten();
    assert_eq!(forgotten.len(), 1);
    assert_eq!(
        (
            forgotten[0].job.job_id.as_str(),
            forgotten[0].job.spec_hash.as_str(),
            forgotten[0].seq
        ),
        ("a", "recorded-hash", 7)
    );
    assert!(registry.take_forgotten().is_empty(), "taken once");
    // A job the store refused is taken back.
    registry.remove(&b);
    assert!(registry.get(&key("b")).is_err() && registry.get(&key("c")).is_ok());
}

#[test]
fn a_submission_is_numbered_by_its_time_so_runs_of_one_job_id_differ_across_restarts() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let registry = JobRegistry::new(jobs_only(10));
    let a = created(registry.submit(plan("a")).unwrap());
    let b = created(registry.submit(plan("b")).unwrap());
    assert!(a.seq >= now && b.seq > a.seq, "{} {}", a.seq, b.seq);
    // A new process (a restart takes more than a millisecond), its registry empty (the first run was forgotten):
    // the same job id gets a later seq, where a counter would have started again from 0.
    std::thread::sleep(std::time::Duration::from_millis(2));
    let restarted = JobRegistry::new(jobs_only(10));
    let again = created(restarted.submit(plan("a")).unwrap());
    assert!(again.seq > b.seq, "{} {}", again.seq, b.seq);
}

#[test]
fn adopting_another_run_of_a_job_replaces_the_handle_and_the_same_run_keeps_it() {
    let registry = JobRegistry::new(jobs_only(10));
    let first = registry.adopt(plan("a"), 10, "h".into());
    assert!(Arc::ptr_eq(
        &first,
        &registry.adopt(plan("a"), 10, "h".into())
    ));
    // A replica that missed the first run's deletion sees the second run's record: same spec, another seq.
    let second = registry.adopt(plan("a"), 11, "h".into());
    assert!(!Arc::ptr_eq(&first, &second));
    assert_eq!(second.seq, 11);
    assert!(Arc::ptr_eq(&registry.get(&key("a")).unwrap(), &second));
}

#[tokio::test]
async fn only_a_job_created_to_be_recorded_makes_a_retry_wait() {
    let registry = JobRegistry::new(jobs_only(10));
    // Created by give_up_durable (nothing to record): a later submission of it answers at once.
    let given_up = created(registry.submit(plan("g")).unwrap());
    assert!(given_up.recorded.wait().await);
    let recording = created(registry.submit_to_record(plan("r")).unwrap());
    let waited = tokio::time::timeout(
        std::time::Duration::from_millis(50),
        recording.recorded.wait(),
    )
    .await;
    assert!(
        waited.is_err(),
        "waits until the creating call has recorded it"
    );
    recording.recorded.set(true);
    assert!(recording.recorded.wait().await);
}
