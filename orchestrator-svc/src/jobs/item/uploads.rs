//! An item's object writes, several at a time. On R2 a put is a round trip of tens of milliseconds and a photo
//! writes one object per instance mask, per rule, its masks record and its preview (~28 for the interior preset):
//! one after another they were most of a small photo's time, with the CPU idle. Writes run as tasks while the item
//! goes on with its CPU work; `flush` waits for them, so whatever the item does after a flush (its masks record,
//! its result) comes after everything before it is stored.

use bytes::Bytes;
use tokio::task::JoinSet;
use tracing::Instrument;

use super::ItemError;
use crate::storage::{SharedStore, StorageError};

/// Writes in flight for one item at most; BATCH_CONCURRENCY items make that many times this many connections.
pub(super) const MAX_PUTS: usize = 16;
/// Bytes of bodies being written an item holds at most, besides the one it starts: what a slow store adds to an
/// item's memory (a 12 MP photo's output is a few MB as JPEG, tens of MB as a cut-out PNG, which then goes alone).
pub(super) const MAX_PENDING_BYTES: usize = 16 << 20;

/// The writes one item started and has not seen end. Dropped (the item failed or was cancelled), it aborts them.
pub(super) struct Uploads {
    store: SharedStore,
    running: JoinSet<Result<usize, StorageError>>,
    pending_bytes: usize,
}

impl Uploads {
    pub fn new(store: SharedStore) -> Self {
        Uploads {
            store,
            running: JoinSet::new(),
            pending_bytes: 0,
        }
    }

    /// Starts writing `body` at `key`, first waiting while MAX_PUTS writes or MAX_PENDING_BYTES are in flight. A
    /// write that failed meanwhile is this call's error (the item fails as if that write had been awaited).
    pub async fn put(
        &mut self,
        key: String,
        body: Bytes,
        content_type: &'static str,
    ) -> Result<(), ItemError> {
        let len = body.len();
        while !self.running.is_empty()
            && (self.running.len() >= MAX_PUTS || self.pending_bytes + len > MAX_PENDING_BYTES)
        {
            self.wait_for_one().await?;
        }
        self.pending_bytes += len;
        let store = self.store.clone();
        let write = async move { store.put(&key, body, content_type).await.map(|()| len) };
        // In the item's span: the store's logs and spans name the job and the image.
        self.running
            .spawn(write.instrument(tracing::Span::current()));
        Ok(())
    }

    /// Waits until every write started so far is stored; the first that failed is the error.
    pub async fn flush(&mut self) -> Result<(), ItemError> {
        while !self.running.is_empty() {
            self.wait_for_one().await?;
        }
        Ok(())
    }

    async fn wait_for_one(&mut self) -> Result<(), ItemError> {
        match self.running.join_next().await {
            Some(Ok(Ok(len))) => {
                self.pending_bytes -= len;
                Ok(())
            }
            Some(Ok(Err(e))) => Err(e.into()),
            Some(Err(join)) => Err(ItemError::Worker(join)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::Mutex;
    use std::time::Duration;

    use async_trait::async_trait;

    use super::*;
    use crate::storage::{ObjectMeta, ObjectStore};

    /// A store whose puts take `delay` and that records how many ran at once (fault injection: a slow remote
    /// store), failing the put of `fail_key`.
    #[derive(Debug, Default)]
    struct SlowStore {
        delay: Duration,
        fail_key: Option<String>,
        state: Mutex<State>,
    }

    #[derive(Debug, Default)]
    struct State {
        in_flight: usize,
        max_in_flight: usize,
        max_bytes_in_flight: usize,
        bytes_in_flight: usize,
        stored: Vec<String>,
    }

    #[async_trait]
    impl ObjectStore for SlowStore {
        async fn get_at_most(&self, key: &str, _max: u64) -> Result<Bytes, StorageError> {
            Err(StorageError::NotFound(key.to_string()))
        }
        async fn head(&self, _key: &str) -> Result<Option<ObjectMeta>, StorageError> {
            Ok(None)
        }
        async fn put(&self, key: &str, body: Bytes, _ct: &str) -> Result<(), StorageError> {
            {
                let mut s = self.state.lock().unwrap();
                s.in_flight += 1;
                s.bytes_in_flight += body.len();
                s.max_in_flight = s.max_in_flight.max(s.in_flight);
                s.max_bytes_in_flight = s.max_bytes_in_flight.max(s.bytes_in_flight);
            }
            tokio::time::sleep(self.delay).await;
            let mut s = self.state.lock().unwrap();
            s.in_flight -= 1;
            s.bytes_in_flight -= body.len();
            if self.fail_key.as_deref() == Some(key) {
                return Err(StorageError::unavailable(key, "injected"));
            }
            s.stored.push(key.to_string());
            Ok(())
        }
    }

    fn slow(delay_ms: u64, fail_key: Option<&str>) -> Arc<SlowStore> {
        Arc::new(SlowStore {
            delay: Duration::from_millis(delay_ms),
            fail_key: fail_key.map(str::to_string),
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn writes_overlap_up_to_the_cap_and_flush_waits_for_all_of_them() {
        let store = slow(50, None);
        let mut uploads = Uploads::new(store.clone());
        let started = std::time::Instant::now();
        for n in 0..3 * MAX_PUTS {
            let key = format!("masks/{n}.png");
            uploads
                .put(key, Bytes::from_static(b"png"), "image/png")
                .await
                .unwrap();
        }
        uploads.flush().await.unwrap();
        let s = store.state.lock().unwrap();
        assert_eq!(s.stored.len(), 3 * MAX_PUTS);
        assert_eq!(s.max_in_flight, MAX_PUTS);
        // Three waves of 50 ms, not 48 writes of 50 ms one after another (2.4 s).
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn bodies_in_flight_stay_under_the_byte_cap_but_a_larger_one_still_goes() {
        let store = slow(20, None);
        let mut uploads = Uploads::new(store.clone());
        let big = Bytes::from(vec![0u8; MAX_PENDING_BYTES / 3]);
        for n in 0..7 {
            uploads
                .put(format!("o/{n}"), big.clone(), "image/jpeg")
                .await
                .unwrap();
        }
        let huge = Bytes::from(vec![0u8; MAX_PENDING_BYTES + 1]);
        uploads
            .put("o/huge".into(), huge, "image/png")
            .await
            .unwrap();
        uploads.flush().await.unwrap();
        let s = store.state.lock().unwrap();
        assert_eq!(s.stored.len(), 8);
        assert_eq!(s.max_in_flight, 3);
        assert_eq!(s.max_bytes_in_flight, MAX_PENDING_BYTES + 1);
    }

    #[tokio::test]
    async fn a_failed_write_is_the_error_of_the_next_wait_and_dropping_aborts_the_rest() {
        let store = slow(30, Some("masks/0.png"));
        let mut uploads = Uploads::new(store.clone());
        uploads
            .put("masks/0.png".into(), Bytes::from_static(b"x"), "image/png")
            .await
            .unwrap();
        let err = uploads.flush().await.unwrap_err();
        assert!(matches!(err, ItemError::Storage(_)), "{err:?}");

        let store = slow(200, None);
        let mut uploads = Uploads::new(store.clone());
        uploads
            .put(
                "outputs/0.jpg".into(),
                Bytes::from_static(b"x"),
                "image/jpeg",
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(uploads);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let s = store.state.lock().unwrap();
        assert!(
            s.stored.is_empty(),
            "a cancelled item's write went on: {:?}",
            s.stored
        );
    }
}
