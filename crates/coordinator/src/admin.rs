//! `AdminService`: the operator's view of workers and placement.

use std::sync::Arc;

use std::time::{Duration, Instant};
use switchyard::conversions::timestamp_from;
use switchyard::pb;
use switchyard::pb::admin_service_server::AdminService;

use switchyard::metadata::deadline_of;
use switchyard_core::{UserId, WorkerId, slot_of};
use tonic::{Request, Response, Status};

use crate::error::CoordinatorError;
use crate::gate::Caller;
use crate::membership::{Membership, PUBLISH_WAIT, WorkerState};
use crate::router::{Router, caller_name};

/// The log target of audit events (the workers' too).
const AUDIT: &str = "switchyard::audit";

/// The `node` of the coordinator's own alerts.
const COORDINATOR_NODE: &str = "coordinator";

fn not_found(session_id: switchyard_core::SessionId) -> Status {
    Status::not_found(format!("session {session_id} not found"))
}

/// How long `DrainWorker` with `wait` waits when the call has no deadline.
const DRAIN_WAIT: Duration = Duration::from_secs(60);

pub struct Admin {
    membership: Arc<Membership>,
    /// Quota calls go to the owner of the user's slot, as session calls do.
    router: Arc<Router>,
}

impl Admin {
    pub fn new(membership: Arc<Membership>, router: Arc<Router>) -> Self {
        Admin { membership, router }
    }

