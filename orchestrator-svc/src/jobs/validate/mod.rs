//! Job spec validation: every bad field is reported at once, and the spec is turned into the plan that runs
//! (normalised concepts, parsed rules, occluders resolved, preset applied).
//!
//! One concern per file, all adding to one `Violations`: `concepts` (phrases), `rules` (`impl Validate for Rule`),
//! `occluders` (what a rule's region leaves out). This file checks the spec's own fields and puts the plan
//! together.

mod concepts;
mod job_ref;
mod occluders;
mod rules;
mod violations;

use std::collections::BTreeMap;
use std::sync::Arc;

use palette_proto::orchestrator::v1::{JobSpec, Rule as RuleSpec};
use palette_rules::preset::{OUTPUT_FORMATS, Preset};
use palette_rules::rule::Rule;

pub use concepts::{MAX_CONCEPT_CHARS, concept_problem, normalize_concept};
pub use job_ref::JobKey;
pub use violations::{Validate, Violations};

use crate::error::ApiError;
use crate::keys;
use concepts::ConceptList;
use rules::{ParsedRule, RuleContext};

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

/// The job a request names, checked: INVALID_ARGUMENT with every bad id otherwise.
pub fn job_key<R: Validate<(), Valid = JobKey>>(request: &R) -> Result<JobKey, ApiError> {
    let mut v = Violations::default();
    let key = request.validate((), &mut v);
    v.finish()?;
    Ok(key.expect("ids without violations make a key"))
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
    /// With `durable_items`: the hash of the queue message's own spec, as it came (`job::spec_hash`), which keys
    /// the item records. Not the effective spec's: that one depends on the presets of the replica that plans it,
    /// and a redelivery to a replica whose preset changed since (a rolling deploy) found none of the records and
    /// ran and called back every item again.
    pub message_hash: Option<String>,
    /// Set for an edit (EditJob): the photos and masks come from another job's, and nothing is segmented.
    pub source: Option<EditSource>,
    /// The preset the spec named, as it was when planned: the job record keeps it, so the rest of a resumed job
    /// (or another replica's share of it) is planned with it, not with a preset file changed since.
    pub preset: Option<Arc<Preset>>,
}

/// Where an edit's photos and masks are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EditSource {
    /// The job the request named.
    pub source_job_id: String,
    /// The job whose `inputs/` and `masks/` hold them: the source itself, or the source's own source.
    pub photos_job_id: String,
}

#[cfg(test)]
impl JobPlan {
    /// A queue job's plan (durable items) of `image_count` images, no rules, for tests.
    pub(crate) fn durable_for_tests(job_id: &str, image_count: u32) -> JobPlan {
        JobPlan {
            user_id: "u".into(),
            job_id: job_id.into(),
            image_count,
            concepts: vec!["wall".into()],
            rules: vec![],
            effective_spec: Default::default(),
            durable_items: true,
            message_hash: None,
            source: None,
            preset: None,
        }
    }
}

impl JobPlan {
    /// Whether a rule fills its region from the photo around it: such an item holds more memory (`admission`).
    pub fn fills(&self) -> bool {
        self.rules.iter().any(|r| r.rule.fills_from_surroundings())
    }

    /// Whether the rules' outputs are PNG (`JobSpec.output_format`), keeping a photo's transparency; a cut-out's
    /// is PNG either way.
    pub fn png_outputs(&self) -> bool {
        self.effective_spec.output_format == PNG
    }

    /// The job under whose `inputs/` (and `masks/`) this job's photos are: its own, or an edit's source's.
    pub fn photos_job_id(&self) -> &str {
        self.source
            .as_ref()
            .map_or(&self.job_id, |s| &s.photos_job_id)
    }

    /// The job's identity in the registry.
    pub fn key(&self) -> JobKey {
        JobKey {
            user_id: self.user_id.clone(),
            job_id: self.job_id.clone(),
        }
    }

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

/// What a job spec is checked against.
#[derive(Clone, Copy)]
pub struct JobContext<'a> {
    pub presets: &'a BTreeMap<String, Arc<Preset>>,
    pub limits: JobLimits,
    /// Whether the concepts to segment (listed, rule targets, occluders) are held to `limits.max_concepts`: not for
    /// an edit, which segments nothing (`validate_edit`); every list length is still capped.
    pub count_concepts: bool,
}

/// The spec as a plan, or every problem it has.
pub fn validate(
    spec: &JobSpec,
    presets: &BTreeMap<String, Arc<Preset>>,
    limits: JobLimits,
) -> Result<JobPlan, ApiError> {
    validate_in(spec, presets, limits, true)
}

/// `validate` for an edit's spec (its source's concepts and the edit's rules): the concepts it names are not
/// counted against the limit (it segments nothing; one its source lacks is named by `edit::plan_edit`), every list
/// length still is.
pub fn validate_edit(
    spec: &JobSpec,
    presets: &BTreeMap<String, Arc<Preset>>,
    limits: JobLimits,
) -> Result<JobPlan, ApiError> {
    validate_in(spec, presets, limits, false)
}

fn validate_in(
    spec: &JobSpec,
    presets: &BTreeMap<String, Arc<Preset>>,
    limits: JobLimits,
    count_concepts: bool,
) -> Result<JobPlan, ApiError> {
    let cx = JobContext {
        presets,
        limits,
        count_concepts,
    };
    let mut v = Violations::default();
    let plan = spec.validate(cx, &mut v);
    v.finish()?;
    Ok(plan.expect("a spec without violations has a plan"))
}

