//! TLS, mutual TLS and bearer tokens on the orchestrator's server (the service kit gives the segmenter the same
//! layers; segmenter-svc/tests/grpcurl.rs and the end-to-end tests cover it there). Certificates are made per test
//! with rcgen. A call that gets past authentication is an empty SubmitJob, answered INVALID_ARGUMENT.

use std::time::Duration;

use palette_proto::orchestrator::v1::JobSpec;
use palette_proto::orchestrator::v1::jobs_client::JobsClient;
use palette_testing::orchestrator::{self, Orchestrator};
use palette_testing::server::{health_on, wait_serving_on};
use palette_testing::tls::{Pki, TOKEN};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

/// Nothing listens on the discard port: these tests never reach the segmenter.
const NO_SEGMENTER: &str = "http://127.0.0.1:9";

async fn start(pki: &Pki, tweak: impl FnOnce(&mut orchestrator_svc::Config)) -> Orchestrator {
    let orch = orchestrator::start(NO_SEGMENTER, tweak).await;
    wait_serving_on(pki.endpoint(orch.addr, Some("client")), "").await;
    orch
}

/// The code of an empty SubmitJob on `channel` with `token` (INVALID_ARGUMENT: it got past authentication).
async fn submit(channel: Channel, token: Option<&str>) -> Code {
    let mut request = tonic::Request::new(JobSpec::default());
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().unwrap();
        request.metadata_mut().insert("authorization", value);
    }
    match JobsClient::new(channel).submit_job(request).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// Whether the call reached the service (with or without a token).
fn served(code: Code) -> bool {
    matches!(code, Code::InvalidArgument | Code::Unauthenticated)
}

async fn list_services(
    channel: Channel,
    token: Option<&str>,
) -> Result<Vec<String>, tonic::Status> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let mut request = tonic::Request::new(tokio_stream::iter([ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    }]));
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().unwrap();
        request.metadata_mut().insert("authorization", value);
    }
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(request)
        .await?
        .into_inner();
    let reply = stream.message().await?.expect("one reply");
    match reply.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => panic!("unexpected reply {other:?}"),
    }
}

#[tokio::test]
async fn tls_serves_clients_that_trust_the_ca_and_refuses_plaintext() {
    let pki = Pki::generate();
    let orch = start(&pki, |c| pki.serve_tls(&mut c.serve, false)).await;
    let channel = pki.connect(orch.addr, None).await.unwrap();
    assert_eq!(submit(channel, None).await, Code::InvalidArgument);
    // orch.channel is the harness's plaintext channel: no TLS, no answer.
    let plaintext = submit(orch.channel.clone(), None).await;
    assert!(!served(plaintext), "{plaintext:?}");
}

#[tokio::test]
async fn mutual_tls_refuses_a_client_without_a_certificate_or_with_a_strangers() {
    let pki = Pki::generate();
    let orch = start(&pki, |c| pki.serve_tls(&mut c.serve, true)).await;
    let with_cert = pki.connect(orch.addr, Some("client")).await.unwrap();
    assert_eq!(submit(with_cert, None).await, Code::InvalidArgument);
    for identity in [None, Some("stranger")] {
        // With TLS 1.3 the server checks the client certificate after the client's handshake finished: the refusal
        // shows on the connection or on the first call.
        let refused = match pki.connect(orch.addr, identity).await {
            Err(_) => true,
            Ok(channel) => !served(submit(channel, None).await),
        };
        assert!(refused, "{identity:?} was let in");
    }
}

#[tokio::test]
async fn tokens_missing_or_wrong_are_unauthenticated_and_health_stays_open() {
    let pki = Pki::generate();
    let orch = start(&pki, |c| {
        pki.serve_tls(&mut c.serve, false);
        c.serve.auth_tokens = Some(format!("{TOKEN},second-token-0123456789").into());
    })
    .await;
    let channel = pki.connect(orch.addr, None).await.unwrap();
    assert_eq!(submit(channel.clone(), None).await, Code::Unauthenticated);
    assert_eq!(
        submit(channel.clone(), Some("wrong-token-0123456789abc")).await,
        Code::Unauthenticated
    );
    assert_eq!(
        submit(channel.clone(), Some(TOKEN)).await,
        Code::InvalidArgument
    );
    assert_eq!(
        submit(channel.clone(), Some("second-token-0123456789")).await,
        Code::InvalidArgument
    );
    // Health needs no token (health_on sends none).
    assert_eq!(
        health_on(
            pki.endpoint(orch.addr, None),
            "palette.orchestrator.v1.Jobs"
        )
        .await,
        ServingStatus::Serving as i32
    );
    // Reflection is behind the token like the API.
    let refused = list_services(channel.clone(), None).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let services = list_services(channel, Some(TOKEN)).await.unwrap();
    assert!(
        services.iter().any(|s| s == "palette.orchestrator.v1.Jobs"),
        "{services:?}"
    );
}

