//! Planning a recorded job again: with the preset it was submitted with, whatever the preset files say now.

use super::*;
use palette_proto::orchestrator::v1::{JobSpec, Rule as RuleSpec};
use prost_types::{Struct, Value, value::Kind};

fn limits() -> JobLimits {
    JobLimits {
        max_images: 10,
        max_rules: 4,
        max_concepts: 8,
    }
}

fn house(concepts: &[&str], finish: &str) -> Arc<Preset> {
    Arc::new(Preset {
        name: "house".into(),
        concepts: concepts.iter().map(|c| c.to_string()).collect(),
        priorities: [("sofa".to_string(), 1)].into(),
        rule_defaults: [(
            "recolor".to_string(),
            serde_json::json!({ "finish": finish })
                .as_object()
                .unwrap()
                .clone(),
        )]
        .into(),
        output_format: None,
    })
}

fn presets(preset: Arc<Preset>) -> BTreeMap<String, Arc<Preset>> {
    BTreeMap::from([(preset.name.clone(), preset)])
}

/// A wall recolour under the `house` preset, its concepts taken from the preset.
fn spec() -> JobSpec {
    let color = Value {
        kind: Some(Kind::StringValue("#C8B8A0".into())),
    };
    JobSpec {
        user_id: "u".into(),
        job_id: "j".into(),
        rules: vec![RuleSpec {
            rule_id: "walls".into(),
            concept: "wall".into(),
            r#type: "recolor".into(),
            params: Some(Struct {
                fields: [("color".to_string(), color)].into(),
            }),
        }],
        image_count: 3,
        preset: "house".into(),
        ..Default::default()
    }
}

/// The record SubmitJob writes for `spec` planned with `at_submission`.
fn recorded(at_submission: &BTreeMap<String, Arc<Preset>>) -> (JobPlan, JobRecord) {
    let plan = validate::validate(&spec(), at_submission, limits()).unwrap();
    let record = JobRecord {
        user_id: "u".into(),
        job_id: "j".into(),
        spec_hash: store::plan_hash(&plan),
        spec: spec(),
        seq: 1,
        cancelled: false,
        source: None,
        preset: plan.preset.clone(),
    };
    (plan, record)
}

/// What a plan runs: its concepts and its rules with every default applied.
fn runs(plan: &JobPlan) -> (Vec<String>, String) {
    (plan.concepts.clone(), format!("{:?}", plan.rules))
}

#[test]
fn a_recorded_job_plans_with_its_preset_as_submitted() {
    let (submitted, record) = recorded(&presets(house(&["wall", "floor", "sofa"], "matte")));
    assert!(record.preset.is_some(), "the record keeps the preset");
    // The preset file was edited since (another default, fewer concepts), or removed.
    for today in [presets(house(&["wall"], "gloss")), BTreeMap::new()] {
        let replanned = replan_record(&record, &today, limits()).expect("it plans as submitted");
        assert_eq!(runs(&replanned), runs(&submitted));
        assert!(
            runs(&replanned).1.contains("Matte"),
            "{:?}",
            replanned.rules
        );
        assert_eq!(replanned.preset, submitted.preset);
    }
}

#[test]
fn a_record_from_before_presets_were_kept_plans_with_todays_and_says_when_it_changed() {
    let at_submission = presets(house(&["wall", "floor", "sofa"], "matte"));
    let (submitted, mut record) = recorded(&at_submission);
    record.preset = None;
    let same = replan_record(&record, &at_submission, limits()).expect("an unchanged preset plans");
    assert_eq!(runs(&same), runs(&submitted));
    let why = replan_record(&record, &presets(house(&["wall"], "matte")), limits()).unwrap_err();
    assert!(why.contains("its preset changed"), "{why}");
}

#[test]
fn limits_lowered_since_still_fail_a_recorded_job() {
    let (_, record) = recorded(&presets(house(&["wall", "floor", "sofa"], "matte")));
    let lower = JobLimits {
        max_images: 2,
        ..limits()
    };
    let why = replan_record(&record, &BTreeMap::new(), lower).unwrap_err();
    assert!(why.contains("image_count"), "{why}");
}
