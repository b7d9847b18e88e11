//! A texture rule's uploaded swatch, for previews. Cached decoded (in linear light, as the texture samples it); but a swatch key is the user's to upload over
//! (`inputs/{user}/...`, or an operator's `swatches/...`), and jobs read it afresh every time, so a cached one is
//! checked again once it is `SWATCH_TTL` old: its bytes fetched and compared by SHA-256, decoded again only when
//! they changed. A burst of previews (a slider dragged) reads storage once.

use std::sync::Arc;

use palette_rules::swatch::LinearSwatch;
use sha2::{Digest, Sha256};

use super::PreviewService;
use super::cache::Cached;
use crate::jobs::item::{ItemError, blocking, imaging};
use crate::storage::StorageError;

/// How long a cached swatch is used without looking at storage again.
const SWATCH_TTL: std::time::Duration = std::time::Duration::from_secs(2);

impl PreviewService {
    pub(super) async fn swatch(
        &self,
        rule_id: &str,
        key: &str,
    ) -> Result<Arc<LinearSwatch>, ItemError> {
        let cache_key = format!("s|{key}");
        let cached = match self.cache.get(&cache_key) {
            Some(Cached::Swatch {
                image,
                sha256,
                read_at,
            }) => {
                if read_at.elapsed() < SWATCH_TTL {
                    return Ok(image);
                }
                Some((image, sha256))
            }
            _ => None,
        };
        let unusable = |source: crate::error::BoxError| ItemError::Swatch {
            rule_id: rule_id.to_string(),
            key: key.to_string(),
            source,
        };
        let bytes = self
            .store
            .get_at_most(key, self.inputs.max_bytes)
            .await
            .map_err(|e| match e {
                StorageError::Unavailable { .. } => ItemError::Storage(e),
                e => unusable(e.into()),
            })?;
        let sha256: [u8; 32] = Sha256::digest(&bytes).into();
        let image = match cached {
            Some((image, was)) if was == sha256 => image,
            _ => {
                let max_pixels = self.inputs.max_pixels.min(imaging::MAX_SWATCH_PIXELS);
                // Admitted for its pixels while it decodes, as a photo is (no other admission is held here).
                let pixels = imaging::admissible_pixels(&bytes, max_pixels)
                    .map_err(|e| unusable(e.into()))?;
                self.admit(pixels, None)
                    .await
                    .hold_while(blocking(move || {
                        Ok(imaging::decode_swatch(&bytes, max_pixels)
                            .map(|rgb| Arc::new(LinearSwatch::from_rgb(&rgb))))
                    }))
                    .await?
                    .map_err(|e| unusable(e.into()))?
            }
        };
        self.cache.insert(
            cache_key,
            Cached::Swatch {
                image: image.clone(),
                sha256,
                read_at: tokio::time::Instant::now(),
            },
        );
        Ok(image)
    }
}
