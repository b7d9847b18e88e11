//! PreviewEdit: rules on one photo of a finished job at preview size, from its stored masks, in the response.

use palette_testing as common;

use common::fake_segmenter;
use common::orchestrator::{
    Orchestrator, SEED_USER, is_terminal, photo_jpeg, seed_spec, start, string_struct,
};
use orchestrator_svc::jobs::preview::render;
use orchestrator_svc::storage::ObjectStore;
use palette_proto::orchestrator::v1::{EditJobRequest, JobSpec, PreviewEditRequest, Rule};
use std::sync::atomic::Ordering;
use tonic::Code;

fn rule(rule_id: &str, concept: &str, kind: &str, params: &[(&str, &str)]) -> Rule {
    Rule {
        rule_id: rule_id.into(),
        concept: concept.into(),
        r#type: kind.into(),
        params: Some(string_struct(params)),
    }
}

/// A floor tone: warmer by `warmth` (a number parameter).
fn warm_floor(warmth: f64) -> Rule {
    let mut params = string_struct(&[]);
    params.fields.insert(
        "warmth".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::NumberValue(warmth)),
        },
    );
    Rule {
        rule_id: "warm".into(),
        concept: "floor".into(),
        r#type: "tone".into(),
        params: Some(params),
    }
}

fn paint(color: &str) -> Rule {
    rule("paint", "wall", "recolor", &[("color", color)])
}

fn request(job_id: &str, rules: Vec<Rule>) -> PreviewEditRequest {
    PreviewEditRequest {
        user_id: SEED_USER.into(),
        job_id: job_id.into(),
        idx: 0,
        rules,
        preset: String::new(),
        max_side: 160,
        format: String::new(),
    }
}

async fn finished(orch: &mut Orchestrator, job_id: &str, rules: Vec<Rule>) {
    orch.put_input(SEED_USER, job_id, 0, photo_jpeg(640, 480))
        .await;
    orch.client
        .submit_job(JobSpec {
            rules,
            ..seed_spec(job_id, 1)
        })
        .await
        .unwrap();
    let job = orch.wait_for(job_id, is_terminal).await;
    assert_eq!(job.completed, 1, "{job:?}");
}

