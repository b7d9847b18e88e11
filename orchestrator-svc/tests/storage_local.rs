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

#[tokio::test]
async fn symlinks_cannot_lead_out_of_the_root() {
    let parent = tempfile::tempdir().unwrap();
    let root = parent.path().join("root");
    let outside = parent.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret.jpg"), b"not yours").unwrap();
    let store = LocalStore::new(&root).unwrap();
    std::fs::create_dir_all(root.join("inputs/u")).unwrap();
    // A linked folder and a linked file, both pointing out of the root.
    std::os::unix::fs::symlink(&outside, root.join("inputs/u/j")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.jpg"), root.join("inputs/u/0.jpg")).unwrap();
    for key in ["inputs/u/j/secret.jpg", "inputs/u/0.jpg"] {
        let got = store.get(key).await;
        assert!(
            matches!(got, Err(StorageError::InvalidKey(_))),
            "{key}: {got:?}"
        );
        assert!(
            matches!(store.head(key).await, Err(StorageError::InvalidKey(_))),
            "{key}"
        );
    }
    let put = store
        .put(
            "inputs/u/j/new/0.jpg",
            Bytes::from_static(b"x"),
            "image/jpeg",
        )
        .await;
    assert!(matches!(put, Err(StorageError::InvalidKey(_))), "{put:?}");
    assert!(
        !outside.join("new").exists(),
        "a folder was created outside the root"
    );
    // Links that stay inside the root are fine (a store laid out with links, e.g. a mounted volume).
    std::fs::create_dir_all(root.join("shared")).unwrap();
    std::fs::write(root.join("shared/a.jpg"), b"ok").unwrap();
    std::os::unix::fs::symlink(root.join("shared"), root.join("inputs/u/alias")).unwrap();
    assert_eq!(
        store.get("inputs/u/alias/a.jpg").await.unwrap(),
        Bytes::from_static(b"ok")
    );
}
