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
