//! CheckConcepts: the segmenter's verdict on concept phrases before a job is accepted. The orchestrator's own checks
//! (characters, length) cannot see the model's text context (32 CLIP tokens for SAM3): an ASCII phrase of digits
//! or hyphens within 64 characters can exceed it, and Segment then refuses every image of a job already accepted.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use palette_proto::segmenter::v1::CheckConceptsRequest;

use super::Segmenter;

/// How long a submission waits for the verdict (a tokenisation: microseconds, plus a round trip) before it accepts
/// the job unchecked (Segment judges it later).
const CHECK_DEADLINE: Duration = Duration::from_millis(500);
/// After a check that got no verdict, submissions skip the check this long: a segmenter that is down, starting or
/// scaled to zero must not add CHECK_DEADLINE to every submission.
const SKIP_AFTER_FAILURE: Duration = Duration::from_secs(30);
/// Usable phrases remembered; past this the set starts again (phrases repeat: a few hundred in practice).
const MAX_REMEMBERED: usize = 4096;

/// Phrases found usable, not asked again: a submission of known phrases costs no call, and the segmenter being
/// down or slow delays none of them. Forgotten when another model is seen (a segmenter upgraded in place, whose
/// text context may be shorter), within the model id's TTL or at the first Segment reply that names it.
#[derive(Debug, Default)]
pub(super) struct Usable {
    phrases: Mutex<HashSet<String>>,
    /// The model the verdicts came from, as last seen ("" before any).
    model_id: Mutex<String>,
    /// Until when submissions skip the check (SKIP_AFTER_FAILURE after a check that got no verdict).
    skip_until: Mutex<Option<Instant>>,
}

impl Usable {
    fn contains(&self, phrase: &str) -> bool {
        self.phrases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(phrase)
    }

    fn remember(&self, phrase: &str) {
        let mut set = self.phrases.lock().unwrap_or_else(|e| e.into_inner());
        if set.len() >= MAX_REMEMBERED {
            set.clear();
        }
        set.insert(phrase.to_string());
    }

    /// The segmenter's model is `model_id` now: verdicts of another model are forgotten.
    pub(super) fn seen_model(&self, model_id: &str) {
        if model_id.is_empty() {
            return;
        }
        let mut known = self.model_id.lock().unwrap_or_else(|e| e.into_inner());
        if *known == model_id {
            return;
        }
        if !known.is_empty() {
            self.phrases
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            // Debug: while a rolling upgrade mixes two models, replies alternate between them.
            tracing::debug!(from = %known, to = model_id, "segmenter model changed: phrases are checked again");
        }
        *known = model_id.to_string();
    }

    fn skipping(&self) -> bool {
        let skip = self.skip_until.lock().unwrap_or_else(|e| e.into_inner());
        skip.is_some_and(|until| Instant::now() < until)
    }

    /// No verdict: this job and the next SKIP_AFTER_FAILURE of submissions are accepted unchecked (said once, here).
    fn failed(&self, why: &str) {
        *self.skip_until.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Instant::now() + SKIP_AFTER_FAILURE);
        tracing::warn!(
            reason = why,
            skip_sec = SKIP_AFTER_FAILURE.as_secs(),
            "CheckConcepts gave no verdict: jobs are accepted without checking their phrases against the model for a while (Segment judges them)"
        );
    }
}

impl Segmenter {
    /// The phrases among `phrases` the segmenter's model cannot read, each with why (Segment's description), in
    /// order. Empty when all are usable, and when the segmenter cannot say now (no replica, no answer within
    /// CHECK_DEADLINE, a segmenter from before CheckConcepts; then for SKIP_AFTER_FAILURE without asking): the job
    /// is then accepted and Segment judges them.
    pub async fn unusable_phrases(&self, phrases: &[String]) -> Vec<(String, String)> {
        let checks = &self.usable_phrases;
        let unknown: Vec<String> = phrases
            .iter()
            .filter(|p| !checks.contains(p))
            .cloned()
            .collect();
        if unknown.is_empty() || checks.skipping() {
            return Vec::new();
        }
        if self.replicas() == 0 {
            // At start the first lookup may still be running.
            let _ = tokio::time::timeout(CHECK_DEADLINE, self.refresh_replicas()).await;
            if self.replicas() == 0 {
                checks.failed("no segmenter replica resolved");
                return Vec::new();
            }
        }
        let mut client = self.client.clone();
        let mut request = tonic::Request::new(CheckConceptsRequest {
            concepts: unknown.clone(),
        });
        request.set_timeout(CHECK_DEADLINE);
        let verdicts =
            match tokio::time::timeout(CHECK_DEADLINE, client.check_concepts(request)).await {
                Ok(Ok(reply)) => reply.into_inner().concepts,
                Ok(Err(status)) => {
                    checks.failed(&format!("{:?}: {}", status.code(), status.message()));
                    return Vec::new();
                }
                Err(_) => {
                    checks.failed(&format!("no answer within {CHECK_DEADLINE:?}"));
                    return Vec::new();
                }
            };
        if verdicts.len() != unknown.len() {
            checks.failed(&format!(
                "{} verdicts for {} phrases",
                verdicts.len(),
                unknown.len()
            ));
            return Vec::new();
        }
        let mut unusable = Vec::new();
        for (phrase, check) in unknown.into_iter().zip(verdicts) {
            if check.problem.is_empty() {
                checks.remember(&phrase);
            } else {
                unusable.push((phrase, check.problem));
            }
        }
        unusable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_model_forgets_the_verdicts_of_the_last() {
        let usable = Usable::default();
        usable.seen_model("sam3-a");
        usable.remember("wall");
        usable.seen_model("");
        usable.seen_model("sam3-a");
        assert!(usable.contains("wall"), "the same model keeps them");
        usable.seen_model("sam3-b");
        assert!(!usable.contains("wall"), "asked again of the new model");
    }
}
