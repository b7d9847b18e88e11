//! Concept phrases as the model reads them: normalised, then tokenised within its text context. Segment refuses a
//! request with a phrase that fails either; CheckConcepts answers the same verdicts without an image, so a caller
//! can refuse work up front instead of failing it later.

use palette_proto::segmenter::v1 as pb;

use crate::error::Error;
use crate::model::tokenizer::{PhraseTokenizer, Tokens};

/// Phrases one CheckConcepts call may carry (each costs a tokenisation: microseconds).
pub const MAX_CHECKED_PHRASES: usize = 1024;

/// A phrase as the model reads it: whitespace runs collapsed to one space, lowercase. Its length is measured on the
/// raw text first, without allocating, and counting stops at the limit: the normalised copy is only made of a phrase
/// within it (a 64 MiB phrase of one-letter words used to cost ~1 GB of word list and copies before being refused).
pub fn normalise_phrase(raw: &str, max_chars: usize) -> Result<String, String> {
    let mut chars = 0usize;
    for (i, word) in raw.split_whitespace().enumerate() {
        chars += usize::from(i > 0);
        for c in word.chars() {
            chars += c.to_lowercase().count();
            if chars > max_chars {
                return Err(format!("longer than {max_chars} characters"));
            }
        }
    }
    if chars == 0 {
        return Err("empty phrase".into());
    }
    Ok(raw
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase())
}

/// A normalised phrase's tokens, or why the model cannot read it (Segment's INVALID_ARGUMENT description).
pub fn tokens(tokenizer: &PhraseTokenizer, phrase: &str) -> Result<Tokens, String> {
    match tokenizer.encode(phrase) {
        Err(e) => Err(format!("cannot tokenise: {e}")),
        Ok(tokens) if tokens.truncated() => Err(too_long(tokenizer, &tokens)),
        Ok(tokens) => Ok(tokens),
    }
}

fn too_long(tokenizer: &PhraseTokenizer, tokens: &Tokens) -> String {
    format!(
        "{} tokens with BOS/EOS; the model reads at most {}: shorten the phrase",
        tokens.full_len,
        tokenizer.context()
    )
}

/// Segment's verdict on one raw phrase.
pub fn check(tokenizer: &PhraseTokenizer, max_chars: usize, raw: &str) -> pb::ConceptCheck {
    let phrase = match normalise_phrase(raw, max_chars) {
        Ok(phrase) => phrase,
        Err(problem) => {
            return pb::ConceptCheck {
                problem,
                ..Default::default()
            };
        }
    };
    let (problem, tokens) = match tokenizer.encode(&phrase) {
        Err(e) => (format!("cannot tokenise: {e}"), 0),
        Ok(t) if t.truncated() => (too_long(tokenizer, &t), t.full_len as u32),
        Ok(t) => (String::new(), t.full_len as u32),
    };
    pb::ConceptCheck {
        concept: phrase,
        problem,
        tokens,
    }
}

/// CheckConcepts: a verdict per phrase, in order; more than MAX_CHECKED_PHRASES is INVALID_ARGUMENT.
pub fn check_all(
    tokenizer: &PhraseTokenizer,
    max_chars: usize,
    raw: &[String],
) -> Result<Vec<pb::ConceptCheck>, Error> {
    if raw.len() > MAX_CHECKED_PHRASES {
        return Err(Error::invalid(
            "concepts",
            format!(
                "at most {MAX_CHECKED_PHRASES} phrases per call, got {}",
                raw.len()
            ),
        ));
    }
    Ok(raw
        .iter()
        .map(|phrase| check(tokenizer, max_chars, phrase))
        .collect())
}
