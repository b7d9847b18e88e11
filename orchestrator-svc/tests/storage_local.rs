use bytes::Bytes;
use orchestrator_svc::storage::{LocalStore, ObjectMeta, ObjectStore, StorageError};

#[tokio::test]
async fn put_get_head_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path()).unwrap();
    let key = "outputs/u/j/r/0.jpg";
    assert_eq!(store.head(key).await.unwrap(), None);
    assert!(!store.exists(key).await.unwrap());
    store
        .put(key, Bytes::from_static(b"jpeg bytes"), "image/jpeg")
        .await
        .unwrap();
    assert_eq!(
        store.get(key).await.unwrap(),
        Bytes::from_static(b"jpeg bytes")
    );
    assert_eq!(
        store.head(key).await.unwrap(),
        Some(ObjectMeta { size: 10 })
    );
    store
        .put(key, Bytes::from_static(b"v2"), "image/jpeg")
        .await
        .unwrap();
    assert_eq!(store.get(key).await.unwrap(), Bytes::from_static(b"v2"));
    // No temp file is left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path().join("outputs/u/j/r"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["0.jpg"]);
}

#[tokio::test]
async fn missing_object_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path()).unwrap();
    assert!(matches!(
        store.get("inputs/u/j/0.jpg").await,
        Err(StorageError::NotFound(_))
    ));
}

#[tokio::test]
async fn keys_cannot_escape_the_root() {
    let parent = tempfile::tempdir().unwrap();
    let root = parent.path().join("root");
    let store = LocalStore::new(&root).unwrap();
    for key in ["../outside", "a/../../outside", "/etc/passwd", "a//b", ""] {
        let put = store.put(key, Bytes::from_static(b"x"), "text/plain").await;
        assert!(
            matches!(put, Err(StorageError::InvalidKey(_))),
            "{key:?}: {put:?}"
        );
        assert!(matches!(
            store.get(key).await,
            Err(StorageError::InvalidKey(_))
        ));
    }
    assert!(!parent.path().join("outside").exists());
}
