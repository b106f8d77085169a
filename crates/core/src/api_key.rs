//! API keys: how callers of the public API authenticate, what each may do (scopes), and
//! which users it may act for (the tenant's user-id prefix).
//!
//! Keys are kept only as SHA-256 hashes; a presented key is hashed and looked up.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use ring::digest;

use crate::error::{Error, ErrorCode, ServiceError, quote};

/// Every key this crate makes starts with it, so a leaked key is easy to recognise.
pub const API_KEY_PREFIX: &str = "sy_";
/// Longest accepted presented key; longer ones are refused unhashed.
pub const MAX_API_KEY_CHARS: usize = 256;
/// Longest accepted key name.
pub const MAX_API_KEY_NAME_BYTES: usize = 64;

/// What a key may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// SessionService.
    Sessions,
    /// The reads of AdminService.
    AdminRead,
    /// Everything in AdminService (reads included).
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Sessions, Scope::AdminRead, Scope::Admin];

    pub fn parse(text: &str) -> Result<Scope, Error> {
        match text {
            "sessions" => Ok(Scope::Sessions),
            "admin-read" => Ok(Scope::AdminRead),
            "admin" => Ok(Scope::Admin),
            other => Err(Error::invalid(
                "scopes",
                format!(
                    "{} is not a scope (sessions, admin-read or admin)",
                    quote(other)
                ),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Sessions => "sessions",
            Scope::AdminRead => "admin-read",
            Scope::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a caller was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiKeyError {
    #[error("missing API key: send it as `authorization: Bearer <key>`")]
    Missing,
    #[error("malformed authorization metadata: send `authorization: Bearer <key>`")]
    Malformed,
    #[error("unknown API key")]
    Unknown,
    #[error("API key {name:?} lacks the scope {needed} that {method} needs")]
    MissingScope {
        name: String,
        needed: Scope,
        method: String,
    },
    #[error("user_id: API key {name:?} acts only for user ids that start with {prefix:?}")]
    OutsidePrefix { name: String, prefix: String },
}

impl ServiceError for ApiKeyError {
    fn error_code(&self) -> ErrorCode {
        match self {
            ApiKeyError::Missing | ApiKeyError::Malformed | ApiKeyError::Unknown => {
                ErrorCode::Unauthenticated
            }
            ApiKeyError::MissingScope { .. } | ApiKeyError::OutsidePrefix { .. } => {
                ErrorCode::PermissionDenied
            }
        }
    }
}

/// SHA-256 of a key, as the key file stores it.
pub fn hash_api_key(key: &str) -> [u8; 32] {
    let digest = digest::digest(&digest::SHA256, key.as_bytes());
    let mut hash = [0u8; 32];
    hash.copy_from_slice(digest.as_ref());
    hash
}

/// One configured key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub name: String,
    pub hash: [u8; 32],
    pub scopes: Vec<Scope>,
    /// When set, the key acts only for user ids that start with it (a tenant).
    pub user_prefix: Option<String>,
}

impl ApiKey {
    pub fn allows(&self, needed: Scope) -> bool {
        self.scopes
            .iter()
            .any(|scope| *scope == needed || (*scope == Scope::Admin && needed == Scope::AdminRead))
    }

    /// Refuses `needed` unless the key has it; `method` names the call in the error.
    pub fn require(&self, needed: Scope, method: &str) -> Result<(), ApiKeyError> {
        if self.allows(needed) {
            return Ok(());
        }
        Err(ApiKeyError::MissingScope {
            name: self.name.clone(),
            needed,
            method: method.to_string(),
        })
    }

    /// Refuses a user id outside the key's prefix.
    pub fn check_user(&self, user_id: &str) -> Result<(), ApiKeyError> {
        match &self.user_prefix {
            Some(prefix) if !user_id.starts_with(prefix.as_str()) => {
                Err(ApiKeyError::OutsidePrefix {
                    name: self.name.clone(),
                    prefix: prefix.clone(),
                })
            }
            _ => Ok(()),
        }
    }
}

/// The configured keys, looked up by hash.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    by_hash: HashMap<[u8; 32], Arc<ApiKey>>,
}

impl ApiKeys {
    /// Checks each key (a name, at least one scope, no duplicate name or hash).
    pub fn new(keys: Vec<ApiKey>) -> Result<ApiKeys, Error> {
        let mut by_hash = HashMap::with_capacity(keys.len());
        let mut names = std::collections::HashSet::new();
        for key in keys {
            if key.name.is_empty()
                || key.name.len() > MAX_API_KEY_NAME_BYTES
                || key.name.chars().any(char::is_control)
            {
                return Err(Error::invalid(
                    "name",
                    format!(
                        "{} must be 1 to {MAX_API_KEY_NAME_BYTES} bytes without control characters",
                        quote(&key.name)
                    ),
                ));
            }
            if key.scopes.is_empty() {
                return Err(Error::invalid(
                    "scopes",
                    format!("key {} has no scope", quote(&key.name)),
                ));
            }
            if key.user_prefix.as_deref() == Some("") {
                return Err(Error::invalid(
                    "user_prefix",
                    format!(
                        "key {} has an empty prefix: leave it out instead",
                        quote(&key.name)
                    ),
                ));
            }
            if !names.insert(key.name.clone()) {
                return Err(Error::invalid(
                    "name",
                    format!("two keys are named {}", quote(&key.name)),
                ));
            }
            let name = key.name.clone();
            if by_hash.insert(key.hash, Arc::new(key)).is_some() {
                return Err(Error::invalid(
                    "sha256",
                    format!("key {} has the hash of another key", quote(&name)),
                ));
            }
        }
        Ok(ApiKeys { by_hash })
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The key an `authorization` metadata value presents.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Arc<ApiKey>, ApiKeyError> {
        let value = authorization.ok_or(ApiKeyError::Missing)?;
        let (scheme, key) = value.split_once(' ').ok_or(ApiKeyError::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(ApiKeyError::Malformed);
        }
        let key = key.trim();
        if key.is_empty() || key.len() > MAX_API_KEY_CHARS {
            return Err(ApiKeyError::Unknown);
        }
        self.by_hash
            .get(&hash_api_key(key))
            .cloned()
            .ok_or(ApiKeyError::Unknown)
    }
}

/// Parses 64 hex digits.
pub fn parse_sha256_hex(text: &str) -> Result<[u8; 32], Error> {
    let text = text.trim();
    let invalid = || Error::invalid("sha256", "must be 64 hex digits (the SHA-256 of the key)");
    if text.len() != 64 || !text.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        return Err(invalid());
    }
    let mut hash = [0u8; 32];
    for (index, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[index * 2..index * 2 + 2], 16).map_err(|_| invalid())?;
    }
    Ok(hash)
}

/// Formats a hash as the key file stores it.
pub fn sha256_hex(hash: &[u8; 32]) -> String {
    hash.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, secret: &str, scopes: &[Scope], prefix: Option<&str>) -> ApiKey {
        ApiKey {
            name: name.into(),
            hash: hash_api_key(secret),
            scopes: scopes.to_vec(),
            user_prefix: prefix.map(Into::into),
        }
    }

    #[test]
    fn keys_are_found_by_their_hash_and_checked_for_scope_and_prefix() {
        let keys = ApiKeys::new(vec![
            key("app", "sy_app", &[Scope::Sessions], Some("acme:")),
            key("ops", "sy_ops", &[Scope::Admin], None),
        ])
        .unwrap();
        let app = keys.authenticate(Some("Bearer sy_app")).unwrap();
        assert_eq!(app.name, "app");
        assert!(app.allows(Scope::Sessions));
        assert!(!app.allows(Scope::AdminRead));
        assert!(app.check_user("acme:alice").is_ok());
        assert!(matches!(
            app.check_user("globex:bob"),
            Err(ApiKeyError::OutsidePrefix { .. })
        ));
        let ops = keys.authenticate(Some("bearer sy_ops")).unwrap();
        assert!(ops.allows(Scope::AdminRead) && ops.allows(Scope::Admin));
        assert!(ops.require(Scope::Sessions, "CreateSession").is_err());

        assert_eq!(keys.authenticate(None), Err(ApiKeyError::Missing));
        assert_eq!(
            keys.authenticate(Some("Basic abc")),
            Err(ApiKeyError::Malformed)
        );
        assert_eq!(
            keys.authenticate(Some("Bearer sy_other")),
            Err(ApiKeyError::Unknown)
        );
        let huge = format!("Bearer {}", "k".repeat(MAX_API_KEY_CHARS + 1));
        assert_eq!(keys.authenticate(Some(&huge)), Err(ApiKeyError::Unknown));
    }

    #[test]
    fn errors_never_echo_the_key() {
        let keys = ApiKeys::new(vec![key("app", "sy_secret", &[Scope::Sessions], None)]).unwrap();
        for presented in ["Bearer sy_wrong_secret", "Bearer sy_secret"] {
            let message = match keys.authenticate(Some(presented)) {
                Err(error) => error.to_string(),
                Ok(found) => found
                    .require(Scope::Admin, "Rebalance")
                    .unwrap_err()
                    .to_string(),
            };
            assert!(!message.contains("secret"), "{message}");
        }
    }

    #[test]
    fn bad_key_sets_are_refused() {
        assert!(ApiKeys::new(vec![key("", "a", &[Scope::Sessions], None)]).is_err());
        assert!(ApiKeys::new(vec![key("a", "a", &[], None)]).is_err());
        assert!(ApiKeys::new(vec![key("a", "a", &[Scope::Sessions], Some(""))]).is_err());
        assert!(
            ApiKeys::new(vec![
                key("a", "a", &[Scope::Sessions], None),
                key("a", "b", &[Scope::Sessions], None)
            ])
            .is_err()
        );
        assert!(
            ApiKeys::new(vec![
                key("a", "same", &[Scope::Sessions], None),
                key("b", "same", &[Scope::Sessions], None)
            ])
            .is_err()
        );
    }

    #[test]
    fn hashes_round_trip_through_hex() {
        let hash = hash_api_key("sy_x");
        assert_eq!(parse_sha256_hex(&sha256_hex(&hash)).unwrap(), hash);
        assert!(parse_sha256_hex("zz").is_err());
        assert!(parse_sha256_hex(&"g".repeat(64)).is_err());
        assert!(parse_sha256_hex(&"é".repeat(32)).is_err());
    }
}
