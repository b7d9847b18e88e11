//! Job spec validation: every bad field is reported at once, and the spec is turned into the plan that runs
//! (normalised concepts, parsed rules, occluders resolved, preset applied).

use std::collections::BTreeMap;
use std::sync::Arc;

use palette_proto::orchestrator::v1::{JobSpec, Rule as RuleSpec};
use palette_rules::preset::Preset;
use palette_rules::rule::{RULE_TYPES, Rule, parse_rule};
use serde_json::{Map, Value};

use crate::error::{Error, FieldViolation};
use crate::keys;

pub const MAX_CONCEPT_CHARS: usize = 64;

#[derive(Debug, Clone, Copy)]
pub struct JobLimits {
    pub max_images: u32,
    pub max_rules: usize,
    pub max_concepts: usize,
}

/// One rule, ready to run.
#[derive(Debug)]
pub struct PlannedRule {
    pub rule_id: String,
    pub concept: String,
    pub rule: Rule,
    /// Concepts whose masks are subtracted from the target (the sofa in front of the wall).
    pub occluders: Vec<String>,
}

/// A validated job: what the pipeline runs.
#[derive(Debug)]
pub struct JobPlan {
    pub user_id: String,
    pub job_id: String,
    pub image_count: u32,
    /// Every concept segmented, in one Segment call per image: listed, then rule targets, then occluders.
    pub concepts: Vec<String>,
    pub rules: Vec<PlannedRule>,
    /// The spec after normalisation and the preset: compared for idempotency and reported as `effective_spec`.
    pub effective_spec: JobSpec,
    /// ADAPTER=queue_pull: the job may run more than once (a redelivered queue message), so each item's end is
    /// recorded in storage (`keys::item_marker`) and an item already recorded is not run nor called back again.
    pub durable_items: bool,
}

impl JobPlan {
    /// Concepts whose full-resolution masks a rule needs (targets and occluders); others are only stored.
    pub fn concepts_used_by_rules(&self) -> Vec<&str> {
        let mut used: Vec<&str> = Vec::new();
        for r in &self.rules {
            for c in std::iter::once(&r.concept).chain(&r.occluders) {
                if !used.contains(&c.as_str()) {
                    used.push(c);
                }
            }
        }
        used
    }
}

/// Lower-cased, trimmed, inner whitespace collapsed to one space.
pub fn normalize_concept(raw: &str) -> String {
    raw.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

fn concept_problem(concept: &str) -> Option<String> {
    if concept.is_empty() {
        return Some("must not be empty".into());
    }
    if concept.chars().count() > MAX_CONCEPT_CHARS {
        return Some(format!("must be at most {MAX_CONCEPT_CHARS} characters"));
    }
    // The phrase becomes a key segment (spaces -> '_'): it must be a valid id there.
    if !concept
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, ' ' | '-'))
    {
        return Some("may only contain letters, digits, spaces and '-'".into());
    }
    keys::id_problem(&keys::concept_segment(concept)).map(str::to_string)
}

/// protobuf Struct -> JSON object (what palette-rules parses).
pub fn struct_to_json(s: &prost_types::Struct) -> Map<String, Value> {
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), value_to_json(v)))
        .collect()
}

fn value_to_json(v: &prost_types::Value) -> Value {
    use prost_types::value::Kind;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::NumberValue(n)) => {
            // Struct numbers are doubles; give integral ones back their integer form so "radius": 3 stays an int.
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                Value::from(*n as i64)
            } else {
                serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number)
            }
        }
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StructValue(s)) => Value::Object(struct_to_json(s)),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(value_to_json).collect()),
    }
}

fn push_unique(list: &mut Vec<String>, concept: &str) {
    if !list.iter().any(|c| c == concept) {
        list.push(concept.to_string());
    }
}

