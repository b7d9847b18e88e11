//! Object storage behind one trait, so the pipeline does not care whether bytes live in R2, another S3 service or
//! a local directory.

#[cfg(test)]
pub mod failing;
mod local;
mod s3;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

pub use crate::config::S3Settings;
pub use local::LocalStore;
pub use s3::S3Store;

use crate::config::StorageSettings;
use crate::error::BoxError;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The key does not exist; distinct so an input that was never uploaded is not reported as an outage.
    #[error("no object at {0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidKey(String),
    /// The object is over the size the caller reads at most; found from its Content-Length (or its file size)
    /// before the body was read, or while reading it when the store did not say.
    #[error("{key} is larger than the limit of {limit} bytes{}", size.map(|s| format!(" ({s} bytes)")).unwrap_or_default())]
    TooLarge {
        key: String,
        size: Option<u64>,
        limit: u64,
    },
    /// Anything else: network, credentials, a full disk. Already retried by the backend where that makes sense.
    /// `context` names the operation and key (and the service's error code where it gave one); `source` is the
    /// backend's own error.
    #[error("{context}")]
    Unavailable {
        context: String,
        #[source]
        source: BoxError,
        /// The store refused this caller (S3 403 AccessDenied, or a bare 403 as HEAD answers; a local permission
        /// error): an answer that asking again will not change, unlike an outage. A policy without s3:ListBucket
        /// answers a missing key so, which is why this is not NotFound either. Credentials or bucket errors are
        /// not refusals: they pass once fixed.
        refused: bool,
    },
}

impl StorageError {
    pub fn unavailable(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        StorageError::Unavailable {
            context: context.into(),
            source: source.into(),
            refused: false,
        }
    }

    /// `unavailable`, for a refusal (see `Unavailable::refused`).
    pub fn refused(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        StorageError::Unavailable {
            context: context.into(),
            source: source.into(),
            refused: true,
        }
    }

    /// An error that may pass if the same request is made again later: the store down, slow or unreachable.
    pub fn is_outage(&self) -> bool {
        matches!(self, StorageError::Unavailable { refused: false, .. })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    pub size: u64,
}

#[async_trait]
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// The object's bytes, if it is at most `max_bytes` long (`TooLarge` otherwise, without reading past the cap:
    /// memory stays bounded whatever was uploaded). Everything the service reads goes through this.
    async fn get_at_most(&self, key: &str, max_bytes: u64) -> Result<Bytes, StorageError>;

    /// The whole object, however large: for tests and tools, never for what users upload.
    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        self.get_at_most(key, u64::MAX).await
    }
    async fn put(&self, key: &str, body: Bytes, content_type: &str) -> Result<(), StorageError>;

    /// `put` only if no object is at `key`: true when this call wrote it, false when one was there (this call's
    /// write was not made). Atomic in the real backends (S3 `If-None-Match: *`, honoured by R2, AWS S3 and
    /// SeaweedFS; a local hard link), so of two writers racing for one key exactly one gets true: what makes the
    /// first recorded end of a queue job's item the only one (`jobs::durable::claim`). A service that ignores the
    /// header overwrites, as `put` does.
    ///
    /// This default (look, then put) is not atomic: for test stores only.
    async fn put_new(
        &self,
        key: &str,
        body: Bytes,
        content_type: &str,
    ) -> Result<bool, StorageError> {
        if self.exists(key).await? {
            return Ok(false);
        }
        self.put(key, body, content_type).await?;
        Ok(true)
    }
    /// None when the key does not exist.
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError>;

    async fn exists(&self, key: &str) -> Result<bool, StorageError> {
        Ok(self.head(key).await?.is_some())
    }

    /// At start-up: whether this store's credentials and bucket are usable, from one request. A local folder is
    /// usable once created (`LocalStore::new`).
    async fn check_access(&self) -> AccessCheck {
        AccessCheck::Usable
    }
}

/// What the start-up probe of the object store found (`ObjectStore::check_access`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessCheck {
    /// The service answered as it does for a caller it accepts (the probed key exists or not).
    Usable,
    /// The service itself said the credentials or the bucket are wrong: every item would fail. The text is the
    /// service's own code and message. (A store that is still starting can say so for a moment: ask again.)
    Refused(String),
    /// The service refused in a way that may concern only the probe (AccessDenied: a least-privilege policy without
    /// s3:ListBucket answers so for any missing key). A final answer, but not a reason to stay down: items report
    /// their own storage errors.
    Doubtful(String),
    /// No answer (transport failure) or a server error: the store may be down for a moment.
    Unreachable(String),
}

pub type SharedStore = Arc<dyn ObjectStore>;

/// Keys are relative, '/'-separated, and no segment is empty, "." or "..": the same rule for every backend, so a key
/// that works locally works in R2 and none can climb out of a local root.
pub fn check_key(key: &str) -> Result<(), StorageError> {
    let bad = key.is_empty()
        || key.len() > 1024
        || key.starts_with('/')
        || key.contains('\\')
        || key.contains('\0')
        || key
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..");
    if bad {
        Err(StorageError::InvalidKey(format!(
            "object key {key:?} is not a plain relative path"
        )))
    } else {
        Ok(())
    }
}

/// Builds the backend STORAGE_BACKEND names (a local root is created if missing).
pub fn from_settings(settings: StorageSettings) -> Result<SharedStore, StorageError> {
    match settings {
        StorageSettings::Local(dir) => Ok(Arc::new(LocalStore::new(dir)?)),
        StorageSettings::S3(s3) => Ok(Arc::new(S3Store::new(s3))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_must_be_plain_relative_paths() {
        for bad in ["", "/abs", "a//b", "a/../b", "..", "a/./b", "a\\b", "a/"] {
            assert!(check_key(bad).is_err(), "{bad:?} accepted");
        }
        check_key("inputs/u/j/0.jpg").unwrap();
    }
}
