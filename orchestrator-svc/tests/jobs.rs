//! Jobs end to end inside this crate: gRPC in, local storage, a fault-injecting segmenter, a real callback receiver.

use palette_testing as common;

use std::sync::atomic::Ordering;

use common::orchestrator::{is_terminal, photo_jpeg, seed_spec, start};
use common::receiver::Receiver;
use common::{fake_segmenter, orchestrator};
use orchestrator_svc::callback::{CallbackJob, idempotency_key};
use orchestrator_svc::jobs::store::spec_hash;
use orchestrator_svc::mask_png;
use orchestrator_svc::storage::ObjectStore;
use palette_proto::orchestrator::v1::{
    CallbackState, CancelJobRequest, ItemState, JobState, MaskKey,
};
use palette_rules::GrayImage;
use palette_testing::status::violated_fields;
use tonic::Code;

const SECRET: &str = "supersecret123";

#[path = "common/fake_masks.rs"]
mod fake_masks;
use fake_masks::fake_left_half;

/// A stored mask composes to `full`. A grid (the default layout) is the model's mask as answered, its `placement`
/// chunk and its entry agreeing; a crop is pasted at its placement (the oFFs chunk and the entry agree on it).
fn assert_composes_to(png: &[u8], entry: &MaskKey, full: &GrayImage) {
    let stored = image::load_from_memory(png).unwrap().to_luma8();
    assert_eq!((entry.image_width, entry.image_height), full.dimensions());
    if entry.grid_width > 0 {
        assert_eq!(stored.dimensions(), (entry.grid_width, entry.grid_height));
        let at = orchestrator_svc::mask_png::grid::read_placement(png).expect("a placement chunk");
        assert_eq!(
            (at.x, at.y, at.width, at.height),
            (entry.x, entry.y, entry.width, entry.height),
            "placement vs {entry:?}"
        );
    } else {
        assert_eq!(
            (stored.width(), stored.height()),
            (entry.width, entry.height)
        );
        assert_eq!(
            mask_png::read_offset(png),
            Some((entry.x as i32, entry.y as i32)),
            "oFFs vs {entry:?}"
        );
        let mut composed = GrayImage::new(entry.image_width, entry.image_height);
        image::imageops::replace(&mut composed, &stored, entry.x.into(), entry.y.into());
        assert!(composed == *full, "{} composed differs", entry.key);
    }
    assert!(mask_png::compose(png, entry.image_width, entry.image_height).unwrap() == *full);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_job_completes_with_outputs_masks_preview_and_one_signed_callback() {
    let segmenter = fake_segmenter::start().await;
    let receiver = Receiver::start(SECRET, vec![(500, None)]).await;
    let mut orch = start(&segmenter.url, |c| {
        c.callbacks.workers_api_url = Some(receiver.url().into());
        c.callbacks.gpu_callback_secret = Some(SECRET.into());
    })
    .await;
    orch.put_input("test-user", "test-job", 0, photo_jpeg(96, 64))
        .await;

    let job = orch
        .client
        .submit_job(seed_spec("test-job", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.items.len(), 1);
    assert_eq!(job.items[0].input_key, "inputs/test-user/test-job/0.jpg");

    let events = orch.watch_to_end("test-job").await;
    assert_eq!(events[0].1, None, "the first event is the snapshot");
    let (last, _) = events.last().unwrap();
    assert_eq!(last.state, JobState::Done as i32);
    let item = &last.items[0];
    assert_eq!(item.state, ItemState::Completed as i32, "{item:?}");
    assert_eq!(item.output_key, "outputs/test-user/test-job/rule1/0.jpg");
    assert_eq!(
        item.preview_key,
        "previews/test-user/test-job/0_preview.jpg"
    );
    let mask_keys: Vec<&str> = item.masks.iter().map(|m| m.key.as_str()).collect();
    for key in [
        "masks/test-user/test-job/wall/0_1.png",
        "masks/test-user/test-job/floor/0_1.png",
        "masks/test-user/test-job/furniture/0_1.png",
    ] {
        assert!(mask_keys.contains(&key), "{key} not in {mask_keys:?}");
        let entry = item.masks.iter().find(|m| m.key == key).unwrap();
        let png = orch.store.get(key).await.unwrap();
        assert_composes_to(&png, entry, &fake_left_half(96, 64));
        assert!(entry.width < 96, "a crop, not the full frame: {entry:?}");
    }
    let output = image::load_from_memory(&orch.store.get(&item.output_key).await.unwrap())
        .unwrap()
        .to_rgb8();
    assert_eq!(output.dimensions(), (96, 64));
    // The left half (the fake "wall") turned orange-ish, the right half kept its grey.
    let painted = output.get_pixel(10, 32).0;
    let kept = output.get_pixel(90, 32).0;
    assert!(
        painted[0] > painted[2] + 30,
        "wall not recoloured: {painted:?}"
    );
    assert!(
        (kept[0] as i32 - kept[2] as i32).abs() < 30,
        "outside the mask changed: {kept:?}"
    );
    let preview =
        image::load_from_memory(&orch.store.get(&item.preview_key).await.unwrap()).unwrap();
    assert_eq!(
        (preview.width(), preview.height()),
        (96, 64),
        "small images are not upscaled"
    );

    let job = orch
        .wait_for("test-job", |j| {
            j.items[0].callback_state == CallbackState::Delivered as i32
        })
        .await;
    assert_eq!(job.items[0].callback_attempts, 2);
    let hash = spec_hash(job.effective_spec.as_ref().unwrap());
    let about = CallbackJob {
        user_id: &job.user_id,
        job_id: "test-job",
        spec_hash: &hash,
    };
    let id = idempotency_key(about, 0, "completed");
    assert_eq!(
        receiver.per_id().get(&id),
        Some(&2),
        "one 500, then the same event again"
    );
    let deliveries = receiver.deliveries();
    assert!(
        deliveries
            .iter()
            .all(|d| d.verified && d.job_id == "test-job")
    );
    let body = &deliveries.last().unwrap().body;
    assert_eq!(body["idx"], 0);
    assert_eq!(body["status"], "completed");
    // The URL names only the job id; the body names the user too (two users may use one job id).
    assert_eq!(
        (&body["user_id"], &body["job_id"]),
        (&"test-user".into(), &"test-job".into())
    );
    assert_eq!(body["output_key"], "outputs/test-user/test-job/rule1/0.jpg");
    assert_eq!(
        body["preview_key"],
        "previews/test-user/test-job/0_preview.jpg"
    );
    assert!(body["error"].is_null());
    assert_eq!(body["outputs"][0]["rule_id"], "rule1");
    assert_eq!(body["masks"].as_array().unwrap().len(), 3);
    let first = &item.masks[0];
    let placement = &body["masks"][0];
    assert_eq!(placement["key"], first.key.as_str());
    for (field, value) in [
        ("x", first.x),
        ("y", first.y),
        ("width", first.width),
        ("height", first.height),
        ("image_width", 96),
        ("image_height", 64),
    ] {
        assert_eq!(placement[field], value, "{field}");
    }
}

/// WatchJob of the seed user's `job_id`.
async fn watch_events(
    client: &mut palette_proto::orchestrator::v1::jobs_client::JobsClient<
        tonic::transport::Channel,
    >,
    job_id: &str,
    changes_only: bool,
) -> tonic::Streaming<palette_proto::orchestrator::v1::JobEvent> {
    client
        .watch_job(palette_proto::orchestrator::v1::WatchJobRequest {
            job_id: job_id.into(),
            user_id: common::orchestrator::SEED_USER.into(),
            changes_only,
        })
        .await
        .unwrap()
        .into_inner()
}

/// A watcher's view of the items after `event`: the whole job's, or the changed item put in its place (which
/// every event naming one carries, whatever the mode).
fn apply_event(
    items: &mut [palette_proto::orchestrator::v1::Item],
    event: &palette_proto::orchestrator::v1::JobEvent,
) {
    let job = event.job.as_ref().expect("every event carries the job");
    if let Some(idx) = event.changed_idx {
        assert_eq!(event.item.as_ref().map(|i| i.idx), Some(idx), "{event:?}");
    }
    if job.items.is_empty() {
        let item = event
            .item
            .clone()
            .expect("a change without the job's items names its item");
        let idx = item.idx as usize;
        items[idx] = item;
    } else {
        items.clone_from_slice(&job.items);
    }
}

/// WatchJob with `changes_only`: the whole job once, then each change as the job's state and counters plus the
/// changed item, so a watcher receives each item about once instead of the whole job per change; the items the
/// changes carry add up to the job GetJob shows at the end. Without it every event is the whole job (and names
/// the changed item too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_of_changes_only_sends_each_item_not_the_whole_job() {
    const IMAGES: u32 = 6;
    let segmenter = fake_segmenter::start().await;
    segmenter.faults.delay_ms.store(30, Ordering::SeqCst);
    let mut orch = start(&segmenter.url, |_| {}).await;
    for idx in 0..IMAGES {
        orch.put_input("test-user", "watched", idx, photo_jpeg(48, 32))
            .await;
    }
    orch.client
        .submit_job(seed_spec("watched", IMAGES))
        .await
        .unwrap();
    let watch = |changes_only: bool| {
        let mut client = orch.client.clone();
        async move {
            let mut stream = watch_events(&mut client, "watched", changes_only).await;
            let mut events = Vec::new();
            while let Some(event) = stream.message().await.unwrap() {
                events.push(event);
            }
            events
        }
    };
    let (compact, whole) = tokio::join!(watch(true), watch(false));
    let done = orch.wait_for("watched", is_terminal).await;

    let first = compact[0].job.as_ref().unwrap();
    assert_eq!(first.items.len(), IMAGES as usize);
    let mut items = first.items.clone();
    let (mut compact_bytes, mut whole_bytes) = (0, 0);
    for event in &compact[1..] {
        let job = event.job.as_ref().unwrap();
        compact_bytes += prost::Message::encoded_len(event);
        if job.items.is_empty() {
            assert!(job.effective_spec.is_none(), "{job:?}");
        } else {
            // The last event (the job ended), or a watcher that fell behind: the whole job.
            assert!(
                event.changed_idx.is_none() || job.state == JobState::Done as i32,
                "{job:?}"
            );
        }
        apply_event(&mut items, event);
    }
    let last = compact.last().unwrap().job.as_ref().unwrap();
    assert_eq!(last.state, JobState::Done as i32);
    assert_eq!(last.completed, IMAGES);
    assert_eq!(items, done.items, "the changes add up to the job");
    for event in &whole[1..] {
        whole_bytes += prost::Message::encoded_len(event);
        let job = event.job.as_ref().unwrap();
        assert_eq!(job.items.len(), IMAGES as usize);
        if let Some(idx) = event.changed_idx {
            assert_eq!(event.item.as_ref(), Some(&job.items[idx as usize]));
        }
    }
    eprintln!(
        "{IMAGES}-image job, {} changes: {compact_bytes} bytes of changes only, {whole_bytes} bytes of whole jobs",
        compact.len() - 1
    );
    assert!(
        compact_bytes * 2 < whole_bytes,
        "{compact_bytes} vs {whole_bytes}"
    );
}

/// A cancel ends every open item at once: a `changes_only` watcher still learns how each one ended (the last
/// event is the whole job), instead of a stream that stops at the first change whose job reads CANCELLED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_of_changes_only_sees_every_item_a_cancel_ends() {
    const IMAGES: u32 = 5;
    let segmenter = fake_segmenter::start().await;
    segmenter.faults.delay_ms.store(60_000, Ordering::SeqCst);
    let mut orch = start(&segmenter.url, |c| c.limits.batch_concurrency = 1).await;
    for idx in 0..IMAGES {
        orch.put_input("test-user", "cancelled-watch", idx, photo_jpeg(32, 32))
            .await;
    }
    orch.client
        .submit_job(seed_spec("cancelled-watch", IMAGES))
        .await
        .unwrap();
    let mut stream = watch_events(&mut orch.client, "cancelled-watch", true).await;
    let mut items = stream.message().await.unwrap().unwrap().job.unwrap().items;
    orch.client
        .cancel_job(CancelJobRequest {
            job_id: "cancelled-watch".into(),
            user_id: "test-user".into(),
        })
        .await
        .unwrap();
    let mut last = None;
    while let Some(event) = stream.message().await.unwrap() {
        apply_event(&mut items, &event);
        last = event.job;
    }
    assert_eq!(last.unwrap().state, JobState::Cancelled as i32);
    assert!(
        items.iter().all(|i| i.state == ItemState::Cancelled as i32),
        "{items:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_is_idempotent_and_a_different_spec_is_already_exists() {
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |_| {}).await;
    orch.put_input("test-user", "idem", 0, photo_jpeg(32, 32))
        .await;
    orch.client.submit_job(seed_spec("idem", 1)).await.unwrap();
    orch.client.submit_job(seed_spec("idem", 1)).await.unwrap();
    orch.watch_to_end("idem").await;
    orch.client.submit_job(seed_spec("idem", 1)).await.unwrap();
    assert_eq!(
        segmenter.counters.segment_calls.load(Ordering::SeqCst),
        1,
        "duplicate work"
    );

    let mut other = seed_spec("idem", 1);
    other.concepts.push("ceiling".into());
    let err = orch.client.submit_job(other).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swatch_outside_the_library_and_the_users_inputs_is_refused_at_submit() {
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |_| {}).await;
    for (n, key) in [
        "inputs/another-user/job/0.jpg",
        "outputs/test-user/job/rule1/0.jpg",
    ]
    .into_iter()
    .enumerate()
    {
        let mut spec = seed_spec(&format!("bad-swatch-{n}"), 1);
        spec.rules[0].r#type = "texture".into();
        spec.rules[0].params = Some(orchestrator::string_struct(&[("swatch", key)]));
        let err = orch.client.submit_job(spec).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{key}");
        assert_eq!(violated_fields(&err), ["rules[0].params.swatch"], "{key}");
    }
    // The swatch library and the user's own uploads are accepted.
    for (n, key) in ["swatches/oak.jpg", "inputs/test-user/swatch/oak.jpg"]
        .into_iter()
        .enumerate()
    {
        let mut spec = seed_spec(&format!("good-swatch-{n}"), 1);
        spec.rules[0].r#type = "texture".into();
        spec.rules[0].params = Some(orchestrator::string_struct(&[("swatch", key)]));
        orch.client.submit_job(spec).await.expect(key);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_spec_reports_every_bad_field() {
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |_| {}).await;
    let mut spec = seed_spec("../../etc", 0);
    spec.user_id = String::new();
    spec.concepts.push(" ".into());
    spec.rules[0].r#type = "paint".into();
    let err = orch.client.submit_job(spec).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let fields = violated_fields(&err);
    for f in [
        "user_id",
        "job_id",
        "image_count",
        "concepts[3]",
        "rules[0].type",
    ] {
        assert!(fields.iter().any(|v| v == f), "{f} missing in {fields:?}");
    }
}

/// The callback URL is the job's (`/jobs/{jobId}/callback`): a 410 Gone there means the receiver wants none of this
/// job's callbacks, so the job's later items are not posted (each was, and got its own 410).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_for_one_item_stops_the_callbacks_of_the_jobs_later_items() {
    let segmenter = fake_segmenter::start().await;
    // Items end ~0.5 s apart (one at a time), long after a loopback callback's answer.
    segmenter.faults.delay_ms.store(500, Ordering::SeqCst);
    let receiver = Receiver::start(SECRET, vec![(410, None)]).await;
    let mut orch = start(&segmenter.url, |c| {
        c.callbacks.workers_api_url = Some(receiver.url().into());
        c.callbacks.gpu_callback_secret = Some(SECRET.into());
        c.limits.batch_concurrency = 1;
    })
    .await;
    for idx in 0..3 {
        orch.put_input("test-user", "gone", idx, photo_jpeg(40 + idx, 30))
            .await;
    }
    orch.client.submit_job(seed_spec("gone", 3)).await.unwrap();
    let job = orch
        .wait_for("gone", |j| {
            is_terminal(j)
                && j.items
                    .iter()
                    .all(|i| i.callback_state == CallbackState::Failed as i32)
        })
        .await;
    assert_eq!(job.completed, 3, "{job:?}");
    assert_eq!(receiver.deliveries().len(), 1, "only the first was posted");
    assert_eq!(job.items[0].callback_attempts, 1);
    for item in &job.items[1..] {
        assert_eq!(item.callback_attempts, 0, "{item:?}");
        assert!(item.callback_error.contains("410 Gone"), "{item:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_input_fails_only_its_item() {
    let segmenter = fake_segmenter::start().await;
    let receiver = Receiver::start(SECRET, vec![]).await;
    let mut orch = start(&segmenter.url, |c| {
        c.callbacks.workers_api_url = Some(receiver.url().into());
        c.callbacks.gpu_callback_secret = Some(SECRET.into());
    })
    .await;
    orch.put_input("test-user", "partial", 0, photo_jpeg(32, 32))
        .await;
    orch.put_input("test-user", "partial", 2, b"not a jpeg".to_vec())
        .await;
    orch.client
        .submit_job(seed_spec("partial", 3))
        .await
        .unwrap();
    let job = orch
        .wait_for("partial", |j| {
            is_terminal(j)
                && j.items
                    .iter()
                    .all(|i| i.callback_state == CallbackState::Delivered as i32)
        })
        .await;
    assert_eq!(job.state, JobState::Done as i32);
    assert_eq!((job.completed, job.failed), (1, 2));
    assert_eq!(job.items[1].error_code, "input_missing");
    assert_eq!(job.items[2].error_code, "input_corrupt");
    let mut statuses: Vec<String> = receiver
        .deliveries()
        .iter()
        .map(|d| format!("{}:{}", d.body["idx"], d.body["status"]))
        .collect();
    statuses.sort();
    assert_eq!(
        statuses,
        ["0:\"completed\"", "1:\"failed\"", "2:\"failed\""]
    );
    assert!(
        receiver
            .deliveries()
            .iter()
            .any(|d| d.body["error_code"] == "input_missing")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segmenter_that_is_down_fails_items_as_segmenter_unavailable() {
    let mut orch = start("http://127.0.0.1:9", |_| {}).await;
    orch.put_input("test-user", "down", 0, photo_jpeg(32, 32))
        .await;
    // The phrase check gets no verdict: accepted within its 0.5 s deadline, and the next submission, with phrases
    // never checked, is not delayed again (the check is skipped for a while after a failure).
    let started = std::time::Instant::now();
    orch.client.submit_job(seed_spec("down", 1)).await.unwrap();
    let first = started.elapsed();
    let started = std::time::Instant::now();
    let other = palette_proto::orchestrator::v1::JobSpec {
        concepts: vec!["ceiling".into()],
        ..seed_spec("down-too", 1)
    };
    orch.client.submit_job(other).await.unwrap();
    let second = started.elapsed();
    assert!(first < std::time::Duration::from_millis(1500), "{first:?}");
    assert!(second < std::time::Duration::from_millis(300), "{second:?}");
    let events = orch.watch_to_end("down").await;
    let item = &events.last().unwrap().0.items[0];
    assert_eq!(item.state, ItemState::Failed as i32);
    assert_eq!(item.error_code, "segmenter_unavailable");
    assert_eq!(item.callback_state, CallbackState::NotConfigured as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_segmenter_calls_are_retried() {
    let segmenter = fake_segmenter::start().await;
    segmenter
        .faults
        .unavailable_first
        .store(2, Ordering::SeqCst);
    let mut orch = start(&segmenter.url, |c| c.segmenter.segmenter_attempts = 3).await;
    orch.put_input("test-user", "flaky", 0, photo_jpeg(32, 32))
        .await;
    orch.client.submit_job(seed_spec("flaky", 1)).await.unwrap();
    let item = orch.watch_to_end("flaky").await.last().unwrap().0.items[0].clone();
    assert_eq!(item.state, ItemState::Completed as i32, "{item:?}");
    assert_eq!(segmenter.counters.segment_calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_segmenter_reply_fails_the_item_and_is_not_cached() {
    let segmenter = fake_segmenter::start().await;
    segmenter.faults.nan_scores.store(true, Ordering::SeqCst);
    let mut orch = start(&segmenter.url, |_| {}).await;
    let photo = photo_jpeg(32, 32);
    orch.put_input("test-user", "nan-1", 0, photo.clone()).await;
    orch.client.submit_job(seed_spec("nan-1", 1)).await.unwrap();
    let item = orch.watch_to_end("nan-1").await.last().unwrap().0.items[0].clone();
    assert_eq!(item.state, ItemState::Failed as i32, "{item:?}");
    assert_eq!(item.error_code, "segmenter_unavailable", "{item:?}");
    assert!(item.error.contains("score NaN"), "{item:?}");
    // The same bytes again, the segmenter mended: asked again (nothing of the bad reply was cached).
    segmenter.faults.nan_scores.store(false, Ordering::SeqCst);
    orch.put_input("test-user", "nan-2", 0, photo).await;
    orch.client.submit_job(seed_spec("nan-2", 1)).await.unwrap();
    let item = orch.watch_to_end("nan-2").await.last().unwrap().0.items[0].clone();
    assert_eq!(item.state, ItemState::Completed as i32, "{item:?}");
    assert_eq!(segmenter.counters.segment_calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_ends_every_open_item_once_with_one_callback_each() {
    let segmenter = fake_segmenter::start().await;
    segmenter.faults.delay_ms.store(1500, Ordering::SeqCst);
    let receiver = Receiver::start(SECRET, vec![]).await;
    let mut orch = start(&segmenter.url, |c| {
        c.limits.batch_concurrency = 1;
        c.callbacks.workers_api_url = Some(receiver.url().into());
        c.callbacks.gpu_callback_secret = Some(SECRET.into());
    })
    .await;
    for idx in 0..3 {
        orch.put_input("test-user", "cancel-me", idx, photo_jpeg(32, 32))
            .await;
    }
    orch.client
        .submit_job(seed_spec("cancel-me", 3))
        .await
        .unwrap();
    orch.wait_for("cancel-me", |j| {
        j.items[0].state == ItemState::Running as i32
    })
    .await;
    let job = orch
        .client
        .cancel_job(CancelJobRequest {
            job_id: "cancel-me".into(),
            user_id: common::orchestrator::SEED_USER.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.state, JobState::Cancelled as i32);
    assert_eq!(job.cancelled, 3);
    assert!(job.items.iter().all(|i| i.error_code == "cancelled"));

    let job = orch
        .wait_for("cancel-me", |j| {
            j.items
                .iter()
                .all(|i| i.callback_state == CallbackState::Delivered as i32)
        })
        .await;
    // A late pipeline would (wrongly) finish item 0 and call back again before the drain ends: after shutdown
    // nothing can call back any more.
    orch.shutdown().await;
    assert!(
        job.items
            .iter()
            .all(|i| i.state == ItemState::Cancelled as i32)
    );
    let per_id = receiver.per_id();
    assert_eq!(per_id.len(), 3, "{per_id:?}");
    assert!(per_id.values().all(|n| *n == 1), "{per_id:?}");
    assert!(
        segmenter.counters.segment_calls.load(Ordering::SeqCst) <= 1,
        "items after the cancel never started"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masks_are_reused_for_the_same_input_bytes() {
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |_| {}).await;
    let photo = photo_jpeg(48, 32);
    orch.put_input("test-user", "first", 0, photo.clone()).await;
    orch.put_input("test-user", "second", 0, photo).await;
    orch.client.submit_job(seed_spec("first", 1)).await.unwrap();
    let first = orch.watch_to_end("first").await.last().unwrap().0.clone();
    orch.client
        .submit_job(seed_spec("second", 1))
        .await
        .unwrap();
    let second = orch.watch_to_end("second").await.last().unwrap().0.clone();
    assert!(!first.items[0].masks_reused);
    assert!(second.items[0].masks_reused);
    assert_eq!(second.items[0].state, ItemState::Completed as i32);
    assert_eq!(segmenter.counters.segment_calls.load(Ordering::SeqCst), 1);
    assert!(
        orch.store
            .exists("masks/test-user/second/wall/0_1.png")
            .await
            .unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_in_flight_are_bounded_by_batch_concurrency() {
    let segmenter = fake_segmenter::start().await;
    segmenter.faults.delay_ms.store(150, Ordering::SeqCst);
    let mut orch = start(&segmenter.url, |c| c.limits.batch_concurrency = 2).await;
    for job in ["bound-a", "bound-b"] {
        for idx in 0..4 {
            // Different bytes per image so no mask is reused.
            orch.put_input(
                "test-user",
                job,
                idx,
                photo_jpeg(32 + idx, 32 + (job == "bound-b") as u32),
            )
            .await;
        }
    }
    orch.client
        .submit_job(seed_spec("bound-a", 4))
        .await
        .unwrap();
    orch.client
        .submit_job(seed_spec("bound-b", 4))
        .await
        .unwrap();
    let a = orch.watch_to_end("bound-a").await.last().unwrap().0.clone();
    let b = orch.watch_to_end("bound-b").await.last().unwrap().0.clone();
    assert_eq!((a.completed, b.completed), (4, 4));
    assert!(segmenter.counters.max_in_flight.load(Ordering::SeqCst) <= 2);
    assert_eq!(segmenter.counters.segment_calls.load(Ordering::SeqCst), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_jobs_are_not_found() {
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |_| {}).await;
    let err = orch
        .client
        .get_job(palette_proto::orchestrator::v1::GetJobRequest {
            job_id: "nope".into(),
            user_id: common::orchestrator::SEED_USER.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let _ = orchestrator::is_terminal;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_beyond_the_memory_budget_are_forgotten_when_they_end() {
    let segmenter = fake_segmenter::start().await;
    // No memory for finished jobs at all: each is forgotten as soon as it ends, with no other submit to prompt it.
    let mut orch = start(&segmenter.url, |c| c.limits.retained_jobs_mb = 0).await;
    orch.put_input("test-user", "kept-while-running", 0, photo_jpeg(32, 32))
        .await;
    segmenter.faults.delay_ms.store(500, Ordering::SeqCst);
    orch.client
        .submit_job(seed_spec("kept-while-running", 1))
        .await
        .unwrap();
    // Running: over the budget, yet kept (and GetJob answers).
    let running = orch
        .client
        .get_job(palette_proto::orchestrator::v1::GetJobRequest {
            job_id: "kept-while-running".into(),
            user_id: common::orchestrator::SEED_USER.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!is_terminal(&running));
    let events = orch.watch_to_end("kept-while-running").await;
    assert_eq!(
        events.last().unwrap().0.items[0].state,
        ItemState::Completed as i32,
        "a watcher still sees the job end"
    );
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let answer = orch
            .client
            .get_job(palette_proto::orchestrator::v1::GetJobRequest {
                job_id: "kept-while-running".into(),
                user_id: common::orchestrator::SEED_USER.into(),
            })
            .await;
        match answer {
            Err(status) if status.code() == Code::NotFound => break,
            _ => assert!(
                tokio::time::Instant::now() < deadline,
                "the finished job was never forgotten"
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A 64x40 product shot already on a transparent page (its right quarter; the fake's masks cover the left half),
/// and its PNG.
fn product_on_a_transparent_page() -> (image::RgbaImage, Vec<u8>) {
    let source = image::RgbaImage::from_fn(64, 40, |x, y| {
        image::Rgba([
            (x * 4) as u8,
            (y * 6) as u8,
            90,
            if x >= 48 { 0 } else { 255 },
        ])
    });
    let mut png = std::io::Cursor::new(Vec::new());
    source.write_to(&mut png, image::ImageFormat::Png).unwrap();
    (source, png.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cutout_is_stored_as_png_with_alpha() {
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |_| {}).await;
    // The cut-out keeps the page's transparency.
    let (source, input) = product_on_a_transparent_page();
    orch.put_input("test-user", "cut", 0, input).await;
    let mut spec = seed_spec("cut", 1);
    spec.rules.push(palette_proto::orchestrator::v1::Rule {
        rule_id: "cutout".into(),
        concept: "furniture".into(),
        r#type: "remove".into(),
        params: Some(orchestrator::string_struct(&[("mode", "cutout")])),
    });
    orch.client.submit_job(spec).await.unwrap();
    let job = orch.watch_to_end("cut").await.last().unwrap().0.clone();
    let item = &job.items[0];
    assert_eq!(item.state, ItemState::Completed as i32, "{item:?}");
    let keys: Vec<&str> = item.outputs.iter().map(|o| o.output_key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "outputs/test-user/cut/rule1/0.jpg",
            "outputs/test-user/cut/cutout/0.png"
        ]
    );
    let png = image::load_from_memory(&orch.store.get(keys[1]).await.unwrap()).unwrap();
    assert!(png.color().has_alpha());
    let (png, mut cut) = (png.into_rgba8(), 0);
    for ((x, y, out), src) in png.enumerate_pixels().zip(source.pixels()) {
        assert!(
            out[3] <= src[3],
            "({x}, {y}): transparent in the source, not in the cut-out"
        );
        if src[3] == 255 && out[3] == 255 {
            assert_eq!(out.0[..3], src.0[..3], "({x}, {y}) kept as it was");
        }
        cut += usize::from(src[3] == 255 && out[3] < 255);
    }
    assert!(cut > 0, "the furniture was cut out");
    assert_eq!(
        item.output_key, keys[0],
        "output_key is the first rule's output"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_png_job_keeps_a_transparent_photos_transparency_in_its_edits() {
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |_| {}).await;
    let (source, input) = product_on_a_transparent_page();
    orch.put_input("test-user", "png", 0, input).await;
    let mut spec = seed_spec("png", 1);
    spec.output_format = "png".into();
    orch.client.submit_job(spec).await.unwrap();
    let job = orch.watch_to_end("png").await.last().unwrap().0.clone();
    let item = &job.items[0];
    assert_eq!(item.state, ItemState::Completed as i32, "{item:?}");
    assert_eq!(item.output_key, "outputs/test-user/png/rule1/0.png");
    assert_eq!(
        item.preview_key, "previews/test-user/png/0_preview.jpg",
        "previews stay JPEG"
    );
    let png = image::load_from_memory(&orch.store.get(&item.output_key).await.unwrap()).unwrap();
    assert!(png.color().has_alpha());
    let png = png.into_rgba8();
    for ((x, y, out), src) in png.enumerate_pixels().zip(source.pixels()) {
        assert_eq!(out[3], src[3], "({x}, {y}): the photo's own alpha");
    }
    let (wall, rest) = (png.get_pixel(4, 20), png.get_pixel(44, 20));
    assert_ne!(
        wall.0[..3],
        source.get_pixel(4, 20).0[..3],
        "the wall is painted"
    );
    assert_eq!(
        rest.0,
        source.get_pixel(44, 20).0,
        "lossless outside the region"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presets_output_format_is_what_its_jobs_get_unless_they_name_theirs() {
    let segmenter = fake_segmenter::start().await;
    let presets = tempfile::tempdir().unwrap();
    std::fs::write(
        presets.path().join("shop.json"),
        r#"{"name": "shop", "concepts": ["wall"], "output_format": "png"}"#,
    )
    .unwrap();
    let dir = presets.path().to_path_buf();
    let mut orch = start(&segmenter.url, move |c| c.limits.presets_dir = dir).await;
    for (job_id, named, key) in [
        (
            "shop-default",
            "",
            "outputs/test-user/shop-default/rule1/0.png",
        ),
        (
            "shop-jpeg",
            "jpeg",
            "outputs/test-user/shop-jpeg/rule1/0.jpg",
        ),
    ] {
        orch.put_input("test-user", job_id, 0, photo_jpeg(48, 32))
            .await;
        let mut spec = seed_spec(job_id, 1);
        spec.preset = "shop".into();
        spec.output_format = named.into();
        let job = orch.client.submit_job(spec).await.unwrap().into_inner();
        let effective = job.effective_spec.unwrap().output_format;
        assert_eq!(effective, if named.is_empty() { "png" } else { "jpeg" });
        let done = orch.watch_to_end(job_id).await.last().unwrap().0.clone();
        let item = &done.items[0];
        assert_eq!(item.state, ItemState::Completed as i32, "{item:?}");
        assert_eq!(item.output_key, key);
        orch.store.get(key).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_interior_preset_supplies_concepts_and_occluders() {
    let segmenter = fake_segmenter::start().await;
    let presets = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../presets");
    let mut orch = start(&segmenter.url, move |c| c.limits.presets_dir = presets).await;
    orch.put_input("test-user", "interior", 0, photo_jpeg(48, 32))
        .await;
    let mut spec = seed_spec("interior", 1);
    spec.concepts.clear();
    spec.preset = "interior".into();
    let job = orch.client.submit_job(spec).await.unwrap().into_inner();
    let effective = job.effective_spec.unwrap();
    assert!(effective.concepts.len() >= 17, "{:?}", effective.concepts);
    assert!(effective.concepts.iter().any(|c| c == "sofa"));
    let done = orch
        .watch_to_end("interior")
        .await
        .last()
        .unwrap()
        .0
        .clone();
    assert_eq!(
        done.items[0].state,
        ItemState::Completed as i32,
        "{:?}",
        done.items[0]
    );
    assert!(
        done.items[0]
            .masks
            .iter()
            .any(|m| m.key == "masks/test-user/interior/picture_frame/0_1.png")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_concepts_not_seen_before_are_segmented_again() {
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |_| {}).await;
    let photo = photo_jpeg(40, 30);
    orch.put_input("test-user", "seen", 0, photo.clone()).await;
    orch.put_input("test-user", "partly-new", 0, photo).await;
    orch.client.submit_job(seed_spec("seen", 1)).await.unwrap();
    orch.watch_to_end("seen").await;
    let mut spec = seed_spec("partly-new", 1);
    spec.concepts = vec!["ceiling".into(), "wall".into()];
    orch.client.submit_job(spec).await.unwrap();
    let job = orch
        .watch_to_end("partly-new")
        .await
        .last()
        .unwrap()
        .0
        .clone();
    let item = &job.items[0];
    assert_eq!(item.state, ItemState::Completed as i32, "{item:?}");
    assert!(item.masks_reused);
    let requests = segmenter.counters.requests.lock().unwrap().clone();
    assert_eq!(
        requests,
        [vec!["wall", "floor", "furniture"], vec!["ceiling"]]
    );
    let concepts: Vec<&str> = item.masks.iter().map(|m| m.concept.as_str()).collect();
    assert_eq!(concepts, ["ceiling", "wall"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_edits_the_union_of_its_concept_instances() {
    let segmenter = fake_segmenter::start().await;
    segmenter
        .faults
        .second_instance
        .store(true, Ordering::SeqCst);
    let mut orch = start(&segmenter.url, |_| {}).await;
    orch.put_input("test-user", "two", 0, photo_jpeg(96, 64))
        .await;
    orch.client.submit_job(seed_spec("two", 1)).await.unwrap();
    let job = orch.watch_to_end("two").await.last().unwrap().0.clone();
    let item = &job.items[0];
    assert_eq!(item.state, ItemState::Completed as i32, "{item:?}");
    let wall: Vec<&str> = item
        .masks
        .iter()
        .filter(|m| m.concept == "wall")
        .map(|m| m.key.as_str())
        .collect();
    assert_eq!(
        wall,
        [
            "masks/test-user/two/wall/0_1.png",
            "masks/test-user/two/wall/0_2.png"
        ]
    );
    let output = image::load_from_memory(&orch.store.get(&item.output_key).await.unwrap())
        .unwrap()
        .to_rgb8();
    let orange = |p: [u8; 3]| p[0] as i32 > p[2] as i32 + 30;
    assert!(
        orange(output.get_pixel(10, 20).0),
        "first instance (left half) not edited"
    );
    assert!(
        orange(output.get_pixel(85, 60).0),
        "second instance (bottom right) not edited"
    );
    assert!(
        !orange(output.get_pixel(85, 20).0),
        "outside both instances edited"
    );

    // MASK_LAYOUT=crop stores the same masks as photo-resolution crops, and the outputs do not change.
    let mut crops = start(&segmenter.url, |c| {
        c.storage.mask_layout = orchestrator_svc::config::MaskLayout::Crop
    })
    .await;
    crops
        .put_input("test-user", "two", 0, photo_jpeg(96, 64))
        .await;
    crops.client.submit_job(seed_spec("two", 1)).await.unwrap();
    let cropped = crops.watch_to_end("two").await.last().unwrap().0.clone();
    let cropped = &cropped.items[0];
    assert_eq!(cropped.state, ItemState::Completed as i32, "{cropped:?}");
    assert_eq!(cropped.masks.len(), item.masks.len());
    for (grid, crop) in item.masks.iter().zip(&cropped.masks) {
        assert!(
            grid.grid_width > 0 && crop.grid_width == 0,
            "{grid:?} {crop:?}"
        );
        let full_grid = mask_png::compose(&orch.store.get(&grid.key).await.unwrap(), 96, 64);
        let crop_png = crops.store.get(&crop.key).await.unwrap();
        assert_composes_to(&crop_png, crop, &full_grid.unwrap());
    }
    assert_eq!(
        crops.store.get(&cropped.output_key).await.unwrap(),
        orch.store.get(&item.output_key).await.unwrap(),
        "the same output from either layout"
    );

    // MASK_LAYOUT=full stores each mask as the seed's worker did: the full-frame mask itself, photo-sized.
    let mut frames = start(&segmenter.url, |c| {
        c.storage.mask_layout = orchestrator_svc::config::MaskLayout::Full
    })
    .await;
    frames
        .put_input("test-user", "two", 0, photo_jpeg(96, 64))
        .await;
    frames.client.submit_job(seed_spec("two", 1)).await.unwrap();
    let framed = frames.watch_to_end("two").await.last().unwrap().0.clone();
    let framed = &framed.items[0];
    assert_eq!(framed.state, ItemState::Completed as i32, "{framed:?}");
    assert_eq!(framed.masks.len(), item.masks.len());
    for (grid, full) in item.masks.iter().zip(&framed.masks) {
        let full_grid = mask_png::compose(&orch.store.get(&grid.key).await.unwrap(), 96, 64);
        let png = frames.store.get(&full.key).await.unwrap();
        let stored = image::load_from_memory(&png).unwrap().to_luma8();
        assert!(
            stored == full_grid.unwrap(),
            "{} is not the full-frame mask",
            full.key
        );
        assert_eq!(
            mask_png::read_offset(&png),
            None,
            "no placement chunk needed"
        );
        // The entry still names where the mask is non-zero.
        assert_eq!(
            (full.x, full.y, full.width, full.height, full.grid_width),
            (grid.x, grid.y, grid.width, grid.height, 0)
        );
    }
    assert_eq!(
        frames.store.get(&framed.output_key).await.unwrap(),
        orch.store.get(&item.output_key).await.unwrap(),
        "the same output from every layout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_with_nothing_to_edit_says_so_in_the_item_and_the_callback() {
    let segmenter = fake_segmenter::start().await;
    segmenter
        .faults
        .nothing_for
        .lock()
        .unwrap()
        .push("ceiling".into());
    let receiver = Receiver::start(SECRET, vec![]).await;
    let mut orch = start(&segmenter.url, |c| {
        c.callbacks.workers_api_url = Some(receiver.url().into());
        c.callbacks.gpu_callback_secret = Some(SECRET.into());
    })
    .await;
    let photo = photo_jpeg(128, 96);
    orch.put_input("test-user", "nothing", 0, photo.clone())
        .await;
    let mut spec = seed_spec("nothing", 1);
    spec.concepts = vec!["wall".into(), "floor".into(), "ceiling".into()];
    let rule = |id: &str, concept: &str, params: prost_types::Struct| {
        palette_proto::orchestrator::v1::Rule {
            rule_id: id.into(),
            concept: concept.into(),
            r#type: "recolor".into(),
            params: Some(params),
        }
    };
    let string = |s: &str| prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(s.into())),
    };
    let mut behind_the_floor = orchestrator::string_struct(&[("color", "#1F3A5F")]);
    behind_the_floor.fields.insert(
        "occluded_by".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::ListValue(
                prost_types::ListValue {
                    values: vec![string("floor")],
                },
            )),
        },
    );
    // The fake finds every concept on the left half: the wall behind the floor is hidden entirely.
    spec.rules = vec![
        rule(
            "paint",
            "wall",
            orchestrator::string_struct(&[("color", "#FF5733")]),
        ),
        rule(
            "ceiling",
            "ceiling",
            orchestrator::string_struct(&[("color", "#FFFFFF")]),
        ),
        rule("hidden", "wall", behind_the_floor),
    ];
    orch.client.submit_job(spec).await.unwrap();
    let job = orch.watch_to_end("nothing").await.last().unwrap().0.clone();
    let item = &job.items[0];
    assert_eq!(item.state, ItemState::Completed as i32, "{item:?}");
    let flags: Vec<(&str, bool, &str)> = item
        .outputs
        .iter()
        .map(|o| (o.rule_id.as_str(), o.applied, o.not_applied_reason.as_str()))
        .collect();
    assert_eq!(
        flags,
        [
            ("paint", true, ""),
            ("ceiling", false, "concept_not_found"),
            ("hidden", false, "region_empty")
        ]
    );
    // Every rule still has its output: the photo as it was where nothing was edited.
    let unchanged =
        image::load_from_memory(&orch.store.get(&item.outputs[1].output_key).await.unwrap())
            .unwrap()
            .to_rgb8();
    let input = image::load_from_memory(&photo).unwrap().to_rgb8();
    let max_diff = unchanged
        .as_raw()
        .iter()
        .zip(input.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(max_diff <= 4, "re-encoding only: max diff {max_diff}");
    let job = orch
        .wait_for("nothing", |j| {
            j.items[0].callback_state == CallbackState::Delivered as i32
        })
        .await;
    assert_eq!(job.items[0].outputs.len(), 3);
    let deliveries = receiver.deliveries();
    let outputs = deliveries.last().unwrap().body["outputs"]
        .as_array()
        .unwrap();
    assert_eq!(outputs[0]["applied"], true);
    assert!(outputs[0]["not_applied_reason"].is_null());
    assert_eq!(outputs[1]["applied"], false);
    assert_eq!(outputs[1]["not_applied_reason"], "concept_not_found");
    assert_eq!(outputs[2]["not_applied_reason"], "region_empty");
}

/// The rules' swatches are read before the segmenter is asked: a missing one failed every item only after its photo
/// had been segmented (GPU time for nothing, per photo).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_swatch_fails_the_items_before_any_segmentation() {
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |_| {}).await;
    for idx in 0..2 {
        orch.put_input("test-user", "no-swatch", idx, photo_jpeg(32, 32))
            .await;
    }
    let mut spec = seed_spec("no-swatch", 2);
    spec.rules[0].r#type = "texture".into();
    spec.rules[0].params = Some(orchestrator::string_struct(&[(
        "swatch",
        "swatches/never-uploaded.png",
    )]));
    orch.client.submit_job(spec).await.unwrap();
    let job = orch
        .watch_to_end("no-swatch")
        .await
        .last()
        .unwrap()
        .0
        .clone();
    for item in &job.items {
        assert_eq!(item.state, ItemState::Failed as i32, "{item:?}");
        assert!(
            item.error.contains("swatches/never-uploaded.png"),
            "{}",
            item.error
        );
    }
    assert_eq!(
        segmenter
            .counters
            .segment_calls
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no photo segmented"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swatch_over_the_byte_limit_fails_its_item_naming_the_swatch() {
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |c| c.limits.max_input_bytes = 8_000).await;
    orch.put_input("test-user", "big-swatch", 0, photo_jpeg(32, 32))
        .await;
    // A noisy PNG: ~50 KB, over the 8 KB limit the (small) photo is under.
    let noise = image::RgbImage::from_fn(128, 128, |x, y| {
        let h =
            (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)).wrapping_mul(2_246_822_519);
        image::Rgb([(h >> 8) as u8, (h >> 16) as u8, (h >> 24) as u8])
    });
    let mut png = std::io::Cursor::new(Vec::new());
    noise.write_to(&mut png, image::ImageFormat::Png).unwrap();
    assert!(png.get_ref().len() > 8_000);
    orch.store
        .put(
            "swatches/huge.png",
            bytes::Bytes::from(png.into_inner()),
            "image/png",
        )
        .await
        .unwrap();
    let mut spec = seed_spec("big-swatch", 1);
    spec.rules[0].r#type = "texture".into();
    spec.rules[0].params = Some(orchestrator::string_struct(&[(
        "swatch",
        "swatches/huge.png",
    )]));
    orch.client.submit_job(spec).await.unwrap();
    let job = orch
        .watch_to_end("big-swatch")
        .await
        .last()
        .unwrap()
        .0
        .clone();
    let item = &job.items[0];
    assert_eq!(item.state, ItemState::Failed as i32, "{item:?}");
    assert_eq!(item.error_code, "rule_failed");
    assert!(
        item.error.contains("swatches/huge.png")
            && item.error.contains("larger than the limit of 8000 bytes"),
        "{}",
        item.error
    );
}