pub fn validate(
    spec: &JobSpec,
    presets: &BTreeMap<String, Arc<Preset>>,
    limits: JobLimits,
) -> Result<JobPlan, Error> {
    let mut bad = Vec::new();
    let mut violation =
        |field: String, description: String| bad.push(FieldViolation::new(field, description));

    for (field, id) in [("user_id", &spec.user_id), ("job_id", &spec.job_id)] {
        if let Some(problem) = keys::id_problem(id) {
            violation(field.into(), problem.into());
        }
    }
    if spec.image_count == 0 || spec.image_count > limits.max_images {
        violation(
            "image_count".into(),
            format!("must be between 1 and {}", limits.max_images),
        );
    }

    let preset_name = spec.preset.trim();
    let preset = if preset_name.is_empty() {
        None
    } else if let Some(p) = presets.get(preset_name) {
        Some(p.clone())
    } else {
        let known: Vec<&str> = presets.keys().map(String::as_str).collect();
        violation(
            "preset".into(),
            format!(
                "unknown preset {preset_name:?}; known: [{}]",
                known.join(", ")
            ),
        );
        None
    };

    // Listed concepts, or the preset's when the request lists none.
    let mut concepts: Vec<String> = Vec::new();
    for (i, raw) in spec.concepts.iter().enumerate() {
        let concept = normalize_concept(raw);
        match concept_problem(&concept) {
            Some(problem) => violation(format!("concepts[{i}]"), problem),
            None => push_unique(&mut concepts, &concept),
        }
    }
    if spec.concepts.is_empty()
        && let Some(p) = &preset
    {
        for c in &p.concepts {
            push_unique(&mut concepts, &normalize_concept(c));
        }
    }

    if spec.rules.len() > limits.max_rules {
        violation(
            "rules".into(),
            format!(
                "at most {} rules per job, got {}",
                limits.max_rules,
                spec.rules.len()
            ),
        );
    }
    let mut parsed: Vec<(String, String, Rule)> = Vec::new();
    for (i, r) in spec.rules.iter().enumerate() {
        if let Some(planned) = check_rule(
            i,
            r,
            &spec.rules[..i],
            &spec.user_id,
            preset.as_deref(),
            &mut violation,
        ) {
            // A per-image perspective names images by index: each must be one of this job's.
            for idx in planned.2.perspective_images() {
                if idx >= spec.image_count {
                    violation(
                        format!("rules[{i}].params.perspective.{idx}"),
                        format!(
                            "image {idx} is not in this job (image_count {})",
                            spec.image_count
                        ),
                    );
                }
            }
            push_unique(&mut concepts, &planned.1);
            parsed.push(planned);
        }
    }
    if concepts.is_empty() && spec.rules.is_empty() {
        violation(
            "concepts".into(),
            "name at least one concept or rule (or a preset with concepts)".into(),
        );
    }

    // Occluders: the rule's own list, else the preset's depth order among the job's concepts.
    let present = concepts.clone();
    let mut rules = Vec::new();
    for (rule_id, concept, rule) in parsed {
        let occluders: Vec<String> = match (rule.occluded_by(), &preset) {
            (Some(list), _) => list
                .iter()
                .map(|c| normalize_concept(c))
                .filter(|c| *c != concept)
                .collect(),
            (None, Some(p)) => p.occluders_of(&concept, &present),
            (None, None) => Vec::new(),
        };
        for c in &occluders {
            push_unique(&mut concepts, c);
        }
        rules.push(PlannedRule {
            rule_id,
            concept,
            rule,
            occluders,
        });
    }
    if concepts.len() > limits.max_concepts {
        violation(
            "concepts".into(),
            format!(
                "{} concepts to segment (listed, rule targets and occluders: {}) exceed the limit of {}",
                concepts.len(),
                concepts.join(", "),
                limits.max_concepts
            ),
        );
    }

    if !bad.is_empty() {
        return Err(Error::InvalidArgument(bad));
    }
    let effective_spec = JobSpec {
        user_id: spec.user_id.clone(),
        job_id: spec.job_id.clone(),
        concepts: concepts.clone(),
        rules: spec
            .rules
            .iter()
            .zip(&rules)
            .map(|(r, planned)| RuleSpec {
                concept: planned.concept.clone(),
                ..r.clone()
            })
            .collect(),
        image_count: spec.image_count,
        preset: preset_name.to_string(),
    };
    Ok(JobPlan {
        user_id: spec.user_id.clone(),
        job_id: spec.job_id.clone(),
        image_count: spec.image_count,
        concepts,
        rules,
        effective_spec,
        durable_items: false,
    })
}

