//! A photo larger than the model's input reaches the real segmenter (tiny model, 168 px input) downscaled as raw
//! RGB, and its masks land where the segmenter puts them when it is sent the upload itself: the same instances and
//! scores (the model sees the same pixels: each side capped at its input, the segmenter's own resize filter), and
//! each stored mask, composed on the photo, is the instance the upload gives, upsampled inside its box.

use orchestrator_svc::storage::ObjectStore;
use palette_e2e::{start_segmenter, synthetic_room};
use palette_proto::orchestrator::v1::ItemState;
use palette_proto::segmenter::v1::segmenter_client::SegmenterClient;
use palette_rules::mask::{ModelMask, PixelBox, upsample_instance};
use palette_testing::orchestrator::{is_terminal, seed_spec, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_photos_masks_through_raw_rgb_are_the_uploads_masks() {
    let segmenter = start_segmenter().await;
    let mut orch = start(&segmenter.url(), |_| {}).await;
    let (w, h) = (640u32, 480u32);
    let jpeg = synthetic_room(w, h, 3);
    orch.put_input("test-user", "raw", 0, jpeg.clone()).await;
    let spec = seed_spec("raw", 1);
    orch.client.submit_job(spec.clone()).await.unwrap();
    let job = orch.wait_for("raw", is_terminal).await;
    let item = &job.items[0];
    assert_eq!(item.state, ItemState::Completed as i32, "{item:?}");

    let mut client = SegmenterClient::connect(segmenter.url()).await.unwrap();
    let concepts: Vec<&str> = spec.concepts.iter().map(String::as_str).collect();
    let request = palette_testing::segmenter::request(jpeg, &concepts);
    let upload = client.segment(request).await.unwrap().into_inner();
    assert_eq!((upload.image_width, upload.image_height), (w, h));
    let mut checked = 0;
    for result in &upload.concepts {
        let stored: Vec<_> = item
            .masks
            .iter()
            .filter(|m| m.concept == result.concept)
            .collect();
        assert_eq!(stored.len(), result.instances.len(), "{}", result.concept);
        for (entry, instance) in stored.iter().zip(&result.instances) {
            assert!(
                (entry.score - instance.score).abs() < 1e-5,
                "{}: score {} vs {}",
                entry.key,
                entry.score,
                instance.score
            );
            let b = instance.r#box.unwrap();
            let model = ModelMask {
                width: upload.mask_width,
                height: upload.mask_height,
                probs: &instance.mask.as_ref().unwrap().data,
            };
            let bbox = PixelBox {
                x0: b.x0,
                y0: b.y0,
                x1: b.x1,
                y1: b.y1,
            };
            let want = upsample_instance(&model, bbox, w, h);
            let png = orch.store.get(&entry.key).await.unwrap();
            let got = orchestrator_svc::mask_png::compose(&png, w, h).unwrap();
            // Boxes come back in 168 px and are scaled to the photo: their edges may round to the next pixel.
            let diff: u64 = got
                .as_raw()
                .iter()
                .zip(want.as_raw())
                .map(|(a, b)| u64::from(a.abs_diff(*b)))
                .sum();
            let mean = diff as f64 / f64::from(w * h);
            assert!(mean < 0.5, "{}: mean |diff| {mean:.3}", entry.key);
            checked += 1;
        }
    }
    assert!(checked > 0, "the tiny model found instances");
}

/// A segmenter that takes fewer concepts per call (MAX_CONCEPTS=2) than the job names (3): the orchestrator sends
/// them in two groups instead of failing every item, and each concept's instances are the ones one call for all
/// three gives (the decoder treats each phrase on its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_concepts_than_the_segmenter_takes_are_sent_in_groups() {
    let mut config = palette_testing::segmenter::test_config();
    config.max_concepts = 2;
    let narrow = palette_testing::segmenter::TestServer::start(config).await;
    let narrow_url = format!("http://{}", narrow.addr);
    let mut orch = start(&narrow_url, |_| {}).await;
    let jpeg = synthetic_room(320, 240, 5);
    orch.put_input("test-user", "groups", 0, jpeg.clone()).await;
    let spec = seed_spec("groups", 1);
    assert_eq!(spec.concepts.len(), 3, "more than the segmenter's 2");
    orch.client.submit_job(spec.clone()).await.unwrap();
    let job = orch.wait_for("groups", is_terminal).await;
    let item = &job.items[0];
    assert_eq!(item.state, ItemState::Completed as i32, "{item:?}");

    let wide = start_segmenter().await;
    let mut client = SegmenterClient::connect(wide.url()).await.unwrap();
    let concepts: Vec<&str> = spec.concepts.iter().map(String::as_str).collect();
    let once = client
        .segment(palette_testing::segmenter::request(jpeg, &concepts))
        .await
        .unwrap()
        .into_inner();
    let mut compared = 0;
    for result in &once.concepts {
        let stored: Vec<f32> = item
            .masks
            .iter()
            .filter(|m| m.concept == result.concept)
            .map(|m| m.score)
            .collect();
        let want: Vec<f32> = result.instances.iter().map(|i| i.score).collect();
        assert_eq!(stored.len(), want.len(), "{}", result.concept);
        for (got, want) in stored.iter().zip(&want) {
            assert!(
                (got - want).abs() < 1e-5,
                "{}: {got} vs {want}",
                result.concept
            );
            compared += 1;
        }
    }
    assert!(compared > 0, "the tiny model found instances");
}

