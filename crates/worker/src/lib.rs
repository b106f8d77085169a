//! The Switchyard worker: hosts the sessions of the slots the coordinator placed on it.

mod error;
mod membership;
mod placement;
mod service;
mod sessions;
mod turn;

use std::net::SocketAddr;
use std::sync::Arc;

use switchyard::pb::session_service_server::SessionServiceServer;
use switchyard_agents::AgentCatalog;
use switchyard_core::{Limits, TokenKey, WorkerId};
use switchyard_server::GrpcServer;
use switchyard_store::SessionStore;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use error::WorkerError;
pub use membership::MembershipError;
pub use placement::PlacementView;
pub use sessions::SessionManager;

use crate::membership::MembershipClient;
use crate::service::WorkerSessionService;

/// Everything a worker needs to start.
#[derive(Clone)]
pub struct WorkerConfig {
    pub worker_id: WorkerId,
    /// Where the coordinator's MembershipService listens, e.g. `http://coordinator:50051`.
    pub coordinator_url: String,
    /// The address the coordinator reaches this worker at; the listener's when `None`.
    pub advertise_address: Option<String>,
    pub token_key: TokenKey,
    pub limits: Limits,
    pub agents: AgentCatalog,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot read the listener address: {0}")]
    Listener(std::io::Error),
    #[error(transparent)]
    Membership(#[from] MembershipError),
}

/// A running worker.
pub struct WorkerHandle {
    pub worker_id: WorkerId,
    pub address: SocketAddr,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Leaves the cluster, lets calls in progress finish, and stops.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }

    /// Stops at once without leaving the cluster or finishing calls, as a crash would;
    /// the coordinator learns of it only when the lease expires.
    pub fn abort(self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Registers with the coordinator (waiting for it if needed), then serves on `listener`
/// until `shutdown` is cancelled.
pub async fn start(
    config: WorkerConfig,
    listener: TcpListener,
    store: Arc<dyn SessionStore>,
    shutdown: CancellationToken,
) -> Result<WorkerHandle, StartError> {
    let local_address = listener.local_addr().map_err(StartError::Listener)?;
    let advertise = config
        .advertise_address
        .clone()
        .unwrap_or_else(|| local_address.to_string());
    let worker_id = config.worker_id.clone();
    let slot_count_unknown_yet = 1;
    let placement = Arc::new(PlacementView::new(
        worker_id.clone(),
        slot_count_unknown_yet,
    ));
    let membership = MembershipClient::new(
        &config.coordinator_url,
        worker_id.clone(),
        advertise,
        config.token_key.id(),
        placement.clone(),
    )?;
    let registration = membership.register(&shutdown).await?;
    let slot_count = placement.current().slot_count();
    let sessions = Arc::new(SessionManager::new(
        store,
        config.limits.clone(),
        slot_count,
    ));

    // The server stops after membership has left, so the coordinator routes elsewhere
    // before this worker stops answering.
    let server_shutdown = CancellationToken::new();
    let membership_task = {
        let sessions = sessions.clone();
        let shutdown = shutdown.clone();
        let server_shutdown = server_shutdown.clone();
        tokio::spawn(async move {
            membership.run(registration, sessions, shutdown).await;
            server_shutdown.cancel();
        })
    };
    let service = WorkerSessionService::new(
        worker_id.clone(),
        placement.clone(),
        sessions.clone(),
        config.agents.clone(),
        config.token_key.clone(),
    );
    let server_task = {
        let worker_id = worker_id.clone();
        tokio::spawn(async move {
            let server = GrpcServer::new().add_service(SessionServiceServer::new(service));
            if let Err(error) = server.serve(listener, server_shutdown).await {
                tracing::error!(%worker_id, %error, "worker server failed");
            }
        })
    };
    let upkeep_task = tokio::spawn(upkeep(
        worker_id.clone(),
        placement,
        sessions,
        shutdown.clone(),
    ));
    tracing::info!(%worker_id, address = %local_address, slot_count, "worker serving");
    Ok(WorkerHandle {
        worker_id,
        address: local_address,
        shutdown,
        tasks: vec![membership_task, server_task, upkeep_task],
    })
}

/// Expires idle sessions and lets go of the sessions of slots that moved away.
async fn upkeep(
    worker_id: WorkerId,
    placement: Arc<PlacementView>,
    sessions: Arc<SessionManager>,
    shutdown: CancellationToken,
) {
    let mut tables = placement.subscribe();
    let mut reap = tokio::time::interval(sessions.reap_interval());
    reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = reap.tick() => {
                let owned = placement.current().slots_of(&worker_id);
                if let Err(error) = sessions.expire_idle(&owned).await {
                    tracing::warn!(%worker_id, %error, "idle session expiry failed");
                }
            }
            changed = tables.changed() => {
                if changed.is_err() {
                    break;
                }
                let table = tables.borrow_and_update().clone();
                sessions.release_slots(|slot| table.is_owner(slot, &worker_id)).await;
            }
            _ = shutdown.cancelled() => break,
        }
    }
}
