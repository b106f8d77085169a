//! Who may call what on the coordinator, decided from headers before any body is read.
//!
//! - MembershipService: only workers, with a node credential made from the cluster secret.
//! - SessionService and AdminService: callers with an API key of the right scope (unless the
//!   coordinator runs with `--insecure-no-auth`). A call that carries a node credential
//!   was forwarded by a coordinator and is refused here, so no call is forwarded twice.
//! - Health and reflection: anyone (the server builder keeps them open).

use std::sync::Arc;

use switchyard::auth::verify_node_credential;
use switchyard::metadata::{AUTHORIZATION, NODE_CREDENTIAL};
use switchyard::status::status_from;
use switchyard_core::{ApiKey, ApiKeyError, ClusterKey, NodeRole, Scope};
use switchyard_server::{CallClass, Gate, TlsConnectInfo};
use tonic::Status;

use crate::api_keys::ApiKeyRegistry;

const MEMBERSHIP: &str = "/switchyard.v1.MembershipService/";
const ADMIN: &str = "/switchyard.v1.AdminService/";
const SESSIONS: &str = "/switchyard.v1.SessionService/";
/// AdminService methods that only read.
const ADMIN_READS: [&str; 7] = [
    "ListWorkers",
    "GetPlacement",
    "ClusterStatus",
    "GetUserQuota",
    "GetUsage",
    "GetSessionHealth",
    "ListAlerts",
];

/// How callers of the public services authenticate.
#[derive(Clone)]
pub enum CallerAuth {
    /// Every call carries an API key from the registry.
    ApiKeys(Arc<ApiKeyRegistry>),
    /// No key is asked for: anyone who reaches the port is every user and an operator.
    Open,
}

/// The API key a call was admitted with, for the handlers' tenant checks.
#[derive(Clone, Debug)]
pub struct Caller(pub Arc<ApiKey>);

impl Caller {
    /// Refuses a user id outside the key's prefix; any user when keys are off.
    pub fn check_user(caller: Option<&Caller>, user_id: &str) -> Result<(), Status> {
        match caller {
            Some(Caller(key)) => key.check_user(user_id).map_err(|error| status_from(&error)),
            None => Ok(()),
        }
    }
}

pub struct CoordinatorGate {
    cluster_key: ClusterKey,
    callers: CallerAuth,
    /// Membership calls must come over TLS with a client certificate of the cluster CA.
    member_certificates: bool,
}

impl CoordinatorGate {
    pub fn new(cluster_key: ClusterKey, callers: CallerAuth, member_certificates: bool) -> Self {
        CoordinatorGate {
            cluster_key,
            callers,
            member_certificates,
        }
    }
}

/// The scope a method needs.
fn scope_of(path: &str) -> Scope {
    if path.starts_with(SESSIONS) {
        return Scope::Sessions;
    }
    match path.strip_prefix(ADMIN) {
        Some(method) if ADMIN_READS.contains(&method) => Scope::AdminRead,
        // Admin writes, and anything unknown: the most a key can hold.
        _ => Scope::Admin,
    }
}

