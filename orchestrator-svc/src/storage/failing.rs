//! A fault-injection store for unit tests: a local folder whose first puts fail as an outage would.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use bytes::Bytes;

use super::{LocalStore, ObjectMeta, ObjectStore, SharedStore, StorageError};

/// `LocalStore` at a folder, whose next `failures` puts fail (`Unavailable`, an outage).
#[derive(Debug)]
pub struct FailingPuts {
    inner: LocalStore,
    failures: AtomicUsize,
}

impl FailingPuts {
    pub fn shared(dir: &Path, failures: usize) -> SharedStore {
        Arc::new(FailingPuts {
            inner: LocalStore::new(dir).unwrap(),
            failures: AtomicUsize::new(failures),
        })
    }
}

#[async_trait]
impl ObjectStore for FailingPuts {
    async fn get_at_most(&self, key: &str, max: u64) -> Result<Bytes, StorageError> {
        self.inner.get_at_most(key, max).await
    }
    async fn put(&self, key: &str, body: Bytes, ct: &str) -> Result<(), StorageError> {
        let failing = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(StorageError::unavailable(key, "injected 503"));
        }
        self.inner.put(key, body, ct).await
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        self.inner.head(key).await
    }
}