/// One rule's problems, reported through `violation`; the parsed rule when it has none.
fn check_rule(
    i: usize,
    r: &RuleSpec,
    earlier: &[RuleSpec],
    user_id: &str,
    preset: Option<&Preset>,
    violation: &mut impl FnMut(String, String),
) -> Option<(String, String, Rule)> {
    let mut ok = true;
    if let Some(problem) = keys::id_problem(&r.rule_id) {
        violation(format!("rules[{i}].rule_id"), problem.into());
        ok = false;
    } else if earlier.iter().any(|e| e.rule_id == r.rule_id) {
        violation(
            format!("rules[{i}].rule_id"),
            format!("duplicate rule id {:?}", r.rule_id),
        );
        ok = false;
    }
    let concept = normalize_concept(&r.concept);
    if let Some(problem) = concept_problem(&concept) {
        violation(format!("rules[{i}].concept"), problem);
        ok = false;
    }
    let rule_type = r.r#type.trim().to_lowercase();
    if !RULE_TYPES.contains(&rule_type.as_str()) {
        violation(
            format!("rules[{i}].type"),
            format!(
                "unknown rule type {:?}; expected one of {}",
                r.r#type,
                RULE_TYPES.join(", ")
            ),
        );
        return None;
    }
    let params = r.params.as_ref().map(struct_to_json).unwrap_or_default();
    let defaults = preset.and_then(|p| p.rule_defaults.get(&rule_type));
    match parse_rule(&rule_type, &params, defaults) {
        Ok(rule) if ok => {
            // The swatch is read from storage: refuse keys that could not be stored under the same rules, and any
            // key outside the swatch library and this user's own uploads.
            if let Some(key) = rule.texture_key() {
                let problem = match crate::storage::check_key(key) {
                    Err(e) => Some(e.to_string()),
                    Ok(()) => keys::swatch_problem(user_id, key),
                };
                if let Some(problem) = problem {
                    violation(format!("rules[{i}].params.swatch"), problem);
                    return None;
                }
            }
            Some((r.rule_id.clone(), concept, rule))
        }
        Ok(_) => None,
        Err(errors) => {
            for e in errors {
                violation(format!("rules[{i}].{}", e.field), e.message);
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
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
            crate::adapters::runpod::spec_from_input(&serde_json::json!({
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
        let Err(Error::InvalidArgument(v)) = validate(
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
        let Err(Error::InvalidArgument(v)) = validate(
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
        };
        let Err(Error::InvalidArgument(v)) = validate(&spec, &BTreeMap::new(), limits()) else {
            panic!("accepted")
        };
        let fields: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
        for expected in [
            "user_id",
            "job_id",
            "image_count",
            "preset",
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
    fn too_many_concepts_counts_rule_concepts() {
        let mut spec = seed_spec();
        spec.concepts = (0..16).map(|i| format!("thing{i}")).collect();
        let Err(Error::InvalidArgument(v)) = validate(&spec, &BTreeMap::new(), limits()) else {
            panic!("accepted")
        };
        assert_eq!(v[0].field, "concepts");
    }

    #[test]
    fn struct_numbers_keep_integers() {
        let s = Struct {
            fields: [
                (
                    "n".to_string(),
                    PValue {
                        kind: Some(Kind::NumberValue(3.0)),
                    },
                ),
                (
                    "f".to_string(),
                    PValue {
                        kind: Some(Kind::NumberValue(0.5)),
                    },
                ),
            ]
            .into_iter()
            .collect(),
        };
        let json = struct_to_json(&s);
        assert_eq!(json["n"], serde_json::json!(3));
        assert_eq!(json["f"], serde_json::json!(0.5));
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
    fn explicit_occluders_are_segmented_too() {
        let mut spec = seed_spec();
        let mut params = params(&[("color", "#FF5733")]).unwrap();
        params.fields.insert(
            "occluded_by".into(),
            PValue {
                kind: Some(Kind::ListValue(prost_types::ListValue {
                    values: vec![PValue {
                        kind: Some(Kind::StringValue("Lamp".into())),
                    }],
                })),
            },
        );
        spec.rules[0].params = Some(params);
        let plan = validate(&spec, &BTreeMap::new(), limits()).unwrap();
        assert_eq!(plan.rules[0].occluders, ["lamp"]);
        assert!(plan.concepts.contains(&"lamp".to_string()));
    }

    #[test]
    fn swatch_keys_must_be_plain_keys() {
        let mut spec = seed_spec();
        spec.rules[0].r#type = "texture".into();
        spec.rules[0].params = params(&[("swatch", "../../etc/passwd")]);
        let Err(Error::InvalidArgument(v)) = validate(&spec, &BTreeMap::new(), limits()) else {
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
            let Err(Error::InvalidArgument(v)) = validate(&spec, &BTreeMap::new(), limits()) else {
                panic!("{key} accepted")
            };
            assert_eq!(v.len(), 1, "{key}: {v:?}");
            assert_eq!(v[0].field, "rules[0].params.swatch", "{key}");
        }
    }
}
