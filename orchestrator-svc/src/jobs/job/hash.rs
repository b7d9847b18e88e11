//! What a job is recorded and called back under: a hash of its effective spec (and, for an edit, of its source),
//! equal on every replica and after every restart.

use super::JobPlan;

/// Hex SHA-256 of the spec's protobuf encoding. prost encodes fields in tag order and `Struct` maps are
/// `BTreeMap`s, so equal specs hash equally.
pub fn spec_hash(spec: &palette_proto::orchestrator::v1::JobSpec) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(prost::Message::encode_to_vec(spec)))
}

/// The hash a job is recorded and called back under: `spec_hash` of its effective spec, and for an edit also of
/// its source, so two edits with one job id and one set of rules on different sources are different jobs.
pub fn plan_hash(plan: &JobPlan) -> String {
    match &plan.source {
        None => spec_hash(&plan.effective_spec),
        Some(source) => {
            use sha2::Digest;
            let mut hasher = sha2::Sha256::new();
            hasher.update(prost::Message::encode_to_vec(&plan.effective_spec));
            // Ids never contain a newline: the parts stay apart.
            hasher.update(format!(
                "\nedit of\n{}\n{}",
                source.source_job_id, source.photos_job_id
            ));
            hex::encode(hasher.finalize())
        }
    }
}
