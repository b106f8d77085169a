//! The node credential: proof, on every call inside a cluster, that the caller holds the
//! cluster's secret.
//!
//! `v1.<role>.<unix_ms>.<mac>.<node_id>`, where the MAC is HMAC-SHA256 over the version, the
//! role, the time, the node id and the gRPC method path, under a key derived from the shared
//! cluster secret with HKDF-SHA256. A credential is valid for [`MAX_CLOCK_SKEW`] either side
//! of its time and only for the method it was made for. Nothing in a refusal says anything
//! about the cluster.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::{hkdf, hmac};

use crate::error::{ErrorCode, ServiceError};

/// Shortest accepted cluster secret.
pub const MIN_CLUSTER_SECRET_BYTES: usize = 32;
/// How far a credential's time may be from the verifier's clock.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(30);
/// Longer credentials are refused before any parsing.
const MAX_CREDENTIAL_CHARS: usize = 256;
const VERSION: &str = "v1";
const HKDF_SALT: &[u8] = b"switchyard cluster secret v1";
const HKDF_INFO: &[u8] = b"switchyard node credential";

/// Which kind of node made a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRole {
    Coordinator,
    Worker,
}

impl NodeRole {
    fn as_str(self) -> &'static str {
        match self {
            NodeRole::Coordinator => "c",
            NodeRole::Worker => "w",
        }
    }

    fn parse(text: &str) -> Option<NodeRole> {
        match text {
            "c" => Some(NodeRole::Coordinator),
            "w" => Some(NodeRole::Worker),
            _ => None,
        }
    }
}

/// Why a node credential was refused. The message a caller sees is the same for all of
/// them; the variant is for the verifier's own log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NodeCredentialError {
    #[error("this endpoint serves only members of its cluster")]
    Missing,
    #[error("this endpoint serves only members of its cluster")]
    Malformed,
    #[error("this endpoint serves only members of its cluster")]
    BadSignature,
    #[error("this endpoint serves only members of its cluster")]
    OutsideClockSkew,
    #[error("this endpoint serves only members of its cluster")]
    WrongRole,
}

impl NodeCredentialError {
    /// Why, for the verifier's log (never sent to the caller).
    pub fn reason(&self) -> &'static str {
        match self {
            NodeCredentialError::Missing => "no node credential",
            NodeCredentialError::Malformed => "malformed node credential",
            NodeCredentialError::BadSignature => "node credential signed with another secret",
            NodeCredentialError::OutsideClockSkew => "node credential too old or too new",
            NodeCredentialError::WrongRole => "node credential of the wrong role",
        }
    }
}

impl ServiceError for NodeCredentialError {
    fn error_code(&self) -> ErrorCode {
        ErrorCode::Unauthenticated
    }
}

/// What a valid credential proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeClaims {
    pub role: NodeRole,
    pub node_id: String,
}

/// The key every member of a cluster derives from the cluster secret.
#[derive(Clone)]
pub struct ClusterKey {
    key: hmac::Key,
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterKey").finish_non_exhaustive()
    }
}

impl ClusterKey {
    /// Derives the key from the cluster secret (at least [`MIN_CLUSTER_SECRET_BYTES`]).
    pub fn from_secret(secret: &[u8]) -> Result<Self, crate::Error> {
        if secret.len() < MIN_CLUSTER_SECRET_BYTES {
            return Err(crate::Error::invalid(
                "cluster_secret",
                format!(
                    "is {} bytes long, at least {MIN_CLUSTER_SECRET_BYTES} are needed",
                    secret.len()
                ),
            ));
        }
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(secret);
        let key: hmac::Key = prk
            .expand(&[HKDF_INFO], hmac::HMAC_SHA256)
            .map_err(|_| crate::Error::invalid("cluster_secret", "cannot derive a key from it"))?
            .into();
        Ok(ClusterKey { key })
    }

    /// A credential for one call of `path` by `node_id`, made at `now`.
    pub fn credential(&self, role: NodeRole, node_id: &str, path: &str, now: SystemTime) -> String {
        let millis = unix_millis(now);
        let tag = hmac::sign(&self.key, &signed_bytes(role, millis, node_id, path));
        format!(
            "{VERSION}.{}.{millis}.{}.{node_id}",
            role.as_str(),
            URL_SAFE_NO_PAD.encode(tag.as_ref())
        )
    }

