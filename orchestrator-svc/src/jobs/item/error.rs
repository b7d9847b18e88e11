//! Why one image failed. The job it belongs to was accepted, so this never becomes a gRPC status: `code()` is the
//! machine-readable reason on the item (`Item.error_code`, the callback's `error_code`) and `Report` of the error
//! its text.

use palette_rules::rule::FieldError;

use crate::error::BoxError;
use crate::segmenter::SegmenterError;
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum ItemError {
    /// The input object is not in storage.
    #[error("object not found: {key}")]
    InputMissing { key: String },
    #[error("input too large: {0}")]
    InputTooLarge(String),
    #[error("input is not a readable image: {0}")]
    InputCorrupt(String),
    /// Reading or writing an object failed (other than a missing input).
    #[error("object storage")]
    Storage(#[source] StorageError),
    #[error("segmenter")]
    Segmenter(#[from] SegmenterError),
    /// The rule could not be applied to this image.
    #[error("rule {rule_id}")]
    Rule {
        rule_id: String,
        #[source]
        source: FieldError,
    },
    /// A texture rule's swatch is missing or not an image.
    #[error("rule {rule_id}: texture swatch {key:?}")]
    Swatch {
        rule_id: String,
        key: String,
        #[source]
        source: BoxError,
    },
    /// An edit's photo has no masks record: its item in the source job did not complete.
    #[error(
        "no stored masks for this photo ({key}): its item in the source job did not complete, or ran before edits were recorded"
    )]
    EditSourceMissing { key: String },
    /// An edit's photo (the source job's input) is gone from storage or no longer a usable image: nothing under
    /// the edit's own id to upload again, so not `input_missing`.
    #[error("the source job's photo {key}: {reason}")]
    EditSourcePhoto { key: String, reason: String },
    /// An edit's photo is not the one its stored masks were computed from (a job id used again for a new photo
    /// whose item failed before storing masks, or a new upload over the input).
    #[error(
        "photo {key} is not the one its stored masks were computed from (uploaded again since?): run a job on it to segment it again"
    )]
    EditSourceChanged { key: String },
    /// The stored masks of an edit's photo are from a run of the source job that did not segment a concept the
    /// rules use: the job id was run again with other concepts and this photo's item has not stored its masks
    /// (still running, or failed).
    #[error(
        "the stored masks of photo {key} are from a run that did not segment {concept:?} (the job is running again with other concepts?): retry once its item has completed"
    )]
    EditSourceStale { key: String, concept: String },
    /// A mask the source job stored is gone (deleted) or unusable.
    #[error("stored mask {key}: {reason}")]
    StoredMask { key: String, reason: String },
    /// Encoding an output failed: a bug or a resource limit, not the caller's input.
    #[error("{what}")]
    Encode {
        what: &'static str,
        #[source]
        source: BoxError,
    },
    /// A CPU task panicked or was cancelled by the runtime.
    #[error("worker task")]
    Worker(#[source] tokio::task::JoinError),
    /// The process shut down while the item ran, and nothing will run it again (JOB_STORE=memory).
    #[error(
        "the orchestrator shut down while this image was being processed; submit it again in a new job"
    )]
    ShutDown,
    /// The item's own steps panicked (a bug): the item fails, the process and the other items go on.
    #[error("internal error (a panic: {0})")]
    Panicked(String),
    #[error("cancelled")]
    Cancelled,
}

impl From<StorageError> for ItemError {
    /// A missing object is the caller's missing input; anything else is storage's.
    fn from(err: StorageError) -> Self {
        match err {
            StorageError::NotFound(key) => ItemError::InputMissing { key },
            e @ StorageError::TooLarge { .. } => ItemError::InputTooLarge(e.to_string()),
            other => ItemError::Storage(other),
        }
    }
}

impl ItemError {
    /// This error as an edit's: what makes a job's input unusable (missing, too large, not an image) is, for an
    /// edit, its source job's photo (`key`) gone or changed, `source_missing`. Others stay as they are.
    pub fn of_source_photo(self, key: &str) -> Self {
        let reason = match self {
            ItemError::InputMissing { .. } => "gone from storage".to_string(),
            ItemError::InputTooLarge(why) => format!("too large now: {why}"),
            ItemError::InputCorrupt(why) => format!("not a readable image now: {why}"),
            other => return other,
        };
        ItemError::EditSourcePhoto {
            key: key.to_string(),
            reason,
        }
    }

    /// The machine-readable reason reported on a failed item (see `Item.error_code` in orchestrator.proto).
    pub fn code(&self) -> &'static str {
        match self {
            ItemError::InputMissing { .. } => "input_missing",
            ItemError::InputCorrupt(_) => "input_corrupt",
            ItemError::InputTooLarge(_) => "input_too_large",
            ItemError::Segmenter(_) => "segmenter_unavailable",
            ItemError::Storage(StorageError::Unavailable { .. }) => "storage_unavailable",
            ItemError::Storage(
                StorageError::NotFound(_)
                | StorageError::InvalidKey(_)
                | StorageError::TooLarge { .. },
            ) => "internal",
            ItemError::Rule { .. } | ItemError::Swatch { .. } => "rule_failed",
            ItemError::EditSourceMissing { .. }
            | ItemError::EditSourcePhoto { .. }
            | ItemError::EditSourceChanged { .. }
            | ItemError::EditSourceStale { .. } => "source_missing",
            ItemError::StoredMask { .. } => "mask_missing",
            ItemError::Cancelled => "cancelled",
            ItemError::Encode { .. }
            | ItemError::Worker(_)
            | ItemError::Panicked(_)
            | ItemError::ShutDown => "internal",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::report;

    #[test]
    fn codes_for_items() {
        let missing = ItemError::from(StorageError::NotFound("k".into()));
        assert_eq!(missing.code(), "input_missing");
        assert_eq!(ItemError::Cancelled.code(), "cancelled");
        let outage = ItemError::from(StorageError::unavailable(
            "GET k",
            std::io::Error::other("reset"),
        ));
        assert_eq!(outage.code(), "storage_unavailable");
        assert_eq!(report(&outage), "object storage: GET k: reset");
        let refused = ItemError::from(SegmenterError::Rejected {
            call: "Segment",
            attempts: 1,
            status: tonic::Status::invalid_argument("bad image"),
        });
        assert_eq!(refused.code(), "segmenter_unavailable");
    }
}
