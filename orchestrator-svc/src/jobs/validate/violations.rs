//! The one collector every validator adds to, so a request gets all of its problems back at once.

use crate::error::{ApiError, FieldViolation};

/// A request message checked field by field: each problem goes into `v` under its field path; `Valid` is what the
/// plan is built from, when this message has no problem of its own.
pub trait Validate<Context> {
    type Valid;
    fn validate(&self, context: Context, v: &mut Violations) -> Option<Self::Valid>;
}

/// Every bad field found so far.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// INVALID_ARGUMENT with every violation, if there is any.
    pub fn finish(self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::InvalidArgument(self.0))
        }
    }

    #[cfg(test)]
    pub fn fields(&self) -> Vec<&str> {
        self.0.iter().map(|v| v.field.as_str()).collect()
    }
}
