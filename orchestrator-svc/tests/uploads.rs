//! An item's object writes overlap: on a remote store each is a round trip, and one after another they were most
//! of a small photo's time. Local storage behind a store whose puts take 150 ms (fault injection: a slow R2),
//! counting how many run at once; the seed's job (three concepts, two instances each, one rule).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use orchestrator_svc::jobs::{ItemRunner, JobKey, Pipeline};
use orchestrator_svc::storage::{LocalStore, ObjectMeta, ObjectStore, StorageError};
use palette_proto::orchestrator::v1::ItemState;
use palette_testing::fake_segmenter;
use palette_testing::orchestrator::{SEED_USER, photo_jpeg, seed_spec};

#[path = "common/job_service.rs"]
mod job_service;

const PUT_DELAY: Duration = Duration::from_millis(150);

#[derive(Debug)]
struct SlowPuts {
    inner: LocalStore,
    in_flight: Mutex<(usize, usize)>,
    puts: Mutex<usize>,
}

#[async_trait]
impl ObjectStore for SlowPuts {
    async fn get_at_most(&self, key: &str, max_bytes: u64) -> Result<Bytes, StorageError> {
        self.inner.get_at_most(key, max_bytes).await
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        self.inner.head(key).await
    }
    async fn put(&self, key: &str, body: Bytes, content_type: &str) -> Result<(), StorageError> {
        {
            let mut n = self.in_flight.lock().unwrap();
            n.0 += 1;
            n.1 = n.1.max(n.0);
        }
        tokio::time::sleep(PUT_DELAY).await;
        let stored = self.inner.put(key, body, content_type).await;
        self.in_flight.lock().unwrap().0 -= 1;
        *self.puts.lock().unwrap() += 1;
        stored
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_items_writes_to_a_slow_store_overlap() {
    let segmenter = fake_segmenter::start().await;
    segmenter
        .faults
        .second_instance
        .store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SlowPuts {
        inner: LocalStore::new(dir.path()).unwrap(),
        in_flight: Mutex::new((0, 0)),
        puts: Mutex::new(0),
    });
    store
        .inner
        .put(
            &format!("inputs/{SEED_USER}/up-1/0.jpg"),
            Bytes::from(photo_jpeg(96, 64)),
            "image/jpeg",
        )
        .await
        .unwrap();

    let client = job_service::segmenter_at(&segmenter.url, Duration::from_secs(10));
    let runner = ItemRunner::new(store.clone(), Arc::new(client), job_service::INPUTS, 0);
    let pipeline = Arc::new(Pipeline::new(runner, None, 1));
    let service = job_service::service_of(pipeline, Default::default(), 10);

    let started = Instant::now();
    service.submit(&seed_spec("up-1", 1)).await.unwrap();
    let key = JobKey {
        user_id: SEED_USER.into(),
        job_id: "up-1".into(),
    };
    let job = loop {
        let job = service.get(&key).unwrap().snapshot();
        if palette_testing::orchestrator::is_terminal(&job) {
            break job;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{job:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let elapsed = started.elapsed();
    let item = &job.items[0];
    assert_eq!(item.state, ItemState::Completed as i32, "{item:?}");

    // 6 instance masks, the masks record, the output, the preview (and the job's photos record).
    let puts = *store.puts.lock().unwrap();
    assert!(puts >= 9, "{puts} writes");
    let overlapped = store.in_flight.lock().unwrap().1;
    assert!(overlapped >= 6, "at most {overlapped} writes at once");
    // Serial, the writes alone took puts x 150 ms; here the masks go together, then the rest.
    assert!(
        elapsed < PUT_DELAY * (puts as u32) * 2 / 3,
        "{puts} writes of {PUT_DELAY:?} took {elapsed:?}"
    );
}

/// A store whose HEAD panics: a bug in an item's async steps (not its CPU work, which comes back as an error).
#[derive(Debug)]
struct PanickingHead(LocalStore);

#[async_trait]
impl ObjectStore for PanickingHead {
    async fn get_at_most(&self, key: &str, max_bytes: u64) -> Result<Bytes, StorageError> {
        self.0.get_at_most(key, max_bytes).await
    }
    async fn head(&self, _key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        panic!("a bug in the store");
    }
    async fn put(&self, key: &str, body: Bytes, content_type: &str) -> Result<(), StorageError> {
        self.0.put(key, body, content_type).await
    }
}

/// A panic in an item's async steps used to unwind out of its task: the item stayed RUNNING for ever, its job never
/// ended (no callback, no end to WatchJob, never forgotten). It ends FAILED `internal`, and the job with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_an_item_fails_the_item_not_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(PanickingHead(LocalStore::new(dir.path()).unwrap()));
    let client = job_service::segmenter_at("http://127.0.0.1:1", Duration::from_secs(1));
    let runner = ItemRunner::new(store, Arc::new(client), job_service::INPUTS, 0);
    let pipeline = Arc::new(Pipeline::new(runner, None, 1));
    let service = job_service::service_of(pipeline, Default::default(), 10);
    service.submit(&seed_spec("panics", 2)).await.unwrap();
    let key = JobKey {
        user_id: SEED_USER.into(),
        job_id: "panics".into(),
    };
    let started = Instant::now();
    let job = loop {
        let job = service.get(&key).unwrap().snapshot();
        if palette_testing::orchestrator::is_terminal(&job) {
            break job;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{job:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for item in &job.items {
        assert_eq!(item.state, ItemState::Failed as i32, "{item:?}");
        assert_eq!(item.error_code, "internal");
        assert!(item.error.contains("a bug in the store"), "{}", item.error);
    }
}
