//! The job spec as a whole: the examples a newcomer would try first.

use super::*;
use prost_types::{Struct, Value as PValue, value::Kind};

fn limits() -> JobLimits {
    JobLimits {
        max_images: 500,
        max_rules: 16,
        max_concepts: 16,
    }
}

fn params(pairs: &[(&str, &str)]) -> Option<Struct> {
    Some(Struct {
        fields: pairs
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    PValue {
                        kind: Some(Kind::StringValue(v.to_string())),
                    },
                )
            })
            .collect(),
    })
}

pub fn seed_spec() -> JobSpec {
    JobSpec {
        user_id: "test-user".into(),
        job_id: "test-job".into(),
        concepts: vec!["wall".into(), "floor".into(), "furniture".into()],
        rules: vec![RuleSpec {
            rule_id: "rule1".into(),
            concept: "wall".into(),
            r#type: "recolor".into(),
            params: params(&[("color", "#FF5733")]),
        }],
        image_count: 1,
        preset: String::new(),
        output_format: String::new(),
    }
}

#[test]
fn accepts_the_seed_example() {
    let plan = validate(&seed_spec(), &BTreeMap::new(), limits()).unwrap();
    assert_eq!(plan.concepts, ["wall", "floor", "furniture"]);
    assert_eq!(plan.rules.len(), 1);
    assert_eq!(plan.rules[0].concept, "wall");
    assert!(plan.rules[0].occluders.is_empty());
}

#[test]
fn a_per_image_perspective_names_only_this_jobs_images() {
    let floor = serde_json::json!([[0.3, 0.5], [0.7, 0.5], [1.0, 1.0], [0.0, 1.0]]);
    let spec = |planes: serde_json::Value| {
        crate::spec_json::spec_from_input(&serde_json::json!({
            "userId": "u", "jobId": "j", "imageCount": 2, "concepts": ["floor"],
            "rules": [{"ruleId": "oak", "concept": "floor", "type": "texture",
                       "params": {"builtin": "wood", "perspective": planes}}],
        }))
        .unwrap()
    };
    let plan = validate(
        &spec(serde_json::json!({"1": floor})),
        &BTreeMap::new(),
        limits(),
    )
    .unwrap();
    let rule = &plan.rules[0].rule;
    let plane = |idx| match rule.for_image(idx).as_ref() {
        Rule::Texture(p) => p.perspective.clone(),
        _ => unreachable!(),
    };
    assert!(plane(0).is_none(), "image 0 has no plane: flat tiling");
    assert_eq!(plane(1).unwrap().corners[0], [0.3, 0.5]);
    let Err(ApiError::InvalidArgument(v)) = validate(
        &spec(serde_json::json!({"5": floor, "one": floor})),
        &BTreeMap::new(),
        limits(),
    ) else {
        panic!("accepted")
    };
    let fields: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
    assert_eq!(
        fields,
        ["rules[0].params.perspective.one"],
        "a bad key fails the rule before its indices are checked"
    );
    let Err(ApiError::InvalidArgument(v)) = validate(
        &spec(serde_json::json!({"5": floor})),
        &BTreeMap::new(),
        limits(),
    ) else {
        panic!("accepted")
    };
    assert_eq!(v[0].field, "rules[0].params.perspective.5");
    assert!(v[0].description.contains("image_count 2"), "{:?}", v[0]);
}

#[test]
fn adds_rule_concepts_and_normalizes() {
    let mut spec = seed_spec();
    spec.concepts = vec!["  Wooden   Floor ".into()];
    spec.rules[0].concept = "WALL".into();
    let plan = validate(&spec, &BTreeMap::new(), limits()).unwrap();
    assert_eq!(plan.concepts, ["wooden floor", "wall"]);
}

#[test]
fn reports_every_bad_field() {
    let spec = JobSpec {
        user_id: "../etc".into(),
        job_id: String::new(),
        concepts: vec!["".into(), "x".repeat(65), "ok".into()],
        rules: vec![
            RuleSpec {
                rule_id: "r1".into(),
                concept: "wall".into(),
                r#type: "paint".into(),
                params: None,
            },
            RuleSpec {
                rule_id: "r2".into(),
                concept: "wall".into(),
                r#type: "recolor".into(),
                params: params(&[("colour", "red")]),
            },
            RuleSpec {
                rule_id: "r2".into(),
                concept: "floor".into(),
                r#type: "recolor".into(),
                params: params(&[("color", "#00FF00")]),
            },
        ],
        image_count: 0,
        preset: "nope".into(),
        output_format: "gif".into(),
    };
    let Err(ApiError::InvalidArgument(v)) = validate(&spec, &BTreeMap::new(), limits()) else {
        panic!("accepted")
    };
    let fields: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
    for expected in [
        "user_id",
        "job_id",
        "image_count",
        "preset",
        "output_format",
        "concepts[0]",
        "concepts[1]",
        "rules[0].type",
        "rules[2].rule_id",
    ] {
        assert!(
            fields.contains(&expected),
            "{expected} missing from {fields:?}"
        );
    }
    assert!(
        fields.iter().any(|f| f.starts_with("rules[1].params")),
        "{fields:?}"
    );
}

