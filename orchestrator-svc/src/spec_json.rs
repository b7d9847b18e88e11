//! The job spec between protobuf and JSON, both ways: rule `params` arrive as a protobuf `Struct` over gRPC and are
//! parsed by palette-rules as JSON; the queue adapters (Runpod, NATS) receive the seed's job JSON and submit it as
//! the same `JobSpec` SubmitJob takes.

use palette_proto::orchestrator::v1::{JobSpec, Rule};
use prost_types::value::Kind;
use serde::Deserialize;
use serde_json::{Map, Value};

/// A queued job that is not the seed's job JSON.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("job is not JSON")]
    NotJson(#[source] serde_json::Error),
    #[error("invalid job input")]
    Invalid(#[source] serde_json::Error),
}

/// protobuf Struct -> JSON object (what palette-rules parses).
pub fn struct_to_json(s: &prost_types::Struct) -> Map<String, Value> {
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), value_to_json(v)))
        .collect()
}

fn value_to_json(v: &prost_types::Value) -> Value {
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

/// JSON object -> protobuf Struct.
pub fn to_prost_struct(map: &Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), to_prost_value(v)))
            .collect(),
    }
}

fn to_prost_value(value: &Value) -> prost_types::Value {
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(to_prost_value).collect(),
        }),
        Value::Object(o) => Kind::StructValue(to_prost_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// The seed's job JSON (what SubmitJob takes), camelCase; snake_case names are accepted too.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SpecJson {
    #[serde(alias = "user_id")]
    user_id: String,
    #[serde(alias = "job_id")]
    job_id: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    concepts: Vec<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    rules: Vec<RuleJson>,
    #[serde(alias = "image_count")]
    image_count: u32,
    #[serde(default)]
    preset: Option<String>,
    #[serde(default, alias = "output_format")]
    output_format: Option<String>,
}

/// `"concepts": null` as no concepts: JSON writers commonly send an empty optional list as null.
fn null_as_empty<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Option::unwrap_or_default)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RuleJson {
    #[serde(alias = "rule_id")]
    rule_id: String,
    concept: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    params: Option<Map<String, Value>>,
}

/// A queued job's JSON (a Runpod job's `input`, a NATS message) as a JobSpec.
pub fn spec_from_input(input: &Value) -> Result<JobSpec, SpecError> {
    let spec = SpecJson::deserialize(input).map_err(SpecError::Invalid)?;
    Ok(JobSpec {
        user_id: spec.user_id,
        job_id: spec.job_id,
        concepts: spec.concepts,
        rules: spec
            .rules
            .into_iter()
            .map(|r| Rule {
                rule_id: r.rule_id,
                concept: r.concept,
                r#type: r.kind,
                params: r.params.as_ref().map(to_prost_struct),
            })
            .collect(),
        image_count: spec.image_count,
        preset: spec.preset.unwrap_or_default(),
        output_format: spec.output_format.unwrap_or_default(),
    })
}

/// Like `spec_from_input`, from the JSON bytes of a message.
pub fn spec_from_bytes(bytes: &[u8]) -> Result<JobSpec, SpecError> {
    let input: Value = serde_json::from_slice(bytes).map_err(SpecError::NotJson)?;
    spec_from_input(&input)
}

/// The ids and image count of a message that is JSON but not the seed's job (an unknown field, a rule of the
/// wrong shape): enough to tell the job's caller it was refused (`JobService::refusal_of_unreadable`). None when the
/// message does not name them (a string user and job id, an integer image count; either spelling).
pub fn named_job(bytes: &[u8]) -> Option<JobSpec> {
    let input: Value = serde_json::from_slice(bytes).ok()?;
    let field = |camel: &str, snake: &str| input.get(camel).or_else(|| input.get(snake));
    let text = |camel, snake| field(camel, snake)?.as_str().map(str::to_string);
    Some(JobSpec {
        user_id: text("userId", "user_id")?,
        job_id: text("jobId", "job_id")?,
        image_count: u32::try_from(field("imageCount", "image_count")?.as_u64()?).ok()?,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::{Struct, Value as PValue};
    use serde_json::json;

    #[test]
    fn null_lists_are_empty_lists() {
        let spec = spec_from_input(&json!({
            "userId": "u", "jobId": "j", "concepts": null, "rules": null, "imageCount": 1, "preset": null,
        }))
        .unwrap();
        assert!(spec.concepts.is_empty() && spec.rules.is_empty() && spec.preset.is_empty());
    }

    #[test]
    fn seed_input_maps_onto_the_spec() {
        let spec = spec_from_input(&json!({
            "userId": "u", "jobId": "j", "concepts": ["wall"], "imageCount": 2,
            "rules": [{"ruleId": "r", "concept": "wall", "type": "recolor", "params": {"color": "#FF5733", "strength": 0.5}}],
        }))
        .unwrap();
        assert_eq!(spec.user_id, "u");
        assert_eq!(spec.image_count, 2);
        let params = spec.rules[0].params.as_ref().unwrap();
        assert_eq!(
            params.fields["color"].kind,
            Some(Kind::StringValue("#FF5733".into()))
        );
        assert_eq!(params.fields["strength"].kind, Some(Kind::NumberValue(0.5)));
        assert!(spec_from_input(&json!({"jobId": 3})).is_err());
        assert!(spec_from_input(&json!("nope")).is_err());
    }

    #[test]
    fn the_output_format_is_read_in_either_spelling() {
        for key in ["outputFormat", "output_format"] {
            let spec = spec_from_input(&json!({
                "userId": "u", "jobId": "j", "concepts": ["wall"], "imageCount": 1, key: "png",
            }))
            .unwrap();
            assert_eq!(spec.output_format, "png", "{key}");
        }
        let spec = spec_from_input(&json!({
            "userId": "u", "jobId": "j", "concepts": ["wall"], "imageCount": 1, "outputFormat": null,
        }))
        .unwrap();
        assert_eq!(spec.output_format, "", "null: the default");
    }

    #[test]
    fn bytes_that_are_not_json_say_so() {
        assert!(matches!(
            spec_from_bytes(b"{not json"),
            Err(SpecError::NotJson(_))
        ));
        assert!(matches!(
            spec_from_bytes(br#"{"jobId": 3}"#),
            Err(SpecError::Invalid(_))
        ));
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

    #[test]
    fn a_message_that_is_not_a_job_may_still_name_one() {
        let named =
            named_job(br#"{"user_id": "u", "jobId": "j", "imageCount": 3, "rules": 7, "x": 1}"#)
                .expect("named");
        assert_eq!(
            (
                named.user_id.as_str(),
                named.job_id.as_str(),
                named.image_count
            ),
            ("u", "j", 3)
        );
        for unnamed in [
            &b"not json"[..],
            br#"{"jobId": 3, "userId": "u", "imageCount": 1}"#,
            br#"{"jobId": "j", "imageCount": 1}"#,
            br#"{"jobId": "j", "userId": "u", "imageCount": -1}"#,
            br#"{"jobId": "j", "userId": "u", "imageCount": 5000000000}"#,
            br#"[1, 2]"#,
        ] {
            assert!(
                named_job(unnamed).is_none(),
                "{}",
                String::from_utf8_lossy(unnamed)
            );
        }
    }
}
