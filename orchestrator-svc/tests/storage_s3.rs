//! The S3 backend against a real S3 server (SeaweedFS), configured exactly as for R2: static credentials,
//! path-style, checksums only when required.

use palette_testing as common;

use std::time::Duration;

use bytes::Bytes;
use orchestrator_svc::storage::{
    AccessCheck, ObjectMeta, ObjectStore, S3Settings, S3Store, StorageError,
};

fn store(weed: &common::seaweed::Seaweed, bucket: &str) -> S3Store {
    S3Store::new(S3Settings {
        endpoint_url: Some(weed.endpoint.clone()),
        region: "us-east-1".into(),
        bucket: bucket.into(),
        access_key_id: common::seaweed::ACCESS_KEY.into(),
        secret_access_key: common::seaweed::SECRET_KEY.into(),
        attempt_timeout: Duration::from_secs(10),
        max_attempts: 3,
    })
}

/// weed mini opens its port before the bucket exists: wait until a HEAD answers "not found".
async fn wait_ready(store: &S3Store) {
    for _ in 0..150 {
        if store.head("probe/none").await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "SeaweedFS S3 never became ready: {:?}",
        store.head("probe/none").await
    );
}

#[tokio::test]
async fn s3_backend_round_trip_against_seaweedfs() {
    let Some(weed) = common::seaweed::start("palette-test") else {
        return;
    };
    let store = store(&weed, &weed.bucket);
    wait_ready(&store).await;

    let key = "masks/test-user/test-job/wooden_floor/0_1.png";
    assert_eq!(store.head(key).await.unwrap(), None);
    assert!(matches!(
        store.get(key).await,
        Err(StorageError::NotFound(_))
    ));

    let body = Bytes::from((0..200_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
    store.put(key, body.clone(), "image/png").await.unwrap();
    assert_eq!(store.get(key).await.unwrap(), body);
    assert_eq!(
        store.head(key).await.unwrap(),
        Some(ObjectMeta { size: 200_000 })
    );
    assert!(store.exists(key).await.unwrap());

    let content_type = store
        .client()
        .head_object()
        .bucket(&weed.bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    assert_eq!(content_type.content_type(), Some("image/png"));

    assert!(matches!(
        store.get("../escape").await,
        Err(StorageError::InvalidKey(_))
    ));
}

/// `put_new` is create-only against a real S3 server (`If-None-Match: *`): of writers racing for one key exactly
/// one writes, and the object is that writer's. What makes a queue job's first recorded item end the only one.
#[tokio::test]
async fn put_new_writes_only_where_no_object_is() {
    let Some(weed) = common::seaweed::start("palette-test") else {
        return;
    };
    let store = std::sync::Arc::new(store(&weed, &weed.bucket));
    wait_ready(&store).await;
    let key = "jobs-state/u/j/h/0.json";
    let racing = (0..8u8).map(|n| {
        let store = store.clone();
        tokio::spawn(async move {
            let created = store
                .put_new(key, Bytes::from(vec![b'0' + n]), "application/json")
                .await
                .unwrap();
            (n, created)
        })
    });
    let winners: Vec<u8> = futures::future::join_all(racing)
        .await
        .into_iter()
        .map(Result::unwrap)
        .filter_map(|(n, created)| created.then_some(n))
        .collect();
    assert_eq!(winners.len(), 1, "exactly one writer: {winners:?}");
    assert_eq!(
        store.get(key).await.unwrap(),
        Bytes::from(vec![b'0' + winners[0]])
    );
    // A plain put still overwrites.
    store
        .put(key, Bytes::from_static(b"x"), "application/json")
        .await
        .unwrap();
    assert!(
        !store
            .put_new(key, Bytes::from_static(b"y"), "application/json")
            .await
            .unwrap()
    );
    assert_eq!(store.get(key).await.unwrap(), Bytes::from_static(b"x"));
}

#[tokio::test]
async fn a_missing_bucket_is_an_outage_not_a_missing_object() {
    let Some(weed) = common::seaweed::start("palette-test") else {
        return;
    };
    wait_ready(&store(&weed, &weed.bucket)).await;
    // A wrong R2_BUCKET_NAME: every item would have failed input_missing, as if no photo had been uploaded.
    let wrong = store(&weed, "no-such-bucket");
    let key = "inputs/test-user/test-job/0.jpg";
    let says_bucket = |e: &StorageError| {
        matches!(e, StorageError::Unavailable { .. }) && e.to_string().contains("NoSuchBucket")
    };
    let head = wrong.head(key).await.unwrap_err();
    assert!(says_bucket(&head), "{head:?}");
    let get = wrong.get(key).await.unwrap_err();
    assert!(says_bucket(&get), "{get:?}");
}

/// The start-up probe: refused only for what the service says is wrong with the credentials or the bucket (the
/// process then does not start); an unreachable store is only unreachable (it starts and items retry).
#[tokio::test]
async fn the_start_up_access_check_refuses_wrong_credentials_and_buckets_only() {
    let Some(weed) = common::seaweed::start("palette-test") else {
        return;
    };
    let good = store(&weed, &weed.bucket);
    wait_ready(&good).await;
    assert_eq!(good.check_access().await, AccessCheck::Usable);
    // Even once the probed key exists (someone wrote it): still usable.
    good.put(
        "inputs/.palette-access-check",
        Bytes::from_static(b"x"),
        "text/plain",
    )
    .await
    .unwrap();
    assert_eq!(good.check_access().await, AccessCheck::Usable);

    let with = |access_key_id: &str, secret: &str, bucket: &str, endpoint: &str| {
        S3Store::new(S3Settings {
            endpoint_url: Some(endpoint.to_string()),
            region: "us-east-1".into(),
            bucket: bucket.into(),
            access_key_id: access_key_id.into(),
            secret_access_key: secret.into(),
            attempt_timeout: Duration::from_secs(5),
            max_attempts: 1,
        })
    };
    let refused = |check: AccessCheck, code: &str| match check {
        AccessCheck::Refused(why) => assert!(why.contains(code), "{why}"),
        other => panic!("expected a refusal naming {code}, got {other:?}"),
    };
    // The compose file's fallback when R2 keys are unset: another service's key id.
    refused(
        with("nobody", "wrong", &weed.bucket, &weed.endpoint)
            .check_access()
            .await,
        "InvalidAccessKeyId",
    );
    refused(
        with(
            common::seaweed::ACCESS_KEY,
            "wrong",
            &weed.bucket,
            &weed.endpoint,
        )
        .check_access()
        .await,
        "SignatureDoesNotMatch",
    );
    refused(
        store(&weed, "no-such-bucket").check_access().await,
        "NoSuchBucket",
    );
    // Nothing listens there: no answer about the credentials, so not a refusal.
    let closed = format!("http://127.0.0.1:{}", common::ports::free_port());
    let unreachable = with(
        common::seaweed::ACCESS_KEY,
        common::seaweed::SECRET_KEY,
        &weed.bucket,
        &closed,
    )
    .check_access()
    .await;
    assert!(
        matches!(unreachable, AccessCheck::Unreachable(_)),
        "{unreachable:?}"
    );
}

#[tokio::test]
async fn unsigned_payloads_are_stored_and_https_endpoints_send_them() {
    // Over HTTPS (R2, AWS) PUT bodies go unsigned (TLS protects them; no SHA-256 of every stored byte); here the
    // same request over plain HTTP, to check that an S3 server takes it and stores the body as sent.
    let Some(weed) = common::seaweed::start("palette-unsigned") else {
        return;
    };
    let signed = store(&weed, &weed.bucket);
    assert!(signed.signs_payload(), "plain HTTP keeps signed payloads");
    let unsigned = signed.with_payload_signing(false);
    wait_ready(&unsigned).await;
    let body = Bytes::from((0..300_000u32).map(|i| (i % 253) as u8).collect::<Vec<_>>());
    let key = "outputs/u/j/paint/0.jpg";
    unsigned.put(key, body.clone(), "image/jpeg").await.unwrap();
    assert_eq!(unsigned.get(key).await.unwrap(), body);

    let https = |endpoint: Option<&str>| {
        S3Store::new(S3Settings {
            endpoint_url: endpoint.map(str::to_string),
            region: "auto".into(),
            bucket: "b".into(),
            access_key_id: "k".into(),
            secret_access_key: "s".into(),
            attempt_timeout: Duration::from_secs(5),
            max_attempts: 1,
        })
    };
    assert!(!https(Some("https://objects.example")).signs_payload());
    assert!(
        !https(None).signs_payload(),
        "the SDK's AWS endpoint is HTTPS"
    );
    assert!(https(Some("http://seaweedfs:8333")).signs_payload());
}

#[tokio::test]
async fn wrong_credentials_are_unavailable_not_not_found() {
    let Some(weed) = common::seaweed::start("palette-test") else {
        return;
    };
    wait_ready(&store(&weed, &weed.bucket)).await;
    let bad = S3Store::new(S3Settings {
        endpoint_url: Some(weed.endpoint.clone()),
        region: "us-east-1".into(),
        bucket: weed.bucket.clone(),
        access_key_id: "nobody".into(),
        secret_access_key: "wrong".into(),
        attempt_timeout: Duration::from_secs(5),
        max_attempts: 1,
    });
    assert!(matches!(
        bad.get("inputs/u/j/0.jpg").await,
        Err(StorageError::Unavailable { .. })
    ));
}

#[tokio::test]
async fn an_object_over_the_cap_is_refused_from_its_content_length() {
    let Some(weed) = common::seaweed::start("palette-cap") else {
        return;
    };
    let store = store(&weed, &weed.bucket);
    wait_ready(&store).await;
    store
        .put(
            "inputs/u/j/0.jpg",
            Bytes::from(vec![7u8; 20_000]),
            "image/jpeg",
        )
        .await
        .unwrap();
    match store.get_at_most("inputs/u/j/0.jpg", 10_000).await {
        Err(StorageError::TooLarge { size, limit, .. }) => {
            assert_eq!((size, limit), (Some(20_000), 10_000));
        }
        other => panic!("{other:?}"),
    }
    let whole = store.get_at_most("inputs/u/j/0.jpg", 20_000).await.unwrap();
    assert_eq!(whole.len(), 20_000);
}

/// This process's CPU seconds (utime + stime from /proc/self/stat; 0 elsewhere).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    (fields.get(11).unwrap_or(&0.0) + fields.get(12).unwrap_or(&0.0)) / 100.0
}

/// What signing PUT bodies costs the orchestrator: a 12 MP photo's objects (~20 MB in 14 PUTs: ten mask PNGs,
/// three output JPEGs, a preview) stored signed and unsigned, alternately, CPU seconds of this process (SeaweedFS
/// runs in its own). Measurement, not a check: `cargo test --release -p orchestrator-svc --test storage_s3 --
/// --ignored --nocapture unsigned_payload_cpu`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn unsigned_payload_cpu() {
    let Some(weed) = common::seaweed::start("palette-sign-cost") else {
        return;
    };
    let signed = store(&weed, &weed.bucket);
    wait_ready(&signed).await;
    let unsigned = store(&weed, &weed.bucket).with_payload_signing(false);
    // Incompressible-ish bytes, sized as the bench's 12 MP photo stores them.
    let sizes = [1_450_000usize; 10]
        .into_iter()
        .chain([2_000_000; 3])
        .chain([12_000]);
    let bodies: Vec<Bytes> = sizes
        .enumerate()
        .map(|(n, len)| {
            Bytes::from(
                (0..len)
                    .map(|i| ((i as u32 ^ n as u32).wrapping_mul(2_654_435_761) >> 24) as u8)
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    let mb = bodies.iter().map(Bytes::len).sum::<usize>() as f64 / 1e6;
    let (mut s, mut u) = (Vec::new(), Vec::new());
    for round in 0..10 {
        for (label, store, out) in [("s", &signed, &mut s), ("u", &unsigned, &mut u)] {
            let t = cpu_seconds();
            for (n, body) in bodies.iter().enumerate() {
                let key = format!("masks/u/j/wall/{round}_{label}{n}.png");
                store.put(&key, body.clone(), "image/png").await.unwrap();
            }
            out.push((cpu_seconds() - t) * 1e3);
        }
    }
    let range = |v: &[f64]| {
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, 0.0f64), |(a, b), &x| (a.min(x), b.max(x)));
        format!(
            "{lo:.0}-{hi:.0} ms (mean {:.1})",
            v.iter().sum::<f64>() / v.len() as f64
        )
    };
    let ratio = s.iter().sum::<f64>() / u.iter().sum::<f64>().max(1e-9);
    println!(
        "{mb:.1} MB in {} PUTs, CPU of this process per photo: signed {}, unsigned {}: {ratio:.2}x",
        bodies.len(),
        range(&s),
        range(&u)
    );
}

/// The service itself: a bucket the store says does not exist stops `run` at start-up with an error naming the
/// variables to check, instead of a healthy-looking server whose every item fails.
#[tokio::test]
async fn the_orchestrator_does_not_start_on_a_bucket_the_store_refuses() {
    let Some(weed) = common::seaweed::start("palette-test") else {
        return;
    };
    wait_ready(&store(&weed, &weed.bucket)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = orchestrator_svc::Config::for_tests(dir.path(), "http://127.0.0.1:9");
    config.storage.storage_backend = orchestrator_svc::config::StorageBackend::S3;
    config.storage.s3_endpoint_url = Some(weed.endpoint.clone());
    config.storage.r2_access_key_id = Some(common::seaweed::ACCESS_KEY.into());
    config.storage.r2_secret_access_key = Some(common::seaweed::SECRET_KEY.into());
    config.storage.r2_bucket_name = Some("no-such-bucket".into());
    // Asked twice, a second apart, rather than for the default 15 s.
    config.storage.storage_check_sec = 2;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let unchecked = orchestrator_svc::Config {
        storage: orchestrator_svc::config::StorageArgs {
            storage_check_sec: 0,
            ..config.storage.clone()
        },
        ..config.clone()
    };
    let started = std::time::Instant::now();
    let err = orchestrator_svc::run(config, listener, std::future::ready(()))
        .await
        .unwrap_err();
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let text = err.to_string();
    assert!(
        matches!(err, orchestrator_svc::StartupError::StorageAccess(_)),
        "{err:?}"
    );
    assert!(
        text.contains("R2_BUCKET_NAME") && text.contains("NoSuchBucket"),
        "{text}"
    );
    // STORAGE_CHECK_SEC=0: no check; the service starts (and here stops at once).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    orchestrator_svc::run(unchecked, listener, std::future::ready(()))
        .await
        .expect("started without the check");
}

/// A fault-injection S3 endpoint: the n-th request it gets (0-based, over all connections) is answered with
/// `answer(n)`'s bytes, and the connection closes after an answer whose flag is false. The store pointed at it, and
/// how many requests it answered.
fn scripted_s3(
    answer: impl Fn(usize) -> (Vec<u8>, bool) + Send + Sync + 'static,
) -> (S3Store, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let endpoint = format!("http://{}", std_listener.local_addr().unwrap());
    let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
    let answers = Arc::new(AtomicUsize::new(0));
    let (counted, answer) = (answers.clone(), Arc::new(answer));
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (counted, answer) = (counted.clone(), answer.clone());
            tokio::spawn(async move {
                loop {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let (bytes, keep_open) = answer(counted.fetch_add(1, Ordering::SeqCst));
                    if socket.write_all(&bytes).await.is_err() || !keep_open {
                        let _ = socket.flush().await;
                        return;
                    }
                }
            });
        }
    });
    let store = S3Store::new(S3Settings {
        endpoint_url: Some(endpoint),
        region: "us-east-1".into(),
        bucket: "b".into(),
        access_key_id: "k".into(),
        secret_access_key: "s".into(),
        attempt_timeout: Duration::from_secs(5),
        max_attempts: 3,
    });
    (store, answers)
}

