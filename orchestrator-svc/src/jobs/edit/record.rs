//! What an edit reads back from storage, written by the jobs it may edit. In object storage, not in this process:
//! any replica can serve an edit, after a restart too, for as long as the bucket keeps the objects (the registry
//! forgets finished jobs; these records stay with the masks they describe).
//!
//! - the photos record (`keys::photos_record`), written when a job starts: the job whose `inputs/` hold the photos
//!   (the job itself, or for an edit its source's photos job), the concepts it segmented and its image count;
//! - a masks record per photo (`keys::masks_record`), written when that photo's masks are stored: each instance's
//!   key, score and placement, what composing the full-frame masks needs besides the PNGs.

use bytes::Bytes;
use palette_proto::orchestrator::v1::MaskKey;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::jobs::validate::JobPlan;
use crate::keys;
use crate::storage::{SharedStore, StorageError};

/// A record is a few KB (mostly mask keys); anything far larger is not one of ours.
const MAX_RECORD_BYTES: u64 = 16 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhotosRecord {
    /// The job under whose `inputs/` and `masks/` the photos and their masks are.
    pub photos_job_id: String,
    /// Every concept segmented, normalised: an edit's rules may use these and no other.
    pub concepts: Vec<String>,
    pub image_count: u32,
    /// New on every run of the job (random): PreviewEdit's cache keys carry it, so a job id used again for new
    /// photos is not previewed from the old ones it cached. Records from before it have none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub run: String,
}

/// One stored instance mask: `MaskKey`'s fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredMask {
    pub concept: String,
    pub instance: u32,
    pub key: String,
    pub score: f32,
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    pub image_width: u32,
    pub image_height: u32,
    /// Non-zero: the PNG is the model's grid (`crate::mask_png::grid`); records from before grids have none.
    #[serde(default)]
    pub grid_width: u32,
    #[serde(default)]
    pub grid_height: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MasksRecord {
    pub masks: Vec<StoredMask>,
    /// SHA-256 (hex) of the photo's bytes the masks were computed from. An edit or preview checks the photo it
    /// reads against it: a job id used again for a new photo whose item then failed before its masks were
    /// stored leaves the old record next to the new photo, and an upload over `inputs/` does the same. Records
    /// from before it have none (not checked).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub input_sha256: String,
    /// Every concept the run that wrote the record segmented (normalised), found or not. A job id run again with
    /// other concepts writes its photos record first and this one only when the photo's masks are stored: until
    /// then (or for good, when the item fails) this record is the earlier run's, and a concept it does not list
    /// was never looked for, which is not "no instance". Records from before it have none (not checked).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub concepts: Vec<String>,
}

impl MasksRecord {
    /// Whether these masks were computed from the photo whose bytes hash to `sha256` (records without the hash:
    /// assumed so, as before).
    pub fn is_of(&self, sha256: &[u8; 32]) -> bool {
        self.input_sha256.is_empty() || self.input_sha256 == hex::encode(sha256)
    }

    /// The first of `concepts` the run that wrote the record did not segment (records without the list: none).
    pub fn unsegmented<'a>(&self, concepts: &[&'a str]) -> Option<&'a str> {
        if self.concepts.is_empty() {
            return None;
        }
        concepts
            .iter()
            .find(|c| !self.concepts.iter().any(|s| s == *c))
            .copied()
    }
}

/// Why a record could not be had.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("no record {0}")]
    Missing(String),
    #[error("record {key} is not readable: {reason}")]
    Unreadable { key: String, reason: String },
    #[error("object storage")]
    Storage(#[source] StorageError),
}

impl RecordError {
    /// The photos record of `job_id` could not be had (EditJob's source, PreviewEdit's job): none is an unknown job,
    /// one that does not decode is unusable, storage down is worth retrying.
    pub fn of_photos(self, job_id: &str) -> ApiError {
        let job_id = job_id.to_string();
        match self {
            RecordError::Missing(_) => ApiError::JobNotFound { job_id },
            RecordError::Unreadable { reason, .. } => ApiError::SourceUnusable { job_id, reason },
            RecordError::Storage(source) => ApiError::SourceUnavailable {
                job_id,
                source: Box::new(source),
            },
        }
    }
}

