//! Checks shared by the coordinator and the workers: session tokens (both verify every
//! session call, so a routing fault can never open a session) and node credentials (only
//! members of the cluster talk inside it).

use std::time::SystemTime;

use switchyard_core::{
    ClusterKey, ErrorCode, NodeClaims, NodeCredentialError, NodeRole, ServiceError, SessionClaims,
    SessionId, TokenError, TokenKey,
};
use tonic::codegen::http::HeaderMap;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};

use crate::metadata::{NODE_CREDENTIAL, SESSION_TOKEN};

/// A node credential for one call of `path`, as metadata.
pub fn node_credential(
    key: &ClusterKey,
    role: NodeRole,
    node_id: &str,
    path: &str,
) -> AsciiMetadataValue {
    let credential = key.credential(role, node_id, path, SystemTime::now());
    // Made of ASCII letters, digits, '.', '-' and '_' only (node ids are validated).
    AsciiMetadataValue::try_from(credential).unwrap_or_else(|_| AsciiMetadataValue::from_static(""))
}

/// Verifies the node credential of a call of `path`, which must come from a node of `role`.
/// The refusal says nothing about the cluster; the reason goes to this node's debug log.
pub fn verify_node_credential(
    key: &ClusterKey,
    headers: &HeaderMap,
    role: NodeRole,
    path: &str,
) -> Result<NodeClaims, tonic::Status> {
    let verified = headers
        .get(NODE_CREDENTIAL)
        .ok_or(NodeCredentialError::Missing)
        .and_then(|value| value.to_str().map_err(|_| NodeCredentialError::Malformed))
        .and_then(|credential| key.verify(credential, role, path, SystemTime::now()));
    verified.map_err(|error| {
        tracing::debug!(%path, reason = error.reason(), "call refused: no valid node credential");
        crate::status::status_from(&error)
    })
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("the session token does not grant access to session {0}")]
    OtherSession(SessionId),
}

impl ServiceError for AuthError {
    fn error_code(&self) -> ErrorCode {
        match self {
            AuthError::Token(error) => error.error_code(),
            AuthError::OtherSession(_) => ErrorCode::PermissionDenied,
        }
    }
}

/// Verifies the `x-session-token` metadata and that it was minted for `session_id`.
pub fn verify_session_token(
    key: &TokenKey,
    metadata: &MetadataMap,
    session_id: SessionId,
) -> Result<SessionClaims, AuthError> {
    let token = metadata
        .get(SESSION_TOKEN)
        .ok_or(TokenError::Missing)?
        .to_str()
        .map_err(|_| TokenError::Malformed)?;
    let claims = key.verify(token, SystemTime::now())?;
    if claims.session_id != session_id {
        return Err(AuthError::OtherSession(session_id));
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use switchyard_core::UserId;

    use super::*;

    #[test]
    fn a_token_opens_only_its_own_session() {
        let key = TokenKey::from_secret(&[9; 32]).unwrap();
        let mine = SessionId::new_random();
        let token = key.mint(
            mine,
            &UserId::parse("alice").unwrap(),
            Duration::from_secs(60),
        );
        let mut metadata = MetadataMap::new();
        metadata.insert(SESSION_TOKEN, token.parse().unwrap());
        assert_eq!(
            verify_session_token(&key, &metadata, mine)
                .unwrap()
                .session_id,
            mine
        );
        let other = SessionId::new_random();
        assert_eq!(
            verify_session_token(&key, &metadata, other),
            Err(AuthError::OtherSession(other))
        );
        assert_eq!(
            verify_session_token(&key, &MetadataMap::new(), mine),
            Err(AuthError::Token(TokenError::Missing))
        );
    }
}
