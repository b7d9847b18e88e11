//! Both tiers secured as in production: the segmenter (tiny model, real ONNX Runtime) with mutual TLS and a token,
//! the orchestrator calling it over `https://` with the CA, its client certificate and its SEGMENTER_TOKEN. A job
//! completes through it; with a wrong token the same job's item fails at the segmenter instead.

use std::time::Duration;

use palette_e2e::example_photos;
use palette_proto::orchestrator::v1::ItemState;
use palette_testing::orchestrator::{self, is_terminal, seed_spec};
use palette_testing::segmenter::{TestServer, test_config};
use palette_testing::tls::{Pki, TOKEN};

async fn secure_segmenter(pki: &Pki) -> TestServer {
    let mut config = test_config();
    pki.serve_tls(&mut config.serve, true);
    config.serve.auth_tokens = Some(TOKEN.into());
    TestServer::start_checked_by(config, |addr| pki.endpoint(addr, Some("client"))).await
}

/// The item's state and error code after a one-image job through an orchestrator sending the token `send` sets.
async fn run_job(
    pki: &Pki,
    segmenter: &TestServer,
    send: impl FnOnce(&mut orchestrator_svc::Config),
) -> (i32, String) {
    // By name: the resolver dials the addresses `localhost` resolves to, and TLS checks the name, not the address.
    let url = format!("https://localhost:{}", segmenter.addr.port());
    let mut orch = orchestrator::start(&url, |c| {
        c.segmenter.segmenter_tls_ca = Some(pki.path("ca.pem"));
        c.segmenter.segmenter_tls_cert = Some(pki.path("client.pem"));
        c.segmenter.segmenter_tls_key = Some(pki.path("client.key"));
        c.segmenter.segmenter_attempts = 1;
        send(c);
    })
    .await;
    let photo = example_photos().remove(0).1;
    orch.put_input("test-user", "secure", 0, photo).await;
    orch.client
        .submit_job(seed_spec("secure", 1))
        .await
        .unwrap();
    let job = tokio::time::timeout(
        Duration::from_secs(120),
        orch.wait_for("secure", is_terminal),
    )
    .await
    .expect("job finished");
    orch.shutdown().await;
    let item = &job.items[0];
    (item.state, item.error_code.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_over_mutual_tls_with_the_segmenter_token() {
    let pki = Pki::generate();
    let segmenter = secure_segmenter(&pki).await;
    // The token from a file, as a mounted Secret gives it.
    let token_file = pki.path("segmenter-token");
    std::fs::write(&token_file, format!("# for the segmenter\n{TOKEN}\n")).unwrap();
    let (state, error) = run_job(&pki, &segmenter, |c| {
        c.segmenter.segmenter_token_file = Some(token_file);
    })
    .await;
    assert_eq!(state, ItemState::Completed as i32, "error code {error:?}");

    let (state, error) = run_job(&pki, &segmenter, |c| {
        c.segmenter.segmenter_token = Some("not-the-segmenter-token-000".into());
    })
    .await;
    assert_eq!(state, ItemState::Failed as i32);
    assert_eq!(error, "segmenter_unavailable");
    segmenter.stop().await.unwrap();
}
