//! The client side: a tonic interceptor that sends this service's own token (the orchestrator's SEGMENTER_TOKEN)
//! as `authorization: Bearer <token>` on every call.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;

use crate::secret::Secret;

/// No token: calls go out without an authorization header (the server has authentication off).
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(_) => f.write_str("BearerToken(<redacted>)"),
            None => f.write_str("BearerToken(none)"),
        }
    }
}

/// A token that cannot travel in a header (a control character or non-ASCII).
#[derive(Debug, thiserror::Error)]
#[error("the token is not a valid header value")]
pub struct InvalidToken;

impl BearerToken {
    pub fn new(token: Option<&Secret>) -> Result<Self, InvalidToken> {
        let Some(token) = token.map(Secret::expose).filter(|t| !t.trim().is_empty()) else {
            return Ok(BearerToken(None));
        };
        let mut value: MetadataValue<Ascii> = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| InvalidToken)?;
        value.set_sensitive(true);
        Ok(BearerToken(Some(value)))
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}
