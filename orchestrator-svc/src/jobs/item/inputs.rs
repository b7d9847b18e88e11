//! What an item reads besides masks: its photo and its rules' texture swatches (shared with the job's other items in
//! flight: `jobs::swatches`), each capped at MAX_INPUT_BYTES before its body is read.

use std::sync::Arc;

use bytes::Bytes;
use palette_rules::swatch::LinearSwatch;

use super::{ItemError, ItemRunner, imaging};
use crate::jobs::swatches::{HeldSwatch, JobSwatches};
use crate::jobs::validate::JobPlan;
use crate::storage::StorageError;

impl ItemRunner {
    pub(super) async fn download_input(&self, key: &str) -> Result<Bytes, ItemError> {
        let max = self.limits.max_bytes;
        let meta = self
            .store
            .head(key)
            .await?
            .ok_or_else(|| ItemError::InputMissing {
                key: key.to_string(),
            })?;
        let too_large = |size: u64| {
            ItemError::InputTooLarge(format!("{key} is {size} bytes; the limit is {max}"))
        };
        if meta.size > max {
            return Err(too_large(meta.size));
        }
        // Capped again while reading: the object may have been replaced since the HEAD.
        Ok(self.store.get_at_most(key, max).await?)
    }

    /// Checks that each rule's uploaded swatch is there and within MAX_INPUT_BYTES (its HEAD), before the segmenter
    /// is asked: a missing one fails the item without GPU time. Read when its rule is applied (`swatch`).
    pub(super) async fn check_swatches(&self, plan: &JobPlan) -> Result<(), ItemError> {
        for rule in &plan.rules {
            let Some(key) = rule.rule.texture_key() else {
                continue;
            };
            let unusable = |source: crate::error::BoxError| ItemError::Swatch {
                rule_id: rule.rule_id.clone(),
                key: key.to_string(),
                source,
            };
            let max = self.limits.max_bytes;
            match self.store.head(key).await {
                Ok(Some(meta)) if meta.size <= max => {}
                Ok(Some(meta)) => {
                    return Err(unusable(
                        StorageError::TooLarge {
                            key: key.to_string(),
                            size: Some(meta.size),
                            limit: max,
                        }
                        .into(),
                    ));
                }
                Ok(None) => return Err(unusable(StorageError::NotFound(key.to_string()).into())),
                Err(e @ StorageError::Unavailable { .. }) => return Err(ItemError::Storage(e)),
                Err(e) => return Err(unusable(e.into())),
            }
        }
        Ok(())
    }

    /// Rule `rule_id`'s swatch under `key`, from the job's items applying it now or loaded.
    pub(super) async fn swatch(
        &self,
        swatches: &JobSwatches,
        rule_id: &str,
        key: &str,
    ) -> Result<HeldSwatch, ItemError> {
        swatches
            .get_or_load(key, self.load_swatch(rule_id, key))
            .await
    }

    /// A swatch from storage, decoded and in linear light.
    async fn load_swatch(&self, rule_id: &str, key: &str) -> Result<Arc<LinearSwatch>, ItemError> {
        let unusable = |source| ItemError::Swatch {
            rule_id: rule_id.to_string(),
            key: key.to_string(),
            source,
        };
        // A swatch is an upload like the photos: the same byte limit, checked before its body is read.
        let bytes = self
            .store
            .get_at_most(key, self.limits.max_bytes)
            .await
            .map_err(|e| match e {
                StorageError::NotFound(_)
                | StorageError::InvalidKey(_)
                | StorageError::TooLarge { .. } => unusable(e.into()),
                StorageError::Unavailable { .. } => ItemError::Storage(e),
            })?;
        let max_pixels = self.limits.max_pixels;
        let decoded = self
            .cpu(move || imaging::decode_swatch(&bytes, max_pixels))
            .await
            .map_err(|e| unusable(e.into()))?;
        self.cpu(move || Ok(Arc::new(LinearSwatch::from_rgb(&decoded))))
            .await
    }
}
