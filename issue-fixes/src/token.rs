//! The GitHub token, kept out of every output.
//!
//! [`Token`] prints as `***` (Debug and Display), hands its value only to the HTTP client
//! (through a crate-private accessor), and [`Token::scrub`] removes it from any text that
//! came back from the network or the HTTP stack before that text reaches an error or a
//! log line: GitHub (or a proxy, or a mock) may echo request headers back.

use std::fmt;

use crate::submit::SubmitError;

/// The environment variable `--submit` reads.
pub const TOKEN_VAR: &str = "GITHUB_TOKEN";

/// A GitHub token. Its value never appears in Debug, Display, errors or logs.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// Takes a token value: surrounding whitespace (a trailing newline from a file) is
    /// dropped; empty is [`SubmitError::MissingToken`]; whitespace or control characters
    /// inside are [`SubmitError::BadToken`] (an HTTP header could not carry it, and the
    /// error must not echo it).
    pub fn new(value: &str) -> Result<Token, SubmitError> {
        let v = value.trim();
        if v.is_empty() {
            return Err(SubmitError::MissingToken);
        }
        if !v.chars().all(|c| c.is_ascii_graphic()) {
            return Err(SubmitError::BadToken);
        }
        Ok(Token(v.to_string()))
    }

    /// The token from `GITHUB_TOKEN`; unset or empty is [`SubmitError::MissingToken`].
    pub fn from_env() -> Result<Token, SubmitError> {
        Token::from_var(std::env::var_os(TOKEN_VAR))
    }

    /// As [`Token::from_env`], from the variable's value (tests pass it directly).
    pub fn from_var(value: Option<std::ffi::OsString>) -> Result<Token, SubmitError> {
        match value {
            None => Err(SubmitError::MissingToken),
            Some(v) => Token::new(v.to_str().ok_or(SubmitError::BadToken)?),
        }
    }

    /// The value, for the Authorization header only.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    /// `text` with every occurrence of the token replaced by `***`.
    pub fn scrub(&self, text: &str) -> String {
        text.replace(&self.0, "***")
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(***)")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_as_stars_and_scrubs() {
        let t = Token::new(" ghp_secret123\n").unwrap();
        assert_eq!(format!("{t} {t:?}"), "*** Token(***)");
        assert_eq!(t.scrub("Authorization: Bearer ghp_secret123, again ghp_secret123"), "Authorization: Bearer ***, again ***");
        assert!(matches!(Token::new("  "), Err(SubmitError::MissingToken)));
        assert!(matches!(Token::from_var(None), Err(SubmitError::MissingToken)));
        let bad = Token::new("ghp_a b").unwrap_err().to_string();
        assert!(!bad.contains("ghp_a"), "{bad}");
    }
}