/// The SDK retries a GET until its response headers arrive; a body cut short after that (a reset mid-photo, the
/// store's connection dropped) used to fail the item `storage_unavailable` for good. Fetched again, whole. A fault
/// injection: an HTTP server that declares 1000 bytes and closes after 500 on its first answer.
#[tokio::test]
async fn a_body_cut_short_is_fetched_again() {
    let body: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    let served = body.clone();
    let (store, answers) = scripted_s3(move |n| {
        let mut answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: image/jpeg\r\n\r\n",
            served.len()
        )
        .into_bytes();
        // The first answer closes after half the declared length: the client sees the body end early.
        answer.extend_from_slice(if n == 0 { &served[..500] } else { &served[..] });
        (answer, false)
    });
    let got = store.get_at_most("inputs/u/j/0.jpg", 10_000).await.unwrap();
    assert_eq!(got, Bytes::from(body));
    assert_eq!(answers.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// R2 answers a bucket over its request rate with HTTP 429, which the SDK's classifiers did not retry (they know S3's
/// 503 SlowDown): the item failed `storage_unavailable` at the first answer. Retried with back-off now. A fault
/// injection: an HTTP server whose first answer is a 429.
#[tokio::test]
async fn a_429_is_retried() {
    let (store, answers) = scripted_s3(|n| {
        let answer: &[u8] = if n == 0 {
            b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 0\r\n\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: image/jpeg\r\n\r\nphoto"
        };
        (answer.to_vec(), true)
    });
    let got = store.get_at_most("inputs/u/j/0.jpg", 10_000).await.unwrap();
    assert_eq!(got, Bytes::from_static(b"photo"));
    assert_eq!(answers.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// A service without conditional writes answers `If-None-Match` with 501 NotImplemented: `put_new` then writes as
/// `put` does (last writer wins, as before it existed) instead of failing every item record as an outage. A fault
/// injection: an HTTP server whose first answer is that 501.
#[tokio::test]
async fn put_new_on_a_service_without_conditional_writes_writes_plainly() {
    let (store, answers) = scripted_s3(|n| {
        let answer = if n == 0 {
            let error = r#"<?xml version="1.0" encoding="UTF-8"?><Error><Code>NotImplemented</Code><Message>not here</Message></Error>"#;
            format!(
                "HTTP/1.1 501 Not Implemented\r\ncontent-type: application/xml\r\ncontent-length: {}\r\n\r\n{error}",
                error.len()
            )
        } else {
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_string()
        };
        (answer.into_bytes(), false)
    });
    let created = store
        .put_new(
            "jobs-state/u/j/h/0.json",
            Bytes::from_static(b"{}"),
            "application/json",
        )
        .await
        .unwrap();
    assert!(created);
    assert_eq!(answers.load(std::sync::atomic::Ordering::SeqCst), 2);
}
