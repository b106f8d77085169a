//! `WorkerStatusService`: what the coordinator asks of every worker for AdminService's
//! GetSessionHealth and ListAlerts.

use std::sync::Arc;

use switchyard::conversions::{alert_filter, alert_to_wire, duration_to_wire};
use switchyard::pb;
use switchyard::pb::worker_status_service_server::WorkerStatusService;
use switchyard_core::health::{HealthStatus, TurnHealth};
use switchyard_core::{SessionId, UserId, WorkerId};
use tonic::{Request, Response, Status};

use crate::error::WorkerError;
use crate::health::SessionHealth;
use crate::sessions::SessionManager;

pub struct WorkerStatus {
    worker_id: WorkerId,
    sessions: Arc<SessionManager>,
}

impl WorkerStatus {
    pub fn new(worker_id: WorkerId, sessions: Arc<SessionManager>) -> Self {
        WorkerStatus {
            worker_id,
            sessions,
        }
    }
}

fn health_to_wire(
    session_id: SessionId,
    user_id: &UserId,
    worker_id: &WorkerId,
    health: Option<SessionHealth>,
) -> pb::SessionHealth {
    let hot = health.is_some();
    let health = health.unwrap_or_default();
    let turns: &TurnHealth = &health.turns;
    let score = health.score();
    let (recent_errors, recent_turns) = turns.recent_errors();
    pb::SessionHealth {
        session_id: session_id.to_string(),
        user_id: user_id.to_string(),
        worker_id: worker_id.to_string(),
        hot,
        turns: turns.turns,
        errors: turns.errors,
        prompt_tokens: turns.prompt_tokens,
        completion_tokens: turns.completion_tokens,
        latency_p50: turns.p50().map(duration_to_wire),
        latency_p95: turns.p95().map(duration_to_wire),
        score,
        status: HealthStatus::of(score).as_str().to_string(),
        agent_type: health.agent_type.clone(),
        slow_turn: Some(duration_to_wire(health.slow_after)),
        recent_errors,
        recent_turns,
    }
}

#[tonic::async_trait]
impl WorkerStatusService for WorkerStatus {
    async fn get_session_health(
        &self,
        request: Request<pb::GetSessionHealthRequest>,
    ) -> Result<Response<pb::SessionHealth>, Status> {
        let session_id = SessionId::parse(&request.get_ref().session_id)
            .map_err(|error| Status::from(WorkerError::from(error)))?;
        let held = self
            .sessions
            .health_of(session_id)
            .await
            .map_err(Status::from)?;
        let Some((session, health)) = held else {
            return Err(Status::not_found(format!(
                "session {session_id} is not held by worker {}",
                self.worker_id
            )));
        };
        Ok(Response::new(health_to_wire(
            session_id,
            &session.user_id,
            &self.worker_id,
            health,
        )))
    }

    async fn list_alerts(
        &self,
        request: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        let filter = alert_filter(request.get_ref())
            .map_err(|error| Status::from(WorkerError::from(error)))?;
        let node = self.worker_id.to_string();
        let alerts = self
            .sessions
            .alerts()
            .list(&filter)
            .iter()
            .map(|alert| alert_to_wire(alert, &node))
            .collect();
        Ok(Response::new(pb::ListAlertsResponse {
            alerts,
            unreachable_workers: Vec::new(),
        }))
    }
}
