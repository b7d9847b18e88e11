//! Client-side balancing over several segmenter replicas: calls spread over all of them, a replica that goes away
//! mid-job costs no item, and items fail only when every replica refuses.

use palette_testing as common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::fake_segmenter;
use common::orchestrator::{is_terminal, photo_jpeg, seed_spec, start};
use common::partition::Partition;
use palette_proto::orchestrator::v1::ItemState;

fn calls(fake: &fake_segmenter::FakeSegmenter) -> usize {
    fake.counters.segment_calls.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stopped_mid_job_costs_no_item() {
    let a = fake_segmenter::start().await;
    let b = fake_segmenter::start().await;
    for fake in [&a, &b] {
        fake.faults.delay_ms.store(40, Ordering::SeqCst);
    }
    let mut orch = start(&format!("{},{}", a.url, b.url), |c| {
        c.limits.batch_concurrency = 2;
        c.segmenter.mask_cache_mb = 0;
        c.segmenter.segmenter_attempts = 4;
        c.segmenter.segmenter_resolve_interval_sec = 60;
    })
    .await;
    const IMAGES: u32 = 24;
    for idx in 0..IMAGES {
        orch.put_input("test-user", "two-replicas", idx, photo_jpeg(32, 32))
            .await;
    }
    orch.client
        .submit_job(seed_spec("two-replicas", IMAGES))
        .await
        .unwrap();

    // Both replicas take calls; then one goes away while the job runs.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while calls(&a) == 0 || calls(&b) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "calls never reached both replicas: a={} b={}",
            calls(&a),
            calls(&b)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let done_before = calls(&a) + calls(&b);
    assert!(
        (done_before as u32) < IMAGES,
        "the job finished before the stop"
    );
    a.stop().await;
    let a_at_stop = calls(&a);

    let job = orch.wait_for("two-replicas", is_terminal).await;
    for item in &job.items {
        assert_eq!(item.state, ItemState::Completed as i32, "{item:?}");
    }
    assert_eq!(calls(&a), a_at_stop, "a stopped replica took no call");
    assert!(calls(&b) > 0);
    assert!(
        calls(&a) + calls(&b) >= IMAGES as usize,
        "every image segmented"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_fail_only_when_every_replica_refuses() {
    // The discard port on two loopback addresses: nothing listens there, and unlike a probed free port no other
    // test's server can be handed it meanwhile.
    let closed = ["http://127.0.0.1:9", "http://127.0.0.2:9"];
    let mut orch = start(&closed.join(","), |c| c.segmenter.segmenter_attempts = 2).await;
    orch.put_input("test-user", "all-down", 0, photo_jpeg(32, 32))
        .await;
    orch.client
        .submit_job(seed_spec("all-down", 1))
        .await
        .unwrap();
    let job = orch.wait_for("all-down", is_terminal).await;
    let item = &job.items[0];
    assert_eq!(item.state, ItemState::Failed as i32, "{item:?}");
    assert_eq!(item.error_code, "segmenter_unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_name_is_resolved_to_its_replicas() {
    // `localhost` may resolve to ::1 as well, where nothing listens: that address is left out.
    let fake = fake_segmenter::start().await;
    let port = fake.url.rsplit(':').next().unwrap().to_string();
    let mut orch = start(&format!("dns:///localhost:{port}"), |_| {}).await;
    orch.put_input("test-user", "by-name", 0, photo_jpeg(32, 32))
        .await;
    orch.client
        .submit_job(seed_spec("by-name", 1))
        .await
        .unwrap();
    let job = orch.wait_for("by-name", is_terminal).await;
    assert_eq!(
        job.items[0].state,
        ItemState::Completed as i32,
        "{:?}",
        job.items[0]
    );
    assert_eq!(calls(&fake), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_not_serving_replica_leaves_the_rotation_until_it_serves_again() {
    let a = fake_segmenter::start().await;
    let b = fake_segmenter::start().await;
    // b accepts connections but reports NOT_SERVING (warming up, or after a provider failure).
    b.set_serving(false).await;
    let mut orch = start(&format!("{},{}", a.url, b.url), |c| {
        c.segmenter.mask_cache_mb = 0;
        c.segmenter.segmenter_resolve_interval_sec = 1;
    })
    .await;
    const IMAGES: u32 = 12;
    for idx in 0..IMAGES {
        orch.put_input("test-user", "b-down", idx, photo_jpeg(32, 32))
            .await;
    }
    orch.client
        .submit_job(seed_spec("b-down", IMAGES))
        .await
        .unwrap();
    let job = orch.wait_for("b-down", is_terminal).await;
    assert!(
        job.items
            .iter()
            .all(|i| i.state == ItemState::Completed as i32)
    );
    assert_eq!(calls(&a), IMAGES as usize);
    assert_eq!(calls(&b), 0, "a NOT_SERVING replica got calls");

    // Serving again: a later resolver round (every second here) puts it back. The round whose probe finds b
    // SERVING adds it before the next round starts, so the second probe of b from now on marks it back in rotation.
    b.set_serving(true).await;
    let probes = b.counters.health_checks.load(Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while b.counters.health_checks.load(Ordering::SeqCst) < probes + 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the resolver stopped probing b"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Back in the balancer, b still has to connect before the balancer picks it: jobs until it gets a call (a
    // loaded machine may finish the first job on a alone while b's connection is being made).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for round in 0.. {
        let job_id = format!("b-back-{round}");
        for idx in 0..IMAGES {
            orch.put_input("test-user", &job_id, idx, photo_jpeg(32, 32))
                .await;
        }
        orch.client
            .submit_job(seed_spec(&job_id, IMAGES))
            .await
            .unwrap();
        orch.wait_for(&job_id, is_terminal).await;
        if calls(&b) > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "b never came back: a={} b={}",
            calls(&a),
            calls(&b)
        );
    }
}

/// The resolver's health probes speak TLS like the calls: over https://, a NOT_SERVING replica is still left out
/// (were the probes failing the handshake, every replica would look down and all would stay in rotation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_a_not_serving_replica_still_leaves_the_rotation() {
    let pki = palette_testing::tls::Pki::generate();
    let a = fake_segmenter::start_tls(&pki).await;
    let b = fake_segmenter::start_tls(&pki).await;
    b.set_serving(false).await;
    let mut orch = start(&format!("{},{}", a.url, b.url), |c| {
        c.segmenter.mask_cache_mb = 0;
        c.segmenter.segmenter_tls_ca = Some(pki.path("ca.pem"));
    })
    .await;
    const IMAGES: u32 = 8;
    for idx in 0..IMAGES {
        orch.put_input("test-user", "tls-b-down", idx, photo_jpeg(32, 32))
            .await;
    }
    orch.client
        .submit_job(seed_spec("tls-b-down", IMAGES))
        .await
        .unwrap();
    let job = orch.wait_for("tls-b-down", is_terminal).await;
    assert!(
        job.items
            .iter()
            .all(|i| i.state == ItemState::Completed as i32),
        "{:?}",
        job.items
    );
    assert_eq!(calls(&a), IMAGES as usize);
    assert_eq!(calls(&b), 0, "a NOT_SERVING replica got calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_over_the_segmenters_message_limit_is_not_retried() {
    // RESOURCE_EXHAUSTED is retried (a full queue), unless the segmenter says the reply is too large: the same
    // request gets the same answer from every replica, each time after running the whole model.
    let segmenter = fake_segmenter::start().await;
    segmenter
        .faults
        .reply_too_large
        .store(true, Ordering::SeqCst);
    let mut orch = start(&segmenter.url, |c| c.segmenter.segmenter_attempts = 4).await;
    orch.put_input("test-user", "too-large", 0, photo_jpeg(32, 32))
        .await;
    orch.client
        .submit_job(seed_spec("too-large", 1))
        .await
        .unwrap();
    let job = orch.wait_for("too-large", is_terminal).await;
    let item = &job.items[0];
    assert_eq!(item.state, ItemState::Failed as i32, "{item:?}");
    assert!(
        item.error.contains("over the message limit"),
        "{}",
        item.error
    );
    assert_eq!(calls(&segmenter), 1, "one call, no retries");
}

/// A replica that vanishes without closing its connections (no FIN, no RST: its host lost, a partition) holds
/// the calls in flight on it: without HTTP/2 pings they waited for SEGMENTER_TIMEOUT_SEC and failed their items
/// (DEADLINE_EXCEEDED is not retried). The unanswered ping (SEGMENTER_KEEPALIVE_SEC) closes the connection and the
/// calls go to the other replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_gone_silent_mid_call_costs_a_retry_not_the_item() {
    let a = fake_segmenter::start().await;
    let b = fake_segmenter::start().await;
    // a answers late, so calls are in flight on it when it goes silent.
    a.faults.delay_ms.store(3_000, Ordering::SeqCst);
    let a_partition = Partition::start(&a.url).await;
    let mut orch = start(&format!("{},{}", a_partition.url, b.url), |c| {
        c.limits.batch_concurrency = 4;
        c.segmenter.mask_cache_mb = 0;
        c.segmenter.segmenter_attempts = 4;
        c.segmenter.segmenter_timeout_sec = 60;
        c.segmenter.segmenter_keepalive_sec = 1;
        c.segmenter.segmenter_resolve_interval_sec = 60;
    })
    .await;
    const IMAGES: u32 = 8;
    for idx in 0..IMAGES {
        orch.put_input("test-user", "silent", idx, photo_jpeg(32, 32))
            .await;
    }
    orch.client
        .submit_job(seed_spec("silent", IMAGES))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while calls(&a) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no call reached a");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a_partition.cut();
    let cut_at = std::time::Instant::now();
    let job = orch.wait_for("silent", is_terminal).await;
    for item in &job.items {
        assert_eq!(item.state, ItemState::Completed as i32, "{item:?}");
    }
    // Well within the 60 s deadline the calls on a would otherwise have waited for.
    assert!(
        cut_at.elapsed() < Duration::from_secs(30),
        "{:?}",
        cut_at.elapsed()
    );
}
