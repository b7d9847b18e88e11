//! The S3 server stopped and restarted in the middle of a job, with the real segmenter: every item ends in exactly
//! one terminal state with exactly one callback, what completed before the outage is still there afterwards, and
//! the orchestrator keeps serving (a job after the restart completes).

use palette_testing::seaweed;
use palette_testing::{jobs, receiver};

use std::collections::BTreeMap;
use std::time::Duration;

use orchestrator_svc::config::StorageBackend;
use palette_e2e::{example_photos, start_orchestrator, start_segmenter};
use palette_proto::orchestrator::v1::jobs_client::JobsClient;
use palette_proto::orchestrator::v1::{ItemState, Job, JobSpec, Rule, WatchJobRequest};
use prost_types::value::Kind;
use prost_types::{Struct, Value};

const SECRET: &str = "outage-secret";

fn spec(job_id: &str, images: u32) -> JobSpec {
    JobSpec {
        user_id: "outage-user".into(),
        job_id: job_id.into(),
        concepts: vec!["wall".into()],
        rules: vec![Rule {
            rule_id: "paint".into(),
            concept: "wall".into(),
            r#type: "recolor".into(),
            params: Some(Struct {
                fields: [(
                    "color".to_string(),
                    Value {
                        kind: Some(Kind::StringValue("#336699".into())),
                    },
                )]
                .into(),
            }),
        }],
        image_count: images,
        preset: String::new(),
        output_format: String::new(),
    }
}

async fn settled(client: &mut JobsClient<tonic::transport::Channel>, job_id: &str) -> Job {
    jobs::wait_for(client, "outage-user", job_id, jobs::is_settled).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_outage_mid_job_loses_nothing_and_the_service_keeps_serving() {
    let Some(mut weed) = seaweed::start("palette-outage") else {
        return;
    };
    let s3 = palette_e2e::s3::client(&weed.endpoint, seaweed::ACCESS_KEY, seaweed::SECRET_KEY);
    let mut segmenter = start_segmenter().await;
    let hooks = receiver::Receiver::start(SECRET, vec![]).await;
    let photos = example_photos();
    let images = 8u32;
    for idx in 0..images {
        let photo = &photos[idx as usize % photos.len()].1;
        palette_e2e::s3::put(
            &s3,
            &weed.bucket,
            &format!("inputs/outage-user/outage-job/{idx}.jpg"),
            photo.clone(),
        )
        .await;
        palette_e2e::s3::put(
            &s3,
            &weed.bucket,
            &format!("inputs/outage-user/after-job/{idx}.jpg"),
            photo.clone(),
        )
        .await;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config =
        orchestrator_svc::Config::for_tests(dir.path().join("unused"), segmenter.url());
    config.storage.storage_backend = StorageBackend::S3;
    config.storage.s3_endpoint_url = Some(weed.endpoint.clone());
    config.storage.r2_bucket_name = Some(weed.bucket.clone());
    config.storage.r2_access_key_id = Some(seaweed::ACCESS_KEY.into());
    config.storage.r2_secret_access_key = Some(seaweed::SECRET_KEY.into());
    config.storage.storage_timeout_sec = 2;
    config.limits.batch_concurrency = 1;
    config.callbacks.workers_api_url = Some(hooks.url().into());
    config.callbacks.gpu_callback_secret = Some(SECRET.into());
    let mut orchestrator = start_orchestrator(config).await;
    let mut client = JobsClient::connect(orchestrator.url()).await.unwrap();

    client.submit_job(spec("outage-job", images)).await.unwrap();
    // Wait until the first item completed, then take the S3 server away for a few seconds.
    let mut stream = client
        .watch_job(WatchJobRequest {
            job_id: "outage-job".into(),
            user_id: "outage-user".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(event) = stream.message().await.unwrap() {
        if event.job.unwrap().completed >= 1 {
            break;
        }
    }
    weed.stop();
    // Down until an item has met the outage (it fails once STORAGE_TIMEOUT_SEC, 2 s here, is over): a real
    // server's timeout is what is tested, so this wait is on the wall clock, bounded.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Some(event) = tokio::time::timeout_at(deadline, stream.message())
        .await
        .expect("no item met the outage")
        .unwrap()
    {
        if event.job.unwrap().failed >= 1 {
            break;
        }
    }
    weed.restart();

    let job = settled(&mut client, "outage-job").await;
    let completed = ItemState::Completed as i32;
    let failed = ItemState::Failed as i32;
    assert!(
        job.items
            .iter()
            .all(|i| i.state == completed || i.state == failed),
        "{job:#?}"
    );
    assert!(
        job.completed >= 1,
        "the item finished before the outage stays completed"
    );
    for item in job.items.iter().filter(|i| i.state == failed) {
        assert_eq!(item.error_code, "storage_unavailable", "{item:?}");
    }
    // One callback event per item, all delivered.
    let mut per_idx: BTreeMap<u64, usize> = BTreeMap::new();
    for d in hooks
        .deliveries()
        .iter()
        .filter(|d| d.job_id == "outage-job")
    {
        *per_idx.entry(d.body["idx"].as_u64().unwrap()).or_default() += 1;
    }
    assert_eq!(per_idx.len(), images as usize, "{per_idx:?}");
    assert!(per_idx.values().all(|n| *n == 1), "{per_idx:?}");
    // Nothing lost: every completed item's output survived the restart.
    for item in job.items.iter().filter(|i| i.state == completed) {
        let head = s3
            .head_object()
            .bucket(&weed.bucket)
            .key(&item.output_key)
            .send()
            .await;
        assert!(
            head.is_ok(),
            "{} is missing after the restart",
            item.output_key
        );
    }
    // Still serving: a job submitted after the outage completes in full.
    client.submit_job(spec("after-job", images)).await.unwrap();
    let after = settled(&mut client, "after-job").await;
    assert_eq!(after.completed, images, "{after:#?}");

    orchestrator.stop().await.unwrap();
    segmenter.stop().await.unwrap();
}
