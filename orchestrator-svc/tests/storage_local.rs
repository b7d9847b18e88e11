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

#[tokio::test]
async fn reads_are_capped_before_the_body_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path()).unwrap();
    store
        .put(
            "inputs/u/j/0.jpg",
            Bytes::from(vec![7u8; 2000]),
            "image/jpeg",
        )
        .await
        .unwrap();
    match store.get_at_most("inputs/u/j/0.jpg", 1000).await {
        Err(StorageError::TooLarge { key, size, limit }) => {
            assert_eq!(
                (key.as_str(), size, limit),
                ("inputs/u/j/0.jpg", Some(2000), 1000)
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        store
            .get_at_most("inputs/u/j/0.jpg", 2000)
            .await
            .unwrap()
            .len(),
        2000
    );
}

#[tokio::test]
async fn only_regular_files_are_objects() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path()).unwrap();
    let folder = dir.path().join("inputs/u/j");
    std::fs::create_dir_all(&folder).unwrap();
    // A FIFO reports size 0 and would block the reading thread until a writer came; a folder is no object either.
    let status = std::process::Command::new("mkfifo")
        .arg(folder.join("0.jpg"))
        .status()
        .unwrap();
    assert!(status.success());
    for key in ["inputs/u/j/0.jpg", "inputs/u/j"] {
        let got = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            store.get_at_most(key, 1000),
        )
        .await
        .unwrap_or_else(|_| panic!("{key}: the read blocked"));
        assert!(
            matches!(got, Err(StorageError::NotFound(_))),
            "{key}: {got:?}"
        );
    }
}

/// `put_new` is create-only: of writers racing for one key exactly one writes, the object is whole and that
/// writer's, and no temp file is left behind.
#[tokio::test]
async fn put_new_writes_only_where_no_object_is() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(LocalStore::new(dir.path()).unwrap());
    let key = "jobs-state/u/j/h/0.json";
    let racing = (0..16u8).map(|n| {
        let store = store.clone();
        tokio::spawn(async move {
            let body = Bytes::from(vec![n; 4096]);
            (
                n,
                store.put_new(key, body, "application/json").await.unwrap(),
            )
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
        Bytes::from(vec![winners[0]; 4096])
    );
    let names: Vec<_> = std::fs::read_dir(dir.path().join("jobs-state/u/j/h"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["0.json"]);
    assert!(matches!(
        store
            .put_new("../escape", Bytes::new(), "application/json")
            .await,
        Err(StorageError::InvalidKey(_))
    ));
}
