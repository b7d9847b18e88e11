//! Presets: per-domain data files (concepts to detect, who stands in front of whom, rule defaults), validated on
//! load so a typo fails at start-up instead of silently changing edits.

use crate::rule::{RULE_TYPES, validate_defaults};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Serialize: a job record keeps the preset it was planned with, so a job runs with it to the end.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    pub name: String,
    /// Concepts detected when a request names none.
    pub concepts: Vec<String>,
    /// Depth order: a concept with a higher number is in front of (occludes) one with a lower number. Missing = 0.
    #[serde(default)]
    pub priorities: BTreeMap<String, i32>,
    /// Params merged underneath each rule type's request params.
    #[serde(default)]
    pub rule_defaults: BTreeMap<String, Map<String, Value>>,
    /// The outputs' format for a job that names none (`JobSpec.output_format`): "jpeg" or "png". Missing = jpeg.
    /// Not written when missing, so a job record keeps the bytes (and a replica of an older release reads it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_format: Option<String>,
}

/// The output formats a preset may default to (as `JobSpec.output_format` names them).
pub const OUTPUT_FORMATS: [&str; 2] = ["jpeg", "png"];

#[derive(Debug, thiserror::Error)]
pub enum PresetError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Preset {
    /// Concepts among `present` that are in front of `concept`.
    pub fn occluders_of(&self, concept: &str, present: &[String]) -> Vec<String> {
        let prio = |c: &str| self.priorities.get(c).copied().unwrap_or(0);
        let mine = prio(concept);
        let mut out: Vec<String> = present
            .iter()
            .filter(|c| c.as_str() != concept && prio(c) > mine)
            .cloned()
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Every problem with the preset's contents, as messages.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.name.trim().is_empty() {
            out.push("name: must not be empty".to_string());
        }
        if self.concepts.is_empty() {
            out.push("concepts: must list at least one concept".to_string());
        }
        let mut seen = BTreeSet::new();
        for c in &self.concepts {
            if c.trim().is_empty() || c != c.trim() {
                out.push(format!(
                    "concepts: {c:?} must be a non-empty name without surrounding spaces"
                ));
            }
            if !seen.insert(c) {
                out.push(format!("concepts: {c:?} listed twice"));
            }
        }
        for k in self.priorities.keys().filter(|k| !seen.contains(k)) {
            out.push(format!("priorities.{k}: not one of the preset's concepts"));
        }
        if let Some(format) = &self.output_format
            && !OUTPUT_FORMATS.contains(&format.as_str())
        {
            out.push(format!(
                "output_format: {format:?} is not an output format: {}",
                OUTPUT_FORMATS.join(" or ")
            ));
        }
        for (ty, d) in &self.rule_defaults {
            if !RULE_TYPES.contains(&ty.as_str()) {
                out.push(format!(
                    "rule_defaults.{ty}: unknown rule type; expected one of {}",
                    RULE_TYPES.join(", ")
                ));
                continue;
            }
            for e in validate_defaults(ty, d) {
                out.push(format!(
                    "rule_defaults.{ty}.{}: {}",
                    e.field.trim_start_matches("params."),
                    e.message
                ));
            }
        }
        out
    }
}

/// Loads and validates every `*.json` in `dir`, keyed by preset name (which must match the file stem).
pub fn load_dir(dir: &Path) -> Result<BTreeMap<String, Preset>, PresetError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PresetError::Io { path, source }
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    let mut out = BTreeMap::new();
    for path in paths {
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let preset: Preset = serde_json::from_str(&text).map_err(|source| PresetError::Json {
            path: path.clone(),
            source,
        })?;
        let mut problems = preset.problems();
        if path.file_stem().and_then(|s| s.to_str()) != Some(preset.name.as_str()) {
            problems.push(format!("name: {:?} must match the file name", preset.name));
        }
        if !problems.is_empty() {
            return Err(PresetError::Invalid {
                path,
                message: problems.join("; "),
            });
        }
        out.insert(preset.name.clone(), preset);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn presets_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../presets")
    }

    #[test]
    fn real_presets_load_and_order_occluders() {
        let all = load_dir(&presets_dir()).expect("presets load");
        let interior = &all["interior"];
        for c in [
            "wall", "floor", "ceiling", "sofa", "chair", "table", "rug", "cabinet", "curtain",
            "bed", "lamp", "plant",
        ] {
            assert!(
                interior.concepts.iter().any(|x| x == c),
                "interior lacks {c}"
            );
        }
        let present: Vec<String> = ["wall", "sofa", "rug", "floor", "lamp"]
            .map(String::from)
            .to_vec();
        let occ = interior.occluders_of("wall", &present);
        assert!(occ.contains(&"sofa".to_string()) && occ.contains(&"lamp".to_string()));
        assert!(!occ.contains(&"floor".to_string()));
        assert_eq!(
            interior.occluders_of("floor", &present),
            vec!["lamp", "rug", "sofa"]
        );
        let seller = &all["seller"];
        for c in ["product", "background", "table", "shadow"] {
            assert!(seller.concepts.iter().any(|x| x == c), "seller lacks {c}");
        }
        assert!(
            seller
                .occluders_of("background", &["product".into()])
                .contains(&"product".to_string())
        );
    }

    #[test]
    fn unknown_fields_and_bad_defaults_are_rejected() {
        let bad = r#"{"name":"x","concepts":["a"],"colour":"red"}"#;
        assert!(serde_json::from_str::<Preset>(bad).is_err());
        let p: Preset = serde_json::from_str(
            r#"{"name":"x","concepts":["a","a"],"priorities":{"b":1},
                "rule_defaults":{"recolor":{"finish":"mirror"},"blur":{}},"output_format":"gif"}"#,
        )
        .unwrap();
        let probs = p.problems();
        assert_eq!(probs.len(), 5, "{probs:?}");
        assert!(
            probs
                .iter()
                .any(|m| m.starts_with("output_format: \"gif\"")),
            "{probs:?}"
        );
        let dir = std::env::temp_dir().join(format!("palette-presets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("y.json"), r#"{"name":"x","concepts":["a"]}"#).unwrap();
        let err = load_dir(&dir).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.contains("must match the file name"), "{err}");
    }

    #[test]
    fn an_output_format_is_kept_only_when_the_preset_names_one() {
        let plain: Preset = serde_json::from_str(r#"{"name":"x","concepts":["a"]}"#).unwrap();
        assert_eq!(plain.output_format, None);
        // A job record keeps its preset: one without the field is written as before it existed.
        assert!(
            !serde_json::to_string(&plain)
                .unwrap()
                .contains("output_format")
        );
        let png: Preset =
            serde_json::from_str(r#"{"name":"x","concepts":["a"],"output_format":"png"}"#).unwrap();
        assert!(png.problems().is_empty());
        let back: Preset = serde_json::from_str(&serde_json::to_string(&png).unwrap()).unwrap();
        assert_eq!(back.output_format.as_deref(), Some("png"));
    }
}