impl From<&MaskKey> for StoredMask {
    fn from(m: &MaskKey) -> Self {
        StoredMask {
            concept: m.concept.clone(),
            instance: m.instance,
            key: m.key.clone(),
            score: m.score,
            x: m.x,
            y: m.y,
            width: m.width,
            height: m.height,
            image_width: m.image_width,
            image_height: m.image_height,
            grid_width: m.grid_width,
            grid_height: m.grid_height,
        }
    }
}

impl From<&StoredMask> for MaskKey {
    fn from(m: &StoredMask) -> Self {
        MaskKey {
            concept: m.concept.clone(),
            instance: m.instance,
            key: m.key.clone(),
            score: m.score,
            x: m.x,
            y: m.y,
            width: m.width,
            height: m.height,
            image_width: m.image_width,
            image_height: m.image_height,
            grid_width: m.grid_width,
            grid_height: m.grid_height,
        }
    }
}

/// The photos record of the plan's job.
pub async fn write_photos(store: &SharedStore, plan: &JobPlan) -> Result<(), StorageError> {
    let record = PhotosRecord {
        photos_job_id: plan.photos_job_id().to_string(),
        concepts: plan.concepts.clone(),
        image_count: plan.image_count,
        run: uuid::Uuid::new_v4().simple().to_string(),
    };
    let key = keys::photos_record(&plan.user_id, &plan.job_id);
    put_json(store, &key, &record).await
}

/// `write_photos`, written again after 0.5, 2 and 5 s while storage fails (an outage: the SDK's own attempts are a
/// second or two). Without the record the job still runs, but an edit of it is refused as an unknown job, or worse
/// reads what an earlier run of the job id left there (an edit of another source: that source's photos).
pub async fn write_photos_patiently(
    store: &SharedStore,
    plan: &JobPlan,
) -> Result<(), StorageError> {
    let mut waits = crate::jobs::durable::AGAIN_AFTER.iter();
    loop {
        match write_photos(store, plan).await {
            Err(e) if e.is_outage() => match waits.next() {
                Some(&wait) => tokio::time::sleep(wait).await,
                None => return Err(e),
            },
            written => return written,
        }
    }
}

pub async fn read_photos(
    store: &SharedStore,
    user_id: &str,
    job_id: &str,
) -> Result<PhotosRecord, RecordError> {
    let key = keys::photos_record(user_id, job_id);
    let record: PhotosRecord = read_json(store, &key).await?;
    // Its ids make object and cache keys, as a request's do: checked as a request's are.
    let problem = keys::id_problem(&record.photos_job_id)
        .map(|p| format!("its photos job id {:?} {p}", record.photos_job_id))
        .or_else(|| {
            keys::id_problem(&record.run)
                .filter(|_| !record.run.is_empty())
                .map(|p| format!("its run {:?} {p}", record.run))
        })
        .or_else(|| (record.image_count == 0).then(|| "it has no images".to_string()));
    match problem {
        Some(reason) => Err(RecordError::Unreadable { key, reason }),
        None => Ok(record),
    }
}

/// The masks record of photo `idx` (key, JSON body), for the item to write once its masks are stored.
pub fn masks_record_object(
    plan: &JobPlan,
    idx: u32,
    masks: &[MaskKey],
    input_sha256: &[u8; 32],
) -> (String, Bytes) {
    let record = MasksRecord {
        masks: masks.iter().map(StoredMask::from).collect(),
        input_sha256: hex::encode(input_sha256),
        concepts: plan.concepts.clone(),
    };
    let body = serde_json::to_vec(&record).expect("records serialise");
    (
        keys::masks_record(&plan.user_id, &plan.job_id, idx),
        Bytes::from(body),
    )
}

pub async fn read_masks(
    store: &SharedStore,
    user_id: &str,
    job_id: &str,
    idx: u32,
) -> Result<MasksRecord, RecordError> {
    read_json(store, &keys::masks_record(user_id, job_id, idx)).await
}

async fn put_json<T: Serialize>(
    store: &SharedStore,
    key: &str,
    record: &T,
) -> Result<(), StorageError> {
    let body = serde_json::to_vec(record).expect("records serialise");
    store.put(key, Bytes::from(body), "application/json").await
}

