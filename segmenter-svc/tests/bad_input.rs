//! Every kind of bad request gets a clear status with field details, and the server keeps serving afterwards.

use palette_testing::segmenter as common;

use common::{TestServer, image_bytes, request, test_config};
use palette_proto::segmenter::v1 as pb;
use palette_testing::status::violated_fields;
use tonic::Code;

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb([200, 180, 160]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A minimal GIF header: recognised as GIF, which the service does not take.
fn gif() -> Vec<u8> {
    let mut bytes = b"GIF89a".to_vec();
    bytes.extend_from_slice(&[8, 0, 8, 0, 0, 0, 0, 0x3B]);
    bytes
}

/// A PNG whose header claims 20000 x 20000 pixels (a decompression bomb's shape): refused from the header alone.
fn bomb_header() -> Vec<u8> {
    let mut bytes = png(4, 4);
    // IHDR's width and height live at bytes 16..24, its CRC (over type and data, bytes 12..29) at 29..33.
    bytes[16..20].copy_from_slice(&20000u32.to_be_bytes());
    bytes[20..24].copy_from_slice(&20000u32.to_be_bytes());
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    bytes
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

struct Case {
    name: &'static str,
    request: pb::SegmentRequest,
    code: Code,
    field: Option<&'static str>,
    says: &'static str,
}

fn cases() -> Vec<Case> {
    let good = image_bytes("room_640x480.jpg");
    let mut truncated = good.clone();
    truncated.truncate(good.len() / 3);
    let long = "a very long phrase ".repeat(8);
    let many: Vec<String> = (0..33).map(|i| format!("thing {i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let with = |f: &dyn Fn(&mut pb::SegmentRequest)| {
        let mut r = request(good.clone(), &["wall"]);
        f(&mut r);
        r
    };
    vec![
        Case {
            name: "corrupt bytes",
            request: request(b"definitely not an image".to_vec(), &["wall"]),
            code: Code::InvalidArgument,
            field: Some("image.encoded"),
            says: "not a JPEG, PNG or WebP",
        },
        Case {
            name: "truncated JPEG",
            request: request(truncated, &["wall"]),
            code: Code::InvalidArgument,
            field: Some("image.encoded"),
            says: "corrupt or truncated",
        },
        Case {
            name: "unsupported format",
            request: request(gif(), &["wall"]),
            code: Code::InvalidArgument,
            field: Some("image.encoded"),
            says: "not supported",
        },
        Case {
            name: "over the pixel limit",
            request: request(bomb_header(), &["wall"]),
            code: Code::InvalidArgument,
            field: Some("image.encoded"),
            says: "over the limit",
        },
        Case {
            name: "no image",
            request: with(&|r| r.image = None),
            code: Code::InvalidArgument,
            field: Some("image"),
            says: "required",
        },
        Case {
            name: "empty image bytes",
            request: request(Vec::new(), &["wall"]),
            code: Code::InvalidArgument,
            field: Some("image.encoded"),
            says: "no image bytes",
        },
        Case {
            name: "raw RGB of the wrong length",
            request: with(&|r| {
                r.image = Some(pb::Image {
                    source: Some(pb::image::Source::Rgb(pb::RgbImage {
                        width: 10,
                        height: 10,
                        data: vec![0; 299],
                    })),
                })
            }),
            code: Code::InvalidArgument,
            field: Some("image.rgb.data"),
            says: "needs 300",
        },
        Case {
            name: "no concepts",
            request: request(good.clone(), &[]),
            code: Code::InvalidArgument,
            field: Some("concepts"),
            says: "at least one",
        },
        Case {
            name: "too many concepts",
            request: request(good.clone(), &many),
            code: Code::InvalidArgument,
            field: Some("concepts"),
            says: "at most 32",
        },
        Case {
            name: "blank concept",
            request: request(good.clone(), &["wall", "   "]),
            code: Code::InvalidArgument,
            field: Some("concepts[1]"),
            says: "empty phrase",
        },
        Case {
            name: "phrase over the token limit",
            request: request(good.clone(), &[long.as_str()]),
            code: Code::InvalidArgument,
            field: Some("concepts[0]"),
            says: "at most 32",
        },
        Case {
            name: "threshold out of range",
            request: with(&|r| r.score_threshold = Some(1.5)),
            code: Code::InvalidArgument,
            field: Some("score_threshold"),
            says: "[0, 1)",
        },
        Case {
            name: "instance cap over the limit",
            request: with(&|r| r.max_instances_per_concept = 1000),
            code: Code::InvalidArgument,
            field: Some("max_instances_per_concept"),
            says: "at most",
        },
        Case {
            name: "unknown mask format",
            request: with(&|r| r.mask_format = 42),
            code: Code::InvalidArgument,
            field: Some("mask_format"),
            says: "unknown value",
        },
        Case {
            name: "a semantic map asked for in no format",
            request: with(&|r| {
                r.include_semantic = true;
                r.mask_format = pb::MaskFormat::None as i32;
            }),
            code: Code::InvalidArgument,
            field: Some("include_semantic"),
            says: "choose a mask format",
        },
        Case {
            name: "an over-long request id",
            request: with(&|r| r.request_id = "x".repeat(1 << 20)),
            code: Code::InvalidArgument,
            field: Some("request_id"),
            says: "at most 256",
        },
    ]
}

#[tokio::test]
async fn each_bad_request_is_refused_clearly_and_the_server_keeps_serving() {
    let mut config = test_config();
    config.max_image_pixels = 20_000_000;
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    for case in cases() {
        let status = client.segment(case.request).await.expect_err(case.name);
        assert_eq!(status.code(), case.code, "{}: {status:?}", case.name);
        assert!(
            status.message().contains(case.says),
            "{}: message {:?} lacks {:?}",
            case.name,
            status.message(),
            case.says
        );
        if let Some(field) = case.field {
            let fields = violated_fields(&status);
            assert!(
                fields.iter().any(|f| f == field),
                "{}: field {field} not in {fields:?}",
                case.name
            );
        }
    }
    let ok = client
        .segment(request(image_bytes("mug_480x720.png"), &["mug"]))
        .await;
    assert!(ok.is_ok(), "still serving: {ok:?}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn every_violation_is_reported_at_once() {
    let server = TestServer::start(test_config()).await;
    let mut req = request(Vec::new(), &["", "wall"]);
    req.score_threshold = Some(-1.0);
    let status = server.client().await.segment(req).await.unwrap_err();
    let fields = violated_fields(&status);
    assert_eq!(fields, ["image.encoded", "concepts[0]", "score_threshold"]);
    // Raw RGB's size is checked with the other fields, not after the call's turn to decode.
    let mut req = request(Vec::new(), &["", "wall"]);
    req.image = Some(pb::Image {
        source: Some(pb::image::Source::Rgb(pb::RgbImage {
            width: 10,
            height: 10,
            data: vec![0; 299],
        })),
    });
    let status = server.client().await.segment(req).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["image.rgb.data", "concepts[0]"]);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn an_oversize_message_is_refused_before_decoding() {
    let mut config = test_config();
    config.max_message_bytes = 1 << 20;
    let server = TestServer::start(config).await;
    let status = server
        .client()
        .await
        .segment(request(vec![0xFF; 2 << 20], &["wall"]))
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    let ok = server
        .client()
        .await
        .segment(request(image_bytes("mug_480x720.png"), &["mug"]))
        .await;
    assert!(ok.is_ok());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_huge_concept_list_is_refused_on_its_length_alone() {
    // ~4 MiB of distinct phrases: checked one by one, each deduplicated against the others and tokenised, that is
    // ~10^11 comparisons; the length alone decides.
    let server = TestServer::start(test_config()).await;
    let phrases: Vec<String> = (0..400_000).map(|i| format!("thing {i}")).collect();
    let refs: Vec<&str> = phrases.iter().map(String::as_str).collect();
    let req = request(image_bytes("mug_480x720.png"), &refs);
    let mut client = server.client().await;
    let started = std::time::Instant::now();
    let status = client.segment(req).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("400000 concepts given"),
        "{status:?}"
    );
    let fields = violated_fields(&status);
    assert_eq!(fields, ["concepts"], "one violation, not one per phrase");
    // Transfer and decoding of the 4 MiB message included; the check itself is O(1).
    println!("refused in {took:?}");
    assert!(took < std::time::Duration::from_secs(2), "took {took:?}");
    server.stop().await.unwrap();
}
