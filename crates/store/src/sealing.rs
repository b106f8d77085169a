//! Encryption at rest: every session has its own data key (DEK), and the store keeps it
//! only wrapped by a key-encryption key (KEK) that never enters the store.
//!
//! - Message contents and session metadata are sealed with the session's DEK, AES-256-GCM
//!   from `ring`, with a random 96-bit nonce per record. The associated data binds each
//!   ciphertext to its row: a message to (session id, seq), metadata to the session id, so
//!   rows cannot be swapped between places or sessions without failing to open.
//! - A DEK is stored wrapped (AES-256-GCM under the KEK, bound to its session id) with the
//!   KEK's id, so KEKs rotate by re-wrapping DEKs, never re-encrypting messages.
//! - Ending a session deletes its DEK with its rows: a copy of the rows taken before (a
//!   backup) cannot be opened once the DEK is gone from every copy of the key table.
//!
//! A sealed record is stored as text: unpadded base64 of nonce ‖ ciphertext ‖ tag.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use switchyard_core::SessionId;

/// Bytes a sealed record adds to its plaintext: the nonce and the tag.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + 16;
/// Shortest accepted KEK secret.
pub const MIN_KEK_BYTES: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("a KEK secret is {0} bytes long; at least {MIN_KEK_BYTES} are needed")]
    ShortKek(usize),
    #[error(
        "the DEK of session {session_id} is wrapped by KEK {kek_id}, which this node does not hold (give it with --kek-file)"
    )]
    UnknownKek {
        session_id: SessionId,
        kek_id: String,
    },
    #[error("the DEK of session {0} does not unwrap: the KEK is wrong or the key row is damaged")]
    BadWrap(SessionId),
    #[error(
        "a sealed record of session {0} does not open: it was altered, moved, or its key is not its own"
    )]
    BadSeal(SessionId),
    #[error("the system's random number generator failed")]
    Random,
}

/// A key-encryption key, named by an id derived from it.
pub struct Kek {
    id: String,
    key: LessSafeKey,
}

impl Kek {
    /// A KEK from secret bytes (at least [`MIN_KEK_BYTES`]; the key is their SHA-256).
    pub fn from_secret(secret: &[u8]) -> Result<Kek, SealError> {
        if secret.len() < MIN_KEK_BYTES {
            return Err(SealError::ShortKek(secret.len()));
        }
        let mut derive = digest::Context::new(&digest::SHA256);
        derive.update(b"switchyard kek\0");
        derive.update(secret);
        let key = derive.finish();
        let mut name = digest::Context::new(&digest::SHA256);
        name.update(b"switchyard kek id\0");
        name.update(secret);
        let id = name.finish().as_ref()[..4]
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        let key = UnboundKey::new(&AES_256_GCM, key.as_ref()).map_err(|_| SealError::Random)?;
        Ok(Kek {
            id,
            key: LessSafeKey::new(key),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }
}

/// The KEKs a node holds: the first wraps new DEKs, every one unwraps.
#[derive(Clone)]
pub struct KeyRing {
    keks: Arc<[Kek]>,
    random: SystemRandom,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("kek_ids", &self.ids())
            .finish()
    }
}

/// A session's data key.
pub struct Dek {
    key: LessSafeKey,
}

/// What a message's ciphertext is bound to.
pub fn message_aad(session_id: SessionId, seq: u64) -> [u8; 25] {
    let mut aad = [0u8; 25];
    aad[0] = b'm';
    aad[1..17].copy_from_slice(session_id.as_bytes());
    aad[17..].copy_from_slice(&seq.to_be_bytes());
    aad
}

/// What a session's metadata ciphertext is bound to.
pub fn metadata_aad(session_id: SessionId) -> [u8; 17] {
    let mut aad = [0u8; 17];
    aad[0] = b's';
    aad[1..].copy_from_slice(session_id.as_bytes());
    aad
}

fn wrap_aad(session_id: SessionId) -> [u8; 17] {
    let mut aad = [0u8; 17];
    aad[0] = b'k';
    aad[1..].copy_from_slice(session_id.as_bytes());
    aad
}

impl KeyRing {
    /// `active` wraps new DEKs; `others` (older or newer KEKs) still unwrap.
    pub fn new(active: Kek, others: Vec<Kek>) -> KeyRing {
        let mut keks = vec![active];
        for kek in others {
            if keks.iter().all(|known| known.id != kek.id) {
                keks.push(kek);
            }
        }
        KeyRing {
            keks: keks.into(),
            random: SystemRandom::new(),
        }
    }

