//! Edits: new rules on the photos of a job that already ran, from its stored masks, without the segmenter.
//!
//! An edit is a job of its own (its `job_id`), registered, run, followed, cancelled and called back like any other;
//! its plan carries an `EditSource`, so its items read their photo from the source's `inputs/` and their masks from
//! the source's `masks/` (`item::stored_masks`) instead of segmenting. What the source segmented and where its
//! photos are comes from the source's records in storage (`record`), so any replica can serve an edit of any job,
//! after a restart too.

pub mod record;

use std::collections::BTreeMap;
use std::sync::Arc;

use palette_proto::orchestrator::v1::{EditJobRequest, Job, JobSpec};
use palette_rules::preset::Preset;

use super::JobService;
use super::job::{JobHandle, is_terminal, job_is_terminal};
use super::validate::{self, EditSource, JobKey, JobLimits, JobPlan, Violations};
use crate::error::ApiError;
use crate::keys;
use record::PhotosRecord;

/// The request's ids, and that it has rules, checked before anything is read from storage.
pub fn check_request(request: &EditJobRequest) -> Result<(), ApiError> {
    let mut v = Violations::default();
    for (field, id) in [
        ("user_id", &request.user_id),
        ("job_id", &request.job_id),
        ("source_job_id", &request.source_job_id),
    ] {
        if let Some(problem) = keys::id_problem(id) {
            v.add(field, problem);
        }
    }
    if v.is_empty() && request.job_id == request.source_job_id {
        v.add(
            "job_id",
            "must differ from source_job_id: an edit is a job of its own",
        );
    }
    // A preset brings rule defaults, never rules: without rules an edit would only write previews again.
    if request.rules.is_empty() {
        v.add(
            "rules",
            "name at least one rule: an edit runs rules on the source job's photos",
        );
    }
    v.finish()
}

/// An EditJob's id is not the job whose photos and masks it reads: an edit of an edit reads the first job's, and
/// writes outputs and previews under its own id; under that job's id it overwrote that job's results (and GetJob of
/// it answered with the edit). (`check_request` compares with the source job id alone, before the source is read.)
pub fn check_not_the_photos_job(
    request: &EditJobRequest,
    source: &PhotosRecord,
) -> Result<(), ApiError> {
    let mut v = Violations::default();
    if request.job_id == source.photos_job_id {
        v.add(
            "job_id",
            format!(
                "must differ from {:?}, whose photos and masks this edit reads (through {:?}): an edit is a job of \
                 its own",
                source.photos_job_id, request.source_job_id
            ),
        );
    }
    v.finish()
}

/// The edit's plan: the source's concepts and image count with the request's rules, validated as a job spec is;
/// a rule (or occluder) on a concept the source did not segment is a violation naming it.
pub fn plan_edit(
    request: &EditJobRequest,
    source: &PhotosRecord,
    presets: &BTreeMap<String, Arc<Preset>>,
    limits: JobLimits,
) -> Result<JobPlan, ApiError> {
    // The source's image count and concepts are not the request's fields: a source larger than today's limits
    // (lowered since it ran) is a precondition the caller cannot fix in the request.
    let too_large = if source.image_count > limits.max_images {
        Some(format!(
            "it has {} images, more than MAX_IMAGES_PER_JOB ({}) allows now",
            source.image_count, limits.max_images
        ))
    } else if source.concepts.len() > limits.max_concepts {
        Some(format!(
            "it segmented {} concepts, more than MAX_CONCEPTS_PER_JOB ({}) allows now",
            source.concepts.len(),
            limits.max_concepts
        ))
    } else {
        None
    };
    if let Some(reason) = too_large {
        return Err(ApiError::SourceUnusable {
            job_id: request.source_job_id.clone(),
            reason,
        });
    }
    let spec = JobSpec {
        user_id: request.user_id.clone(),
        job_id: request.job_id.clone(),
        concepts: source.concepts.clone(),
        rules: request.rules.clone(),
        image_count: source.image_count,
        preset: request.preset.clone(),
        output_format: request.output_format.clone(),
    };
    // An edit segments nothing, so the concept limit (checked above on what the source segmented) is not the edit's
    // to break: a rule on a concept the source lacks is named below, not counted as one concept too many (on
    // `concepts`, a field EditJob does not have). Every list length (occluders included) is still capped.
    let mut plan = validate::validate_edit(&spec, presets, limits)?;
    let mut v = Violations::default();
    let segmented = |c: &str| source.concepts.iter().any(|s| s == c);
    let not_segmented = |c: &str| {
        format!(
            "{c:?} was not segmented by job {:?} (it segmented {}); submit a new job to segment it",
            request.source_job_id,
            source.concepts.join(", ")
        )
    };
    for (i, rule) in plan.rules.iter().enumerate() {
        if !segmented(&rule.concept) {
            v.add(format!("rules[{i}].concept"), not_segmented(&rule.concept));
        }
        for occluder in rule.occluders.iter().filter(|c| !segmented(c)) {
            v.add(
                format!("rules[{i}].params.occluded_by"),
                not_segmented(occluder),
            );
        }
    }
    v.finish()?;
    plan.source = Some(EditSource {
        source_job_id: request.source_job_id.clone(),
        photos_job_id: source.photos_job_id.clone(),
    });
    Ok(plan)
}

