//! Jobs are scoped by user: GetJob, WatchJob and CancelJob name (user_id, job_id), another user's job is NOT_FOUND
//! exactly like a job that does not exist, and two users may each use the same job id.

use palette_testing as common;

use std::sync::atomic::Ordering;

use common::fake_segmenter;
use common::orchestrator::{SEED_USER, is_terminal, photo_jpeg, seed_spec, start};
use palette_proto::orchestrator::v1::{
    CancelJobRequest, GetJobRequest, JobSpec, JobState, WatchJobRequest,
};
use palette_testing::status::violated_fields;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_job_is_not_found_and_left_alone() {
    let segmenter = fake_segmenter::start().await;
    // Slow segments keep the job running while a stranger tries to cancel it.
    segmenter.faults.delay_ms.store(300, Ordering::SeqCst);
    let mut orch = start(&segmenter.url, |_| {}).await;
    for idx in 0..2 {
        orch.put_input(SEED_USER, "mine", idx, photo_jpeg(32, 32))
            .await;
    }
    orch.client.submit_job(seed_spec("mine", 2)).await.unwrap();

    let stranger = "someone-else";
    let get = orch
        .client
        .get_job(GetJobRequest {
            job_id: "mine".into(),
            user_id: stranger.into(),
        })
        .await
        .unwrap_err();
    let missing = orch
        .client
        .get_job(GetJobRequest {
            job_id: "no-such-job".into(),
            user_id: stranger.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (get.code(), missing.code()),
        (Code::NotFound, Code::NotFound)
    );
    assert_eq!(
        get.message().replace("mine", "X"),
        missing.message().replace("no-such-job", "X"),
        "the answer must not tell another user's job from a missing one"
    );
    let watch = orch
        .client
        .watch_job(WatchJobRequest {
            job_id: "mine".into(),
            user_id: stranger.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(watch.code(), Code::NotFound);
    let cancel = orch
        .client
        .cancel_job(CancelJobRequest {
            job_id: "mine".into(),
            user_id: stranger.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(cancel.code(), Code::NotFound);

    let job = orch.wait_for("mine", is_terminal).await;
    assert_eq!(job.state, JobState::Done as i32);
    assert_eq!(
        (job.completed, job.cancelled),
        (2, 0),
        "the stranger's cancel did nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_may_use_the_same_job_id() {
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |_| {}).await;
    let other = "other-user";
    orch.put_input(SEED_USER, "shared-id", 0, photo_jpeg(32, 32))
        .await;
    orch.put_input(other, "shared-id", 0, photo_jpeg(40, 24))
        .await;
    orch.client
        .submit_job(seed_spec("shared-id", 1))
        .await
        .unwrap();
    // A different spec under the same job id is a different job for another user, not ALREADY_EXISTS.
    let theirs = JobSpec {
        user_id: other.into(),
        concepts: vec!["floor".into()],
        rules: vec![],
        ..seed_spec("shared-id", 1)
    };
    orch.client.submit_job(theirs).await.unwrap();

    let mine = orch.wait_for("shared-id", is_terminal).await;
    assert_eq!(mine.user_id, SEED_USER);
    assert_eq!(mine.effective_spec.unwrap().concepts.len(), 3);
    let theirs =
        palette_testing::jobs::wait_for(&mut orch.client, other, "shared-id", is_terminal).await;
    assert_eq!(theirs.user_id, other);
    assert_eq!((theirs.state, theirs.completed), (JobState::Done as i32, 1));
    assert_eq!(
        theirs.items[0].masks[0].image_width, 40,
        "each job read its own user's input"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_without_a_valid_user_id_are_invalid() {
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |_| {}).await;
    for user_id in ["", "../etc", "a/b"] {
        let err = orch
            .client
            .get_job(GetJobRequest {
                job_id: "any".into(),
                user_id: user_id.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{user_id:?}");
        let fields = violated_fields(&err);
        assert_eq!(fields, ["user_id"], "{user_id:?}");
    }
}