    /// The id of the KEK that wraps new DEKs.
    pub fn active_id(&self) -> &str {
        &self.keks[0].id
    }

    pub fn ids(&self) -> Vec<&str> {
        self.keks.iter().map(|kek| kek.id.as_str()).collect()
    }

    fn nonce(&self) -> Result<[u8; NONCE_LEN], SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random
            .fill(&mut nonce)
            .map_err(|_| SealError::Random)?;
        Ok(nonce)
    }

    /// A new DEK for a session, and its wrapped form under the active KEK.
    pub fn new_dek(&self, session_id: SessionId) -> Result<(Dek, Vec<u8>), SealError> {
        let mut secret = [0u8; 32];
        self.random
            .fill(&mut secret)
            .map_err(|_| SealError::Random)?;
        let wrapped = self.wrap(session_id, &secret)?;
        let dek = Dek::from_secret(&secret)?;
        Ok((dek, wrapped))
    }

    fn wrap(&self, session_id: SessionId, secret: &[u8; 32]) -> Result<Vec<u8>, SealError> {
        let nonce = self.nonce()?;
        let mut sealed = secret.to_vec();
        self.keks[0]
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(wrap_aad(session_id)),
                &mut sealed,
            )
            .map_err(|_| SealError::Random)?;
        let mut wrapped = nonce.to_vec();
        wrapped.extend_from_slice(&sealed);
        Ok(wrapped)
    }

    fn unwrap_secret(
        &self,
        session_id: SessionId,
        kek_id: &str,
        wrapped: &[u8],
    ) -> Result<[u8; 32], SealError> {
        let kek = self
            .keks
            .iter()
            .find(|kek| kek.id == kek_id)
            .ok_or_else(|| SealError::UnknownKek {
                session_id,
                kek_id: kek_id.to_string(),
            })?;
        if wrapped.len() != NONCE_LEN + 32 + 16 {
            return Err(SealError::BadWrap(session_id));
        }
        let (nonce, sealed) = wrapped.split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::BadWrap(session_id))?;
        let mut sealed = sealed.to_vec();
        let secret = kek
            .key
            .open_in_place(nonce, Aad::from(wrap_aad(session_id)), &mut sealed)
            .map_err(|_| SealError::BadWrap(session_id))?;
        secret
            .try_into()
            .map_err(|_| SealError::BadWrap(session_id))
    }

    /// Opens a stored DEK.
    pub fn unwrap(
        &self,
        session_id: SessionId,
        kek_id: &str,
        wrapped: &[u8],
    ) -> Result<Dek, SealError> {
        Dek::from_secret(&self.unwrap_secret(session_id, kek_id, wrapped)?)
    }

    /// A stored DEK wrapped again under the active KEK (for a KEK rotation).
    pub fn rewrap(
        &self,
        session_id: SessionId,
        kek_id: &str,
        wrapped: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        let secret = self.unwrap_secret(session_id, kek_id, wrapped)?;
        self.wrap(session_id, &secret)
    }

    /// Seals `plaintext` with `dek`, bound to `aad`.
    pub fn seal(&self, dek: &Dek, aad: &[u8], plaintext: &str) -> Result<String, SealError> {
        let nonce = self.nonce()?;
        let mut sealed = plaintext.as_bytes().to_vec();
        dek.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut sealed,
            )
            .map_err(|_| SealError::Random)?;
        let mut record = nonce.to_vec();
        record.extend_from_slice(&sealed);
        Ok(STANDARD_NO_PAD.encode(record))
    }
}