async fn read_json<T: for<'de> Deserialize<'de>>(
    store: &SharedStore,
    key: &str,
) -> Result<T, RecordError> {
    let bytes = match store.get_at_most(key, MAX_RECORD_BYTES).await {
        Ok(bytes) => bytes,
        Err(StorageError::NotFound(_)) => return Err(RecordError::Missing(key.to_string())),
        Err(e @ StorageError::TooLarge { .. }) => {
            return Err(RecordError::Unreadable {
                key: key.to_string(),
                reason: e.to_string(),
            });
        }
        Err(e) => return Err(RecordError::Storage(e)),
    };
    serde_json::from_slice(&bytes).map_err(|e| RecordError::Unreadable {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Storage failing for a few seconds as the job starts: the photos record is written once it answers, so the job
    /// can be edited; failing throughout, every wait and then the error.
    #[tokio::test(start_paused = true)]
    async fn the_photos_record_is_written_again_while_storage_fails() {
        let dir = tempfile::tempdir().unwrap();
        let store = |failures| crate::storage::failing::FailingPuts::shared(dir.path(), failures);
        let plan = JobPlan {
            user_id: "u".into(),
            job_id: "j".into(),
            image_count: 2,
            concepts: vec!["wall".into()],
            rules: vec![],
            effective_spec: Default::default(),
            durable_items: false,
            message_hash: None,
            source: None,
            preset: None,
        };
        let waits = crate::jobs::durable::AGAIN_AFTER;
        let started = tokio::time::Instant::now();
        write_photos_patiently(&store(2), &plan).await.unwrap();
        assert_eq!(started.elapsed(), waits[0] + waits[1]);
        assert_eq!(
            read_photos(&store(0), "u", "j").await.unwrap().image_count,
            2
        );
        let started = tokio::time::Instant::now();
        assert!(write_photos_patiently(&store(100), &plan).await.is_err());
        assert_eq!(started.elapsed(), waits.iter().sum::<std::time::Duration>());
    }

    #[test]
    fn a_masks_record_names_the_concepts_its_run_did_not_segment() {
        let record = MasksRecord {
            masks: Vec::new(),
            input_sha256: String::new(),
            concepts: vec!["wall".into(), "floor".into()],
        };
        assert_eq!(record.unsegmented(&["floor", "wall"]), None);
        assert_eq!(record.unsegmented(&["wall", "sofa"]), Some("sofa"));
    }

    /// A photos record's ids make object and cache keys: one that would not pass as a request's id, or one without
    /// images (PreviewEdit's index range), is unusable, not used.
    #[tokio::test]
    async fn a_photos_record_with_unsafe_ids_or_no_images_is_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore =
            std::sync::Arc::new(crate::storage::LocalStore::new(dir.path()).unwrap());
        let good = PhotosRecord {
            photos_job_id: "photos".into(),
            concepts: vec!["wall".into()],
            image_count: 2,
            run: "0123abcd".into(),
        };
        let bad = [
            PhotosRecord {
                photos_job_id: "../other-user".into(),
                ..good.clone()
            },
            PhotosRecord {
                run: "a|b".into(),
                ..good.clone()
            },
            PhotosRecord {
                image_count: 0,
                ..good.clone()
            },
        ];
        let key = keys::photos_record("u", "j");
        for (record, says) in bad.iter().zip(["photos job id", "run", "no images"]) {
            let body = Bytes::from(serde_json::to_vec(record).unwrap());
            store.put(&key, body, "application/json").await.unwrap();
            match read_photos(&store, "u", "j").await {
                Err(RecordError::Unreadable { reason, .. }) => {
                    assert!(reason.contains(says), "{reason}")
                }
                other => panic!("{record:?}: {other:?}"),
            }
        }
        let body = Bytes::from(serde_json::to_vec(&good).unwrap());
        store.put(&key, body, "application/json").await.unwrap();
        assert_eq!(read_photos(&store, "u", "j").await.unwrap(), good);
    }

    #[test]
    fn a_masks_record_from_before_the_concepts_list_is_not_checked() {
        let old: MasksRecord = serde_json::from_str(r#"{"masks": []}"#).unwrap();
        assert!(old.concepts.is_empty());
        assert_eq!(old.unsegmented(&["sofa"]), None);
        let written = serde_json::to_string(&old).unwrap();
        assert_eq!(written, r#"{"masks":[]}"#, "nothing new written for it");
    }
}
