//! What an item reads besides masks: its photo and its rules' texture swatches (shared with the job's other items in
//! flight: `jobs::swatches`), each capped at MAX_INPUT_BYTES before its body is read.

use std::sync::Arc;

use bytes::Bytes;
use palette_rules::swatch::LinearSwatch;

use super::{ItemError, ItemRunner, imaging};
use crate::jobs::swatches::JobSwatches;
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

    /// Each rule's uploaded swatch (None for the others), from the job's items in flight or loaded.
    pub(super) async fn rule_swatches(
        &self,
        plan: &JobPlan,
        swatches: &JobSwatches,
    ) -> Result<Vec<Option<Arc<LinearSwatch>>>, ItemError> {
        let mut out = Vec::with_capacity(plan.rules.len());
        for rule in &plan.rules {
            out.push(match rule.rule.texture_key() {
                Some(key) => Some(
                    swatches
                        .get_or_load(key, self.load_swatch(&rule.rule_id, key))
                        .await?,
                ),
                None => None,
            });
        }
        Ok(out)
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
