//! Reading a refusal: the fields a BadRequest detail names.

use tonic_types::StatusExt;

/// The fields of the status's BadRequest field violations, in order; empty when it carries no BadRequest.
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|bad| bad.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}