impl Gate for CoordinatorGate {
    fn admit(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        extensions: &mut http::Extensions,
    ) -> Result<CallClass, Status> {
        if path.starts_with(MEMBERSHIP) {
            // The listener verified any certificate sent against the cluster CA; here one
            // must have been sent.
            let certified = extensions
                .get::<TlsConnectInfo>()
                .is_some_and(|info| info.peer_certificates.is_some());
            if self.member_certificates && !certified {
                tracing::debug!(%path, "membership call refused: no cluster client certificate");
                return Err(status_from(&switchyard_core::NodeCredentialError::Missing));
            }
            let claims =
                verify_node_credential(&self.cluster_key, headers, NodeRole::Worker, path)?;
            extensions.insert(claims);
            return Ok(CallClass::Control);
        }
        if headers.contains_key(NODE_CREDENTIAL) {
            tracing::warn!(%path, "a forwarded call reached the coordinator: some worker advertises an address that leads to a coordinator");
            return Err(Status::failed_precondition(
                "a forwarded call reached a coordinator and is not forwarded again: check the workers' advertised addresses",
            ));
        }
        let CallerAuth::ApiKeys(registry) = &self.callers else {
            return Ok(CallClass::Work);
        };
        let keys = registry.current();
        let authorization = match headers.get(AUTHORIZATION) {
            None => None,
            Some(value) => Some(
                value
                    .to_str()
                    .map_err(|_| status_from(&ApiKeyError::Malformed))?,
            ),
        };
        let key = keys
            .authenticate(authorization)
            .map_err(|error| status_from(&error))?;
        let method = path.rsplit('/').next().unwrap_or(path);
        key.require(scope_of(path), method)
            .map_err(|error| status_from(&error))?;
        extensions.insert(Caller(key));
        Ok(CallClass::Work)
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use switchyard_core::ApiKeys;
    use switchyard_core::api_key::hash_api_key;
    use tonic::Code;

    use super::*;

    fn gate() -> CoordinatorGate {
        let keys = ApiKeys::new(vec![
            ApiKey {
                name: "app".into(),
                hash: hash_api_key("sy_app"),
                scopes: vec![Scope::Sessions],
                user_prefix: Some("acme:".into()),
            },
            ApiKey {
                name: "viewer".into(),
                hash: hash_api_key("sy_viewer"),
                scopes: vec![Scope::AdminRead],
                user_prefix: None,
            },
        ])
        .unwrap();
        CoordinatorGate::new(
            ClusterKey::from_secret(&[5; 32]).unwrap(),
            CallerAuth::ApiKeys(ApiKeyRegistry::fixed(keys)),
            false,
        )
    }

    fn admit(
        gate: &CoordinatorGate,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<CallClass, Status> {
        let mut map = http::HeaderMap::new();
        for (name, value) in headers {
            map.insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                http::HeaderValue::from_str(value).unwrap(),
            );
        }
        gate.admit(path, &map, &mut http::Extensions::new())
    }

    #[test]
    fn keys_scopes_and_node_credentials_decide() {
        let gate = gate();
        let create = "/switchyard.v1.SessionService/CreateSession";
        let rebalance = "/switchyard.v1.AdminService/Rebalance";
        let list = "/switchyard.v1.AdminService/ListWorkers";
        let register = "/switchyard.v1.MembershipService/Register";

        assert_eq!(
            admit(&gate, create, &[]).unwrap_err().code(),
            Code::Unauthenticated
        );
        assert_eq!(
            admit(&gate, create, &[("authorization", "Bearer nope")])
                .unwrap_err()
                .code(),
            Code::Unauthenticated
        );
        assert_eq!(
            admit(&gate, create, &[("authorization", "Bearer sy_app")]).unwrap(),
            CallClass::Work
        );
        let denied = admit(&gate, list, &[("authorization", "Bearer sy_app")]).unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied);
        assert!(
            denied.message().contains("admin-read"),
            "{}",
            denied.message()
        );
        assert!(!denied.message().contains("sy_app"));
        assert!(admit(&gate, list, &[("authorization", "Bearer sy_viewer")]).is_ok());
        assert_eq!(
            admit(&gate, rebalance, &[("authorization", "Bearer sy_viewer")])
                .unwrap_err()
                .code(),
            Code::PermissionDenied
        );

        // Membership wants a worker's credential, not a key, and refuses without a word
        // about the cluster.
        let refused = admit(&gate, register, &[("authorization", "Bearer sy_viewer")]).unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated);
        let credential =
            gate.cluster_key
                .credential(NodeRole::Worker, "w-1", register, SystemTime::now());
        assert_eq!(
            admit(&gate, register, &[("x-switchyard-node", &credential)]).unwrap(),
            CallClass::Control
        );
        let other_cluster = ClusterKey::from_secret(&[6; 32]).unwrap();
        let forged = other_cluster.credential(NodeRole::Worker, "w-1", register, SystemTime::now());
        assert_eq!(
            admit(&gate, register, &[("x-switchyard-node", &forged)])
                .unwrap_err()
                .code(),
            Code::Unauthenticated
        );

        // A forwarded call is never forwarded again.
        let forwarded = gate.cluster_key.credential(
            NodeRole::Coordinator,
            "coordinator",
            create,
            SystemTime::now(),
        );
        assert_eq!(
            admit(
                &gate,
                create,
                &[
                    ("authorization", "Bearer sy_app"),
                    ("x-switchyard-node", &forwarded)
                ]
            )
            .unwrap_err()
            .code(),
            Code::FailedPrecondition
        );
    }
}
