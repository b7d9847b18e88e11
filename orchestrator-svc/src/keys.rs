//! Object keys, exactly the seed's patterns:
//!
//! - `inputs/{userId}/{jobId}/{idx}.jpg`
//! - `outputs/{userId}/{jobId}/{ruleId}/{idx}.jpg`, or `.png` when the rule's output has an alpha channel (a
//!   `remove` rule in cut-out mode) or the job asked for PNG (`JobSpec.output_format`): a JPEG cannot carry
//!   transparency, and a `.jpg` key holding PNG bytes would lie.
//! - `masks/{userId}/{jobId}/{concept}/{idx}_{instance}.png`, instance 1-based, spaces in the concept phrase become
//!   `_` ("wooden floor" -> `wooden_floor`).
//! - `previews/{userId}/{jobId}/{idx}_preview.jpg`
//! - `jobs-state/{userId}/{jobId}/{specHash}/{idx}.json`: ADAPTER=queue_pull's record that an item ended and was
//!   called back (`jobs::durable`); `specHash` (hex SHA-256 of the effective spec) keeps a job id reused with another
//!   spec from taking the first job's items as its own.
//! - `jobs-state/{userId}/{jobId}/photos.json` and `jobs-state/{userId}/{jobId}/masks/{idx}.json`: what EditJob
//!   reads back (`jobs::edit::record`): the job's photos and concepts, and each photo's stored masks.
//!
//! Texture swatches are READ from `swatches/...` (an operator-curated library) or from the job's own user's
//! `inputs/{userId}/...`; no other key may be named (see `swatch_problem`), so a job cannot read another user's
//! objects or this service's outputs.
//!
//! Every id is checked against `^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$` without `..`, so no key can leave its prefix
//! or climb out of a local storage root.

/// Why an id cannot be part of a key.
pub fn id_problem(id: &str) -> Option<&'static str> {
    let bytes = id.as_bytes();
    if bytes.is_empty() {
        return Some("must not be empty");
    }
    if bytes.len() > 128 {
        return Some("must be at most 128 characters");
    }
    if !bytes[0].is_ascii_alphanumeric() {
        return Some("must start with a letter or digit");
    }
    if !bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Some("may only contain letters, digits, '.', '_' and '-'");
    }
    if id.contains("..") {
        return Some("must not contain '..'");
    }
    None
}

/// Prefix of the operator-curated swatch library.
pub const SWATCH_LIBRARY: &str = "swatches/";

/// Why `key` may not be a texture swatch of a job of `user_id`: only `swatches/...` and `inputs/{user_id}/...`
/// are readable. The key's shape (relative, no `..`) is checked separately (`storage::check_key`).
pub fn swatch_problem(user_id: &str, key: &str) -> Option<String> {
    let own_inputs = format!("inputs/{user_id}/");
    let allowed = [SWATCH_LIBRARY, own_inputs.as_str()]
        .iter()
        .any(|prefix| key.len() > prefix.len() && key.starts_with(prefix));
    (!allowed).then(|| {
        format!("swatch key {key:?} must be under {SWATCH_LIBRARY} (the swatch library) or {own_inputs} (this user's uploads)")
    })
}

pub fn is_valid_id(id: &str) -> bool {
    id_problem(id).is_none()
}

/// The key segment of a concept phrase: spaces become '_'. The phrase itself is validated in `jobs::validate`.
pub fn concept_segment(concept: &str) -> String {
    concept.split_whitespace().collect::<Vec<_>>().join("_")
}

pub fn input(user_id: &str, job_id: &str, idx: u32) -> String {
    format!("inputs/{user_id}/{job_id}/{idx}.jpg")
}

pub fn output(user_id: &str, job_id: &str, rule_id: &str, idx: u32, png: bool) -> String {
    let ext = if png { "png" } else { "jpg" };
    format!("outputs/{user_id}/{job_id}/{rule_id}/{idx}.{ext}")
}

pub fn mask(user_id: &str, job_id: &str, concept: &str, idx: u32, instance: u32) -> String {
    let concept = concept_segment(concept);
    format!("masks/{user_id}/{job_id}/{concept}/{idx}_{instance}.png")
}

pub fn preview(user_id: &str, job_id: &str, idx: u32) -> String {
    format!("previews/{user_id}/{job_id}/{idx}_preview.jpg")
}

/// What an edit of this job needs to know: where its photos are, what it segmented (`jobs::edit::record`).
pub fn photos_record(user_id: &str, job_id: &str) -> String {
    format!("jobs-state/{user_id}/{job_id}/photos.json")
}

/// The masks stored for photo `idx` of the job, with their placement (`jobs::edit::record`).
pub fn masks_record(user_id: &str, job_id: &str, idx: u32) -> String {
    format!("jobs-state/{user_id}/{job_id}/masks/{idx}.json")
}

/// ADAPTER=queue_pull: the record of an item that ended (and whose callback was sent), in the job of that spec.
pub fn item_marker(user_id: &str, job_id: &str, spec_hash: &str, idx: u32) -> String {
    format!("jobs-state/{user_id}/{job_id}/{spec_hash}/{idx}.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_patterns() {
        assert_eq!(input("user123", "job456", 0), "inputs/user123/job456/0.jpg");
        assert_eq!(
            output("user123", "job456", "rule789", 0, false),
            "outputs/user123/job456/rule789/0.jpg"
        );
        assert_eq!(output("u", "j", "cut", 3, true), "outputs/u/j/cut/3.png");
        assert_eq!(
            mask("user123", "job456", "wall", 0, 1),
            "masks/user123/job456/wall/0_1.png"
        );
        assert_eq!(
            mask("u", "j", "wooden  floor", 2, 2),
            "masks/u/j/wooden_floor/2_2.png"
        );
        assert_eq!(
            preview("user123", "job456", 0),
            "previews/user123/job456/0_preview.jpg"
        );
        assert_eq!(
            item_marker("u", "j", "ab12", 3),
            "jobs-state/u/j/ab12/3.json"
        );
    }

    #[test]
    fn ids_cannot_escape() {
        for bad in [
            "",
            "..",
            "a/../b",
            "a/b",
            "../x",
            ".hidden",
            "-x",
            "a..b",
            "a b",
            "é",
            &"x".repeat(129),
        ] {
            assert!(!is_valid_id(bad), "{bad:?} accepted");
        }
        for good in [
            "test-user",
            "test-job",
            "rule1",
            "A.b_c-9",
            &"x".repeat(128),
        ] {
            assert!(is_valid_id(good), "{good:?} rejected");
        }
    }
}