#[test]
fn the_output_format_is_jpeg_by_default_or_png() {
    let plan = |format: &str| {
        let mut spec = seed_spec();
        spec.output_format = format.into();
        validate(&spec, &BTreeMap::new(), limits()).unwrap()
    };
    for jpeg in ["", "jpeg", " jpeg "] {
        let plan = plan(jpeg);
        assert!(!plan.png_outputs(), "{jpeg:?}");
        // Empty in the effective spec: a job naming no format hashes as it did before the field existed.
        assert_eq!(plan.effective_spec.output_format, "");
    }
    let png = plan("png");
    assert!(png.png_outputs());
    assert_eq!(png.effective_spec.output_format, "png");
}

#[test]
fn too_many_concepts_counts_rule_concepts() {
    let mut spec = seed_spec();
    spec.concepts = (0..16).map(|i| format!("thing{i}")).collect();
    let Err(ApiError::InvalidArgument(v)) = validate(&spec, &BTreeMap::new(), limits()) else {
        panic!("accepted")
    };
    assert_eq!(v[0].field, "concepts");
}

#[test]
fn too_many_concepts_without_rules_is_one_violation() {
    let mut spec = seed_spec();
    spec.concepts = (0..17).map(|i| format!("thing{i}")).collect();
    spec.rules.clear();
    let Err(ApiError::InvalidArgument(v)) = validate(&spec, &BTreeMap::new(), limits()) else {
        panic!("accepted")
    };
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].description.starts_with("at most 16 concepts"), "{v:?}");
}

fn preset() -> BTreeMap<String, Arc<Preset>> {
    let p = Preset {
        name: "home".into(),
        concepts: vec!["wall".into(), "sofa".into(), "floor".into()],
        priorities: [
            ("wall".to_string(), 0),
            ("floor".to_string(), 0),
            ("sofa".to_string(), 3),
        ]
        .into_iter()
        .collect(),
        rule_defaults: BTreeMap::new(),
        output_format: None,
    };
    [("home".to_string(), Arc::new(p))].into_iter().collect()
}

#[test]
fn a_preset_supplies_concepts_and_occluders() {
    let mut spec = seed_spec();
    spec.concepts.clear();
    spec.preset = "home".into();
    let plan = validate(&spec, &preset(), limits()).unwrap();
    assert_eq!(plan.concepts, ["wall", "sofa", "floor"]);
    assert_eq!(plan.rules[0].occluders, ["sofa"]);
    assert_eq!(plan.effective_spec.concepts, plan.concepts);
    assert_eq!(plan.concepts_used_by_rules(), ["wall", "sofa"]);
}

#[test]
fn a_preset_may_default_the_output_format_and_a_job_may_still_name_jpeg() {
    let mut presets = preset();
    let mut png_preset = (*presets["home"]).clone();
    png_preset.output_format = Some("png".into());
    presets.insert("home".into(), Arc::new(png_preset));
    let plan = |format: &str| {
        let mut spec = seed_spec();
        spec.preset = "home".into();
        spec.output_format = format.into();
        validate(&spec, &presets, limits()).unwrap()
    };
    let unnamed = plan("");
    assert!(unnamed.png_outputs(), "the preset's png");
    assert_eq!(unnamed.effective_spec.output_format, "png");
    let jpeg = plan("jpeg");
    assert!(!jpeg.png_outputs(), "the job's own choice wins");
    // Kept as said: validated again (an edit is recorded by its effective spec) it must not become the preset's.
    assert_eq!(jpeg.effective_spec.output_format, "jpeg");
    for plan in [unnamed, jpeg] {
        let again = validate(&plan.effective_spec, &presets, limits()).unwrap();
        assert_eq!(again.effective_spec, plan.effective_spec);
    }
    // A preset without one changes nothing: the job's default stays JPEG, written as before.
    let mut spec = seed_spec();
    spec.preset = "home".into();
    let plain = validate(&spec, &preset(), limits()).unwrap();
    assert!(!plain.png_outputs());
    assert_eq!(plain.effective_spec.output_format, "");
}

