//! EditJob: new rules on a finished job's photos from its stored masks, without the segmenter, served by an
//! orchestrator that never saw the source job (a restart, another replica: they share only the storage).

use palette_testing as common;

use std::sync::atomic::Ordering;

use common::fake_segmenter;
use common::orchestrator::{
    Orchestrator, SEED_USER, is_terminal, photo_jpeg, seed_spec, start, string_struct,
};
use orchestrator_svc::storage::ObjectStore;
use palette_proto::orchestrator::v1::{
    EditJobRequest, GetJobRequest, ItemState, Job, JobSpec, JobState, PreviewEditRequest, Rule,
};
use palette_testing::status::violated_fields;
use tonic::Code;

fn paint(rule_id: &str, concept: &str, color: &str) -> Rule {
    Rule {
        rule_id: rule_id.into(),
        concept: concept.into(),
        r#type: "recolor".into(),
        params: Some(string_struct(&[("color", color)])),
    }
}

fn edit(job_id: &str, source: &str, rules: Vec<Rule>) -> EditJobRequest {
    EditJobRequest {
        user_id: SEED_USER.into(),
        job_id: job_id.into(),
        source_job_id: source.into(),
        rules,
        preset: String::new(),
        output_format: String::new(),
    }
}

/// Runs the seed job `source` (3 concepts, 2 photos) on one orchestrator, to its end.
async fn finished_source(orch: &mut Orchestrator, source: &str) -> Job {
    for idx in 0..2 {
        orch.put_input(SEED_USER, source, idx, photo_jpeg(48, 32))
            .await;
    }
    orch.client.submit_job(seed_spec(source, 2)).await.unwrap();
    let job = orch.wait_for(source, is_terminal).await;
    assert_eq!(job.completed, 2, "{job:?}");
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_on_another_orchestrator_renders_what_a_job_would_without_the_segmenter() {
    let segmenter = fake_segmenter::start().await;
    let storage = tempfile::tempdir().unwrap();
    let root = storage.path().to_path_buf();
    let mut first = start(&segmenter.url, |c| {
        c.storage.local_storage_dir = root.clone()
    })
    .await;
    finished_source(&mut first, "room").await;
    // The reference: a full job with the rule the edit will use, on the same photos.
    for idx in 0..2 {
        let bytes = first
            .store
            .get(&format!("inputs/{SEED_USER}/room/{idx}.jpg"))
            .await
            .unwrap();
        first
            .put_input(SEED_USER, "room-full", idx, bytes.to_vec())
            .await;
    }
    first
        .client
        .submit_job(JobSpec {
            rules: vec![paint("sage", "floor", "#9CAF88")],
            ..seed_spec("room-full", 2)
        })
        .await
        .unwrap();
    first.wait_for("room-full", is_terminal).await;
    first.shutdown().await;

    // A fresh orchestrator (nothing in memory) on the same storage; the segmenter is gone.
    segmenter.stop().await;
    let calls = segmenter.counters.segment_calls.load(Ordering::SeqCst);
    let mut second = start(&segmenter.url, |c| {
        c.storage.local_storage_dir = root.clone()
    })
    .await;
    let job = second
        .client
        .edit_job(edit(
            "room-sage",
            "room",
            vec![paint("sage", "floor", "#9CAF88")],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.source_job_id, "room");
    assert_eq!(job.effective_spec.as_ref().unwrap().image_count, 2);
    let job = second.wait_for("room-sage", is_terminal).await;
    assert_eq!(
        (job.state, job.completed),
        (JobState::Done as i32, 2),
        "{job:?}"
    );
    assert_eq!(
        segmenter.counters.segment_calls.load(Ordering::SeqCst),
        calls
    );
    for item in &job.items {
        assert_eq!(
            item.input_key,
            format!("inputs/{SEED_USER}/room/{}.jpg", item.idx)
        );
        assert!(item.masks_reused && !item.masks.is_empty(), "{item:?}");
        assert!(
            item.masks[0]
                .key
                .starts_with(&format!("masks/{SEED_USER}/room/"))
        );
        let output = &item.outputs[0];
        assert_eq!(
            output.output_key,
            format!("outputs/{SEED_USER}/room-sage/sage/{}.jpg", item.idx)
        );
        let edited = second.store.get(&output.output_key).await.unwrap();
        let full = second
            .store
            .get(&format!(
                "outputs/{SEED_USER}/room-full/sage/{}.jpg",
                item.idx
            ))
            .await
            .unwrap();
        assert!(
            edited == full,
            "photo {}: the edit differs from the full job",
            item.idx
        );
    }
    // Idempotent like SubmitJob; a different edit under the same id is ALREADY_EXISTS.
    second
        .client
        .edit_job(edit(
            "room-sage",
            "room",
            vec![paint("sage", "floor", "#9CAF88")],
        ))
        .await
        .unwrap();
    let err = second
        .client
        .edit_job(edit(
            "room-sage",
            "room",
            vec![paint("sage", "floor", "#000000")],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_edits_are_refused_with_the_reason() {
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |_| {}).await;
    finished_source(&mut orch, "room").await;

    let err = orch
        .client
        .edit_job(edit("e1", "room", vec![paint("p", "ceiling", "#FFFFFF")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("\"ceiling\" was not segmented by job \"room\""),
        "{err:?}"
    );
    assert_eq!(violated_fields(&err), ["rules[0].concept"]);

    let err = orch
        .client
        .edit_job(edit(
            "e2",
            "no-such-job",
            vec![paint("p", "wall", "#FFFFFF")],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = orch
        .client
        .edit_job(EditJobRequest {
            user_id: "someone-else".into(),
            ..edit("e3", "room", vec![paint("p", "wall", "#FFFFFF")])
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "another user's job");
    let err = orch
        .client
        .edit_job(edit("e4", "room", vec![paint("p", "wall", "#GGGGGG")]))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "rules are validated as in jobs"
    );
}

/// An edit of a job still running is refused up front, saying how far the source is, instead of being accepted
/// and failing every photo not segmented yet (`source_missing`, each called back); once the source ends, the same
/// request is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_of_a_job_still_running_is_refused_until_it_ends() {
    let segmenter = fake_segmenter::start().await;
    // Long enough that no image ends before the edit is asked for, under load too.
    segmenter.faults.delay_ms.store(3_000, Ordering::SeqCst);
    let mut orch = start(&segmenter.url, |_| {}).await;
    for idx in 0..2 {
        orch.put_input(SEED_USER, "busy", idx, photo_jpeg(48, 32))
            .await;
    }
    orch.client.submit_job(seed_spec("busy", 2)).await.unwrap();
    let request = edit("busy-sage", "busy", vec![paint("p", "wall", "#9CAF88")]);
    let err = orch.client.edit_job(request.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains("job \"busy\" has not ended (0 of 2 images ended)"),
        "{err:?}"
    );

    orch.wait_for("busy", is_terminal).await;
    orch.client.edit_job(request).await.unwrap();
    let edited = orch.wait_for("busy-sage", is_terminal).await;
    assert_eq!(edited.completed, 2, "{edited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_mask_fails_its_photo_naming_the_key() {
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |_| {}).await;
    let source = finished_source(&mut orch, "room").await;
    let wall = source.items[1]
        .masks
        .iter()
        .find(|m| m.concept == "wall")
        .unwrap()
        .key
        .clone();
    std::fs::remove_file(orch.store.root().join(&wall)).unwrap();

    orch.client
        .edit_job(edit("e", "room", vec![paint("p", "wall", "#334455")]))
        .await
        .unwrap();
    let job = orch.wait_for("e", is_terminal).await;
    assert_eq!(job.items[0].state, ItemState::Completed as i32);
    let failed = &job.items[1];
    assert_eq!(failed.state, ItemState::Failed as i32);
    assert_eq!(failed.error_code, "mask_missing");
    assert!(failed.error.contains(&wall), "{}", failed.error);
    // The edit is a job of its own: GetJob by its id, as its user.
    let got = orch
        .client
        .get_job(GetJobRequest {
            job_id: "e".into(),
            user_id: SEED_USER.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.source_job_id, "room");
}

/// The photo an edit reads is the source job's: gone from storage, or no longer an image, it is `source_missing`
/// (the documented code) and not `input_missing` / `input_corrupt`, which tell a caller to upload the edit's own
/// input, of which it has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_photo_gone_or_unreadable_is_source_missing() {
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |_| {}).await;
    finished_source(&mut orch, "room").await;
    let photo = |idx: u32| {
        orch.store
            .root()
            .join(format!("inputs/{SEED_USER}/room/{idx}.jpg"))
    };
    std::fs::remove_file(photo(0)).unwrap();
    std::fs::write(photo(1), b"no longer a photo").unwrap();
    orch.client
        .edit_job(edit("e", "room", vec![paint("p", "wall", "#334455")]))
        .await
        .unwrap();
    let job = orch.wait_for("e", is_terminal).await;
    for (item, says) in job
        .items
        .iter()
        .zip(["gone from storage", "not a readable image"])
    {
        assert_eq!(item.state, ItemState::Failed as i32, "{item:?}");
        assert_eq!(item.error_code, "source_missing", "{item:?}");
        assert!(item.error.contains(says), "{}", item.error);
        assert!(item.error.contains("inputs/"), "{}", item.error);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_photo_replaced_after_its_masks_were_stored_is_not_edited_with_them() {
    // A job id used again for a new photo whose item then failed before storing masks leaves the old masks next to
    // the new photo; so does an upload over inputs/. Both look like this: same key, same size, other bytes.
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |_| {}).await;
    finished_source(&mut orch, "room").await;
    let other = {
        let img = image::RgbImage::from_fn(48, 32, |x, _| image::Rgb([(x * 5) as u8, 40, 200]));
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode_image(&img)
            .unwrap();
        out
    };
    orch.put_input(SEED_USER, "room", 1, other).await;

    orch.client
        .edit_job(edit("e", "room", vec![paint("p", "wall", "#334455")]))
        .await
        .unwrap();
    let job = orch.wait_for("e", is_terminal).await;
    assert_eq!(job.items[0].state, ItemState::Completed as i32, "{job:?}");
    let failed = &job.items[1];
    assert_eq!(failed.state, ItemState::Failed as i32, "{failed:?}");
    assert_eq!(failed.error_code, "source_missing");
    assert!(failed.error.contains("not the one"), "{}", failed.error);

    let preview = PreviewEditRequest {
        user_id: SEED_USER.into(),
        job_id: "room".into(),
        idx: 1,
        rules: vec![paint("p", "wall", "#334455")],
        preset: String::new(),
        max_side: 64,
        format: String::new(),
    };
    let err = orch.client.preview_edit(preview.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("not the one"), "{err:?}");
    // Photo 0 is the one its masks came from.
    let fine = PreviewEditRequest { idx: 0, ..preview };
    orch.client.preview_edit(fine).await.unwrap();
}

/// A retry of an EditJob whose answer was lost is the same edit even once the source's records are gone (or the
/// source id ran again with other concepts): it was planned again from them first, and answered NOT_FOUND (or
/// ALREADY_EXISTS) for the very request that made the edit. Another request under the edit's id is still planned,
/// and refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_edit_is_the_edit_even_once_its_source_records_are_gone() {
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |_| {}).await;
    finished_source(&mut orch, "room").await;
    let request = edit("e", "room", vec![paint("p", "wall", "#334455")]);
    orch.client.edit_job(request.clone()).await.unwrap();
    let done = orch.wait_for("e", is_terminal).await;
    std::fs::remove_file(
        orch.store
            .root()
            .join(format!("jobs-state/{SEED_USER}/room/photos.json")),
    )
    .unwrap();
    let again = orch.client.edit_job(request).await.expect("the same edit");
    let again = again.into_inner();
    assert_eq!(again.job_id, "e");
    assert_eq!(again.completed, done.completed);
    let other = orch
        .client
        .edit_job(edit("e", "room", vec![paint("p", "wall", "#112233")]))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::NotFound, "{other:?}");
}
