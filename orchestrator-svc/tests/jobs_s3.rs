//! A whole job with STORAGE_BACKEND=s3 against a real S3 server (SeaweedFS).

use palette_testing as common;

use std::time::Duration;

use bytes::Bytes;
use common::orchestrator::{photo_jpeg, seed_spec, start};
use common::seaweed::{ACCESS_KEY, SECRET_KEY};
use orchestrator_svc::config::StorageBackend;
use orchestrator_svc::storage::{ObjectStore, S3Settings, S3Store};
use palette_proto::orchestrator::v1::ItemState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_reads_and_writes_through_s3() {
    let Some(weed) = common::seaweed::start("palette-jobs") else {
        return;
    };
    let store = S3Store::new(S3Settings {
        endpoint_url: Some(weed.endpoint.clone()),
        region: "us-east-1".into(),
        bucket: weed.bucket.clone(),
        access_key_id: ACCESS_KEY.into(),
        secret_access_key: SECRET_KEY.into(),
        attempt_timeout: Duration::from_secs(10),
        max_attempts: 3,
    });
    // weed mini creates the bucket shortly after its port opens.
    let mut uploaded = false;
    for _ in 0..150 {
        let put = store
            .put(
                "inputs/test-user/s3-job/0.jpg",
                Bytes::from(photo_jpeg(64, 48)),
                "image/jpeg",
            )
            .await;
        if put.is_ok() {
            uploaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(uploaded, "SeaweedFS never accepted the input");

    let segmenter = common::fake_segmenter::start().await;
    let endpoint = weed.endpoint.clone();
    let bucket = weed.bucket.clone();
    let mut orch = start(&segmenter.url, move |c| {
        c.storage.storage_backend = StorageBackend::S3;
        c.storage.s3_endpoint_url = Some(endpoint);
        c.storage.r2_bucket_name = Some(bucket);
        c.storage.r2_access_key_id = Some(ACCESS_KEY.into());
        c.storage.r2_secret_access_key = Some(SECRET_KEY.into());
    })
    .await;
    orch.client
        .submit_job(seed_spec("s3-job", 1))
        .await
        .unwrap();
    let job = orch.watch_to_end("s3-job").await.last().unwrap().0.clone();
    let item = &job.items[0];
    assert_eq!(item.state, ItemState::Completed as i32, "{item:?}");
    for key in [
        "outputs/test-user/s3-job/rule1/0.jpg",
        "masks/test-user/s3-job/wall/0_1.png",
        "previews/test-user/s3-job/0_preview.jpg",
    ] {
        let bytes = store.get(key).await.unwrap();
        image::load_from_memory(&bytes).unwrap();
    }
    let head = store
        .client()
        .head_object()
        .bucket(&weed.bucket)
        .key(&item.output_key)
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_type(), Some("image/jpeg"));
}
