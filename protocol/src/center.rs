//! Centre identifiers: the one name a hospital has in a federation.

use std::fmt;
use std::str::FromStr;

/// Longest centre id accepted; it must fit a DNS label and a file name.
pub const MAX_CENTER_ID_LEN: usize = 63;

/// A validated centre id: lowercase ASCII letters, digits and '-', starting with a letter or digit.
///
/// Ids end up in certificate URIs, file names and log lines, so the alphabet is kept small on purpose.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CenterId(String);

/// Why a string is not a centre id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CenterIdError {
    #[error("centre id is empty")]
    Empty,
    #[error("centre id {id:?} is {len} characters long; at most {MAX_CENTER_ID_LEN} are allowed")]
    TooLong { id: String, len: usize },
    #[error(
        "centre id {id:?} contains {bad:?}; only lowercase letters, digits and '-' are allowed"
    )]
    BadCharacter { id: String, bad: char },
    #[error("centre id {id:?} must start with a lowercase letter or a digit")]
    BadStart { id: String },
}

impl CenterId {
    pub fn new(id: impl Into<String>) -> Result<Self, CenterIdError> {
        let id = id.into();
        if id.is_empty() {
            return Err(CenterIdError::Empty);
        }
        if id.len() > MAX_CENTER_ID_LEN {
            let len = id.chars().count();
            return Err(CenterIdError::TooLong { id, len });
        }
        if let Some(bad) = id
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(CenterIdError::BadCharacter { id, bad });
        }
        if id.starts_with('-') {
            return Err(CenterIdError::BadStart { id });
        }
        Ok(CenterId(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CenterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl FromStr for CenterId {
    type Err = CenterIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CenterId::new(s)
    }
}

impl AsRef<str> for CenterId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_study_centers() {
        for id in ["center-a", "center-b", "external", "h1", "0-x"] {
            assert_eq!(CenterId::new(id).unwrap().as_str(), id);
        }
    }

    #[test]
    fn refuses_bad_ids_with_the_reason() {
        assert_eq!(CenterId::new(""), Err(CenterIdError::Empty));
        assert!(matches!(
            CenterId::new("Center-A"),
            Err(CenterIdError::BadCharacter { bad: 'C', .. })
        ));
        assert!(matches!(
            CenterId::new("a_b"),
            Err(CenterIdError::BadCharacter { bad: '_', .. })
        ));
        assert!(matches!(
            CenterId::new("a/../b"),
            Err(CenterIdError::BadCharacter { bad: '/', .. })
        ));
        assert!(matches!(
            CenterId::new("-a"),
            Err(CenterIdError::BadStart { .. })
        ));
        assert!(matches!(
            CenterId::new("a".repeat(64)),
            Err(CenterIdError::TooLong { len: 64, .. })
        ));
        assert!(CenterId::new("a".repeat(63)).is_ok());
    }
}
