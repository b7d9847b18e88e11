//! What stands in front of a rule's concept: the rule's own `occluded_by`, else the preset's depth order among the
//! job's concepts, else nothing. Occluders are segmented too.

use palette_rules::preset::Preset;

use super::PlannedRule;
use super::concepts::{ConceptList, normalize_concept};
use super::rules::ParsedRule;

/// Each rule with its occluders; every occluder joins `concepts` (after the concepts the occluders were chosen
/// among).
pub fn plan_rules(
    parsed: Vec<ParsedRule>,
    preset: Option<&Preset>,
    concepts: &mut ConceptList,
) -> Vec<PlannedRule> {
    let present = concepts.as_slice().to_vec();
    let mut rules = Vec::new();
    for ParsedRule {
        rule_id,
        concept,
        rule,
    } in parsed
    {
        let occluders: Vec<String> = match (rule.occluded_by(), preset) {
            (Some(list), _) => list
                .iter()
                .map(|c| normalize_concept(c))
                .filter(|c| *c != concept)
                .collect(),
            (None, Some(p)) => p.occluders_of(&concept, &present),
            (None, None) => Vec::new(),
        };
        for c in &occluders {
            concepts.add(c);
        }
        rules.push(PlannedRule {
            rule_id,
            concept,
            rule,
            occluders,
        });
    }
    rules
}