#[tokio::test]
async fn reflection_off_with_authentication_on() {
    let pki = Pki::generate();
    let orch = start(&pki, |c| {
        pki.serve_tls(&mut c.serve, false);
        c.serve.auth_tokens = Some(TOKEN.into());
        c.serve.reflection = false;
    })
    .await;
    let channel = pki.connect(orch.addr, None).await.unwrap();
    let status = list_services(channel.clone(), Some(TOKEN))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert_eq!(submit(channel, Some(TOKEN)).await, Code::InvalidArgument);
}

#[tokio::test]
async fn a_rewritten_token_file_rotates_the_tokens_without_a_restart() {
    let pki = Pki::generate();
    let old = "old-token-0123456789abcdef";
    let new = "new-token-0123456789abcdef";
    let file = pki.path("tokens");
    std::fs::write(&file, format!("# the upstream API's token\n{old}\n")).unwrap();
    let orch = start(&pki, |c| {
        pki.serve_tls(&mut c.serve, false);
        c.serve.auth_tokens_file = Some(file.clone());
        c.serve.auth_tokens_reload = Duration::from_millis(50);
    })
    .await;
    let channel = pki.connect(orch.addr, None).await.unwrap();
    assert_eq!(
        submit(channel.clone(), Some(old)).await,
        Code::InvalidArgument
    );
    assert_eq!(
        submit(channel.clone(), Some(new)).await,
        Code::Unauthenticated
    );

    // Replaced the way a Kubernetes Secret volume updates: a new file renamed over the old one.
    let staged = pki.path("tokens.new");
    std::fs::write(&staged, format!("{new}\n")).unwrap();
    std::fs::rename(&staged, &file).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while submit(channel.clone(), Some(new)).await != Code::InvalidArgument {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new token was never accepted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        submit(channel.clone(), Some(old)).await,
        Code::Unauthenticated
    );

    // A malformed line (a token too short: an operator's typo) keeps the tokens accepted so far.
    std::fs::write(&file, format!("{new}\nshort\n")).unwrap();
    // Kept as a real wait: what is tested is that nothing changes, which has no event; 300 ms spans six reloads.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        submit(channel.clone(), Some(new)).await,
        Code::InvalidArgument
    );

    // A file emptied of tokens revokes them all (no AUTH_TOKENS here: every call is refused).
    std::fs::write(&file, "# revoked\n").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while submit(channel.clone(), Some(new)).await != Code::Unauthenticated {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the emptied file's token was never revoked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_health_port_answers_in_plaintext_while_the_api_requires_mutual_tls() {
    let pki = Pki::generate();
    let health_port = palette_testing::ports::free_port();
    let orch = start(&pki, |c| {
        pki.serve_tls(&mut c.serve, true);
        c.serve.auth_tokens = Some(TOKEN.into());
        c.serve.health_addr = format!("127.0.0.1:{health_port}");
    })
    .await;
    let health_addr = std::net::SocketAddr::from(([127, 0, 0, 1], health_port));
    assert_eq!(
        palette_testing::server::health(health_addr, "palette.orchestrator.v1.Jobs").await,
        ServingStatus::Serving as i32
    );
    // Only health there: the API is not served on the plaintext port.
    let channel = Channel::from_shared(format!("http://{health_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert_eq!(submit(channel, Some(TOKEN)).await, Code::Unimplemented);

    // The image's healthcheck asks the health port: TLS on the API port does not make the container unhealthy.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_orchestrator-svc"))
            .arg("healthcheck")
            .env("GRPC_ADDR", format!("0.0.0.0:{}", orch.addr.port()))
            .env("HEALTH_ADDR", format!("0.0.0.0:{health_port}"))
            .env("TLS_CERT", "/set/but/not/read.pem")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

type Tweak = dyn Fn(&mut orchestrator_svc::Config);

#[tokio::test]
async fn startup_stops_at_an_unusable_setting_and_names_it() {
    let listener = || async { tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap() };
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(Box<Tweak>, &str)> = vec![
        (
            Box::new(|c| {
                c.serve.tls_cert = Some("/nonexistent/server.pem".into());
                c.serve.tls_key = Some("/nonexistent/server.key".into());
            }),
            "TLS_CERT=/nonexistent/server.pem: cannot read the file",
        ),
        (
            Box::new(|c| c.serve.tls_key = Some("/nonexistent/server.key".into())),
            "TLS_KEY is set but TLS_CERT is not: set both, or neither",
        ),
        (
            Box::new(|c| c.serve.auth_tokens = Some("short".into())),
            "AUTH_TOKENS: token 1 is shorter than 16 characters",
        ),
        (
            Box::new(|c| c.serve.auth_tokens_file = Some("/nonexistent/tokens".into())),
            "AUTH_TOKENS_FILE=/nonexistent/tokens: cannot read the file",
        ),
        (
            Box::new(|c| c.segmenter.segmenter_tls_ca = Some("/nonexistent/ca.pem".into())),
            "SEGMENTER_URL \"http://127.0.0.1:9\"",
        ),
        (
            Box::new(|c| c.segmenter.segmenter_token_file = Some("/nonexistent/token".into())),
            "SEGMENTER_TOKEN_FILE \"/nonexistent/token\"",
        ),
    ];
    for (tweak, expected) in cases {
        let mut config = orchestrator_svc::Config::for_tests(dir.path(), NO_SEGMENTER);
        tweak(&mut config);
        let err = orchestrator_svc::run(config, listener().await, std::future::pending())
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), expected);
    }

    // Files that each parse but do not go together (a key from another issuance), and a replica list that would
    // send the token in plaintext to some replicas: refused at startup, with the reason in the error's chain.
    let pki = Pki::generate();
    let path = |file: &str| Some(pki.path(file));
    let (ca, server_pem, server_key) = (path("ca.pem"), path("server.pem"), path("server.key"));
    let (client_pem, client_key) = (path("client.pem"), path("client.key"));
    let ca_for_client = ca.clone();
    let cases: Vec<(Box<Tweak>, &str)> = vec![
        (
            Box::new(move |c| {
                c.serve.tls_cert = server_pem.clone();
                c.serve.tls_key = client_key.clone();
            }),
            "TLS_CERT, TLS_KEY: not usable together",
        ),
        (
            Box::new(move |c| {
                c.segmenter.segmenter_url = "https://localhost:9".into();
                c.segmenter.segmenter_tls_ca = ca_for_client.clone();
                c.segmenter.segmenter_tls_cert = client_pem.clone();
                c.segmenter.segmenter_tls_key = server_key.clone();
            }),
            "SEGMENTER_TLS_CA, SEGMENTER_TLS_CERT, SEGMENTER_TLS_KEY: not usable together",
        ),
        (
            Box::new(move |c| {
                c.segmenter.segmenter_url = "https://127.0.0.1:9, http://127.0.0.2:9".into();
                c.segmenter.segmenter_tls_ca = ca.clone();
            }),
            "mixes https:// with plaintext entries",
        ),
        // Schemes are case-insensitive: an upper-case HTTPS:// entry is an https one, not a plaintext one.
        (
            Box::new(move |c| {
                c.segmenter.segmenter_url = "HTTPS://127.0.0.1:9, http://127.0.0.2:9".into();
            }),
            "mixes https:// with plaintext entries",
        ),
    ];
    for (tweak, expected) in cases {
        let mut config = orchestrator_svc::Config::for_tests(dir.path(), NO_SEGMENTER);
        tweak(&mut config);
        let err = orchestrator_svc::run(config, listener().await, std::future::pending())
            .await
            .unwrap_err();
        let chain = format!("{:#}", anyhow::Error::from(err));
        assert!(chain.contains(expected), "{chain}");
    }
}

/// A connection that never starts its TLS handshake is closed after the handshake timeout (10 s; 200 ms here)
/// instead of holding a task and a file descriptor for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_says_hello_is_closed() {
    use tokio::io::AsyncReadExt;
    let pki = Pki::generate();
    let orch = start(&pki, |c| {
        pki.serve_tls(&mut c.serve, false);
        c.serve.tls_handshake_timeout = Duration::from_millis(200);
    })
    .await;
    let mut silent = tokio::net::TcpStream::connect(orch.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(20), silent.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the server kept a silent connection open: {read:?}"
    );
}

/// What deploy/dev-certs.sh writes (openssl: EC keys, a local CA) works with the services' TLS as rcgen's does: the
/// compose override and the operations guide rely on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_certs_script_output_is_accepted() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: no openssl");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/dev-certs.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = |name: &str| dir.path().join(name);
    let token = std::fs::read_to_string(file("orchestrator.tokens")).unwrap();
    let orch = orchestrator::start(NO_SEGMENTER, |c| {
        c.serve.tls_cert = Some(file("server.pem"));
        c.serve.tls_key = Some(file("server.key"));
        c.serve.tls_client_ca = Some(file("ca.pem"));
        c.serve.auth_tokens_file = Some(file("orchestrator.tokens"));
    })
    .await;
    let read = |name: &str| std::fs::read(file(name)).unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.pem")))
        .identity(tonic::transport::Identity::from_pem(
            read("client.pem"),
            read("client.key"),
        ))
        .domain_name("localhost");
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{}", orch.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap();
    wait_serving_on(endpoint.clone(), "").await;
    let channel = endpoint.connect().await.unwrap();
    assert_eq!(
        submit(channel, Some(token.trim())).await,
        Code::InvalidArgument
    );
}
