//! What a Segment call carries: its deadline (SEGMENTER_TIMEOUT_SEC as `grpc-timeout`), and a photo larger than the model's input goes downscaled as raw RGB, each side capped
//! at the size GetModelInfo reports, and its masks, in the segmenter's view of the image, land on the full photo;
//! smaller photos, and every photo when the segmenter does not report a size, go as uploaded. The fake segmenter
//! answers in the coordinates of the image it was sent (its instance: the left half), so a mask put back at the
//! wrong scale shows. The real model's masks through this path: tests/tests/segmenter_input.rs.

use palette_testing as common;

use std::sync::atomic::Ordering;

use common::fake_segmenter;
use common::orchestrator::{is_terminal, photo_jpeg, seed_spec, start};
use orchestrator_svc::storage::ObjectStore;
use palette_proto::orchestrator::v1::ItemState;

#[path = "common/fake_masks.rs"]
mod fake_masks;
use fake_masks::fake_left_half;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_photos_reach_the_segmenter_downscaled_and_their_masks_land_on_the_photo() {
    let segmenter = fake_segmenter::start().await;
    segmenter.faults.input_size.store(64, Ordering::SeqCst);
    let mut orch = start(&segmenter.url, |_| {}).await;
    // 200x120: both sides over 64; 300x40: only the width; 48x40: neither.
    let sizes = [(200u32, 120u32), (300, 40), (48, 40)];
    for (idx, (w, h)) in sizes.iter().enumerate() {
        orch.put_input("test-user", "big", idx as u32, photo_jpeg(*w, *h))
            .await;
    }
    orch.client
        .submit_job(seed_spec("big", sizes.len() as u32))
        .await
        .unwrap();
    let job = orch.wait_for("big", is_terminal).await;
    let mut seen = segmenter.counters.images.lock().unwrap().clone();
    seen.sort();
    assert_eq!(
        seen,
        vec![("encoded", 48, 40), ("rgb", 64, 40), ("rgb", 64, 64)]
    );
    for (item, &(w, h)) in job.items.iter().zip(&sizes) {
        assert_eq!(item.state, ItemState::Completed as i32, "{item:?}");
        let wall = item.masks.iter().find(|m| m.concept == "wall").unwrap();
        assert_eq!((wall.image_width, wall.image_height), (w, h));
        let png = orch.store.get(&wall.key).await.unwrap();
        let composed = orchestrator_svc::mask_png::compose(&png, w, h).unwrap();
        assert!(composed == fake_left_half(w, h), "{w}x{h}: {wall:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segmenter_that_reports_no_input_size_gets_the_upload_as_it_is() {
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |_| {}).await;
    orch.put_input("test-user", "old", 0, photo_jpeg(200, 120))
        .await;
    orch.client.submit_job(seed_spec("old", 1)).await.unwrap();
    let job = orch.wait_for("old", is_terminal).await;
    assert_eq!(job.items[0].state, ItemState::Completed as i32);
    assert_eq!(
        *segmenter.counters.images.lock().unwrap(),
        vec![("encoded", 200, 120)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_segment_call_carries_segmenter_timeout_sec_as_its_grpc_timeout() {
    // Without the header the segmenter applies its own default (120 s): a CPU tier's longer SEGMENTER_TIMEOUT_SEC
    // would be cut there with DEADLINE_EXCEEDED, which is not retried.
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |c| c.segmenter.segmenter_timeout_sec = 300).await;
    orch.put_input("test-user", "deadline", 0, photo_jpeg(40, 32))
        .await;
    orch.client
        .submit_job(seed_spec("deadline", 1))
        .await
        .unwrap();
    let job = orch.wait_for("deadline", is_terminal).await;
    assert_eq!(job.items[0].state, ItemState::Completed as i32, "{job:?}");
    let sent = segmenter.counters.grpc_timeouts.lock().unwrap().clone();
    assert_eq!(sent.len(), 1, "{sent:?}");
    // tonic writes the deadline in the largest unit that keeps it within the header's 8 digits.
    let (value, unit) = sent[0].split_at(sent[0].len() - 1);
    let per_second = match unit {
        "S" => 1.0,
        "m" => 1e3,
        "u" => 1e6,
        "n" => 1e9,
        other => panic!("unexpected grpc-timeout unit {other:?} in {sent:?}"),
    };
    let seconds = value.parse::<f64>().unwrap() / per_second;
    assert!((290.0..=300.0).contains(&seconds), "grpc-timeout {sent:?}");
}