#[test]
#[ignore = "a measurement: cargo test --release -p palette-e2e --test segmenter_input -- --ignored --nocapture"]
fn the_segmenters_preprocessing_of_an_upload_against_raw_rgb() {
    // The GPU tier's CPU per photo: decode + resize of the upload against taking the raw pixels the orchestrator
    // sends (each side capped at the input), for SAM3's 1008 px input; best of 5.
    use segmenter_svc::model::manifest::ImageInput;
    use segmenter_svc::preprocess::Preprocessor;
    let pre = Preprocessor {
        size: 1008,
        mean: [0.5; 3],
        std: [0.5; 3],
        max_pixels: 100_000_000,
        input: ImageInput::U8Hwc,
    };
    for (w, h) in [(1008u32, 756u32), (4032, 3024)] {
        let jpeg = synthetic_room(w, h, 1);
        let best = |f: &dyn Fn()| {
            (0..5)
                .map(|_| {
                    let t = std::time::Instant::now();
                    f();
                    t.elapsed().as_secs_f64() * 1e3
                })
                .fold(f64::MAX, f64::min)
        };
        let upload = best(&|| {
            std::hint::black_box(pre.from_encoded(&jpeg).unwrap());
        });
        let (rw, rh) = (w.min(1008), h.min(1008));
        let raw = vec![128u8; (rw * rh * 3) as usize];
        let rgb = best(&|| {
            std::hint::black_box(pre.from_rgb(rw, rh, raw.clone()).unwrap());
        });
        println!(
            "{w}x{h}: upload {} KB, decode + resize {upload:.1} ms; raw {rw}x{rh} {} KB, {rgb:.1} ms",
            jpeg.len() / 1000,
            raw.len() / 1000
        );
    }
}

/// A phrase within the orchestrator's own limits (ASCII, 64 characters) but over the model's text context (digits
/// are a CLIP token each: 37 tokens with BOS/EOS, SAM3 reads 32) is refused at SubmitJob on the field it came from,
/// with the segmenter's reason, instead of an accepted job whose every image the segmenter refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phrase_the_model_cannot_read_is_refused_at_submission() {
    let segmenter = start_segmenter().await;
    let mut orch = start(&segmenter.url(), |_| {}).await;
    let mut spec = seed_spec("wordy", 1);
    spec.concepts
        .push("wall 1234567890123456789012345678901234".into());
    let refused = orch.client.submit_job(spec).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    // The message lists every violation as `field: description`.
    assert!(
        refused.message().contains(
            "concepts[3]: \"wall 1234567890123456789012345678901234\": the segmenter's model cannot read it \
             (37 tokens with BOS/EOS; the model reads at most 32: shorten the phrase)"
        ),
        "{refused:?}"
    );
    // Phrases it can read are taken (and remembered: the next submission asks nothing).
    orch.put_input("test-user", "fine", 0, synthetic_room(64, 48, 1))
        .await;
    orch.client
        .submit_job(seed_spec("fine", 1))
        .await
        .expect("readable phrases are accepted");
    let job = orch.wait_for("fine", is_terminal).await;
    assert_eq!(job.items[0].state, ItemState::Completed as i32, "{job:?}");
}