impl Validate<JobContext<'_>> for JobSpec {
    type Valid = JobPlan;

    fn validate(&self, cx: JobContext<'_>, v: &mut Violations) -> Option<JobPlan> {
        for (field, id) in [("user_id", &self.user_id), ("job_id", &self.job_id)] {
            if let Some(problem) = keys::id_problem(id) {
                v.add(field, problem);
            }
        }
        if self.image_count == 0 || self.image_count > cx.limits.max_images {
            v.add(
                "image_count",
                format!("must be between 1 and {}", cx.limits.max_images),
            );
        }
        let named = preset_of(self, cx.presets, v);
        let preset = named.as_deref();
        output_format(&self.output_format, preset, v);
        // Lists are checked on their length before any per-entry work (deduplication is quadratic): a 4 MiB spec
        // of short phrases is hundreds of thousands of them.
        let listed = if self.concepts.len() > cx.limits.max_concepts {
            v.add(
                "concepts",
                format!(
                    "at most {} concepts per job, got {}",
                    cx.limits.max_concepts,
                    self.concepts.len()
                ),
            );
            &[][..]
        } else {
            &self.concepts[..]
        };
        let mut concepts = concepts::listed(listed, preset, v);
        let parsed = parsed_rules(self, cx.limits, preset, v);
        for rule in &parsed {
            concepts.add(&rule.concept);
        }
        // Too many listed: already said; "name at least one" would contradict it.
        if concepts.is_empty() && self.rules.is_empty() && listed.len() == self.concepts.len() {
            v.add(
                "concepts",
                "name at least one concept or rule (or a preset with concepts)",
            );
        }
        let rules = occluders::plan_rules(parsed, preset, &mut concepts);
        if cx.count_concepts && concepts.len() > cx.limits.max_concepts {
            v.add(
                "concepts",
                format!(
                    "{} concepts to segment (listed, rule targets and occluders: {}) exceed the limit of {}",
                    concepts.len(),
                    concepts.as_slice().join(", "),
                    cx.limits.max_concepts
                ),
            );
        }
        if !v.is_empty() {
            return None;
        }
        Some(plan(self, concepts, rules, named))
    }
}

/// The outputs' format as the effective spec says it: "png", or empty for JPEG (the default, kept empty so that
/// the spec hash of a job that names no format is what it was before the field existed). A job that names none
/// takes its preset's; "jpeg" is kept as said only where the preset's is png, so that validating the effective
/// spec again (an edit's record) gives the same format.
fn output_format(raw: &str, preset: Option<&Preset>, v: &mut Violations) -> &'static str {
    let preset_png = preset.and_then(|p| p.output_format.as_deref()) == Some(PNG);
    match raw.trim() {
        "" if preset_png => PNG,
        "" => "",
        "jpeg" if preset_png => "jpeg",
        "jpeg" => "",
        PNG => PNG,
        other => {
            v.add(
                "output_format",
                format!(
                    "{other:?} is not an output format: {}",
                    OUTPUT_FORMATS.join(" or ")
                ),
            );
            ""
        }
    }
}

const PNG: &str = "png";

/// The named preset (None when none is named, or when the name is unknown: a violation).
fn preset_of(
    spec: &JobSpec,
    presets: &BTreeMap<String, Arc<Preset>>,
    v: &mut Violations,
) -> Option<Arc<Preset>> {
    let name = spec.preset.trim();
    if name.is_empty() {
        return None;
    }
    let found = presets.get(name).cloned();
    if found.is_none() {
        let known: Vec<&str> = presets.keys().map(String::as_str).collect();
        v.add(
            "preset",
            format!("unknown preset {name:?}; known: [{}]", known.join(", ")),
        );
    }
    found
}

/// Every rule without problems; a job has at most `max_rules`.
fn parsed_rules(
    spec: &JobSpec,
    limits: JobLimits,
    preset: Option<&Preset>,
    v: &mut Violations,
) -> Vec<ParsedRule> {
    if spec.rules.len() > limits.max_rules {
        v.add(
            "rules",
            format!(
                "at most {} rules per job, got {}",
                limits.max_rules,
                spec.rules.len()
            ),
        );
        return Vec::new();
    }
    let mut parsed = Vec::new();
    for (index, rule) in spec.rules.iter().enumerate() {
        let cx = RuleContext {
            index,
            earlier: &spec.rules[..index],
            user_id: &spec.user_id,
            image_count: spec.image_count,
            preset,
            max_concepts: limits.max_concepts,
        };
        parsed.extend(rule.validate(cx, v));
    }
    parsed
}

/// The plan of a spec without violations; its `effective_spec` is the spec as it will run.
fn plan(
    spec: &JobSpec,
    concepts: ConceptList,
    rules: Vec<PlannedRule>,
    preset: Option<Arc<Preset>>,
) -> JobPlan {
    let effective_spec = JobSpec {
        user_id: spec.user_id.clone(),
        job_id: spec.job_id.clone(),
        concepts: concepts.as_slice().to_vec(),
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
        preset: spec.preset.trim().to_string(),
        output_format: output_format(
            &spec.output_format,
            preset.as_deref(),
            &mut Violations::default(),
        )
        .to_string(),
    };
    JobPlan {
        user_id: spec.user_id.clone(),
        job_id: spec.job_id.clone(),
        image_count: spec.image_count,
        concepts: concepts.into_vec(),
        rules,
        effective_spec,
        durable_items: false,
        message_hash: None,
        source: None,
        preset,
    }
}

#[cfg(test)]
mod tests;
