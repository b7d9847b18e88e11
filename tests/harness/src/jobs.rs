//! Waiting for a job to reach a state, the one copy every test uses: it follows WatchJob, which sends the job at
//! each change, and asks GetJob only after the stream has ended (WatchJob ends with the job; what changes later,
//! callback outcomes and the job being forgotten, has no event), backing off from a few milliseconds.

use std::time::Duration;

use palette_proto::orchestrator::v1::jobs_client::JobsClient;
use palette_proto::orchestrator::v1::{
    CallbackState, GetJobRequest, ItemState, Job, JobState, WatchJobRequest,
};
use tokio::time::Instant;
use tonic::transport::Channel;

/// How long a wait may take before the test fails: generous, for a loaded CI machine; a passing wait returns at the
/// event.
pub const WAIT_LIMIT: Duration = Duration::from_secs(60);

/// GetJob as `user`.
pub async fn get(client: &mut JobsClient<Channel>, user: &str, job_id: &str) -> Job {
    client
        .get_job(GetJobRequest {
            job_id: job_id.into(),
            user_id: user.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Waits (at most WAIT_LIMIT) until `done(job)`, and returns that job.
pub async fn wait_for(
    client: &mut JobsClient<Channel>,
    user: &str,
    job_id: &str,
    done: impl Fn(&Job) -> bool,
) -> Job {
    wait_for_within(WAIT_LIMIT, client, user, job_id, done).await
}

/// `wait_for` with its own limit (a job on the real model in a debug build takes longer).
pub async fn wait_for_within(
    limit: Duration,
    client: &mut JobsClient<Channel>,
    user: &str,
    job_id: &str,
    done: impl Fn(&Job) -> bool,
) -> Job {
    let deadline = Instant::now() + limit;
    if let Some(job) = watch_until(client, user, job_id, &done, deadline).await {
        return job;
    }
    poll_until(client, user, job_id, &done, deadline).await
}

/// Follows WatchJob until `done`; None when the stream ended (or could not be opened) first.
async fn watch_until(
    client: &mut JobsClient<Channel>,
    user: &str,
    job_id: &str,
    done: &impl Fn(&Job) -> bool,
    deadline: Instant,
) -> Option<Job> {
    let request = WatchJobRequest {
        job_id: job_id.into(),
        user_id: user.into(),
        ..Default::default()
    };
    let mut stream = client.watch_job(request).await.ok()?.into_inner();
    loop {
        let event = tokio::time::timeout_at(deadline, stream.message())
            .await
            .unwrap_or_else(|_| panic!("{job_id}: the awaited state did not come in time"));
        let job = event.ok()??.job?;
        if done(&job) {
            return Some(job);
        }
    }
}

/// GetJob until `done`, backing off from 5 ms to 200 ms between calls. An error answer counts as "not yet" until the
/// deadline: a replica may answer UNAVAILABLE for a moment (its job store restarting, another replica draining).
async fn poll_until(
    client: &mut JobsClient<Channel>,
    user: &str,
    job_id: &str,
    done: &impl Fn(&Job) -> bool,
    deadline: Instant,
) -> Job {
    let mut pause = Duration::from_millis(5);
    loop {
        let request = GetJobRequest {
            job_id: job_id.into(),
            user_id: user.into(),
        };
        let job = client.get_job(request).await.map(|r| r.into_inner());
        if let Ok(job) = &job
            && done(job)
        {
            return job.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{job_id} never reached the awaited state: {job:?}"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Every item ended (DONE or CANCELLED).
pub fn is_terminal(job: &Job) -> bool {
    job.state == JobState::Done as i32 || job.state == JobState::Cancelled as i32
}

/// Ended, and no item's callback still being sent.
pub fn is_settled(job: &Job) -> bool {
    is_terminal(job)
        && job
            .items
            .iter()
            .all(|i| i.callback_state != CallbackState::Pending as i32)
}

/// Items RUNNING now.
pub fn running(job: &Job) -> usize {
    job.items
        .iter()
        .filter(|i| i.state == ItemState::Running as i32)
        .count()
}
