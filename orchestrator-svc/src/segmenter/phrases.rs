//! CheckConcepts: the segmenter's verdict on concept phrases before a job is accepted. The orchestrator's own checks
//! (characters, length) cannot see the model's text context (32 CLIP tokens for SAM3): an ASCII phrase of digits
//! or hyphens within 64 characters can exceed it, and Segment then refuses every image of a job already accepted.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use palette_proto::segmenter::v1::CheckConceptsRequest;

use super::Segmenter;

/// How long a submission waits for the verdict before it accepts the job unchecked (Segment judges it later).
const CHECK_DEADLINE: Duration = Duration::from_secs(2);
/// Usable phrases remembered; past this the set starts again (phrases repeat: a few hundred in practice).
const MAX_REMEMBERED: usize = 4096;

/// Phrases found usable, not asked again: a submission of known phrases costs no call, and the segmenter being
/// down or slow delays none of them.
#[derive(Debug, Default)]
pub(super) struct Usable(Mutex<HashSet<String>>);

impl Usable {
    fn contains(&self, phrase: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(phrase)
    }

    fn remember(&self, phrase: &str) {
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if set.len() >= MAX_REMEMBERED {
            set.clear();
        }
        set.insert(phrase.to_string());
    }
}

impl Segmenter {
    /// The phrases among `phrases` the segmenter's model cannot read, each with why (Segment's description), in
    /// order. Empty when all are usable, and when the segmenter cannot say now (no replica, no answer within
    /// CHECK_DEADLINE, a segmenter from before CheckConcepts): the job is then accepted and Segment judges them.
    pub async fn unusable_phrases(&self, phrases: &[String]) -> Vec<(String, String)> {
        let unknown: Vec<String> = phrases
            .iter()
            .filter(|p| !self.usable_phrases.contains(p))
            .cloned()
            .collect();
        if unknown.is_empty() {
            return Vec::new();
        }
        if self.replicas() == 0 {
            // At start the first lookup may still be running (bounded by REFRESH_WAIT).
            self.refresh_replicas().await;
            if self.replicas() == 0 {
                return Vec::new();
            }
        }
        let mut client = self.client.clone();
        let mut request = tonic::Request::new(CheckConceptsRequest {
            concepts: unknown.clone(),
        });
        request.set_timeout(CHECK_DEADLINE);
        let checks = match tokio::time::timeout(CHECK_DEADLINE, client.check_concepts(request))
            .await
        {
            Ok(Ok(reply)) => reply.into_inner().concepts,
            Ok(Err(status)) => {
                tracing::debug!(code = ?status.code(), message = status.message(), "CheckConcepts failed: phrases accepted unchecked");
                return Vec::new();
            }
            Err(_) => {
                tracing::debug!("CheckConcepts did not answer in time: phrases accepted unchecked");
                return Vec::new();
            }
        };
        if checks.len() != unknown.len() {
            tracing::warn!(
                asked = unknown.len(),
                answered = checks.len(),
                "CheckConcepts answered another number of phrases: accepted unchecked"
            );
            return Vec::new();
        }
        let mut unusable = Vec::new();
        for (phrase, check) in unknown.into_iter().zip(checks) {
            if check.problem.is_empty() {
                self.usable_phrases.remember(&phrase);
            } else {
                unusable.push((phrase, check.problem));
            }
        }
        unusable
    }
}
