//! What a PreviewEdit request must satisfy before any work, and how a preview's failures reach the caller.

use palette_proto::orchestrator::v1::PreviewEditRequest;

use super::render;
use crate::error::{ApiError, FieldViolation, Report};
use crate::jobs::item::ItemError;
use crate::jobs::validate::{PlannedRule, Violations};
use crate::keys;
use crate::storage::StorageError;

/// `max_side` and the format, checked with the ids.
pub(super) fn check_request(request: &PreviewEditRequest) -> Result<(u32, bool), ApiError> {
    let mut v = Violations::default();
    for (field, id) in [("user_id", &request.user_id), ("job_id", &request.job_id)] {
        if let Some(problem) = keys::id_problem(id) {
            v.add(field, problem);
        }
    }
    let max_side = match request.max_side {
        0 => render::DEFAULT_SIDE,
        side => side,
    };
    if !(render::MIN_SIDE..=render::MAX_SIDE).contains(&max_side) {
        v.add(
            "max_side",
            format!(
                "must be between {} and {} (0: {})",
                render::MIN_SIDE,
                render::MAX_SIDE,
                render::DEFAULT_SIDE
            ),
        );
    }
    let png = match request.format.as_str() {
        "" | "jpeg" => false,
        "png" => true,
        other => {
            v.add(
                "format",
                format!("{other:?} is not a preview format: jpeg or png"),
            );
            false
        }
    };
    if request.rules.is_empty() {
        v.add("rules", "at least one rule to preview");
    }
    v.finish()?;
    Ok((max_side, png))
}

/// A cut-out has no photo left to paint on: it may only come last.
pub(super) fn check_cutout_last(rules: &[PlannedRule]) -> Result<(), ApiError> {
    let mut v = Violations::default();
    for (i, rule) in rules.iter().enumerate() {
        if rule.rule.output_has_alpha() && i + 1 < rules.len() {
            v.add(
                format!("rules[{i}]"),
                "a cut-out must be the last rule of a preview",
            );
        }
    }
    v.finish()
}

/// A preview's failure as the caller sees it: the job's stored state is the precondition.
pub(super) fn item_to_api(job_id: &str, err: ItemError) -> ApiError {
    let job_id = job_id.to_string();
    match err {
        ItemError::Storage(e @ StorageError::Unavailable { .. }) => ApiError::SourceUnavailable {
            job_id,
            source: Box::new(e),
        },
        ItemError::Rule { .. } | ItemError::Swatch { .. } => {
            ApiError::InvalidArgument(vec![FieldViolation::new("rules", Report(&err).to_string())])
        }
        ItemError::Encode { .. } | ItemError::Worker(_) | ItemError::Cancelled => {
            ApiError::Internal {
                what: Report(&err).to_string(),
            }
        }
        other => ApiError::SourceUnusable {
            job_id,
            reason: Report(&other).to_string(),
        },
    }
}