impl Dek {
    fn from_secret(secret: &[u8; 32]) -> Result<Dek, SealError> {
        let key = UnboundKey::new(&AES_256_GCM, secret).map_err(|_| SealError::Random)?;
        Ok(Dek {
            key: LessSafeKey::new(key),
        })
    }

    /// Opens a sealed record of `session_id` bound to `aad`.
    pub fn open(
        &self,
        session_id: SessionId,
        aad: &[u8],
        sealed: &str,
    ) -> Result<String, SealError> {
        let bad = || SealError::BadSeal(session_id);
        let record = STANDARD_NO_PAD.decode(sealed).map_err(|_| bad())?;
        if record.len() < SEAL_OVERHEAD {
            return Err(bad());
        }
        let (nonce, sealed) = record.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| bad())?;
        let mut sealed = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut sealed)
            .map_err(|_| bad())?;
        String::from_utf8(plain.to_vec()).map_err(|_| bad())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ring(secret: &str) -> KeyRing {
        KeyRing::new(Kek::from_secret(secret.as_bytes()).unwrap(), Vec::new())
    }

    const OLD: &str = "an-old-key-encryption-key-of-32-bytes-or-more";
    const NEW: &str = "a-new-key-encryption-key-of-32-bytes-or-more!";

    #[test]
    fn records_open_only_where_they_were_sealed() {
        let keys = ring(OLD);
        let session = SessionId::new_random();
        let (dek, _) = keys.new_dek(session).unwrap();
        let sealed = keys
            .seal(&dek, &message_aad(session, 7), "hello é")
            .unwrap();
        assert!(!sealed.contains("hello"));
        assert_eq!(
            dek.open(session, &message_aad(session, 7), &sealed)
                .unwrap(),
            "hello é"
        );
        // Moved to another seq, or another session: it does not open.
        assert_eq!(
            dek.open(session, &message_aad(session, 8), &sealed),
            Err(SealError::BadSeal(session))
        );
        let other = SessionId::new_random();
        assert!(dek.open(session, &message_aad(other, 7), &sealed).is_err());
        // Another session's key does not open it either.
        let (other_dek, _) = keys.new_dek(other).unwrap();
        assert!(
            other_dek
                .open(session, &message_aad(session, 7), &sealed)
                .is_err()
        );
        // Each seal has its own nonce.
        assert_ne!(
            keys.seal(&dek, &message_aad(session, 7), "hello é")
                .unwrap(),
            sealed
        );
    }

    #[test]
    fn a_rotation_rewraps_the_dek_and_the_record_still_opens() {
        let old = ring(OLD);
        let session = SessionId::new_random();
        let (dek, wrapped) = old.new_dek(session).unwrap();
        let sealed = old
            .seal(&dek, &metadata_aad(session), "{\"a\":\"b\"}")
            .unwrap();
        let rotating = KeyRing::new(
            Kek::from_secret(NEW.as_bytes()).unwrap(),
            vec![Kek::from_secret(OLD.as_bytes()).unwrap()],
        );
        let rewrapped = rotating.rewrap(session, old.active_id(), &wrapped).unwrap();
        let new_only = ring(NEW);
        let reopened = new_only
            .unwrap(session, new_only.active_id(), &rewrapped)
            .unwrap();
        assert_eq!(
            reopened
                .open(session, &metadata_aad(session), &sealed)
                .unwrap(),
            "{\"a\":\"b\"}"
        );
        // The old KEK's wrap cannot be opened without it.
        assert_eq!(
            new_only.unwrap(session, old.active_id(), &wrapped).err(),
            Some(SealError::UnknownKek {
                session_id: session,
                kek_id: old.active_id().to_string()
            })
        );
        // A wrap moved to another session does not open.
        assert_eq!(
            rotating
                .unwrap(SessionId::new_random(), rotating.active_id(), &rewrapped)
                .err()
                .map(|error| matches!(error, SealError::BadWrap(_))),
            Some(true)
        );
        assert!(matches!(
            Kek::from_secret(b"short"),
            Err(SealError::ShortKek(5))
        ));
    }
}
