//! Session tokens: `sy1.<payload>.<mac>`, both parts unpadded base64url.
//!
//! The payload binds the key id, the expiry, the session id and the user id; the MAC is
//! HMAC-SHA256 over the payload. Verification is stateless and constant-time (`ring`), so
//! the coordinator can route on a verified user id without a session directory.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::{digest, hmac};

use crate::error::{ErrorCode, ServiceError};
use crate::ids::{SessionId, UserId};

const PREFIX: &str = "sy1.";
const PAYLOAD_VERSION: u8 = 1;
/// Version, key id, expiry, session id.
const FIXED_PAYLOAD_BYTES: usize = 1 + 4 + 8 + 16;
/// Far above any token this module mints; longer input is refused before decoding.
const MAX_TOKEN_CHARS: usize = 1024;
/// Shortest accepted signing key.
pub const MIN_KEY_BYTES: usize = 32;

/// Why a token was refused. Every variant is an authentication failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("missing session token: send it in the x-session-token metadata")]
    Missing,
    #[error("malformed session token")]
    Malformed,
    #[error(
        "session token: unknown key id (it was signed with a key this cluster no longer accepts)"
    )]
    UnknownKey,
    #[error("session token signature is invalid")]
    BadSignature,
    #[error("session token expired")]
    Expired,
}

impl ServiceError for TokenError {
    fn error_code(&self) -> ErrorCode {
        ErrorCode::Unauthenticated
    }
}

/// What a valid token proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionClaims {
    pub session_id: SessionId,
    pub user_id: UserId,
    pub expires_at: SystemTime,
}

/// A session-token signing key, with the other keys whose tokens are still accepted (a
/// key being rotated in, or one being retired).
#[derive(Clone)]
pub struct TokenKey {
    key: hmac::Key,
    id: [u8; 4],
    /// Keys that verify but do not sign, by id.
    verifiers: std::sync::Arc<[([u8; 4], hmac::Key)]>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey")
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

impl TokenKey {
    /// Builds a key from secret bytes (at least [`MIN_KEY_BYTES`]).
    pub fn from_secret(secret: &[u8]) -> Result<Self, crate::Error> {
        if secret.len() < MIN_KEY_BYTES {
            return Err(crate::Error::invalid(
                "token_key",
                format!(
                    "is {} bytes long, at least {MIN_KEY_BYTES} are needed",
                    secret.len()
                ),
            ));
        }
        let mut context = digest::Context::new(&digest::SHA256);
        context.update(b"switchyard token key id\0");
        context.update(secret);
        let fingerprint = context.finish();
        let mut id = [0u8; 4];
        id.copy_from_slice(&fingerprint.as_ref()[..4]);
        Ok(TokenKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            id,
            verifiers: std::sync::Arc::from([]),
        })
    }

    /// This key, also accepting tokens signed by `other` (which it does not sign with).
    pub fn with_verifier(self, other: &TokenKey) -> TokenKey {
        if other.id == self.id || self.verifiers.iter().any(|(id, _)| *id == other.id) {
            return self;
        }
        let mut verifiers: Vec<([u8; 4], hmac::Key)> = self.verifiers.iter().cloned().collect();
        verifiers.push((other.id, other.key.clone()));
        TokenKey {
            verifiers: verifiers.into(),
            ..self
        }
    }

    /// A short public fingerprint of the signing key: the key id every token carries.
    pub fn id(&self) -> String {
        hex_id(&self.id)
    }

    /// The ids of every key whose tokens are accepted, the signing key's first.
    pub fn ids(&self) -> Vec<String> {
        std::iter::once(&self.id)
            .chain(self.verifiers.iter().map(|(id, _)| id))
            .map(hex_id)
            .collect()
    }

    fn key_of(&self, id: &[u8]) -> Option<&hmac::Key> {
        if id == self.id {
            return Some(&self.key);
        }
        self.verifiers
            .iter()
            .find(|(known, _)| known == id)
            .map(|(_, key)| key)
    }

    pub fn mint(&self, session_id: SessionId, user_id: &UserId, ttl: Duration) -> String {
        let expires_at = SystemTime::now() + ttl;
        self.mint_expiring_at(session_id, user_id, expires_at)
    }

    pub fn mint_expiring_at(
        &self,
        session_id: SessionId,
        user_id: &UserId,
        expires_at: SystemTime,
    ) -> String {
        let expires_secs = expires_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut payload = Vec::with_capacity(FIXED_PAYLOAD_BYTES + user_id.as_str().len());
        payload.push(PAYLOAD_VERSION);
        payload.extend_from_slice(&self.id);
        payload.extend_from_slice(&expires_secs.to_be_bytes());
        payload.extend_from_slice(session_id.as_bytes());
        payload.extend_from_slice(user_id.as_str().as_bytes());
        let tag = hmac::sign(&self.key, &payload);
        format!(
            "{PREFIX}{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(tag.as_ref())
        )
    }

