//! CLIP BPE tokenisation into SAM3's fixed text context: [BOS] tokens [EOS], padded, with an attention mask.

use std::path::Path;

use crate::error::ModelError;
use crate::model::manifest::TokenizerSpec;

pub struct PhraseTokenizer {
    inner: tokenizers::Tokenizer,
    bos: i64,
    eos: i64,
    pad: i64,
    context: usize,
}

/// One phrase, ready for the text encoder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<i64>,
    pub mask: Vec<i64>,
    /// How many tokens the phrase had with BOS and EOS, before truncation.
    pub full_len: usize,
}

impl Tokens {
    pub fn truncated(&self) -> bool {
        self.full_len > self.ids.len()
    }
}

impl PhraseTokenizer {
    pub fn load(path: &Path, spec: &TokenizerSpec, context: usize) -> Result<Self, ModelError> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| ModelError::Invalid(format!("{}: {e}", path.display())))?;
        Ok(Self {
            inner,
            bos: spec.bos_id.into(),
            eos: spec.eos_id.into(),
            pad: spec.pad_id.into(),
            context,
        })
    }

    pub fn context(&self) -> usize {
        self.context
    }

    /// Tokenises one phrase. Long phrases are truncated keeping EOS last (HF's processor does not truncate and its
    /// 34-token output breaks the 32-position graph); callers decide whether truncation is acceptable.
    pub fn encode(&self, phrase: &str) -> Result<Tokens, String> {
        let encoding = self.inner.encode(phrase, true).map_err(|e| e.to_string())?;
        let mut ids: Vec<i64> = encoding.get_ids().iter().map(|&id| i64::from(id)).collect();
        if ids.first() != Some(&self.bos) {
            ids.insert(0, self.bos);
        }
        if ids.last() != Some(&self.eos) || ids.len() == 1 {
            ids.push(self.eos);
        }
        let full_len = ids.len();
        if ids.len() > self.context {
            ids.truncate(self.context - 1);
            ids.push(self.eos);
        }
        let real = ids.len();
        ids.resize(self.context, self.pad);
        let mut mask = vec![1i64; real];
        mask.resize(self.context, 0);
        Ok(Tokens {
            ids,
            mask,
            full_len,
        })
    }
}
