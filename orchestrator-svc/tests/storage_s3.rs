//! The S3 backend against a real S3 server (SeaweedFS), configured exactly as for R2: static credentials,
//! path-style, checksums only when required.

use palette_testing as common;

use std::time::Duration;

use bytes::Bytes;
use orchestrator_svc::storage::{ObjectMeta, ObjectStore, S3Settings, S3Store, StorageError};

fn store(weed: &common::seaweed::Seaweed, bucket: &str) -> S3Store {
    S3Store::new(S3Settings {
        endpoint_url: Some(weed.endpoint.clone()),
        region: "us-east-1".into(),
        bucket: bucket.into(),
        access_key_id: common::seaweed::ACCESS_KEY.into(),
        secret_access_key: common::seaweed::SECRET_KEY.into(),
        attempt_timeout: Duration::from_secs(10),
        max_attempts: 3,
    })
}

/// weed mini opens its port before the bucket exists: wait until a HEAD answers "not found".
async fn wait_ready(store: &S3Store) {
    for _ in 0..150 {
        if store.head("probe/none").await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "SeaweedFS S3 never became ready: {:?}",
        store.head("probe/none").await
    );
}

#[tokio::test]
async fn s3_backend_round_trip_against_seaweedfs() {
    let Some(weed) = common::seaweed::start("palette-test") else {
        return;
    };
    let store = store(&weed, &weed.bucket);
    wait_ready(&store).await;

    let key = "masks/test-user/test-job/wooden_floor/0_1.png";
    assert_eq!(store.head(key).await.unwrap(), None);
    assert!(matches!(
        store.get(key).await,
        Err(StorageError::NotFound(_))
    ));

    let body = Bytes::from((0..200_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
    store.put(key, body.clone(), "image/png").await.unwrap();
    assert_eq!(store.get(key).await.unwrap(), body);
    assert_eq!(
        store.head(key).await.unwrap(),
        Some(ObjectMeta { size: 200_000 })
    );
    assert!(store.exists(key).await.unwrap());

    let content_type = store
        .client()
        .head_object()
        .bucket(&weed.bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    assert_eq!(content_type.content_type(), Some("image/png"));

    assert!(matches!(
        store.get("../escape").await,
        Err(StorageError::InvalidKey(_))
    ));
}

#[tokio::test]
async fn wrong_credentials_are_unavailable_not_not_found() {
    let Some(weed) = common::seaweed::start("palette-test") else {
        return;
    };
    wait_ready(&store(&weed, &weed.bucket)).await;
    let bad = S3Store::new(S3Settings {
        endpoint_url: Some(weed.endpoint.clone()),
        region: "us-east-1".into(),
        bucket: weed.bucket.clone(),
        access_key_id: "nobody".into(),
        secret_access_key: "wrong".into(),
        attempt_timeout: Duration::from_secs(5),
        max_attempts: 1,
    });
    assert!(matches!(
        bad.get("inputs/u/j/0.jpg").await,
        Err(StorageError::Unavailable { .. })
    ));
}

#[tokio::test]
async fn an_object_over_the_cap_is_refused_from_its_content_length() {
    let Some(weed) = common::seaweed::start("palette-cap") else {
        return;
    };
    let store = store(&weed, &weed.bucket);
    wait_ready(&store).await;
    store
        .put(
            "inputs/u/j/0.jpg",
            Bytes::from(vec![7u8; 20_000]),
            "image/jpeg",
        )
        .await
        .unwrap();
    match store.get_at_most("inputs/u/j/0.jpg", 10_000).await {
        Err(StorageError::TooLarge { size, limit, .. }) => {
            assert_eq!((size, limit), (Some(20_000), 10_000));
        }
        other => panic!("{other:?}"),
    }
    let whole = store.get_at_most("inputs/u/j/0.jpg", 20_000).await.unwrap();
    assert_eq!(whole.len(), 20_000);
}
