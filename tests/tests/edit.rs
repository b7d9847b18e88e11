//! EditJob with every real part: a job segmented by the real segmenter (tiny model) into SeaweedFS, then the
//! segmenter and the orchestrator stopped; a fresh orchestrator edits the job from what is in the bucket, and its
//! outputs are the bytes a full job with the same rule wrote.

use palette_testing::{jobs, seaweed};

use std::time::Duration;

use orchestrator_svc::config::StorageBackend;
use palette_e2e::{example_photos, rule_params, start_orchestrator, start_segmenter};
use palette_proto::orchestrator::v1::jobs_client::JobsClient;
use palette_proto::orchestrator::v1::{
    EditJobRequest, ItemState, Job, JobSpec, JobState, PreviewEditRequest, Rule,
};
use prost_types::value::Kind;

const USER: &str = "edit-user";

fn sage() -> Rule {
    Rule {
        rule_id: "sage".into(),
        concept: "wall".into(),
        r#type: "recolor".into(),
        params: rule_params(&[("color", Kind::StringValue("#9CAF88".into()))]),
    }
}

async fn settled(url: &str, job_id: &str) -> Job {
    let mut client = JobsClient::connect(url.to_string()).await.unwrap();
    let done = |job: &Job| job.state == JobState::Done as i32;
    jobs::wait_for_within(Duration::from_secs(240), &mut client, USER, job_id, done).await
}

fn config(weed: &seaweed::Seaweed, segmenter_url: &str) -> orchestrator_svc::Config {
    let mut config =
        orchestrator_svc::Config::for_tests(std::path::PathBuf::from("unused"), segmenter_url);
    config.storage.storage_backend = StorageBackend::S3;
    config.storage.s3_endpoint_url = Some(weed.endpoint.clone());
    config.storage.r2_bucket_name = Some(weed.bucket.clone());
    config.storage.r2_access_key_id = Some(seaweed::ACCESS_KEY.into());
    config.storage.r2_secret_access_key = Some(seaweed::SECRET_KEY.into());
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_after_a_restart_without_the_segmenter_matches_a_full_job() {
    let Some(weed) = seaweed::start("palette-edit") else {
        return;
    };
    let s3 = palette_e2e::s3::client(&weed.endpoint, seaweed::ACCESS_KEY, seaweed::SECRET_KEY);
    let photos = example_photos();
    for job in ["source", "full"] {
        for (idx, (_, bytes)) in photos.iter().enumerate() {
            let key = format!("inputs/{USER}/{job}/{idx}.jpg");
            palette_e2e::s3::put(&s3, &weed.bucket, &key, bytes.clone()).await;
        }
    }
    let spec = |job_id: &str, rules: Vec<Rule>| JobSpec {
        user_id: USER.into(),
        job_id: job_id.into(),
        concepts: vec!["wall".into(), "floor".into()],
        rules,
        image_count: photos.len() as u32,
        preset: String::new(),
        output_format: String::new(),
    };

    let mut segmenter = start_segmenter().await;
    let mut first = start_orchestrator(config(&weed, &segmenter.url())).await;
    let mut client = JobsClient::connect(first.url()).await.unwrap();
    client.submit_job(spec("source", vec![])).await.unwrap();
    client.submit_job(spec("full", vec![sage()])).await.unwrap();
    settled(&first.url(), "source").await;
    let full = settled(&first.url(), "full").await;
    first.stop().await.unwrap();
    segmenter.stop().await.unwrap();

    // Nothing runs but SeaweedFS and a new orchestrator pointing at a segmenter that is gone.
    let mut second = start_orchestrator(config(&weed, &segmenter.url())).await;
    let mut client = JobsClient::connect(second.url()).await.unwrap();
    client
        .edit_job(EditJobRequest {
            user_id: USER.into(),
            job_id: "source-sage".into(),
            source_job_id: "source".into(),
            rules: vec![sage()],
            preset: String::new(),
            output_format: String::new(),
        })
        .await
        .unwrap();
    let edited = settled(&second.url(), "source-sage").await;
    assert_eq!(edited.completed as usize, photos.len(), "{edited:?}");
    for (item, reference) in edited.items.iter().zip(&full.items) {
        assert_eq!(item.state, ItemState::Completed as i32);
        assert!(item.masks_reused);
        let get = |key: String| {
            let s3 = s3.clone();
            let bucket = weed.bucket.clone();
            async move {
                let object = s3
                    .get_object()
                    .bucket(bucket)
                    .key(key)
                    .send()
                    .await
                    .unwrap();
                object.body.collect().await.unwrap().into_bytes()
            }
        };
        let ours = get(item.outputs[0].output_key.clone()).await;
        let theirs = get(reference.outputs[0].output_key.clone()).await;
        assert!(
            ours == theirs,
            "photo {}: edit and full job differ",
            item.idx
        );
    }

    // PreviewEdit on the same photos: the full job's output downscaled, within a code on average.
    for (idx, reference) in full.items.iter().enumerate() {
        let answer = client
            .preview_edit(PreviewEditRequest {
                user_id: USER.into(),
                job_id: "source".into(),
                idx: idx as u32,
                rules: vec![sage()],
                preset: String::new(),
                max_side: 512,
                format: "png".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let object = s3
            .get_object()
            .bucket(&weed.bucket)
            .key(&reference.outputs[0].output_key)
            .send()
            .await
            .unwrap();
        let full = image::load_from_memory(&object.body.collect().await.unwrap().into_bytes())
            .unwrap()
            .to_rgb8();
        let preview = image::load_from_memory(&answer.image).unwrap().to_rgb8();
        let downscaled =
            orchestrator_svc::jobs::preview::render::downscale_rgb(&full, preview.dimensions());
        let diff: u64 = preview
            .as_raw()
            .iter()
            .zip(downscaled.as_raw())
            .map(|(a, b)| a.abs_diff(*b) as u64)
            .sum();
        let mean = diff as f64 / preview.as_raw().len() as f64;
        eprintln!("photo {idx}: preview vs full job downscaled, mean |Δ| {mean:.3} codes");
        assert!(mean <= 1.0, "photo {idx}: mean |Δ| {mean:.3} codes");
    }
    second.stop().await.unwrap();
}
