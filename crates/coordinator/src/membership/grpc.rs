//! `MembershipService`: the gRPC face of [`Membership`].

use std::sync::Arc;
use std::time::Duration;

use switchyard::pb;
use switchyard::pb::membership_service_server::MembershipService;
use switchyard_core::{Epoch, NodeClaims, WorkerId};
use tonic::{Request, Response, Status};

use super::{MAX_INCARNATION_BYTES, MAX_SLOT_LOAD, Membership, PUBLISH_WAIT};
use crate::error::{CoordinatorError, Result};

/// The gRPC face of [`Membership`].
pub struct MembershipGrpc {
    membership: Arc<Membership>,
}

impl MembershipGrpc {
    pub fn new(membership: Arc<Membership>) -> Self {
        MembershipGrpc { membership }
    }
}

#[tonic::async_trait]
impl MembershipService for MembershipGrpc {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let (_, extensions, message) = request.into_parts();
        let worker_id = WorkerId::parse(message.worker_id).map_err(CoordinatorError::from)?;
        check_credential_names(extensions.get::<NodeClaims>(), &worker_id)?;
        if message.incarnation_id.is_empty() || message.incarnation_id.len() > MAX_INCARNATION_BYTES
        {
            return Err(CoordinatorError::from(switchyard_core::Error::invalid(
                "incarnation_id",
                format!("must be 1 to {MAX_INCARNATION_BYTES} bytes"),
            ))
            .into());
        }
        let (registration_id, _) = self.membership.register(
            worker_id,
            message.address,
            &message.token_key_id,
            &message.cluster_id,
            Epoch(message.known_epoch),
            &message.incarnation_id,
        )?;
        // The table with this worker in it, once it is kept (milliseconds); failing that,
        // the worker learns it in a heartbeat.
        self.membership.wait_until_published(PUBLISH_WAIT).await;
        let placement = self.membership.wire_table();
        let config = self.membership.config();
        Ok(Response::new(pb::RegisterResponse {
            registration_id,
            heartbeat_interval_ms: millis(config.heartbeat_interval),
            lease_ms: millis(config.lease),
            placement: Some(placement),
            handoff_grace_ms: millis(config.handoff_grace),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let (_, extensions, message) = request.into_parts();
        let worker_id = WorkerId::parse(message.worker_id).map_err(CoordinatorError::from)?;
        check_credential_names(extensions.get::<NodeClaims>(), &worker_id)?;
        let slot_count = self.membership.config().slot_count;
        let mut slot_loads = Vec::with_capacity(message.slot_loads.len());
        for load in &message.slot_loads {
            if load.slot >= slot_count {
                return Err(CoordinatorError::from(switchyard_core::Error::invalid(
                    "slot_loads.slot",
                    format!(
                        "slot {} is out of range (the cluster has {slot_count})",
                        load.slot
                    ),
                ))
                .into());
            }
            // Sessions per slot are far below this; a larger figure is clamped, not trusted.
            slot_loads.push((load.slot, load.sessions.min(MAX_SLOT_LOAD)));
        }
        let (placement, drain) = self.membership.heartbeat(
            &worker_id,
            &message.registration_id,
            Epoch(message.known_epoch),
            message.session_count,
            &slot_loads,
        )?;
        Ok(Response::new(pb::HeartbeatResponse { placement, drain }))
    }

    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let (_, extensions, message) = request.into_parts();
        let worker_id = WorkerId::parse(message.worker_id).map_err(CoordinatorError::from)?;
        check_credential_names(extensions.get::<NodeClaims>(), &worker_id)?;
        self.membership
            .leave(&worker_id, &message.registration_id)?;
        Ok(Response::new(pb::LeaveResponse {}))
    }
}

/// A worker speaks only for itself: the credential must be its own. (Without claims, the
/// service runs behind no gate: unit tests.)
pub(super) fn check_credential_names(
    claims: Option<&NodeClaims>,
    worker_id: &WorkerId,
) -> Result<()> {
    match claims {
        Some(claims) if claims.node_id != worker_id.as_str() => {
            Err(CoordinatorError::CredentialForAnotherNode {
                credential: claims.node_id.clone(),
                worker_id: worker_id.to_string(),
            })
        }
        _ => Ok(()),
    }
}

pub(super) fn millis(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}