impl JobService {
    /// The edit `request` made, if this replica knows it: same id, same source, and the request's rules, preset and
    /// output format as its plan took them (a request its validation changed, e.g. a concept written "Wall", is
    /// planned again as any request is). Answered once the first call's record is written, as `register` answers a
    /// retry: a first call whose record fails leaves nothing to answer with.
    pub(super) async fn registered_edit(&self, request: &EditJobRequest) -> Option<Job> {
        let key = JobKey {
            user_id: request.user_id.clone(),
            job_id: request.job_id.clone(),
        };
        let made_by = |job: &JobHandle| {
            let spec = &job.plan.effective_spec;
            job.plan
                .source
                .as_ref()
                .is_some_and(|s| s.source_job_id == request.source_job_id)
                && spec.rules == request.rules
                && spec.preset == request.preset
                && spec.output_format == request.output_format
        };
        let job = self.registry.get(&key).ok().filter(|job| made_by(job))?;
        if !job.recorded.wait().await {
            return None;
        }
        // The registry's handle now: JOB_STORE=nats may have put the recorded run in this one's place.
        let job = self.registry.get(&key).ok().filter(|job| made_by(job))?;
        Some(job.snapshot())
    }

    /// An edit of a job still running would fail every photo not segmented yet (`source_missing`, each called
    /// back): refused up front while this replica, or with JOB_STORE=nats the shared store, knows the source as
    /// running. A source known nowhere (ended and forgotten, or run by another JOB_STORE=local replica) is left to
    /// the storage records; a retry of an edit already registered is answered as it was.
    pub(super) async fn refuse_a_running_source(
        &self,
        request: &EditJobRequest,
    ) -> Result<(), ApiError> {
        let edit = JobKey {
            user_id: request.user_id.clone(),
            job_id: request.job_id.clone(),
        };
        if self.registry.get(&edit).is_ok() {
            return Ok(());
        }
        let source = JobKey {
            user_id: request.user_id.clone(),
            job_id: request.source_job_id.clone(),
        };
        let Ok(job) = self.find(&source).await else {
            return Ok(());
        };
        let snapshot = job.snapshot();
        if job_is_terminal(&snapshot) {
            return Ok(());
        }
        Err(ApiError::SourceRunning {
            job_id: request.source_job_id.clone(),
            ended: snapshot
                .items
                .iter()
                .filter(|i| is_terminal(i.state))
                .count(),
            images: snapshot.items.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palette_proto::orchestrator::v1::Rule;
    use prost_types::{ListValue, Struct, Value, value::Kind};

    fn rule(concept: &str, params: &[(&str, &str)]) -> Rule {
        Rule {
            rule_id: format!("r-{}", concept.replace(' ', "-")),
            concept: concept.into(),
            r#type: "recolor".into(),
            params: Some(Struct {
                fields: params
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.to_string(),
                            Value {
                                kind: Some(Kind::StringValue(v.to_string())),
                            },
                        )
                    })
                    .collect(),
            }),
        }
    }

    fn source() -> PhotosRecord {
        PhotosRecord {
            photos_job_id: "photos".into(),
            concepts: vec!["wall".into(), "floor".into()],
            image_count: 3,
            run: String::new(),
        }
    }

    fn request(rules: Vec<Rule>) -> EditJobRequest {
        EditJobRequest {
            user_id: "u".into(),
            job_id: "edit".into(),
            source_job_id: "src".into(),
            rules,
            preset: String::new(),
            output_format: String::new(),
        }
    }

    const LIMITS: JobLimits = JobLimits {
        max_images: 100,
        max_rules: 10,
        max_concepts: 10,
    };

