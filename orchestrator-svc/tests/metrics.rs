//! The Prometheus exporter (process-global, hence its own test binary).

use palette_testing as common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_jobs_items_stages_and_callbacks() {
    // The exporter binds an address, not a listener (see common::ports for why not a probed port-0 one).
    let port = common::ports::free_port();
    let segmenter = common::fake_segmenter::start().await;
    let receiver = common::receiver::Receiver::start("s", vec![]).await;
    let mut orch = common::orchestrator::start(&segmenter.url, |c| {
        c.metrics_addr = format!("127.0.0.1:{port}");
        c.callbacks.workers_api_url = Some(receiver.url().into());
        c.callbacks.gpu_callback_secret = Some("s".into());
    })
    .await;
    orch.put_input(
        "test-user",
        "metered",
        0,
        common::orchestrator::photo_jpeg(32, 32),
    )
    .await;
    orch.client
        .submit_job(common::orchestrator::seed_spec("metered", 2))
        .await
        .unwrap();
    orch.wait_for("metered", |j| j.items.iter().all(|i| i.callback_state == 3))
        .await;

    // A preview of the finished photo: its stages, the wait for the pixel budget (`admit`) apart.
    orch.client
        .preview_edit(palette_proto::orchestrator::v1::PreviewEditRequest {
            user_id: "test-user".into(),
            job_id: "metered".into(),
            idx: 0,
            rules: vec![palette_proto::orchestrator::v1::Rule {
                rule_id: "paint".into(),
                concept: "wall".into(),
                r#type: "recolor".into(),
                params: Some(common::orchestrator::string_struct(&[("color", "#1F3A5F")])),
            }],
            preset: String::new(),
            max_side: 64,
            format: String::new(),
        })
        .await
        .unwrap();

    let text = scrape(port).await;
    for needle in [
        "orchestrator_jobs_submitted_total 1",
        "orchestrator_items_total{state=\"ITEM_STATE_COMPLETED\"} 1",
        "orchestrator_items_total{state=\"ITEM_STATE_FAILED\"} 1",
        "orchestrator_callbacks_total{outcome=\"delivered\"} 2",
        "orchestrator_stage_seconds_bucket{stage=\"segment\"",
        // The completed item only: the failed one (input missing) is no item latency.
        "orchestrator_stage_seconds_count{stage=\"item\"} 1",
        "orchestrator_segmenter_replicas 1",
        "orchestrator_segmenter_replicas_serving 1",
        "orchestrator_preview_stage_seconds_count{stage=\"photo\"} 1",
        "orchestrator_preview_stage_seconds_count{stage=\"masks\"} 1",
        // photo, masks, then the rules' render.
        "orchestrator_preview_stage_seconds_count{stage=\"admit\"} 3",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }

    // The only segmenter stops serving: the balancer keeps its address (calls fail fast rather than wait), so only
    // the serving gauge can show the outage.
    segmenter.set_serving(false).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let text = scrape(port).await;
        if text.contains("orchestrator_segmenter_replicas_serving 0") {
            assert!(text.contains("orchestrator_segmenter_replicas 1"), "{text}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the serving gauge never showed the outage:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

async fn scrape(port: u16) -> String {
    reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// METRICS_ADDR that cannot be listened on (in use) stops the start, naming the variable, as the segmenter's does:
/// it used to log a warning and run without metrics, unseen by the autoscalers that read them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_address_in_use_stops_the_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = orchestrator_svc::Config::for_tests(dir.path(), "http://127.0.0.1:9");
    config.metrics_addr = taken.local_addr().unwrap().to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = orchestrator_svc::run(config, listener, std::future::pending())
        .await
        .unwrap_err();
    assert!(
        err.to_string().starts_with("METRICS_ADDR 127.0.0.1:"),
        "{err}"
    );
}
