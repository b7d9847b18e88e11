//! One rule of a job spec: its id, concept, type and params (parsed by palette-rules, the preset's defaults under
//! them), its swatch key and the images its per-image perspective names.

use palette_proto::orchestrator::v1::Rule as RuleSpec;
use palette_rules::preset::Preset;
use palette_rules::rule::{RULE_TYPES, Rule, parse_rule};

use super::concepts::{concept_problem, normalize_concept};
use super::violations::{Validate, Violations};
use crate::keys;
use crate::spec_json::struct_to_json;

/// A rule without problems, before its occluders are known.
#[derive(Debug)]
pub struct ParsedRule {
    pub rule_id: String,
    /// Normalised.
    pub concept: String,
    pub rule: Rule,
}

/// What one rule is checked against.
#[derive(Clone, Copy)]
pub struct RuleContext<'a> {
    /// Its position in `rules` (field paths are `rules[{index}].…`).
    pub index: usize,
    /// The rules before it (rule ids are unique within a job).
    pub earlier: &'a [RuleSpec],
    /// The job's user: a swatch may be one of their own uploads.
    pub user_id: &'a str,
    pub image_count: u32,
    pub preset: Option<&'a Preset>,
    /// Most concepts a job segments: a rule's `occluded_by` cannot name more.
    pub max_concepts: usize,
}

impl Validate<RuleContext<'_>> for RuleSpec {
    type Valid = ParsedRule;

    fn validate(&self, cx: RuleContext<'_>, v: &mut Violations) -> Option<ParsedRule> {
        let i = cx.index;
        let mut ok = true;
        if let Some(problem) = keys::id_problem(&self.rule_id) {
            v.add(format!("rules[{i}].rule_id"), problem);
            ok = false;
        } else if cx.earlier.iter().any(|e| e.rule_id == self.rule_id) {
            v.add(
                format!("rules[{i}].rule_id"),
                format!("duplicate rule id {:?}", self.rule_id),
            );
            ok = false;
        }
        let concept = normalize_concept(&self.concept);
        if let Some(problem) = concept_problem(&concept) {
            v.add(format!("rules[{i}].concept"), problem);
            ok = false;
        }
        let rule_type = self.r#type.trim().to_lowercase();
        if !RULE_TYPES.contains(&rule_type.as_str()) {
            v.add(
                format!("rules[{i}].type"),
                format!(
                    "unknown rule type {:?}; expected one of {}",
                    self.r#type,
                    RULE_TYPES.join(", ")
                ),
            );
            return None;
        }
        let params = self.params.as_ref().map(struct_to_json).unwrap_or_default();
        let defaults = cx.preset.and_then(|p| p.rule_defaults.get(&rule_type));
        let rule = match parse_rule(&rule_type, &params, defaults) {
            Ok(rule) => rule,
            Err(errors) => {
                for e in errors {
                    v.add(format!("rules[{i}].{}", e.field), e.message);
                }
                return None;
            }
        };
        // Occluders are segmented and become key segments (`masks/.../{concept}/...`) like any concept.
        if let Some(list) = rule.occluded_by() {
            if list.len() > cx.max_concepts {
                v.add(
                    format!("rules[{i}].params.occluded_by"),
                    format!("at most {} occluders, got {}", cx.max_concepts, list.len()),
                );
                return None;
            }
            for (j, raw) in list.iter().enumerate() {
                if let Some(problem) = concept_problem(&normalize_concept(raw)) {
                    v.add(format!("rules[{i}].params.occluded_by[{j}]"), problem);
                    ok = false;
                }
            }
        }
        if !ok {
            return None;
        }
        // The swatch is read from storage: refuse keys that could not be stored under the same rules, and any key
        // outside the swatch library and this user's own uploads.
        if let Some(key) = rule.texture_key() {
            let problem = match crate::storage::check_key(key) {
                Err(e) => Some(e.to_string()),
                Ok(()) => keys::swatch_problem(cx.user_id, key),
            };
            if let Some(problem) = problem {
                v.add(format!("rules[{i}].params.swatch"), problem);
                return None;
            }
        }
        // A per-image perspective names images by index: each must be one of this job's.
        for idx in rule.perspective_images() {
            if idx >= cx.image_count {
                v.add(
                    format!("rules[{i}].params.perspective.{idx}"),
                    format!(
                        "image {idx} is not in this job (image_count {})",
                        cx.image_count
                    ),
                );
            }
        }
        Some(ParsedRule {
            rule_id: self.rule_id.clone(),
            concept,
            rule,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::{Struct, Value, value::Kind};

    fn params(pairs: &[(&str, &str)]) -> Option<Struct> {
        Some(Struct {
            fields: pairs
                .iter()
                .map(|(k, v)| {
                    let kind = Some(Kind::StringValue(v.to_string()));
                    (k.to_string(), Value { kind })
                })
                .collect(),
        })
    }

    fn context(earlier: &[RuleSpec]) -> RuleContext<'_> {
        RuleContext {
            index: 1,
            earlier,
            user_id: "u",
            image_count: 1,
            preset: None,
            max_concepts: 32,
        }
    }

    fn check(rule: &RuleSpec, earlier: &[RuleSpec]) -> (Option<ParsedRule>, Vec<String>) {
        let mut v = Violations::default();
        let parsed = rule.validate(context(earlier), &mut v);
        let fields = v.fields().into_iter().map(String::from).collect();
        (parsed, fields)
    }

    #[test]
    fn a_good_rule_parses_with_its_concept_normalised() {
        let rule = RuleSpec {
            rule_id: "r1".into(),
            concept: " Wall ".into(),
            r#type: "Recolor".into(),
            params: params(&[("color", "#FF5733")]),
        };
        let (parsed, fields) = check(&rule, &[]);
        assert!(fields.is_empty(), "{fields:?}");
        assert_eq!(parsed.unwrap().concept, "wall");
    }

    #[test]
    fn an_unknown_type_stops_at_the_type() {
        let rule = RuleSpec {
            rule_id: "r1".into(),
            concept: "wall".into(),
            r#type: "paint".into(),
            ..Default::default()
        };
        assert_eq!(check(&rule, &[]).1, ["rules[1].type"]);
    }

    #[test]
    fn ids_are_unique_and_params_are_checked_even_then() {
        let earlier = [RuleSpec {
            rule_id: "r1".into(),
            ..Default::default()
        }];
        let rule = RuleSpec {
            rule_id: "r1".into(),
            concept: "wall".into(),
            r#type: "recolor".into(),
            params: params(&[("colour", "red")]),
        };
        let (parsed, fields) = check(&rule, &earlier);
        assert!(parsed.is_none());
        assert_eq!(fields[0], "rules[1].rule_id");
        assert!(fields[1..].iter().all(|f| f.starts_with("rules[1].params")));
    }

    #[test]
    fn swatches_come_from_the_library_or_the_users_inputs() {
        let texture = |swatch: &str| RuleSpec {
            rule_id: "t".into(),
            concept: "floor".into(),
            r#type: "texture".into(),
            params: params(&[("swatch", swatch)]),
        };
        assert!(check(&texture("swatches/oak.jpg"), &[]).1.is_empty());
        assert!(check(&texture("inputs/u/j/oak.jpg"), &[]).1.is_empty());
        for bad in ["inputs/v/j/oak.jpg", "../oak.jpg"] {
            assert_eq!(
                check(&texture(bad), &[]).1,
                ["rules[1].params.swatch"],
                "{bad}"
            );
        }
    }
}
