//! A set of accepted bearer tokens, kept as SHA-256 digests: a presented token is hashed and compared with every
//! digest in constant time, so neither the position of the first differing byte nor a token's length shows in the
//! timing, and the tokens themselves are not kept in memory past parsing.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Shorter tokens are refused: a bearer token is the whole credential, so it must not be guessable.
pub const MIN_TOKEN_CHARS: usize = 16;

/// Why a token list cannot be used. Never holds a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token {position} is shorter than {MIN_TOKEN_CHARS} characters")]
    TooShort { position: usize },
    #[error("token {position} has a character other than visible ASCII")]
    BadCharacter { position: usize },
}

#[derive(Clone, Default)]
pub struct TokenSet {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenSet({} tokens)", self.digests.len())
    }
}

impl TokenSet {
    /// Tokens separated by commas or new lines; blank entries and `#` comment lines are skipped.
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let mut set = TokenSet::default();
        set.extend(text)?;
        Ok(set)
    }

    /// Adds the tokens of `text` (same format as `parse`).
    pub fn extend(&mut self, text: &str) -> Result<(), TokenError> {
        let entries = text
            .lines()
            .filter(|line| !line.trim_start().starts_with('#'))
            .flat_map(|line| line.split(','))
            .map(str::trim)
            .filter(|token| !token.is_empty());
        for token in entries {
            let position = self.digests.len() + 1;
            if token.chars().count() < MIN_TOKEN_CHARS {
                return Err(TokenError::TooShort { position });
            }
            // What an HTTP/2 header value can carry after `Bearer `.
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(TokenError::BadCharacter { position });
            }
            self.digests.push(Sha256::digest(token.as_bytes()).into());
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    pub(super) fn digests(&self) -> &[[u8; 32]] {
        &self.digests
    }

    /// Whether `presented` is one of the tokens. Every digest is compared, whichever matches.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        self.digests
            .iter()
            .fold(subtle::Choice::from(0), |found, d| found | d.ct_eq(&digest))
            .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "token-aaaaaaaaaaaaaaaa";
    const B: &str = "token-bbbbbbbbbbbbbbbb";

    #[test]
    fn accepts_only_listed_tokens() {
        let set = TokenSet::parse(&format!(" {A} ,{B},, ")).unwrap();
        assert_eq!(set.len(), 2);
        assert!(set.accepts(A.as_bytes()));
        assert!(set.accepts(B.as_bytes()));
        assert!(!set.accepts(b"token-cccccccccccccccc"));
        assert!(!set.accepts(&A.as_bytes()[..10]));
        assert!(!set.accepts(b""));
    }

    #[test]
    fn file_format_skips_comments_and_blank_lines() {
        let set = TokenSet::parse(&format!("# rotated 2026-11-30\n{A}\n\n{B}\n")).unwrap();
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn weak_tokens_are_refused_without_showing_them() {
        let err = TokenSet::parse(&format!("{A},short")).unwrap_err();
        assert_eq!(err.to_string(), "token 2 is shorter than 16 characters");
        let err = TokenSet::parse("token with spaces inside").unwrap_err();
        assert!(matches!(err, TokenError::BadCharacter { position: 1 }));
        assert_eq!(
            format!("{:?}", TokenSet::parse(A).unwrap()),
            "TokenSet(1 tokens)"
        );
    }
}
