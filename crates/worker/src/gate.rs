//! Workers are internal: they serve SessionService only to the coordinator, whose every
//! forwarded call carries a node credential made from the cluster secret. A caller with a
//! valid API key and session token is refused too; health and reflection stay open.

use switchyard::auth::verify_node_credential;
use switchyard_core::{ClusterKey, NodeRole};
use switchyard_server::{CallClass, Gate};
use tonic::Status;

pub struct WorkerGate {
    cluster_key: ClusterKey,
}

impl WorkerGate {
    pub fn new(cluster_key: ClusterKey) -> Self {
        WorkerGate { cluster_key }
    }
}

impl Gate for WorkerGate {
    fn admit(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        _extensions: &mut http::Extensions,
    ) -> Result<CallClass, Status> {
        verify_node_credential(&self.cluster_key, headers, NodeRole::Coordinator, path)?;
        Ok(CallClass::Work)
    }
}
