//! The Segment API over real gRPC on 127.0.0.1:0: shapes, formats, duplicates, model info, health, reflection,
//! concurrency and batching, admission control, deadlines, and graceful shutdown.

use palette_testing::segmenter as common;

use std::time::Duration;

use common::{TestServer, image_bytes, request, test_config};
use palette_proto::segmenter::v1 as pb;
use tonic::Code;

#[tokio::test]
async fn segment_returns_kept_instances_per_concept_in_request_order() {
    let server = TestServer::start(test_config()).await;
    let mut client = server.client().await;
    let mut req = request(
        image_bytes("room_640x480.jpg"),
        &["Wall", "floor", "wall", "sofa"],
    );
    req.score_threshold = Some(0.655);
    req.include_rle = true;
    req.include_semantic = true;
    let resp = client.segment(req).await.unwrap().into_inner();
    assert_eq!((resp.image_width, resp.image_height), (640, 480));
    assert_eq!((resp.mask_width, resp.mask_height), (48, 48));
    let names: Vec<&str> = resp.concepts.iter().map(|c| c.concept.as_str()).collect();
    assert_eq!(
        names,
        ["wall", "floor", "wall", "sofa"],
        "normalised, duplicates answered per occurrence"
    );
    assert_eq!(
        resp.concepts[0].instances.len(),
        resp.concepts[2].instances.len()
    );
    let kept: usize = resp.concepts.iter().map(|c| c.instances.len()).sum();
    assert!(kept > 0, "the reference keeps instances at this threshold");
    for concept in &resp.concepts {
        assert!((0.0..=1.0).contains(&concept.presence_score));
        let semantic = concept.semantic.as_ref().expect("include_semantic");
        assert_eq!(semantic.shape, vec![48, 48]);
        let mut last = f32::INFINITY;
        for inst in &concept.instances {
            assert!(
                inst.score > 0.655 && inst.score <= last,
                "best first, above threshold"
            );
            last = inst.score;
            let b = inst.r#box.unwrap();
            assert!(
                0.0 <= b.x0
                    && b.x0 <= b.x1
                    && b.x1 <= 640.0
                    && 0.0 <= b.y0
                    && b.y0 <= b.y1
                    && b.y1 <= 480.0
            );
            let mask = inst.mask.as_ref().unwrap();
            assert_eq!(mask.dtype, pb::DataType::Uint8 as i32);
            assert_eq!(mask.data.len(), 48 * 48);
            let rle = inst.rle.as_ref().unwrap();
            assert_eq!((rle.width, rle.height), (640, 480));
            assert_eq!(rle.counts.iter().map(|&c| c as u64).sum::<u64>(), 640 * 480);
        }
    }
    let t = resp.timings.unwrap();
    assert!(
        t.total_ms > 0.0 && t.vision_ms > 0.0 && t.decoder_ms > 0.0 && t.vision_batch_size >= 1
    );
    assert!(!resp.model_id.is_empty());

    // Second call: text features come from the cache.
    let mut again = request(image_bytes("room_640x480.jpg"), &["wall"]);
    again.score_threshold = Some(0.655);
    let mut as_logits = again.clone();
    as_logits.mask_format = pb::MaskFormat::LogitsF32 as i32;
    let bytes = client.segment(again).await.unwrap().into_inner();
    let resp = client.segment(as_logits).await.unwrap().into_inner();
    assert!(resp.concepts[0].text_cache_hit);
    let inst = resp.concepts[0].instances.first().expect("kept at 0.655");
    let mask = inst.mask.as_ref().unwrap();
    assert_eq!(
        (mask.dtype, mask.data.len()),
        (pb::DataType::Float32 as i32, 48 * 48 * 4)
    );
    // The bundled decoder returns uint8 probabilities: the logits served for them are reconstructed, and turn back
    // into exactly the probabilities the default format sends.
    let logits: Vec<f32> = mask
        .data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let probabilities = &bytes.concepts[0].instances[0].mask.as_ref().unwrap().data;
    assert_eq!(
        &segmenter_svc::postprocess::to_probability_u8(&logits),
        probabilities
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn raw_rgb_input_gives_the_same_answer_as_png() {
    let server = TestServer::start(test_config()).await;
    let mut client = server.client().await;
    let png = image_bytes("mug_480x720.png");
    let rgb = image::load_from_memory(&png).unwrap().into_rgb8();
    let mut by_png = request(png, &["mug", "table"]);
    by_png.score_threshold = Some(0.3);
    let mut by_rgb = by_png.clone();
    by_rgb.image = Some(pb::Image {
        source: Some(pb::image::Source::Rgb(pb::RgbImage {
            width: rgb.width(),
            height: rgb.height(),
            data: rgb.into_raw(),
        })),
    });
    let a = client.segment(by_png).await.unwrap().into_inner();
    let b = client.segment(by_rgb).await.unwrap().into_inner();
    assert_same_answer(&a.concepts, &b.concepts, 0.0);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn model_info_reports_provider_limits_and_random_weights() {
    let mut config = test_config();
    // Taken as 1 by admission: reported as what it does.
    config.queue_capacity = 0;
    let server = TestServer::start(config).await;
    let info = server
        .client()
        .await
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.execution_provider, "cpu");
    assert_eq!(info.random_init, "tiny");
    assert_eq!(
        (
            info.image_size,
            info.mask_size,
            info.num_queries,
            info.max_text_tokens
        ),
        (168, 48, 20, 32)
    );
    let limits = info.limits.unwrap();
    assert_eq!(limits.max_concepts, 32);
    assert_eq!(limits.queue_capacity, 1);
    server.stop().await.unwrap();
}

/// CheckConcepts gives Segment's verdict on each phrase without an image: the phrase as the model reads it, its
/// tokens, and the very description Segment refuses it with.
#[tokio::test]
async fn check_concepts_judges_phrases_as_segment_does() {
    let server = TestServer::start(test_config()).await;
    let mut client = server.client().await;
    // 35 words: within MAX_CONCEPT_CHARS (200), over the model's 32-token context.
    let wordy = "wall ".repeat(35);
    let phrases = vec![
        "Wall".to_string(),
        "  red   SOFA ".to_string(),
        " \t ".to_string(),
        wordy.clone(),
        "x".repeat(201),
    ];
    let checks = client
        .check_concepts(pb::CheckConceptsRequest {
            concepts: phrases.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .concepts;
    assert_eq!(checks.len(), phrases.len());
    assert_eq!(
        (checks[0].concept.as_str(), checks[0].problem.as_str()),
        ("wall", "")
    );
    assert_eq!(checks[0].tokens, 3);
    assert_eq!(
        (checks[1].concept.as_str(), checks[1].problem.as_str()),
        ("red sofa", "")
    );
    assert_eq!(checks[2].problem, "empty phrase");
    assert!(
        checks[3].problem.contains("the model reads at most 32"),
        "{:?}",
        checks[3]
    );
    assert_eq!(checks[3].tokens, 37);
    assert!(
        checks[4].problem.contains("longer than 200"),
        "{:?}",
        checks[4]
    );

    // Segment refuses the same phrase with the same description.
    let refused = client
        .segment(request(
            image_bytes("room_640x480.jpg"),
            &["wall", wordy.as_str()],
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains(&checks[3].problem),
        "{refused:?}"
    );

    let too_many = client
        .check_concepts(pb::CheckConceptsRequest {
            concepts: vec!["wall".into(); 1025],
        })
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn concurrent_requests_are_batched_and_answered_correctly() {
    let mut config = test_config();
    config.max_batch_images = 4;
    config.max_queue_delay_ms = 50;
    let server = TestServer::start(config).await;
    let client = server.client().await;
    let image = image_bytes("room_640x480.jpg");
    let mut single = request(image.clone(), &["wall", "sofa"]);
    single.score_threshold = Some(0.6);
    let expected = client
        .clone()
        .segment(single.clone())
        .await
        .unwrap()
        .into_inner()
        .concepts;
    let calls = (0..12).map(|_| {
        let mut c = client.clone();
        let r = single.clone();
        tokio::spawn(async move { c.segment(r).await.map(|r| r.into_inner()) })
    });
    let results = futures::future::join_all(calls).await;
    let mut max_batch = 0;
    for r in results {
        let resp = r.unwrap().unwrap();
        // A batch of 4 runs other kernels than a batch of 1: equal up to float reassociation.
        assert_same_answer(&resp.concepts, &expected, 1e-4);
        max_batch = max_batch.max(resp.timings.unwrap().vision_batch_size);
    }
    assert!(max_batch > 1, "concurrent requests shared a vision batch");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_full_queue_answers_resource_exhausted_and_the_server_recovers() {
    let mut config = test_config();
    config.queue_capacity = 1;
    config.max_batch_images = 1;
    config.max_queue_delay_ms = 0;
    config.preprocess_concurrency = 32;
    let server = TestServer::start(config).await;
    let client = server.client().await;
    let concepts: Vec<String> = (0..16).map(|i| format!("thing number {i}")).collect();
    let refs: Vec<&str> = concepts.iter().map(String::as_str).collect();
    let heavy = request(image_bytes("room_640x480.jpg"), &refs);
    let calls = (0..24).map(|_| {
        let mut c = client.clone();
        let r = heavy.clone();
        tokio::spawn(async move { c.segment(r).await })
    });
    let results = futures::future::join_all(calls).await;
    let codes: Vec<Code> = results
        .into_iter()
        .map(|r| r.unwrap().map(|_| Code::Ok).unwrap_or_else(|s| s.code()))
        .collect();
    assert!(codes.contains(&Code::Ok), "{codes:?}");
    assert!(codes.contains(&Code::ResourceExhausted), "{codes:?}");
    assert!(
        codes
            .iter()
            .all(|c| matches!(c, Code::Ok | Code::ResourceExhausted)),
        "{codes:?}"
    );
    let ok = client
        .clone()
        .segment(request(image_bytes("mug_480x720.png"), &["mug"]))
        .await;
    assert!(ok.is_ok(), "still serving after overload");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn an_expired_deadline_is_deadline_exceeded() {
    let server = TestServer::start(test_config()).await;
    let mut client = server.client().await;
    let mut req = tonic::Request::new(request(image_bytes("room_640x480.jpg"), &["wall"]));
    req.set_timeout(Duration::from_micros(1));
    let status = client.segment(req).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    assert!(
        client
            .segment(request(image_bytes("room_640x480.jpg"), &["wall"]))
            .await
            .is_ok()
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_reply_over_the_message_limit_is_resource_exhausted_with_what_to_change() {
    let mut config = test_config();
    // Room for the 28 KB photo, not for 20 instances of 48x48 f32 logits (9 KB each).
    config.max_message_bytes = 64 * 1024;
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let mut req = request(image_bytes("room_640x480.jpg"), &["wall"]);
    req.mask_format = pb::MaskFormat::LogitsF32 as i32;
    req.score_threshold = Some(0.0);
    let status = client.segment(req.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("MAX_MESSAGE_BYTES")
            && status.message().contains("PROBABILITY_U8"),
        "{status:?}"
    );
    // Told apart from a full queue (also RESOURCE_EXHAUSTED, which clients retry) by its ErrorInfo.
    let info = tonic_types::StatusExt::get_details_error_info(&status).expect("an ErrorInfo");
    assert_eq!(
        (info.domain.as_str(), info.reason.as_str()),
        ("palette.segmenter.v1", "REPLY_TOO_LARGE")
    );
    // The same request without masks fits.
    req.mask_format = pb::MaskFormat::None as i32;
    let resp = client.segment(req).await.unwrap().into_inner();
    assert!(!resp.concepts[0].instances.is_empty());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_drains_requests_in_flight() {
    let server = TestServer::start(test_config()).await;
    let client = server.client().await;
    let concepts: Vec<String> = (0..24).map(|i| format!("object {i}")).collect();
    let refs: Vec<&str> = concepts.iter().map(String::as_str).collect();
    let req = request(image_bytes("room_640x480.jpg"), &refs);
    let in_flight: Vec<_> = (0..3)
        .map(|_| {
            let mut c = client.clone();
            let r = req.clone();
            tokio::spawn(async move { c.segment(r).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(30)).await;
    server.stop().await.unwrap();
    for call in in_flight {
        let resp = call
            .await
            .unwrap()
            .expect("in-flight request finished during graceful shutdown");
        assert_eq!(resp.into_inner().concepts.len(), 24);
    }
}

#[tokio::test]
async fn reflection_lists_every_service() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let server = TestServer::start(test_config()).await;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("{response:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "palette.segmenter.v1.Segmenter",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn reflection_can_be_turned_off_and_health_stays_open() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    let mut config = test_config();
    config.serve.reflection = false;
    let server = TestServer::start(config).await;
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let status = ServerReflectionClient::new(server.channel().await)
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    // TestServer::start waited for SERVING through health: it is still served.
    server.stop().await.unwrap();
}

/// Same concepts, same kept queries in the same order, scores and boxes within `tol` (0: bit-identical), mask bytes
/// within one level. The text-cache flag is ignored: it depends on what ran before.
fn assert_same_answer(a: &[pb::ConceptResult], b: &[pb::ConceptResult], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.concept, y.concept);
        assert!(
            (x.presence_score - y.presence_score).abs() <= tol,
            "{} presence",
            x.concept
        );
        let qx: Vec<u32> = x.instances.iter().map(|i| i.query_index).collect();
        let qy: Vec<u32> = y.instances.iter().map(|i| i.query_index).collect();
        assert_eq!(qx, qy, "{} kept queries", x.concept);
        for (i, j) in x.instances.iter().zip(&y.instances) {
            assert!(
                (i.score - j.score).abs() <= tol,
                "{} score {} vs {}",
                x.concept,
                i.score,
                j.score
            );
            let (bi, bj) = (i.r#box.unwrap(), j.r#box.unwrap());
            let d = [
                (bi.x0 - bj.x0),
                (bi.y0 - bj.y0),
                (bi.x1 - bj.x1),
                (bi.y1 - bj.y1),
            ];
            assert!(
                d.iter().all(|v| v.abs() <= tol * 1000.0),
                "{} box {bi:?} vs {bj:?}",
                x.concept
            );
            let (mi, mj) = (i.mask.as_ref().unwrap(), j.mask.as_ref().unwrap());
            assert!(
                mi.data
                    .iter()
                    .zip(&mj.data)
                    .all(|(p, q)| p.abs_diff(*q) <= 1),
                "{} mask",
                x.concept
            );
        }
    }
}

/// The reply's timings: `decode_ms` is the image's decode, `preprocess_ms` its resize to the model's input, and the
/// wait for a pre-processing slot is neither (it is in `queue_ms`, with the wait for the inference thread).
#[tokio::test]
async fn timings_report_decode_and_resize_apart_from_the_wait_for_a_slot() {
    let mut config = test_config();
    config.preprocess_concurrency = 1;
    let shared = segmenter_svc::server::load(&config).await.unwrap();
    let permits = shared.preprocess_permits.clone();
    let mut server = palette_testing::server::start(|listener, shutdown| {
        segmenter_svc::server::serve(config, shared, listener, shutdown)
    })
    .await;
    palette_testing::server::wait_serving(server.addr, segmenter_svc::server::SERVICE_NAME).await;
    let mut client = pb::segmenter_client::SegmenterClient::connect(server.url())
        .await
        .unwrap();

    // The only slot is held for 2 s while the request waits for it (margins for a loaded CI machine).
    let held = permits.acquire_owned().await.unwrap();
    let call = tokio::spawn(async move {
        client
            .segment(request(image_bytes("room_640x480.jpg"), &["wall"]))
            .await
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(held);
    let t = call.await.unwrap().unwrap().into_inner().timings.unwrap();
    assert!(t.decode_ms > 0.0 && t.preprocess_ms > 0.0, "{t:?}");
    assert!(
        t.decode_ms + t.preprocess_ms < 1000.0,
        "the wait for the slot counted as decoding: {t:?}"
    );
    assert!(
        t.queue_ms >= 1000.0,
        "the wait for the slot is queueing: {t:?}"
    );
    assert!(
        t.total_ms >= t.queue_ms + t.decode_ms + t.preprocess_ms + t.vision_ms,
        "{t:?}"
    );
    server.stop().await.unwrap();
}