#[test]
fn explicit_occluders_are_segmented_too() {
    let mut spec = seed_spec();
    let mut params = params(&[("color", "#FF5733")]).unwrap();
    params.fields.insert(
        "occluded_by".into(),
        PValue {
            kind: Some(Kind::ListValue(prost_types::ListValue {
                // Repeats (in any case) and the rule's own concept count once, and not at all.
                values: ["Lamp", "lamp", "wall", "LAMP ", "sofa", "Lamp"]
                    .into_iter()
                    .map(|s| PValue {
                        kind: Some(Kind::StringValue(s.into())),
                    })
                    .collect(),
            })),
        },
    );
    spec.rules[0].params = Some(params);
    let plan = validate(&spec, &BTreeMap::new(), limits()).unwrap();
    assert_eq!(plan.rules[0].occluders, ["lamp", "sofa"]);
    assert!(plan.concepts.contains(&"lamp".to_string()));
}

#[test]
fn swatch_keys_must_be_plain_keys() {
    let mut spec = seed_spec();
    spec.rules[0].r#type = "texture".into();
    spec.rules[0].params = params(&[("swatch", "../../etc/passwd")]);
    let Err(ApiError::InvalidArgument(v)) = validate(&spec, &BTreeMap::new(), limits()) else {
        panic!("accepted")
    };
    assert_eq!(v[0].field, "rules[0].params.swatch");
}

#[test]
fn swatch_keys_name_the_library_or_the_users_own_inputs() {
    let user = seed_spec().user_id;
    for key in [
        "swatches/oak.jpg".to_string(),
        "swatches/woods/walnut.png".to_string(),
        format!("inputs/{user}/job-1/swatch.jpg"),
    ] {
        let mut spec = seed_spec();
        spec.rules[0].r#type = "texture".into();
        spec.rules[0].params = params(&[("swatch", key.as_str())]);
        let plan = validate(&spec, &BTreeMap::new(), limits());
        assert!(plan.is_ok(), "{key}: {plan:?}");
    }
    for key in [
        "inputs/someone-else/job-1/0.jpg",
        "outputs/test-user/job-1/rule1/0.jpg",
        "masks/test-user/job-1/wall/0_1.png",
        "swatches",
        "swatches/",
        "inputs/test-user",
        "inputs/test-user/",
        "inputs/test-user-2/x.jpg",
        "private/swatches/oak.jpg",
        "Swatches/oak.jpg",
    ] {
        let key = key.replace("test-user", &user);
        let mut spec = seed_spec();
        spec.rules[0].r#type = "texture".into();
        spec.rules[0].params = params(&[("swatch", key.as_str())]);
        let Err(ApiError::InvalidArgument(v)) = validate(&spec, &BTreeMap::new(), limits()) else {
            panic!("{key} accepted")
        };
        assert_eq!(v.len(), 1, "{key}: {v:?}");
        assert_eq!(v[0].field, "rules[0].params.swatch", "{key}");
    }
}

#[test]
fn occluders_are_checked_like_concepts() {
    let mut spec = seed_spec();
    let mut p = params(&[("color", "#FF5733")]).unwrap();
    p.fields.insert(
        "occluded_by".into(),
        PValue {
            kind: Some(Kind::ListValue(prost_types::ListValue {
                values: ["sofa", "a/b", "..", "étagère"]
                    .iter()
                    .map(|s| PValue {
                        kind: Some(Kind::StringValue(s.to_string())),
                    })
                    .collect(),
            })),
        },
    );
    spec.rules[0].params = Some(p);
    let Err(ApiError::InvalidArgument(v)) = validate(&spec, &BTreeMap::new(), limits()) else {
        panic!("accepted occluders that would become key segments");
    };
    let fields: Vec<&str> = v.iter().map(|f| f.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "rules[0].params.occluded_by[1]",
            "rules[0].params.occluded_by[2]",
            "rules[0].params.occluded_by[3]"
        ]
    );
}

#[test]
fn a_4_mib_spec_of_phrases_is_refused_on_its_lengths_in_milliseconds() {
    // What fits in a 4 MiB gRPC message: ~400k short phrases, and 100k rules. Deduplicating them one by one is
    // quadratic (~10^11 comparisons); the lengths alone decide.
    let mut spec = seed_spec();
    spec.concepts = (0..400_000).map(|i| format!("thing {i}")).collect();
    spec.rules = (0..100_000)
        .map(|i| RuleSpec {
            rule_id: format!("r{i}"),
            concept: format!("thing {i}"),
            r#type: "recolor".into(),
            params: params(&[("color", "#FF5733")]),
        })
        .collect();
    let started = std::time::Instant::now();
    let Err(ApiError::InvalidArgument(v)) = validate(&spec, &BTreeMap::new(), limits()) else {
        panic!("accepted");
    };
    let took = started.elapsed();
    let fields: Vec<&str> = v.iter().map(|f| f.field.as_str()).collect();
    assert_eq!(fields, ["concepts", "rules"], "{v:?}");
    assert!(v[0].description.contains("got 400000"), "{v:?}");
    println!("refused in {took:?}");
    assert!(took < std::time::Duration::from_millis(50), "took {took:?}");
}
