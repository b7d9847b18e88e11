//! A job's phrases asked of the segmenter before the job is accepted (`Segmenter::unusable_phrases`): a phrase its
//! model cannot read (too many tokens) is INVALID_ARGUMENT on the field it came from, instead of a job whose every
//! image fails later.

use palette_proto::orchestrator::v1::JobSpec;

use super::validate::{JobPlan, normalize_concept};
use crate::error::{ApiError, FieldViolation};
use crate::segmenter::Segmenter;

pub(super) async fn refuse_unreadable(
    segmenter: &Segmenter,
    spec: &JobSpec,
    plan: &JobPlan,
) -> Result<(), ApiError> {
    let unusable = segmenter.unusable_phrases(&plan.concepts).await;
    if unusable.is_empty() {
        return Ok(());
    }
    Err(ApiError::InvalidArgument(
        unusable
            .into_iter()
            .map(|(phrase, why)| {
                FieldViolation::new(
                    field_of(spec, plan, &phrase),
                    format!("{phrase:?}: the segmenter's model cannot read it ({why})"),
                )
            })
            .collect(),
    ))
}

/// Where a segmented phrase came from: a listed concept, a rule's target, a rule's `occluded_by`, else the preset
/// (its concepts, or an occluder from its depth order).
fn field_of(spec: &JobSpec, plan: &JobPlan, phrase: &str) -> String {
    if let Some(i) = spec
        .concepts
        .iter()
        .position(|c| normalize_concept(c) == phrase)
    {
        return format!("concepts[{i}]");
    }
    if let Some(j) = plan.rules.iter().position(|r| r.concept == phrase) {
        return format!("rules[{j}].concept");
    }
    if let Some(j) = plan.rules.iter().position(|r| {
        r.rule
            .occluded_by()
            .is_some_and(|list| list.iter().any(|c| normalize_concept(c) == phrase))
    }) {
        return format!("rules[{j}].params.occluded_by");
    }
    "preset".into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::validate::{JobLimits, validate};
    use palette_proto::orchestrator::v1::Rule as RuleSpec;
    use prost_types::{ListValue, Struct, Value, value::Kind};

    fn string(s: &str) -> Value {
        Value {
            kind: Some(Kind::StringValue(s.into())),
        }
    }

    #[test]
    fn a_phrase_is_reported_on_the_field_it_came_from() {
        let occluded_by = Value {
            kind: Some(Kind::ListValue(ListValue {
                values: vec![string("Lamp 2")],
            })),
        };
        let spec = JobSpec {
            user_id: "u".into(),
            job_id: "j".into(),
            concepts: vec!["Wall".into(), "floor".into()],
            rules: vec![RuleSpec {
                rule_id: "r".into(),
                concept: "sofa  cover".into(),
                r#type: "recolor".into(),
                params: Some(Struct {
                    fields: [
                        ("color".to_string(), string("#112233")),
                        ("occluded_by".to_string(), occluded_by),
                    ]
                    .into(),
                }),
            }],
            image_count: 1,
            preset: String::new(),
            output_format: String::new(),
        };
        let limits = JobLimits {
            max_images: 1,
            max_rules: 1,
            max_concepts: 8,
        };
        let plan = validate(&spec, &Default::default(), limits).unwrap();
        let fields: Vec<String> = ["floor", "sofa cover", "lamp 2", "chair"]
            .iter()
            .map(|p| field_of(&spec, &plan, p))
            .collect();
        assert_eq!(
            fields,
            [
                "concepts[1]",
                "rules[0].concept",
                "rules[0].params.occluded_by",
                "preset"
            ]
        );
    }
}