    /// Checks a credential for a call of `path` from a node of `role`.
    pub fn verify(
        &self,
        credential: &str,
        role: NodeRole,
        path: &str,
        now: SystemTime,
    ) -> Result<NodeClaims, NodeCredentialError> {
        if credential.len() > MAX_CREDENTIAL_CHARS {
            return Err(NodeCredentialError::Malformed);
        }
        let mut parts = credential.splitn(5, '.');
        let (Some(VERSION), Some(role_text), Some(millis), Some(tag), Some(node_id)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(NodeCredentialError::Malformed);
        };
        let claimed_role = NodeRole::parse(role_text).ok_or(NodeCredentialError::Malformed)?;
        if millis.is_empty() || millis.len() > 20 || !millis.bytes().all(|b| b.is_ascii_digit()) {
            return Err(NodeCredentialError::Malformed);
        }
        let millis: u64 = millis.parse().map_err(|_| NodeCredentialError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| NodeCredentialError::Malformed)?;
        hmac::verify(
            &self.key,
            &signed_bytes(claimed_role, millis, node_id, path),
            &tag,
        )
        .map_err(|_| NodeCredentialError::BadSignature)?;
        let skew = Duration::from_millis(unix_millis(now).abs_diff(millis));
        if skew > MAX_CLOCK_SKEW {
            return Err(NodeCredentialError::OutsideClockSkew);
        }
        if claimed_role != role {
            return Err(NodeCredentialError::WrongRole);
        }
        Ok(NodeClaims {
            role: claimed_role,
            node_id: node_id.to_string(),
        })
    }
}

fn unix_millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn signed_bytes(role: NodeRole, millis: u64, node_id: &str, path: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(32 + node_id.len() + path.len());
    for part in [
        VERSION.as_bytes(),
        role.as_str().as_bytes(),
        millis.to_string().as_bytes(),
        node_id.as_bytes(),
        path.as_bytes(),
    ] {
        bytes.extend_from_slice(part);
        bytes.push(0);
    }
    bytes
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const PATH: &str = "/switchyard.v1.MembershipService/Register";

    fn key(byte: u8) -> ClusterKey {
        ClusterKey::from_secret(&[byte; 32]).unwrap()
    }

    #[test]
    fn a_credential_verifies_for_its_method_role_and_time_only() {
        let now = SystemTime::now();
        let credential = key(1).credential(NodeRole::Worker, "worker-0.a", PATH, now);
        let claims = key(1)
            .verify(&credential, NodeRole::Worker, PATH, now)
            .unwrap();
        assert_eq!(claims.node_id, "worker-0.a");
        assert_eq!(
            key(2).verify(&credential, NodeRole::Worker, PATH, now),
            Err(NodeCredentialError::BadSignature)
        );
        assert_eq!(
            key(1).verify(
                &credential,
                NodeRole::Worker,
                "/switchyard.v1.MembershipService/Leave",
                now
            ),
            Err(NodeCredentialError::BadSignature)
        );
        assert_eq!(
            key(1).verify(&credential, NodeRole::Coordinator, PATH, now),
            Err(NodeCredentialError::WrongRole)
        );
        let later = now + MAX_CLOCK_SKEW + Duration::from_secs(1);
        assert_eq!(
            key(1).verify(&credential, NodeRole::Worker, PATH, later),
            Err(NodeCredentialError::OutsideClockSkew)
        );
    }

    #[test]
    fn another_node_id_breaks_the_signature() {
        let now = SystemTime::now();
        let credential = key(1).credential(NodeRole::Worker, "worker-0", PATH, now);
        let forged = credential.replace("worker-0", "worker-1");
        assert_eq!(
            key(1).verify(&forged, NodeRole::Worker, PATH, now),
            Err(NodeCredentialError::BadSignature)
        );
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(ClusterKey::from_secret(&[0; 31]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_input_is_refused_without_panicking(input in ".{0,300}") {
            let key = key(3);
            prop_assert!(key.verify(&input, NodeRole::Worker, PATH, SystemTime::now()).is_err());
        }

        #[test]
        fn any_changed_byte_is_refused(index in 0usize..200, byte in any::<u8>()) {
            let key = key(3);
            let now = SystemTime::now();
            let credential = key.credential(NodeRole::Coordinator, "coordinator", PATH, now);
            let mut bytes = credential.clone().into_bytes();
            let index = index % bytes.len();
            prop_assume!(bytes[index] != byte);
            bytes[index] = byte;
            let changed = String::from_utf8_lossy(&bytes).into_owned();
            prop_assume!(changed != credential);
            prop_assert!(key.verify(&changed, NodeRole::Coordinator, PATH, now).is_err());
        }
    }
}
