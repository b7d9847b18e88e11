//! Concept phrases: normalised, checked (they become key segments), deduplicated, in the order they are segmented.

use palette_rules::preset::Preset;

use super::violations::Violations;
use crate::keys;

pub const MAX_CONCEPT_CHARS: usize = 64;

/// Lower-cased, trimmed, inner whitespace collapsed to one space.
pub fn normalize_concept(raw: &str) -> String {
    raw.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Why a normalised phrase cannot be a concept, if it cannot.
pub fn concept_problem(concept: &str) -> Option<String> {
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

/// The concepts a job segments, each once, in first-seen order: listed, then rule targets, then occluders.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConceptList(Vec<String>);

impl ConceptList {
    pub fn add(&mut self, concept: &str) {
        if !self.0.iter().any(|c| c == concept) {
            self.0.push(concept.to_string());
        }
    }

    pub fn as_slice(&self) -> &[String] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_vec(self) -> Vec<String> {
        self.0
    }
}

/// The request's `concepts` (each checked as `concepts[i]`), or the preset's when the request lists none.
pub fn listed(raw: &[String], preset: Option<&Preset>, v: &mut Violations) -> ConceptList {
    let mut concepts = ConceptList::default();
    for (i, raw) in raw.iter().enumerate() {
        let concept = normalize_concept(raw);
        match concept_problem(&concept) {
            Some(problem) => v.add(format!("concepts[{i}]"), problem),
            None => concepts.add(&concept),
        }
    }
    if raw.is_empty()
        && let Some(p) = preset
    {
        for c in &p.concepts {
            concepts.add(&normalize_concept(c));
        }
    }
    concepts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_concepts_are_normalised_once_each() {
        let mut v = Violations::default();
        let raw = ["  Wooden   Floor ", "wooden floor", "WALL"].map(String::from);
        let concepts = listed(&raw, None, &mut v);
        assert_eq!(concepts.as_slice(), ["wooden floor", "wall"]);
        assert!(v.fields().is_empty());
    }

    #[test]
    fn bad_phrases_are_reported_by_index() {
        let mut v = Violations::default();
        let raw = ["".to_string(), "x".repeat(65), "ok".into(), "a/b".into()];
        let concepts = listed(&raw, None, &mut v);
        assert_eq!(concepts.as_slice(), ["ok"]);
        assert_eq!(v.fields(), ["concepts[0]", "concepts[1]", "concepts[3]"]);
    }

    #[test]
    fn a_preset_fills_in_only_when_none_are_listed() {
        let preset = Preset {
            name: "home".into(),
            concepts: vec!["Wall".into(), "sofa".into()],
            priorities: Default::default(),
            rule_defaults: Default::default(),
            output_format: None,
        };
        let mut v = Violations::default();
        assert_eq!(
            listed(&[], Some(&preset), &mut v).as_slice(),
            ["wall", "sofa"]
        );
        assert_eq!(
            listed(&["floor".into()], Some(&preset), &mut v).as_slice(),
            ["floor"]
        );
    }
}