    async fn forward_user_call<Req, Resp>(
        &self,
        method: &'static str,
        request: Request<Req>,
        user_id: impl Fn(&Req) -> &str,
    ) -> Result<Response<Resp>, Status>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        let caller = request.extensions().get::<Caller>().cloned();
        let user = user_id(request.get_ref()).to_string();
        let reply = self
            .router
            .forward_user_call(
                method,
                &user,
                caller.as_ref(),
                request.metadata(),
                request.get_ref(),
            )
            .await?;
        Ok(Response::new(reply))
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn get_session_health(
        &self,
        request: Request<pb::GetSessionHealthRequest>,
    ) -> Result<Response<pb::SessionHealth>, Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        let session_id = switchyard_core::SessionId::parse(&request.get_ref().session_id)
            .map_err(CoordinatorError::from)?;
        // The coordinator does not know a session's user: every worker is asked, and the
        // one whose slot holds the session answers.
        let answers: Vec<(WorkerId, Result<pb::SessionHealth, Status>)> = self
            .router
            .ask_every_worker(
                "/switchyard.v1.WorkerStatusService/GetSessionHealth",
                request.metadata(),
                request.get_ref(),
            )
            .await;
        let mut unreachable = Vec::new();
        let mut found = Vec::new();
        for (worker, answer) in answers {
            match answer {
                Ok(health) => found.push((worker, health)),
                Err(status) if status.code() == tonic::Code::NotFound => {}
                Err(status) => unreachable.push(format!("{worker} ({})", status.message())),
            }
        }
        // While a slot moves, the worker it leaves may not know yet: the owner in the
        // coordinator's table answers first.
        let placement = self.membership.routing().placement.clone();
        let owns = |worker: &WorkerId, health: &pb::SessionHealth| {
            placement.owner(slot_of(&health.user_id, placement.slot_count())) == Some(worker)
        };
        found.sort_by_key(|(worker, health)| !owns(worker, health));
        if let Some((_, health)) = found.into_iter().next() {
            // A key limited to a user prefix sees its own users' sessions only, and learns
            // nothing of others' (not even that they exist).
            return match Caller::check_user(caller.as_ref(), &health.user_id) {
                Ok(()) => Ok(Response::new(health)),
                Err(_) => Err(not_found(session_id)),
            };
        }
        if unreachable.is_empty() {
            Err(not_found(session_id))
        } else {
            Err(Status::unavailable(format!(
                "session {session_id} was not found on the workers that answered; not answering: {}",
                unreachable.join(", ")
            )))
        }
    }

    async fn list_alerts(
        &self,
        request: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        let filter = switchyard::conversions::alert_filter(request.get_ref())
            .map_err(CoordinatorError::from)?;
        let mut alerts: Vec<pb::Alert> = self
            .membership
            .alerts()
            .list(&filter)
            .iter()
            .map(|alert| switchyard::conversions::alert_to_wire(alert, COORDINATOR_NODE))
            .collect();
        let mut unreachable_workers = Vec::new();
        let answers: Vec<(WorkerId, Result<pb::ListAlertsResponse, Status>)> = self
            .router
            .ask_every_worker(
                "/switchyard.v1.WorkerStatusService/ListAlerts",
                request.metadata(),
                request.get_ref(),
            )
            .await;
        for (worker, answer) in answers {
            match answer {
                Ok(listed) => alerts.extend(listed.alerts),
                Err(status) => {
                    tracing::debug!(worker_id = %worker, %status, "a worker did not list its alerts");
                    unreachable_workers.push(worker.to_string());
                }
            }
        }
        // A key limited to a user prefix sees the alerts of its users, none of the others'.
        alerts.retain(|alert| {
            alert.user_id.is_empty() && Caller::check_user(caller.as_ref(), "").is_ok()
                || !alert.user_id.is_empty()
                    && Caller::check_user(caller.as_ref(), &alert.user_id).is_ok()
        });
        alerts.sort_by(|a, b| {
            let seen = |alert: &pb::Alert| {
                alert
                    .last_seen
                    .as_ref()
                    .map_or((0, 0), |at| (at.seconds, at.nanos))
            };
            seen(b).cmp(&seen(a))
        });
        Ok(Response::new(pb::ListAlertsResponse {
            alerts,
            unreachable_workers,
        }))
    }

    async fn erase_user(
        &self,
        request: Request<pb::EraseUserRequest>,
    ) -> Result<Response<pb::EraseUserResponse>, Status> {
        self.forward_user_call(
            "/switchyard.v1.UserStateService/EraseUser",
            request,
            |request| &request.user_id,
        )
        .await
    }

    async fn set_user_quota(
        &self,
        request: Request<pb::SetUserQuotaRequest>,
    ) -> Result<Response<pb::UserQuota>, Status> {
        self.forward_user_call(
            "/switchyard.v1.UserStateService/SetUserQuota",
            request,
            |request| &request.user_id,
        )
        .await
    }

    async fn get_user_quota(
        &self,
        request: Request<pb::GetUserQuotaRequest>,
    ) -> Result<Response<pb::UserQuota>, Status> {
        self.forward_user_call(
            "/switchyard.v1.UserStateService/GetUserQuota",
            request,
            |request| &request.user_id,
        )
        .await
    }

    async fn get_usage(
        &self,
        request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        self.forward_user_call(
            "/switchyard.v1.UserStateService/GetUsage",
            request,
            |request| &request.user_id,
        )
        .await
    }

    async fn list_workers(
        &self,
        _request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let routing = self.membership.routing();
        let slot_counts = routing.placement.slot_counts();
        let loads = self.membership.worker_loads();
        let workers = self
            .membership
            .workers()
            .into_iter()
            .map(|record| pb::WorkerInfo {
                slot_count: slot_counts.get(&record.worker_id).copied().unwrap_or(0),
                load: loads.get(&record.worker_id).copied().unwrap_or(0),
                worker_id: record.worker_id.to_string(),
                address: record.address,
                state: match record.state {
                    WorkerState::Joining => pb::WorkerState::Joining,
                    WorkerState::Active => pb::WorkerState::Active,
                    WorkerState::Draining => pb::WorkerState::Draining,
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
        let caller = request.extensions().get::<Caller>().cloned();
        let user_id = request.into_inner().user_id;
        let placement = self.membership.routing().placement.clone();
        let slots: Vec<u32> = if user_id.is_empty() {
            (0..placement.slot_count()).collect()
        } else {
            let user_id = UserId::parse(user_id).map_err(CoordinatorError::from)?;
            Caller::check_user(caller.as_ref(), user_id.as_str())?;
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
        // Live as the published table says: the workers calls are routed among now (one
        // that has just joined counts once its table is kept and published).
        let live: Vec<_> = workers
            .iter()
            .filter(|record| record.state.is_member() && placement.is_member(&record.worker_id))
            .collect();
        let dead = workers
            .iter()
            .filter(|record| record.state == WorkerState::Dead)
            .count();
        let unassigned_slots = placement.unassigned_slots();
        Ok(Response::new(pb::ClusterStatusResponse {
            epoch: placement.epoch().0,
            slot_count: placement.slot_count(),
            live_workers: live.len() as u32,
            dead_workers: dead as u32,
            unassigned_slots,
            session_count: live.iter().map(|record| record.session_count).sum(),
            serving: unassigned_slots == 0,
        }))
    }

    async fn rebalance(
        &self,
        request: Request<pb::RebalanceRequest>,
    ) -> Result<Response<pb::RebalanceResponse>, Status> {
        let caller = caller_name(request.extensions().get::<Caller>());
        // From the loads of now: every worker heartbeats once more first.
        let lease = self.membership.config().lease;
        if !self.membership.wait_for_fresh_loads(lease).await {
            tracing::warn!(
                "rebalancing with loads older than this call: a worker did not heartbeat within a lease"
            );
        }
        let rebalanced = self.membership.rebalance_now();
        tracing::info!(
            target: AUDIT,
            event = "rebalance",
            caller,
            outcome = format!("{} slots moved", rebalanced.slots_moved),
            "audit"
        );
        // Answer with the table as everyone sees it: published once kept in the store.
        self.membership.wait_until_published(PUBLISH_WAIT).await;
        Ok(Response::new(pb::RebalanceResponse {
            epoch: self.membership.routing().placement.epoch().0,
            slots_moved: rebalanced.slots_moved,
            max_over_average_load: rebalanced.max_over_average_load,
        }))
    }

    async fn drain_worker(
        &self,
        request: Request<pb::DrainWorkerRequest>,
    ) -> Result<Response<pb::DrainWorkerResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let caller = caller_name(request.extensions().get::<Caller>());
        let message = request.into_inner();
        if message.worker_id.is_empty() {
            return Err(CoordinatorError::from(switchyard_core::Error::invalid(
                "worker_id",
                "must not be empty",
            ))
            .into());
        }
        let worker_id = WorkerId::parse(message.worker_id).map_err(CoordinatorError::from)?;
        let drained = self.membership.drain(&worker_id);
        tracing::info!(
            target: AUDIT,
            event = "drain",
            caller,
            worker_id = %worker_id,
            outcome = match &drained {
                Ok(drained) => format!("{} slots moved", drained.slots_moved),
                Err(error) => format!("refused: {error}"),
            },
            "audit"
        );
        let drained = drained?;
        self.membership.wait_until_published(PUBLISH_WAIT).await;
        let mut left = false;
        if message.wait {
            let until = deadline
                .unwrap_or_else(|| Instant::now() + DRAIN_WAIT)
                .into();
            let mut tables = self.membership.subscribe();
            let gone = |membership: &Membership| {
                membership
                    .worker(&worker_id)
                    .is_none_or(|record| record.state == WorkerState::Dead)
            };
            left = tokio::time::timeout_at(until, async {
                while !gone(&self.membership) {
                    if tables.changed().await.is_err() {
                        break;
                    }
                }
            })
            .await
            .is_ok()
                && gone(&self.membership);
        }
        Ok(Response::new(pb::DrainWorkerResponse {
            epoch: self.membership.routing().placement.epoch().0,
            slots_moved: drained.slots_moved,
            left,
        }))
    }
}
