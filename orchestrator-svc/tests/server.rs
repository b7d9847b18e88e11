//! Server scaffolding: health, reflection, reserved adapters.

mod common;

use orchestrator_svc::config::Adapter;
use orchestrator_svc::{Config, Error};
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
}

#[tokio::test]
async fn reserved_adapters_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(dir.path(), "http://127.0.0.1:9");
    config.adapter = Adapter::Runpod;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = orchestrator_svc::run(config, listener, std::future::ready(()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotImplemented(_)));
    assert!(err.to_string().contains("not implemented yet"), "{err}");
}