    /// Checks the signature and the expiry, and returns what the token proves.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<SessionClaims, TokenError> {
        if token.len() > MAX_TOKEN_CHARS {
            return Err(TokenError::Malformed);
        }
        let body = token.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
        let (payload, tag) = body.split_once('.').ok_or(TokenError::Malformed)?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Malformed)?;
        if payload.len() <= FIXED_PAYLOAD_BYTES || payload[0] != PAYLOAD_VERSION {
            return Err(TokenError::Malformed);
        }
        let key = self.key_of(&payload[1..5]).ok_or(TokenError::UnknownKey)?;
        hmac::verify(key, &payload, &tag).map_err(|_| TokenError::BadSignature)?;

        let mut expires = [0u8; 8];
        expires.copy_from_slice(&payload[5..13]);
        let expires_at = UNIX_EPOCH + Duration::from_secs(u64::from_be_bytes(expires));
        if now >= expires_at {
            return Err(TokenError::Expired);
        }
        let mut session = [0u8; 16];
        session.copy_from_slice(&payload[13..29]);
        let user_id = std::str::from_utf8(&payload[FIXED_PAYLOAD_BYTES..])
            .ok()
            .and_then(|user| UserId::parse(user).ok())
            .ok_or(TokenError::Malformed)?;
        Ok(SessionClaims {
            session_id: SessionId::from_bytes(session),
            user_id,
            expires_at,
        })
    }
}

fn hex_id(id: &[u8; 4]) -> String {
    id.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotation_accepts_both_keys_then_refuses_the_retired_one() {
        let old = key(1);
        let new = key(2);
        let session = SessionId::new_random();
        let by_old = old.mint(session, &user("ann"), Duration::from_secs(60));
        // Step 1: the new key is added beside the old, which still signs.
        let adding = old.clone().with_verifier(&new);
        assert_eq!(adding.ids(), vec![old.id(), new.id()]);
        assert!(adding.verify(&by_old, SystemTime::now()).is_ok());
        // Step 2: the new key signs, the old one still verifies.
        let swapped = new.clone().with_verifier(&old);
        let by_new = swapped.mint(session, &user("ann"), Duration::from_secs(60));
        assert!(adding.verify(&by_new, SystemTime::now()).is_ok());
        assert!(swapped.verify(&by_old, SystemTime::now()).is_ok());
        // Step 3: the old key is retired.
        assert_eq!(
            new.verify(&by_old, SystemTime::now()),
            Err(TokenError::UnknownKey)
        );
        assert!(
            TokenError::UnknownKey
                .to_string()
                .contains("unknown key id"),
            "{}",
            TokenError::UnknownKey
        );
        assert!(new.verify(&by_new, SystemTime::now()).is_ok());
        // A verifier added twice, or the signer itself, is kept once.
        assert_eq!(
            swapped.with_verifier(&old).with_verifier(&new).ids().len(),
            2
        );
    }

    fn key(byte: u8) -> TokenKey {
        TokenKey::from_secret(&[byte; 32]).unwrap()
    }

    fn user(name: &str) -> UserId {
        UserId::parse(name).unwrap()
    }

    #[test]
    fn round_trip() {
        let key = key(7);
        let session = SessionId::new_random();
        let token = key.mint(session, &user("alice"), Duration::from_secs(60));
        let claims = key.verify(&token, SystemTime::now()).unwrap();
        assert_eq!(claims.session_id, session);
        assert_eq!(claims.user_id, user("alice"));
    }

    #[test]
    fn tampering_is_detected() {
        let key = key(7);
        let token = key.mint(
            SessionId::new_random(),
            &user("alice"),
            Duration::from_secs(60),
        );
        let (head, tag) = token.rsplit_once('.').unwrap();
        // Swap the user inside the payload while keeping the old MAC.
        let forged_payload = key.mint(
            SessionId::new_random(),
            &user("mallory"),
            Duration::from_secs(60),
        );
        let forged_head = forged_payload.rsplit_once('.').unwrap().0;
        assert_eq!(
            key.verify(&format!("{forged_head}.{tag}"), SystemTime::now()),
            Err(TokenError::BadSignature)
        );
        let mut flipped = tag.to_string().into_bytes();
        flipped[0] = if flipped[0] == b'A' { b'B' } else { b'A' };
        let flipped = format!("{head}.{}", String::from_utf8(flipped).unwrap());
        assert_eq!(
            key.verify(&flipped, SystemTime::now()),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn another_key_is_refused() {
        let token = key(1).mint(
            SessionId::new_random(),
            &user("alice"),
            Duration::from_secs(60),
        );
        assert_eq!(
            key(2).verify(&token, SystemTime::now()),
            Err(TokenError::UnknownKey)
        );
    }

    #[test]
    fn expiry_is_enforced() {
        let key = key(7);
        let token = key.mint(
            SessionId::new_random(),
            &user("alice"),
            Duration::from_secs(60),
        );
        let later = SystemTime::now() + Duration::from_secs(120);
        assert_eq!(key.verify(&token, later), Err(TokenError::Expired));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let key = key(7);
        for input in [
            "",
            "sy1.",
            "sy1..",
            "sy1.AAAA.BBBB",
            "nope",
            "sy1.%%%.###",
            &"x".repeat(5000),
        ] {
            assert!(key.verify(input, SystemTime::now()).is_err(), "{input}");
        }
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(TokenKey::from_secret(&[0; 16]).is_err());
    }
}
