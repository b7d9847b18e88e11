//! ENGINE_INSTANCES: several inference threads behind one server. A request goes to the instance with the least work
//! waiting, so one slow run does not hold the others back; the server's health is its worst instance's.

use palette_testing::segmenter as common;

use std::time::{Duration, Instant};

use common::{TestServer, image_bytes, request, test_config};
use tonic_health::pb::health_check_response::ServingStatus;

const SERVING: i32 = ServingStatus::Serving as i32;
const NOT_SERVING: i32 = ServingStatus::NotServing as i32;

fn two_instances() -> segmenter_svc::Config {
    let mut config = test_config();
    config.engine_instances = 2;
    // One image per vision run: each request is a batch of its own.
    config.max_batch_images = 1;
    config
}

#[tokio::test]
async fn a_request_does_not_wait_behind_another_instances_slow_run() {
    let config = two_instances();
    let faults = config.faults.clone();
    let server = TestServer::start(config).await;
    assert_eq!(server.health().await, SERVING, "both instances warm");
    let mut client = server.client().await;
    let req = || request(image_bytes("room_640x480.jpg"), &["wall", "floor"]);
    let clean = client.segment(req()).await.unwrap().into_inner();

    // The next run takes 4 s longer: the request that gets it holds its instance that long.
    faults.delay_next_run(Duration::from_secs(4));
    let mut slow_client = server.client().await;
    let slow = tokio::spawn(async move { slow_client.segment(req()).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let started = Instant::now();
    let fast = client.segment(req()).await.unwrap().into_inner();
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(3),
        "answered by the other instance, not after the slow run ({waited:?})"
    );
    assert!(!slow.is_finished(), "the slow run was still running");
    let slow = slow.await.unwrap().unwrap().into_inner();
    for answer in [&fast, &slow] {
        assert_eq!(answer.concepts.len(), clean.concepts.len());
        for (got, want) in answer.concepts.iter().zip(&clean.concepts) {
            assert_eq!(got.instances.len(), want.instances.len(), "the same answer");
        }
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn one_broken_instance_turns_the_server_not_serving() {
    let config = two_instances();
    let faults = config.faults.clone();
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let req = || request(image_bytes("room_640x480.jpg"), &["wall"]);
    client.segment(req()).await.unwrap();

    // A panic ends one inference thread: the device they share is suspect, so the whole server says so.
    faults.panic_next_run();
    let _ = client.segment(req()).await;
    for _ in 0..200 {
        if server.health().await == NOT_SERVING {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(server.health().await, NOT_SERVING);
    let err = client.segment(req()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("panic"), "{err:?}");
    server.stop().await.unwrap();
}

/// With ORT_PROFILE_DIR each instance writes its own three profiles, named so that one instance's cannot be taken
/// for (or overwrite) another's: the first instance's as with one, the second's `<graph>-instance1_<time>.json`.
#[tokio::test]
async fn each_instance_writes_profiles_of_its_own() {
    let profiles = tempfile::tempdir().unwrap();
    let mut config = two_instances();
    config.ort_profile_dir = Some(profiles.path().to_path_buf());
    let server = TestServer::start(config).await;
    assert_eq!(server.health().await, SERVING);
    // Stopping the server stops the engines, which end profiling.
    server.stop().await.unwrap();
    let mut prefixes: Vec<String> = std::fs::read_dir(profiles.path())
        .unwrap()
        .map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(name.ends_with(".json"), "{name}");
            // The prefix: all before `_<YYYY-MM-DD>_<time>.json`.
            let date = name
                .find("_20")
                .unwrap_or_else(|| panic!("{name}: no timestamp"));
            name[..date].to_string()
        })
        .collect();
    prefixes.sort();
    assert_eq!(
        prefixes,
        [
            "decoder",
            "decoder-instance1",
            "text",
            "text-instance1",
            "vision",
            "vision-instance1"
        ]
    );
}
