//! Server scaffolding: health, reflection, reserved adapters.

use palette_testing as common;

use orchestrator_svc::config::Adapter;
use orchestrator_svc::{Config, StartupError};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test]
async fn health_reports_the_jobs_service_serving() {
    let segmenter = common::fake_segmenter::start().await;
    let orch = common::orchestrator::start(&segmenter.url, |_| {}).await;
    let mut health = HealthClient::new(orch.channel.clone());
    for service in ["", "palette.orchestrator.v1.Jobs"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
}

#[tokio::test]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let segmenter = common::fake_segmenter::start().await;
    let orch = common::orchestrator::start(&segmenter.url, |_| {}).await;
    let mut client = ServerReflectionClient::new(orch.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("{response:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["palette.orchestrator.v1.Jobs", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} not in {names:?}"
        );
    }
    assert!(
        !names.iter().any(|n| n.contains("Segmenter")),
        "the segmenter is not served here: {names:?}"
    );
}

#[tokio::test]
async fn queue_pull_without_nats_url_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(dir.path(), "http://127.0.0.1:9");
    config.adapter = Adapter::QueuePull;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = orchestrator_svc::run(config, listener, std::future::ready(()))
        .await
        .unwrap_err();
    assert!(matches!(err, StartupError::Config(_)));
    assert!(err.to_string().contains("NATS_URL"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_items_in_flight_and_ends_unstarted_ones_with_a_callback() {
    use std::sync::atomic::Ordering;

    use palette_proto::orchestrator::v1::ItemState;

    let segmenter = common::fake_segmenter::start().await;
    segmenter.faults.delay_ms.store(600, Ordering::SeqCst);
    let receiver = common::receiver::Receiver::start("s", vec![]).await;
    let mut orch = common::orchestrator::start(&segmenter.url, |c| {
        c.limits.batch_concurrency = 1;
        c.callbacks.workers_api_url = Some(receiver.url().into());
        c.callbacks.gpu_callback_secret = Some("s".into());
    })
    .await;
    for idx in 0..3 {
        orch.put_input(
            "test-user",
            "drain",
            idx,
            common::orchestrator::photo_jpeg(32, 32),
        )
        .await;
    }
    orch.client
        .submit_job(common::orchestrator::seed_spec("drain", 3))
        .await
        .unwrap();
    orch.wait_for("drain", |j| j.items[0].state == ItemState::Running as i32)
        .await;
    orch.shutdown().await;

    let mut seen: Vec<(u64, String, String)> = receiver
        .deliveries()
        .iter()
        .map(|d| {
            (
                d.body["idx"].as_u64().unwrap(),
                d.body["status"].as_str().unwrap().to_string(),
                d.body["error_code"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            (0, "completed".to_string(), String::new()),
            (1, "failed".to_string(), "internal".to_string()),
            (2, "failed".to_string(), "internal".to_string()),
        ]
    );
}

fn healthcheck_binary(grpc_addr: &str) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_orchestrator-svc"))
        .arg("healthcheck")
        .env("GRPC_ADDR", grpc_addr)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_subcommand_exits_zero_when_serving() {
    let segmenter = common::fake_segmenter::start().await;
    let orch = common::orchestrator::start(&segmenter.url, |_| {}).await;
    let addr = format!("0.0.0.0:{}", orch.addr.port());
    let out = tokio::task::spawn_blocking(move || healthcheck_binary(&addr))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_subcommand_fails_on_a_closed_port() {
    // The discard port: nothing listens there (a probed free port could be handed to another test's server).
    let addr = "0.0.0.0:9".to_string();
    let out = tokio::task::spawn_blocking(move || healthcheck_binary(&addr))
        .await
        .unwrap();
    assert!(!out.status.success(), "{:?}", out.status);
}

#[tokio::test]
async fn reflection_can_be_turned_off() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;

    let segmenter = common::fake_segmenter::start().await;
    let orch = common::orchestrator::start(&segmenter.url, |c| c.serve.reflection = false).await;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let status = ServerReflectionClient::new(orch.channel.clone())
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    // Health stays open: Kubernetes probes and load balancers need it.
    let serving = HealthClient::new(orch.channel.clone())
        .check(HealthCheckRequest {
            service: "palette.orchestrator.v1.Jobs".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(serving, ServingStatus::Serving as i32);
}

/// `--help` shows each setting's environment value unless told not to: secrets are hidden (a Runpod template sets
/// them as environment variables, where anyone running `--help` in the pod would print them).
#[test]
fn help_does_not_print_secret_settings() {
    let secrets = [
        ("AUTH_TOKENS", "sentinel-auth-token-0123456789"),
        ("SEGMENTER_TOKEN", "sentinel-segmenter-token-0123"),
        (
            "WORKERS_API_URL",
            "https://user:sentinel-pass@example.test/x",
        ),
        ("NATS_URL", "nats://user:sentinel-nats@127.0.0.1:4222"),
        ("GPU_CALLBACK_SECRET", "sentinel-callback-secret"),
        ("R2_SECRET_ACCESS_KEY", "sentinel-r2-secret"),
        ("RUNPOD_AI_API_KEY", "sentinel-runpod-key"),
    ];
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_orchestrator-svc"))
        .arg("--help")
        .envs(secrets)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    for (name, value) in secrets {
        assert!(help.contains(name), "{name} is not in --help");
        assert!(
            !help.contains("sentinel"),
            "{name}'s value {value:?} is printed by --help"
        );
    }
}

/// A client watching health on the API port (client-side health checking) does not hold the drain: its stream
/// says NOT_SERVING and ends, and the server stops long before its grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_health_watch_ends_at_shutdown_instead_of_holding_the_drain() {
    let segmenter = common::fake_segmenter::start().await;
    let mut orch = common::orchestrator::start(&segmenter.url, |c| c.shutdown_grace_sec = 60).await;
    let mut watch = HealthClient::new(orch.channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    tokio::time::timeout(std::time::Duration::from_secs(20), orch.shutdown())
        .await
        .expect("the drain waited on the open health watch");
    let mut statuses = Vec::new();
    while let Ok(Some(message)) = watch.message().await {
        statuses.push(message.status);
    }
    assert_eq!(
        statuses.last(),
        Some(&(ServingStatus::NotServing as i32)),
        "{statuses:?}"
    );
}
