//! Identifiers and their validation. Every id that crosses the wire is parsed here, so a
//! malformed one is refused with the name of its field before it reaches any logic.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

use crate::error::{Error, quote};

/// Longest accepted user id, in bytes.
pub const MAX_USER_ID_BYTES: usize = 128;
/// Longest accepted worker id, in bytes.
pub const MAX_WORKER_ID_BYTES: usize = 64;

/// A session's id: a random (v4) UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(Uuid);

impl SessionId {
    pub fn new_random() -> Self {
        SessionId(Uuid::new_v4())
    }

    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        SessionId(Uuid::from_bytes(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// Parses the `session_id` field of a request.
    pub fn parse(input: &str) -> Result<Self, Error> {
        if input.is_empty() {
            return Err(Error::invalid("session_id", "must not be empty"));
        }
        let not_canonical = || {
            Error::invalid(
                "session_id",
                format!(
                    "{} is not a UUID in canonical form (lowercase, hyphenated)",
                    quote(input)
                ),
            )
        };
        // Only the canonical form: one session has one spelling, in logs and in the store.
        if input.len() != 36
            || !input
                .bytes()
                .all(|byte| byte == b'-' || byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
        {
            return Err(not_canonical());
        }
        let id = Uuid::try_parse(input).map_err(|_| not_canonical())?;
        if id.hyphenated().to_string() != input {
            return Err(not_canonical());
        }
        Ok(SessionId(id))
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for SessionId {
    type Err = Error;

    fn from_str(input: &str) -> Result<Self, Error> {
        SessionId::parse(input)
    }
}

/// The id of a user of the calling service: any non-empty text of at most
/// [`MAX_USER_ID_BYTES`] bytes without control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(String);

impl UserId {
    /// Parses the `user_id` field of a request.
    pub fn parse(input: impl Into<String>) -> Result<Self, Error> {
        let input = input.into();
        if input.is_empty() {
            return Err(Error::invalid("user_id", "must not be empty"));
        }
        if input.len() > MAX_USER_ID_BYTES {
            return Err(Error::invalid(
                "user_id",
                format!(
                    "is {} bytes long, the limit is {MAX_USER_ID_BYTES}",
                    input.len()
                ),
            ));
        }
        if let Some(bad) = input.chars().find(|c| !is_printable(*c)) {
            return Err(Error::invalid(
                "user_id",
                format!(
                    "must be printable text: it contains U+{:04X}, a control, NUL or bidi-override character",
                    u32::from(bad)
                ),
            ));
        }
        Ok(UserId(input))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Text that shows as it is: no control characters (NUL included), and none of the
/// invisible marks that reorder text (bidi overrides and isolates), which make one id look
/// like another in logs and consoles.
pub fn is_printable(c: char) -> bool {
    !c.is_control()
        && !matches!(
            c,
            '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
        )
}

/// A worker's id: 1 to [`MAX_WORKER_ID_BYTES`] ASCII letters, digits, `.`, `_` or `-`,
/// so it is safe in logs, metrics labels and Kubernetes pod names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(String);

impl WorkerId {
    pub fn parse(input: impl Into<String>) -> Result<Self, Error> {
        let input = input.into();
        if input.is_empty() {
            return Err(Error::invalid("worker_id", "must not be empty"));
        }
        if input.len() > MAX_WORKER_ID_BYTES {
            return Err(Error::invalid(
                "worker_id",
                format!("is longer than {MAX_WORKER_ID_BYTES} bytes"),
            ));
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if !input.chars().all(allowed) {
            return Err(Error::invalid(
                "worker_id",
                format!(
                    "{} may hold only ASCII letters, digits, '.', '_' and '-'",
                    quote(&input)
                ),
            ));
        }
        Ok(WorkerId(input))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_id_round_trips_and_rejects_garbage() {
        let id = SessionId::new_random();
        assert_eq!(SessionId::parse(&id.to_string()), Ok(id));
        let error = SessionId::parse("../../etc/passwd").unwrap_err();
        assert!(error.to_string().starts_with("session_id: "), "{error}");
        assert!(SessionId::parse("").is_err());
        let upper = id.to_string().to_uppercase();
        assert!(SessionId::parse(&upper).is_err());
        let simple = id.to_string().replace('-', "");
        assert!(SessionId::parse(&simple).is_err());
        assert!(SessionId::parse(&format!("{{{id}}}")).is_err());
        assert!(SessionId::parse(&format!("urn:uuid:{id}")).is_err());
    }

    #[test]
    fn user_id_limits() {
        assert!(UserId::parse("alice@example.com").is_ok());
        assert!(UserId::parse("ユーザー").is_ok());
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse("a\nb").is_err());
        assert!(UserId::parse("a\0b").is_err());
        assert!(UserId::parse("admin\u{202E}nimda").is_err());
        assert!(UserId::parse("a\u{2066}b").is_err());
        assert!(UserId::parse("x".repeat(MAX_USER_ID_BYTES)).is_ok());
        let error = UserId::parse("x".repeat(MAX_USER_ID_BYTES + 1)).unwrap_err();
        assert!(error.to_string().contains("user_id"), "{error}");
    }

    #[test]
    fn worker_id_charset() {
        assert!(WorkerId::parse("worker-0.pod_a").is_ok());
        assert!(WorkerId::parse("worker 0").is_err());
        assert!(WorkerId::parse("").is_err());
    }
}
