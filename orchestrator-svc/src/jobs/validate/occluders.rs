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
            (Some(list), _) => {
                // Each once, in the order given: a repeated occluder ("sofa", "Sofa") adds nothing to the region
                // but would cost a full-frame mask copy per entry, and would keep rules that name the same
                // occluders from sharing their region.
                let mut unique: Vec<String> = Vec::with_capacity(list.len());
                for c in list.iter().map(|c| normalize_concept(c)) {
                    if c != concept && !unique.contains(&c) {
                        unique.push(c);
                    }
                }
                unique
            }
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
