//! The product's main job with every real part: the segmenter (tiny SAM3 model, real ONNX Runtime) over gRPC, the
//! orchestrator over gRPC, SeaweedFS as the S3 server, and an HTTP server receiving signed callbacks.

use palette_testing::receiver;
use palette_testing::seaweed;

use std::collections::BTreeSet;
use std::time::Duration;

use orchestrator_svc::config::StorageBackend;
use palette_e2e::{example_photos, rule_params, start_orchestrator, start_segmenter};
use palette_proto::orchestrator::v1::jobs_client::JobsClient;
use palette_proto::orchestrator::v1::{ItemState, Job, JobSpec, JobState, Rule, WatchJobRequest};
use prost_types::value::Kind;

const SECRET: &str = "e2e-callback-secret";

/// A stored mask composes to a full-frame mask of the photo that is zero outside its entry's rectangle, and the
/// rectangle is tight (its border rows and columns hold a non-zero value) unless the instance is empty (one zero
/// pixel at (0, 0)). A grid (the default layout) is the model's mask as answered and its `placement` chunk agrees
/// with the entry; a crop is that rectangle of pixels and its oFFs chunk agrees with the entry.
fn assert_composes_at_placement(
    png: &[u8],
    mask: &palette_proto::orchestrator::v1::MaskKey,
    frame: (u32, u32),
) {
    use orchestrator_svc::mask_png::{self, grid as mask_grid};
    let stored = image::load_from_memory(png).unwrap().to_luma8();
    assert_eq!((mask.image_width, mask.image_height), frame, "{mask:?}");
    assert!(
        mask.x + mask.width <= frame.0 && mask.y + mask.height <= frame.1,
        "{mask:?}"
    );
    let full = mask_png::compose(png, frame.0, frame.1).unwrap();
    if mask.grid_width > 0 {
        assert_eq!(stored.dimensions(), (mask.grid_width, mask.grid_height));
        let at = mask_grid::read_placement(png).expect("a grid's placement chunk");
        assert_eq!(
            (
                at.x,
                at.y,
                at.width,
                at.height,
                at.image_width,
                at.image_height
            ),
            (mask.x, mask.y, mask.width, mask.height, frame.0, frame.1)
        );
    } else {
        assert_eq!(stored.dimensions(), (mask.width, mask.height));
        assert_eq!(
            mask_png::read_offset(png),
            Some((mask.x as i32, mask.y as i32))
        );
        let mut pasted = image::GrayImage::new(frame.0, frame.1);
        image::imageops::replace(&mut pasted, &stored, mask.x.into(), mask.y.into());
        assert!(full == pasted);
    }
    let inside = |x: u32, y: u32| {
        (mask.x..mask.x + mask.width).contains(&x) && (mask.y..mask.y + mask.height).contains(&y)
    };
    assert!(
        full.enumerate_pixels()
            .all(|(x, y, p)| p.0[0] == 0 || inside(x, y)),
        "non-zero outside {mask:?}"
    );
    let (x0, y0, x1, y1) = (
        mask.x,
        mask.y,
        mask.x + mask.width - 1,
        mask.y + mask.height - 1,
    );
    let row_has = |y| (x0..=x1).any(|x| full.get_pixel(x, y).0[0] > 0);
    let col_has = |x| (y0..=y1).any(|y| full.get_pixel(x, y).0[0] > 0);
    if full.as_raw().iter().any(|&v| v > 0) {
        assert!(row_has(y0) && row_has(y1), "{mask:?}");
        assert!(col_has(x0) && col_has(x1), "{mask:?}");
    } else {
        assert_eq!((mask.x, mask.y, mask.width, mask.height), (0, 0, 1, 1));
    }
}

fn text(s: &str) -> Kind {
    Kind::StringValue(s.into())
}

async fn list(s3: &aws_sdk_s3::Client, bucket: &str) -> BTreeSet<String> {
    let out = s3
        .list_objects_v2()
        .bucket(bucket)
        .max_keys(1000)
        .send()
        .await
        .unwrap();
    out.contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_string))
        .collect()
}

