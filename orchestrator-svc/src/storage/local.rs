//! A directory as object store: for development and tests. Content types are not stored (the extension says it).

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;

use super::{ObjectMeta, ObjectStore, StorageError, check_key};

#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
    /// The root with every symlink resolved: what every object's real path must lie under.
    real_root: PathBuf,
}

impl LocalStore {
    pub fn new(root: impl AsRef<Path>) -> Result<Self, StorageError> {
        let root = root.as_ref();
        std::fs::create_dir_all(root).map_err(|e| {
            StorageError::unavailable(format!("cannot create {}", root.display()), e)
        })?;
        let real_root = root.canonicalize().map_err(|e| {
            StorageError::unavailable(format!("cannot resolve {}", root.display()), e)
        })?;
        Ok(LocalStore {
            root: root.to_path_buf(),
            real_root,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, StorageError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    /// Keys cannot name a path outside the root (`check_key`), but a symlink inside it could lead there: the
    /// deepest part of `path` that exists, resolved, must lie under the real root. A key that leaves it is refused
    /// as an invalid key and logged (someone put that link there).
    fn confined(&self, key: &str, path: &Path) -> Result<(), StorageError> {
        let mut existing = path;
        while std::fs::symlink_metadata(existing).is_err() {
            match existing.parent() {
                Some(parent) => existing = parent,
                None => return Ok(()),
            }
        }
        match existing.canonicalize() {
            Ok(real) if real.starts_with(&self.real_root) => Ok(()),
            // A dangling link resolves nowhere: it cannot be read, and a write through it would land wherever it
            // points.
            _ => {
                tracing::warn!(key, path = %existing.display(), root = %self.real_root.display(), "object path leads outside the storage root through a symlink; refused");
                Err(StorageError::InvalidKey(format!(
                    "{key}: leads outside the storage root through a symlink"
                )))
            }
        }
    }
}

fn unavailable(what: &str, path: &Path, e: std::io::Error) -> StorageError {
    let context = format!("{what} {}", path.display());
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        return StorageError::refused(context, e);
    }
    StorageError::unavailable(context, e)
}

/// Runs one operation's file-system calls, all of them, on the blocking pool: one hand-off per object rather than
/// one per call (a put's folder creation, write and rename were three, each waking a pool thread, then the
/// runtime, then parking: with the bench's 28 objects per 1 MP photo, ~6 % of its CPU), and no blocking call (the
/// symlink checks') on the runtime's threads.
async fn off_runtime<T: Send + 'static>(
    store: &LocalStore,
    key: &str,
    op: impl FnOnce(&LocalStore, &str) -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    let (store, key) = (store.clone(), key.to_string());
    tokio::task::spawn_blocking(move || op(&store, &key))
        .await
        .map_err(|e| StorageError::unavailable("local storage task", e))?
}

impl LocalStore {
    fn get_at_most_now(&self, key: &str, max_bytes: u64) -> Result<Bytes, StorageError> {
        let path = self.path_of(key)?;
        self.confined(key, &path)?;
        let too_large = |size: u64| StorageError::TooLarge {
            key: key.to_string(),
            size: Some(size),
            limit: max_bytes,
        };
        let not_found = || StorageError::NotFound(key.to_string());
        // Only a regular file is an object: opening a FIFO would block this thread until a writer came, and a
        // device would read without end. Checked on the path before opening, then on what was opened.
        match std::fs::metadata(&path) {
            Ok(meta) if !meta.is_file() => return Err(not_found()),
            Ok(meta) if meta.len() > max_bytes => return Err(too_large(meta.len())),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(not_found()),
            Err(e) => return Err(unavailable("stat", &path, e)),
        }
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(not_found()),
            Err(e) => return Err(unavailable("open", &path, e)),
        };
        let meta = file.metadata().map_err(|e| unavailable("stat", &path, e))?;
        if !meta.is_file() {
            return Err(not_found());
        }
        // At most one byte past the cap, so a file that grew since the check is refused without reading it all.
        let mut data = Vec::with_capacity(meta.len() as usize);
        std::io::Read::read_to_end(
            &mut std::io::Read::take(file, max_bytes.saturating_add(1)),
            &mut data,
        )
        .map_err(|e| unavailable("read", &path, e))?;
        if data.len() as u64 > max_bytes {
            return Err(too_large(data.len() as u64));
        }
        Ok(Bytes::from(data))
    }

    /// `body` written to a temp file beside `key`'s path (folders created, confined to the root): (temp, path).
    fn staged(&self, key: &str, body: &[u8]) -> Result<(PathBuf, PathBuf), StorageError> {
        let path = self.path_of(key)?;
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        // Before creating folders (which would follow a linked folder out of the root) and after.
        self.confined(key, &dir)?;
        std::fs::create_dir_all(&dir).map_err(|e| unavailable("create", &dir, e))?;
        self.confined(key, &dir)?;
        let tmp = dir.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
        if let Err(e) = std::fs::write(&tmp, body) {
            let _ = std::fs::remove_file(&tmp);
            return Err(unavailable("write", &tmp, e));
        }
        Ok((tmp, path))
    }

    fn put_now(&self, key: &str, body: &[u8]) -> Result<(), StorageError> {
        // Written beside the target and renamed: readers see the old object or the whole new one, never a torn write
        // (a process crash included; no fsync: a power loss may lose recent objects, as orchestrator.md says).
        let (tmp, path) = self.staged(key, body)?;
        if let Err(e) = std::fs::rename(&tmp, &path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(unavailable("rename to", &path, e));
        }
        Ok(())
    }

    /// `put_now` unless an object is at `key` (false then): written beside it and hard-linked into place, which
    /// fails when the name exists, so of two writers exactly one succeeds and readers never see a torn object.
    fn put_new_now(&self, key: &str, body: &[u8]) -> Result<bool, StorageError> {
        let (tmp, path) = self.staged(key, body)?;
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            // A file system without hard links: looked, then written as `put_now` writes (not atomic; said once).
            Err(e) => {
                static SAID: std::sync::atomic::AtomicBool =
                    std::sync::atomic::AtomicBool::new(false);
                if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(path = %path.display(), error = %e, "no hard links in the storage folder: first records are looked for, then written (not atomic)");
                }
                if self.head_now(key)?.is_some() {
                    return Ok(false);
                }
                self.put_now(key, body).map(|()| true)
            }
        }
    }

    fn head_now(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        let path = self.path_of(key)?;
        self.confined(key, &path)?;
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => Ok(Some(ObjectMeta { size: meta.len() })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable("stat", &path, e)),
        }
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn get_at_most(&self, key: &str, max_bytes: u64) -> Result<Bytes, StorageError> {
        off_runtime(self, key, move |store, key| {
            store.get_at_most_now(key, max_bytes)
        })
        .await
    }

    async fn put(&self, key: &str, body: Bytes, _content_type: &str) -> Result<(), StorageError> {
        off_runtime(self, key, move |store, key| store.put_now(key, &body)).await
    }

    async fn put_new(
        &self,
        key: &str,
        body: Bytes,
        _content_type: &str,
    ) -> Result<bool, StorageError> {
        off_runtime(self, key, move |store, key| store.put_new_now(key, &body)).await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        off_runtime(self, key, |store, key| store.head_now(key)).await
    }
}