    fn fields(err: ApiError) -> Vec<String> {
        match err {
            ApiError::InvalidArgument(v) => v.into_iter().map(|v| v.field).collect(),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn an_edit_runs_on_the_source_photos_and_concepts() {
        let plan = plan_edit(
            &request(vec![rule("Wall", &[("color", "#112233")])]),
            &source(),
            &BTreeMap::new(),
            LIMITS,
        )
        .unwrap();
        assert_eq!(plan.image_count, 3);
        assert_eq!(plan.concepts, ["wall", "floor"]);
        assert_eq!(plan.photos_job_id(), "photos");
        assert!(!plan.png_outputs());
        assert_eq!(plan.source.unwrap().source_job_id, "src");
        let png = EditJobRequest {
            output_format: "png".into(),
            ..request(vec![rule("wall", &[("color", "#112233")])])
        };
        let plan = plan_edit(&png, &source(), &BTreeMap::new(), LIMITS).unwrap();
        assert!(plan.png_outputs(), "the edit's own output format");
    }

    #[test]
    fn concepts_the_source_did_not_segment_are_named() {
        let mut occluded = rule("wall", &[("color", "#112233")]);
        let lamp = Value {
            kind: Some(Kind::StringValue("lamp".into())),
        };
        occluded.params.as_mut().unwrap().fields.insert(
            "occluded_by".into(),
            Value {
                kind: Some(Kind::ListValue(ListValue { values: vec![lamp] })),
            },
        );
        let rules = vec![rule("sofa", &[("color", "#112233")]), occluded];
        let err = plan_edit(&request(rules), &source(), &BTreeMap::new(), LIMITS).unwrap_err();
        assert!(
            err.to_string()
                .contains("\"sofa\" was not segmented by job \"src\"")
        );
        assert_eq!(
            fields(err),
            ["rules[0].concept", "rules[1].params.occluded_by"]
        );
    }

    #[test]
    fn a_concept_the_source_lacks_is_named_even_when_the_source_is_at_the_concept_limit() {
        let mut full = source();
        full.concepts = (0..LIMITS.max_concepts)
            .map(|i| format!("thing {i}"))
            .collect();
        let rules = vec![rule("ceiling", &[("color", "#112233")])];
        let err = plan_edit(&request(rules), &full, &BTreeMap::new(), LIMITS).unwrap_err();
        assert_eq!(fields(err), ["rules[0].concept"]);
    }

    #[test]
    fn an_edits_occluder_list_is_still_capped() {
        let mut occluded = rule("wall", &[("color", "#112233")]);
        let many = (0..=LIMITS.max_concepts)
            .map(|i| Value {
                kind: Some(Kind::StringValue(format!("thing {i}"))),
            })
            .collect();
        occluded.params.as_mut().unwrap().fields.insert(
            "occluded_by".into(),
            Value {
                kind: Some(Kind::ListValue(ListValue { values: many })),
            },
        );
        let err = plan_edit(
            &request(vec![occluded]),
            &source(),
            &BTreeMap::new(),
            LIMITS,
        )
        .unwrap_err();
        assert_eq!(fields(err), ["rules[0].params.occluded_by"]);
    }

    #[test]
    fn a_source_over_todays_limits_is_a_failed_precondition_naming_it() {
        let rules = || vec![rule("wall", &[("color", "#112233")])];
        let fewer = |images, concepts| JobLimits {
            max_images: images,
            max_concepts: concepts,
            ..LIMITS
        };
        for (limits, says) in [
            (
                fewer(2, 10),
                "it has 3 images, more than MAX_IMAGES_PER_JOB (2)",
            ),
            (
                fewer(100, 1),
                "it segmented 2 concepts, more than MAX_CONCEPTS_PER_JOB (1)",
            ),
        ] {
            let err =
                plan_edit(&request(rules()), &source(), &BTreeMap::new(), limits).unwrap_err();
            let ApiError::SourceUnusable { job_id, reason } = &err else {
                panic!("{err:?}")
            };
            assert_eq!(job_id, "src");
            assert!(reason.starts_with(says), "{reason}");
        }
    }

    #[test]
    fn ids_are_checked_and_an_edit_is_not_its_own_source() {
        let rules = || vec![rule("wall", &[("color", "#112233")])];
        let mut bad = request(rules());
        bad.source_job_id = "../x".into();
        assert_eq!(fields(check_request(&bad).unwrap_err()), ["source_job_id"]);
        let mut own = request(rules());
        own.source_job_id = own.job_id.clone();
        assert_eq!(fields(check_request(&own).unwrap_err()), ["job_id"]);
        check_request(&request(rules())).unwrap();
        // Nor the job whose photos its source (an edit) read: it overwrote that job's outputs and previews.
        let mut photos_owner = request(rules());
        photos_owner.job_id = source().photos_job_id;
        let err = check_not_the_photos_job(&photos_owner, &source()).unwrap_err();
        assert!(err.to_string().contains("whose photos and masks"), "{err}");
        assert_eq!(fields(err), ["job_id"]);
        check_not_the_photos_job(&request(rules()), &source()).unwrap();
    }

    #[test]
    fn an_edit_without_rules_is_refused_with_or_without_a_preset() {
        let mut edit = request(vec![]);
        assert_eq!(fields(check_request(&edit).unwrap_err()), ["rules"]);
        edit.preset = "interior".into();
        assert_eq!(fields(check_request(&edit).unwrap_err()), ["rules"]);
    }
}