async fn watch_to_end(url: &str, job_id: &str) -> Job {
    let mut client = JobsClient::connect(url.to_string()).await.unwrap();
    let mut stream = client
        .watch_job(WatchJobRequest {
            job_id: job_id.into(),
            user_id: "e2e-user".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, stream.message())
        .await
        .expect("job finished in time")
    {
        last = event.job;
    }
    let job = last.expect("at least one event");
    assert!(
        job.state == JobState::Done as i32 || job.state == JobState::Cancelled as i32,
        "{job:?}"
    );
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_of_several_images_concepts_and_rules_writes_exactly_the_expected_keys() {
    let Some(weed) = seaweed::start("palette-e2e") else {
        return;
    };
    let s3 = palette_e2e::s3::client(&weed.endpoint, seaweed::ACCESS_KEY, seaweed::SECRET_KEY);
    let mut segmenter = start_segmenter().await;
    let hooks = receiver::Receiver::start(SECRET, vec![(500, None)]).await;

    // Items 0..2: the example photos; 3: missing; 4: not an image.
    let photos = example_photos();
    for (idx, (_, bytes)) in photos.iter().enumerate() {
        palette_e2e::s3::put(
            &s3,
            &weed.bucket,
            &format!("inputs/e2e-user/e2e-job/{idx}.jpg"),
            bytes.clone(),
        )
        .await;
    }
    palette_e2e::s3::put(
        &s3,
        &weed.bucket,
        "inputs/e2e-user/e2e-job/4.jpg",
        b"this is not a jpeg".to_vec(),
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    let mut config =
        orchestrator_svc::Config::for_tests(dir.path().join("unused"), segmenter.url());
    config.storage.storage_backend = StorageBackend::S3;
    config.storage.s3_endpoint_url = Some(weed.endpoint.clone());
    config.storage.r2_bucket_name = Some(weed.bucket.clone());
    config.storage.r2_access_key_id = Some(seaweed::ACCESS_KEY.into());
    config.storage.r2_secret_access_key = Some(seaweed::SECRET_KEY.into());
    config.callbacks.workers_api_url = Some(hooks.url().into());
    config.callbacks.gpu_callback_secret = Some(SECRET.into());
    config.limits.presets_dir = palette_e2e::repo_root().join("presets");
    let mut orchestrator = start_orchestrator(config).await;

    let spec = JobSpec {
        user_id: "e2e-user".into(),
        job_id: "e2e-job".into(),
        concepts: vec!["wall".into(), "floor".into(), "sofa".into()],
        rules: vec![
            Rule {
                rule_id: "paint".into(),
                concept: "wall".into(),
                r#type: "recolor".into(),
                params: rule_params(&[("color", text("#1F3A5F"))]),
            },
            Rule {
                rule_id: "floor-tone".into(),
                concept: "floor".into(),
                r#type: "tone".into(),
                params: rule_params(&[
                    ("brightness", Kind::NumberValue(-0.2)),
                    ("warmth", Kind::NumberValue(0.3)),
                ]),
            },
            Rule {
                rule_id: "sofa-linen".into(),
                concept: "sofa".into(),
                r#type: "texture".into(),
                params: rule_params(&[("builtin", text("linen"))]),
            },
            Rule {
                rule_id: "cutout".into(),
                concept: "sofa".into(),
                r#type: "remove".into(),
                params: rule_params(&[("mode", text("cutout"))]),
            },
        ],
        image_count: 5,
        preset: "interior".into(),
        output_format: String::new(),
    };
    let mut client = JobsClient::connect(orchestrator.url()).await.unwrap();
    client.submit_job(spec.clone()).await.unwrap();
    // Idempotent: the same spec again is the same job, not new work.
    client.submit_job(spec.clone()).await.unwrap();
    watch_to_end(&orchestrator.url(), "e2e-job").await;
    // Items end before their callbacks do (outputs first, then the callback): wait for every callback's outcome.
    let job = wait_callbacks_settled(&mut client, "e2e-job").await;

    let states: Vec<i32> = job.items.iter().map(|i| i.state).collect();
    let done = ItemState::Completed as i32;
    let failed = ItemState::Failed as i32;
    assert_eq!(states, vec![done, done, done, failed, failed], "{job:#?}");
    assert_eq!(job.items[3].error_code, "input_missing");
    assert_eq!(job.items[4].error_code, "input_corrupt");

    // Exactly the seed's keys: inputs, one output per rule and image (.png for the cut-out), one preview per image,
    // and the masks the items report; besides them only what an edit reads back: the job's photos record and one
    // masks record per completed photo.
    let mut expected: BTreeSet<String> = (0..5)
        .filter(|i| *i != 3)
        .map(|i| format!("inputs/e2e-user/e2e-job/{i}.jpg"))
        .collect();
    expected.insert("jobs-state/e2e-user/e2e-job/photos.json".into());
    for item in &job.items[..3] {
        let i = item.idx;
        for (rule, ext) in [
            ("paint", "jpg"),
            ("floor-tone", "jpg"),
            ("sofa-linen", "jpg"),
            ("cutout", "png"),
        ] {
            expected.insert(format!("outputs/e2e-user/e2e-job/{rule}/{i}.{ext}"));
        }
        expected.insert(format!("previews/e2e-user/e2e-job/{i}_preview.jpg"));
        expected.insert(format!("jobs-state/e2e-user/e2e-job/masks/{i}.json"));
        assert!(
            !item.masks.is_empty(),
            "the tiny model keeps instances for item {i}"
        );
        for mask in &item.masks {
            assert!(
                mask.key.starts_with("masks/e2e-user/e2e-job/"),
                "{}",
                mask.key
            );
            assert!(
                mask.key.ends_with(&format!("/{i}_{}.png", mask.instance)),
                "{}",
                mask.key
            );
            expected.insert(mask.key.clone());
        }
        assert_eq!(item.outputs.len(), 4);
        assert_eq!(
            item.output_key,
            format!("outputs/e2e-user/e2e-job/paint/{i}.jpg")
        );
    }
    let stored: BTreeSet<String> = list(&s3, &weed.bucket)
        .await
        .into_iter()
        .filter(|k| !k.starts_with("masks-cache/"))
        .collect();
    assert_eq!(stored, expected);

    // Outputs are real images of the photo's size (after EXIF orientation); previews fit inside 256x256.
    for (idx, (_, bytes)) in photos.iter().enumerate() {
        let (w, h) = oriented_size(bytes);
        let out = s3
            .get_object()
            .bucket(&weed.bucket)
            .key(format!("outputs/e2e-user/e2e-job/paint/{idx}.jpg"))
            .send()
            .await
            .unwrap();
        let img = image::load_from_memory(&out.body.collect().await.unwrap().into_bytes()).unwrap();
        assert_eq!((img.width(), img.height()), (w, h));
        let cut = s3
            .get_object()
            .bucket(&weed.bucket)
            .key(format!("outputs/e2e-user/e2e-job/cutout/{idx}.png"))
            .send()
            .await
            .unwrap();
        let cut = image::load_from_memory(&cut.body.collect().await.unwrap().into_bytes()).unwrap();
        assert!(cut.color().has_alpha());
        let preview = s3
            .get_object()
            .bucket(&weed.bucket)
            .key(format!("previews/e2e-user/e2e-job/{idx}_preview.jpg"))
            .send()
            .await
            .unwrap();
        let preview =
            image::load_from_memory(&preview.body.collect().await.unwrap().into_bytes()).unwrap();
        assert!(
            preview.width() <= 256
                && preview.height() <= 256
                && preview.width().max(preview.height()) == 256
        );
        // "256x256" is a bounding box: the preview keeps the photo's aspect ratio (to the rounding of one pixel).
        let long = w.max(h) as f64;
        assert!(
            (preview.width() as f64 - 256.0 * w as f64 / long).abs() <= 1.0
                && (preview.height() as f64 - 256.0 * h as f64 / long).abs() <= 1.0,
            "preview {}x{} of a {w}x{h} photo",
            preview.width(),
            preview.height()
        );
        // Masks (grids by default) compose, as their entries say, to masks of the photo's size.
        for mask in &job.items[idx].masks {
            let got = s3
                .get_object()
                .bucket(&weed.bucket)
                .key(&mask.key)
                .send()
                .await
                .unwrap();
            let png = got.body.collect().await.unwrap().into_bytes();
            assert_composes_at_placement(&png, mask, (w, h));
        }
    }

    // One callback per item (the first attempt got a 500 and was retried with the same webhook-id), all signed.
    let deliveries = hooks.deliveries();
    assert!(
        deliveries.iter().all(|d| d.verified),
        "every callback verifies with the shared secret"
    );
    assert!(
        deliveries.iter().all(|d| d.seed_secret == SECRET),
        "the seed's X-GPU-Callback-Secret is kept"
    );
    let mut per_idx = std::collections::BTreeMap::new();
    for d in deliveries
        .iter()
        .filter(|d| d.body["status"] != serde_json::Value::Null)
    {
        per_idx
            .entry(d.body["idx"].as_u64().unwrap())
            .or_insert_with(BTreeSet::new)
            .insert(d.webhook_id.clone());
    }
    assert_eq!(
        per_idx.keys().copied().collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
    assert!(
        per_idx.values().all(|ids| ids.len() == 1),
        "one event per item: {per_idx:?}"
    );
    assert_eq!(
        deliveries.len(),
        6,
        "5 items + 1 retry of the answer-500 attempt"
    );
    let first = deliveries
        .iter()
        .find(|d| d.body["idx"] == 0 && d.body["status"] == "completed")
        .unwrap();
    assert_eq!(
        first.body["output_key"],
        "outputs/e2e-user/e2e-job/paint/0.jpg"
    );
    assert_eq!(
        first.body["preview_key"],
        "previews/e2e-user/e2e-job/0_preview.jpg"
    );
    assert!(first.body["error"].is_null());
    assert!(
        job.items.iter().all(|i| i.callback_state == 3),
        "every callback DELIVERED"
    );

    orchestrator.stop().await.unwrap();
    segmenter.stop().await.unwrap();
}

async fn wait_callbacks_settled(
    client: &mut JobsClient<tonic::transport::Channel>,
    job_id: &str,
) -> Job {
    use palette_proto::orchestrator::v1::CallbackState;
    let settled = |job: &Job| {
        !job.items
            .iter()
            .any(|i| i.callback_state == CallbackState::Pending as i32)
    };
    palette_testing::jobs::wait_for(client, "e2e-user", job_id, settled).await
}

fn oriented_size(jpeg: &[u8]) -> (u32, u32) {
    use image::ImageDecoder;
    let mut decoder = image::codecs::jpeg::JpegDecoder::new(std::io::Cursor::new(jpeg)).unwrap();
    let (w, h) = decoder.dimensions();
    match decoder.orientation().unwrap() {
        image::metadata::Orientation::Rotate90
        | image::metadata::Orientation::Rotate270
        | image::metadata::Orientation::Rotate90FlipH
        | image::metadata::Orientation::Rotate270FlipH => (h, w),
        _ => (w, h),
    }
}