fn mean_abs_diff(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let sum: u64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y) as u64)
        .sum();
    sum as f64 / a.as_raw().len() as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_is_the_job_output_downscaled_and_writes_nothing() {
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |_| {}).await;
    finished(&mut orch, "room", vec![paint("#1F3A5F")]).await;
    let objects_before = walk(&orch);

    let mut png = request("room", vec![paint("#1F3A5F")]);
    png.format = "png".into();
    let answer = orch.client.preview_edit(png).await.unwrap().into_inner();
    assert_eq!(answer.content_type, "image/png");
    assert_eq!((answer.width, answer.height), (160, 120));
    assert!(answer.rules[0].applied && answer.rules[0].output_key.is_empty());
    let preview = image::load_from_memory(&answer.image).unwrap().to_rgb8();
    let full = orch
        .store
        .get(&format!("outputs/{SEED_USER}/room/paint/0.jpg"))
        .await
        .unwrap();
    let full = image::load_from_memory(&full).unwrap().to_rgb8();
    let downscaled = render::downscale_rgb(&full, (160, 120));
    let diff = mean_abs_diff(&preview, &downscaled);
    eprintln!("preview vs the job's output downscaled: mean |Δ| {diff:.3} codes");
    assert!(
        diff <= 1.0,
        "preview vs the job's output downscaled: mean |Δ| {diff:.3} codes"
    );

    // Another colour on the same wall (the photo, mask and region come from the cache), then two rules in order.
    let jpeg = orch
        .client
        .preview_edit(request("room", vec![paint("#9CAF88")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(jpeg.content_type, "image/jpeg");
    let sage = image::load_from_memory(&jpeg.image).unwrap().to_rgb8();
    assert!(mean_abs_diff(&sage, &preview) > 5.0, "a different colour");
    let both = orch
        .client
        .preview_edit(request("room", vec![paint("#9CAF88"), warm_floor(0.5)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(both.rules.len(), 2);
    assert_eq!(walk(&orch), objects_before, "a preview writes nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cutout_preview_of_a_transparent_photo_keeps_its_transparency() {
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |_| {}).await;
    // A product on a transparent page (its right quarter; the fake's wall is the left quarter).
    let source = image::RgbaImage::from_fn(640, 480, |x, y| {
        image::Rgba([
            (x / 3) as u8,
            (y / 2) as u8,
            90,
            if x >= 480 { 0 } else { 255 },
        ])
    });
    let mut png = std::io::Cursor::new(Vec::new());
    source.write_to(&mut png, image::ImageFormat::Png).unwrap();
    orch.put_input(SEED_USER, "product", 0, png.into_inner())
        .await;
    let spec = JobSpec {
        rules: vec![paint("#1F3A5F")],
        ..seed_spec("product", 1)
    };
    orch.client.submit_job(spec).await.unwrap();
    let job = orch.wait_for("product", is_terminal).await;
    assert_eq!(job.completed, 1, "{job:?}");

    let cut = rule("cut", "wall", "remove", &[("mode", "cutout")]);
    let answer = orch
        .client
        .preview_edit(request("product", vec![cut]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.content_type, "image/png");
    assert_eq!((answer.width, answer.height), (160, 120));
    let preview = image::load_from_memory(&answer.image).unwrap().to_rgba8();
    let alpha = |x: u32| preview.get_pixel(x, 60)[3];
    assert_eq!(alpha(2), 0, "the wall is cut out");
    assert_eq!(alpha(110), 255, "the product stays");
    assert_eq!(alpha(150), 0, "the page was transparent and stays so");

    // A paint previewed as PNG keeps the page's transparency too; as JPEG it is on white.
    let as_png = orch
        .client
        .preview_edit(PreviewEditRequest {
            format: "png".into(),
            ..request("product", vec![paint("#1F3A5F")])
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(as_png.content_type, "image/png");
    let painted = image::load_from_memory(&as_png.image).unwrap().to_rgba8();
    assert_eq!(painted.get_pixel(2, 60)[3], 255, "the painted wall");
    assert_eq!(painted.get_pixel(150, 60)[3], 0, "the transparent page");
    let as_jpeg = orch
        .client
        .preview_edit(request("product", vec![paint("#1F3A5F")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(as_jpeg.content_type, "image/jpeg");
    let on_white = image::load_from_memory(&as_jpeg.image).unwrap().to_rgb8();
    assert!(on_white.get_pixel(150, 60).0.iter().all(|&c| c > 245));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_previews_say_why() {
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |_| {}).await;
    finished(&mut orch, "room", vec![]).await;
    let code = |r: Result<tonic::Response<_>, tonic::Status>| {
        r.map(|_: tonic::Response<_>| ()).unwrap_err()
    };

    let err = code(
        orch.client
            .preview_edit(request("nope", vec![paint("#FFFFFF")]))
            .await,
    );
    assert_eq!(err.code(), Code::NotFound);
    let err = code(
        orch.client
            .preview_edit(PreviewEditRequest {
                user_id: "someone-else".into(),
                ..request("room", vec![paint("#FFFFFF")])
            })
            .await,
    );
    assert_eq!(err.code(), Code::NotFound, "another user's job");
    let err = code(
        orch.client
            .preview_edit(PreviewEditRequest {
                idx: 5,
                ..request("room", vec![paint("#FFFFFF")])
            })
            .await,
    );
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("idx"), "{err:?}");
    let err = code(
        orch.client
            .preview_edit(request(
                "room",
                vec![rule("p", "ceiling", "recolor", &[("color", "#FFFFFF")])],
            ))
            .await,
    );
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("\"ceiling\" was not segmented"),
        "{err:?}"
    );
    let err = code(
        orch.client
            .preview_edit(request(
                "room",
                vec![
                    rule("cut", "wall", "remove", &[("mode", "cutout")]),
                    paint("#FFFFFF"),
                ],
            ))
            .await,
    );
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = code(
        orch.client
            .preview_edit(PreviewEditRequest {
                max_side: 10,
                format: "gif".into(),
                ..request("room", vec![paint("#FFFFFF")])
            })
            .await,
    );
    assert!(
        err.message().contains("max_side") && err.message().contains("format"),
        "{err:?}"
    );

    // A deleted mask: the photo cannot be previewed, and the answer names the key.
    let job = orch.wait_for("room", is_terminal).await;
    let floor = job.items[0]
        .masks
        .iter()
        .find(|m| m.concept == "floor")
        .unwrap()
        .key
        .clone();
    std::fs::remove_file(orch.store.root().join(&floor)).unwrap();
    let err = code(
        orch.client
            .preview_edit(request("room", vec![warm_floor(0.5)]))
            .await,
    );
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains(&floor), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_preview_waits_for_its_pixels_in_the_shared_budget() {
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |c| {
        c.limits.max_inflight_megapixels = Some(1)
    })
    .await;
    finished(&mut orch, "room", vec![paint("#1F3A5F")]).await;
    // A 1.9 MP photo on a 1 MP budget takes all of it, for as long as its (slowed) Segment call and the rest last.
    segmenter
        .faults
        .delay_ms
        .store(1500, std::sync::atomic::Ordering::SeqCst);
    orch.put_input(SEED_USER, "big", 0, photo_jpeg(1600, 1200))
        .await;
    orch.client.submit_job(seed_spec("big", 1)).await.unwrap();
    let in_flight = || {
        segmenter
            .counters
            .in_flight
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while in_flight() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the big item never reached the segmenter"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // The preview decodes the photo at full size: it waits until the big item has ended (its Segment call first).
    orch.client
        .preview_edit(request("room", vec![paint("#9CAF88")]))
        .await
        .unwrap();
    assert_eq!(
        in_flight(),
        0,
        "the preview ran beside an item holding the whole budget"
    );
}

/// `room` forgotten behind another finished job, then run again (its id free) on a square 480x480 photo to the end,
/// and the preview's cached photos records past their TTL.
async fn room_run_again_on_a_square_photo(orch: &mut Orchestrator) {
    finished(orch, "other", vec![paint("#1F3A5F")]).await;
    orch.put_input(SEED_USER, "room", 0, photo_jpeg(480, 480))
        .await;
    orch.client
        .submit_job(JobSpec {
            rules: vec![paint("#B5651D")],
            ..seed_spec("room", 1)
        })
        .await
        .unwrap();
    let job = orch.wait_for("room", is_terminal).await;
    assert_eq!(job.completed, 1, "{job:?}");
    // Kept as a real wait: the cached photos records are read again after their TTL (2 s), which has no event.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_id_used_again_for_new_photos_is_previewed_from_them() {
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |c| c.limits.max_retained_jobs = 1).await;
    finished(&mut orch, "room", vec![paint("#1F3A5F")]).await;
    let first = orch
        .client
        .preview_edit(request("room", vec![paint("#9CAF88")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first.width, first.height), (160, 120));
    // Another job makes the first one forgotten (one retained); its id is then free for another spec and photo.
    room_run_again_on_a_square_photo(&mut orch).await;
    let second = orch
        .client
        .preview_edit(request("room", vec![paint("#9CAF88")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (second.width, second.height),
        (160, 160),
        "the new square photo, not the cached first one"
    );
}

/// An edit's photos are its source's. Previewed after the source job ran again on a new photo, the edit showed the
/// old photo for as long as it stayed cached (the edit's own run, the cache keys' prefix, had not changed), and once
/// the photo left the cache, the old cached masks painted on the new one. Its photos' run is its source's now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_previewed_after_its_source_ran_again_on_a_new_photo_shows_the_new_one() {
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |c| c.limits.max_retained_jobs = 2).await;
    finished(&mut orch, "room", vec![paint("#1F3A5F")]).await;
    orch.client
        .edit_job(EditJobRequest {
            user_id: SEED_USER.into(),
            job_id: "room-edit".into(),
            source_job_id: "room".into(),
            rules: vec![paint("#9CAF88")],
            ..Default::default()
        })
        .await
        .unwrap();
    let edit = orch.wait_for("room-edit", is_terminal).await;
    assert_eq!(edit.completed, 1, "{edit:?}");
    let before = orch
        .client
        .preview_edit(request("room-edit", vec![paint("#9CAF88")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((before.width, before.height), (160, 120));
    // Another job makes `room` forgotten (two retained); its id then runs again on a square photo.
    room_run_again_on_a_square_photo(&mut orch).await;
    let after = orch
        .client
        .preview_edit(request("room-edit", vec![paint("#9CAF88")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (after.width, after.height),
        (160, 160),
        "the source's new square photo, not the cached first one"
    );
}

/// `room` finished and previewed (its records cached), then forgotten behind another job, so that its id can run
/// again; the segmenter slowed down so that the run's photo is still being segmented when the test previews it.
async fn room_forgotten_then_running_again(
    segmenter: &fake_segmenter::FakeSegmenter,
    orch: &mut Orchestrator,
    new_photo: Option<Vec<u8>>,
    spec: JobSpec,
) {
    finished(orch, "room", vec![paint("#1F3A5F")]).await;
    orch.client
        .preview_edit(request("room", vec![paint("#9CAF88")]))
        .await
        .unwrap();
    finished(orch, "other", vec![paint("#1F3A5F")]).await;
    segmenter.faults.delay_ms.store(4000, Ordering::SeqCst);
    if let Some(photo) = new_photo {
        orch.put_input(SEED_USER, "room", 0, photo).await;
    }
    orch.client.submit_job(spec).await.unwrap();
    // Kept as a real wait: the cached photos record is read again after its TTL (2 s), which has no event.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
}

/// A job id run again on a new photo writes its photos record when it starts and the photo's masks record once its
/// masks are stored: a preview in between finds the earlier run's masks record, which must not stay cached (it did,
/// for the whole run: every later preview was refused as "uploaded again since?").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_while_its_job_runs_again_on_a_new_photo_is_served_once_the_masks_are_stored() {
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |c| c.limits.max_retained_jobs = 1).await;
    let spec = JobSpec {
        rules: vec![paint("#B5651D")],
        ..seed_spec("room", 1)
    };
    let square = Some(photo_jpeg(480, 480));
    room_forgotten_then_running_again(&segmenter, &mut orch, square, spec).await;
    let during = orch
        .client
        .preview_edit(request("room", vec![paint("#9CAF88")]))
        .await
        .unwrap_err();
    assert_eq!(during.code(), Code::FailedPrecondition, "{during:?}");
    segmenter.faults.delay_ms.store(0, Ordering::SeqCst);
    let job = orch.wait_for("room", is_terminal).await;
    assert_eq!(job.completed, 1, "{job:?}");
    let after = orch
        .client
        .preview_edit(request("room", vec![paint("#9CAF88")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((after.width, after.height), (160, 160), "the new photo");
}

/// The same photo run again with a concept more: until its masks are stored, the masks record is the earlier run's,
/// which never looked for that concept. Refused (retry), not "no instance" (it was answered, and cached for the run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concept_only_the_running_job_segments_is_not_previewed_as_absent() {
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |c| c.limits.max_retained_jobs = 1).await;
    let sofa = || rule("sofa", "sofa", "recolor", &[("color", "#8B0000")]);
    let mut spec = seed_spec("room", 1);
    spec.concepts.push("sofa".into());
    spec.rules = vec![sofa()];
    room_forgotten_then_running_again(&segmenter, &mut orch, None, spec).await;
    let during = orch
        .client
        .preview_edit(request("room", vec![sofa()]))
        .await
        .unwrap_err();
    assert_eq!(during.code(), Code::FailedPrecondition, "{during:?}");
    assert!(during.message().contains("\"sofa\""), "{during:?}");
    segmenter.faults.delay_ms.store(0, Ordering::SeqCst);
    let job = orch.wait_for("room", is_terminal).await;
    assert_eq!(job.completed, 1, "{job:?}");
    let after = orch
        .client
        .preview_edit(request("room", vec![sofa()]))
        .await
        .unwrap()
        .into_inner();
    assert!(after.rules[0].applied, "{:?}", after.rules);
}

/// Every object under the orchestrator's local storage.
fn walk(orch: &Orchestrator) -> Vec<String> {
    fn visit(dir: &std::path::Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                visit(&path, out);
            } else {
                out.push(path.display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    visit(orch.store.root(), &mut out);
    out.sort();
    out
}

/// A swatch uploaded again under the same key: jobs read it afresh, and so does a preview once its cached copy is
/// two seconds old (the bytes are compared, decoded again only when they changed). It used to stay cached until
/// evicted: the preview showed the old material while the job's output had the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swatch_uploaded_again_is_previewed_as_it_is_now() {
    let segmenter = fake_segmenter::start().await;
    let mut orch = start(&segmenter.url, |_| {}).await;
    finished(&mut orch, "room", vec![paint("#1F3A5F")]).await;
    let key = format!("inputs/{SEED_USER}/swatch/current.png");
    let swatch = |rgb: [u8; 3]| {
        let img = image::RgbImage::from_pixel(64, 64, image::Rgb(rgb));
        let mut out = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        bytes::Bytes::from(out)
    };
    let texture = || rule("tex", "wall", "texture", &[("swatch", key.as_str())]);
    let preview = |orch: &mut Orchestrator| {
        let mut client = orch.client.clone();
        let rules = vec![texture()];
        async move {
            let answer = client
                .preview_edit(request("room", rules))
                .await
                .unwrap()
                .into_inner();
            image::load_from_memory(&answer.image).unwrap().to_rgb8()
        }
    };
    orch.store
        .put(&key, swatch([200, 40, 40]), "image/png")
        .await
        .unwrap();
    let red = preview(&mut orch).await;
    orch.store
        .put(&key, swatch([40, 40, 200]), "image/png")
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
    let blue = preview(&mut orch).await;
    assert!(
        mean_abs_diff(&red, &blue) > 5.0,
        "the new swatch is not in the preview"
    );
    // And unchanged bytes keep what was decoded: the same image again.
    tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
    assert_eq!(preview(&mut orch).await, blue);
}
