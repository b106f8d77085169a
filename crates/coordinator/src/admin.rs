//! `AdminService`: the operator's view of workers and placement.

use std::sync::Arc;

use switchyard::conversions::timestamp_from;
use switchyard::pb;
use switchyard::pb::admin_service_server::AdminService;
use switchyard_core::{UserId, slot_of};
use tonic::{Request, Response, Status};

use crate::error::CoordinatorError;
use crate::membership::{Membership, WorkerState};

pub struct Admin {
    membership: Arc<Membership>,
}

impl Admin {
    pub fn new(membership: Arc<Membership>) -> Self {
        Admin { membership }
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn list_workers(
        &self,
        _request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let routing = self.membership.routing();
        let slot_counts = routing.placement.slot_counts();
        let workers = self
            .membership
            .workers()
            .into_iter()
            .map(|record| pb::WorkerInfo {
                slot_count: slot_counts.get(&record.worker_id).copied().unwrap_or(0),
                worker_id: record.worker_id.to_string(),
                address: record.address,
                state: match record.state {
                    WorkerState::Active => pb::WorkerState::Active,
                    WorkerState::Dead => pb::WorkerState::Dead,
                } as i32,
                session_count: record.session_count,
                registered_at: Some(timestamp_from(record.registered_at)),
                last_heartbeat_at: Some(timestamp_from(record.last_heartbeat_at)),
            })
            .collect();
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }

    async fn get_placement(
        &self,
        request: Request<pb::GetPlacementRequest>,
    ) -> Result<Response<pb::GetPlacementResponse>, Status> {
        let user_id = request.into_inner().user_id;
        let placement = self.membership.routing().placement.clone();
        let slots: Vec<u32> = if user_id.is_empty() {
            (0..placement.slot_count()).collect()
        } else {
            let user_id = UserId::parse(user_id).map_err(CoordinatorError::from)?;
            vec![slot_of(user_id.as_str(), placement.slot_count())]
        };
        let assignments = slots
            .into_iter()
            .filter_map(|slot| {
                placement.owner(slot).map(|owner| pb::SlotAssignment {
                    slot,
                    worker_id: owner.to_string(),
                })
            })
            .collect();
        Ok(Response::new(pb::GetPlacementResponse {
            epoch: placement.epoch().0,
            slot_count: placement.slot_count(),
            assignments,
        }))
    }

    async fn cluster_status(
        &self,
        _request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let placement = self.membership.routing().placement.clone();
        let workers = self.membership.workers();
        let live: Vec<_> = workers
            .iter()
            .filter(|record| record.state == WorkerState::Active)
            .collect();
        let unassigned_slots = placement.unassigned_slots();
        Ok(Response::new(pb::ClusterStatusResponse {
            epoch: placement.epoch().0,
            slot_count: placement.slot_count(),
            live_workers: live.len() as u32,
            dead_workers: (workers.len() - live.len()) as u32,
            unassigned_slots,
            session_count: live.iter().map(|record| record.session_count).sum(),
            serving: unassigned_slots == 0,
        }))
    }
}
