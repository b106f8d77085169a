//! The Switchyard worker: hosts the sessions of the slots the coordinator placed on it.

mod context_cache;
mod error;
mod membership;
mod placement;
mod service;
mod sessions;
mod turn;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use switchyard::pb::session_service_server::SessionServiceServer;
use switchyard_agents::AgentCatalog;
use switchyard_core::{Limits, Slot, TokenKey, WorkerId};
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
    #[error("cannot read the store's cluster id: {0}")]
    Store(#[from] switchyard_store::StoreError),
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
        store.cluster_id().await?,
        placement.clone(),
    )?;
    let registration = membership.register(&shutdown).await?;
    let slot_count = placement.current().slot_count();
    let sessions = Arc::new(SessionManager::new(
        store.clone(),
        placement.clone(),
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
    let upkeep_task = tokio::spawn(upkeep(placement, sessions, store, shutdown.clone()));
    let agents_task = {
        let agents = config.agents.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { agents.maintain(shutdown.cancelled_owned()).await })
    };
    tracing::info!(%worker_id, address = %local_address, slot_count, "worker serving");
    Ok(WorkerHandle {
        worker_id,
        address: local_address,
        shutdown,
        tasks: vec![membership_task, server_task, upkeep_task, agents_task],
    })
}

/// Keeps the store leases in step with the placement table, expires idle sessions and
/// lets go of the sessions of slots that moved away.
async fn upkeep(
    placement: Arc<PlacementView>,
    sessions: Arc<SessionManager>,
    store: Arc<dyn SessionStore>,
    shutdown: CancellationToken,
) {
    let worker_id = placement.worker_id().clone();
    let mut tables = placement.subscribe();
    let mut reap = tokio::time::interval(sessions.reap_interval());
    reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = reap.tick() => {
                sync_leases(&placement, &sessions, &*store).await;
                let held = placement.fenced_slots();
                if let Err(error) = sessions.expire_idle(&held).await {
                    tracing::warn!(%worker_id, %error, "idle session expiry failed");
                }
            }
            changed = tables.changed() => {
                if changed.is_err() {
                    break;
                }
                tables.borrow_and_update();
                sync_leases(&placement, &sessions, &*store).await;
            }
            _ = shutdown.cancelled() => break,
        }
    }
}

/// Takes the store leases of newly owned slots at the table's epoch, and gives up those of
/// slots that moved away. A lease held at a newer epoch by another worker is not taken:
/// that slot is not served here until a newer table says otherwise.
async fn sync_leases(
    placement: &PlacementView,
    sessions: &SessionManager,
    store: &dyn SessionStore,
) {
    let table = placement.current();
    let worker_id = placement.worker_id();
    let owned: HashSet<Slot> = table.slots_of(worker_id).into_iter().collect();
    let held: HashSet<Slot> = placement.fenced_slots().into_iter().collect();

    let lost: Vec<Slot> = held.difference(&owned).copied().collect();
    if !lost.is_empty() {
        sessions.release_slots(|slot| owned.contains(&slot)).await;
        placement.remove_fences(&lost);
    }
    let mut new: Vec<Slot> = owned.difference(&held).copied().collect();
    if new.is_empty() {
        return;
    }
    new.sort_unstable();
    match store.acquire_slots(worker_id, table.epoch(), &new).await {
        Ok(acquired) => {
            if acquired.len() < new.len() {
                tracing::warn!(%worker_id, epoch = %table.epoch(), refused = new.len() - acquired.len(), "some slot leases are held at a newer epoch");
            }
            placement.add_fences(&acquired, table.epoch());
            tracing::debug!(%worker_id, epoch = %table.epoch(), acquired = acquired.len(), "slot leases taken");
        }
        Err(error) => {
            tracing::warn!(%worker_id, %error, "cannot take slot leases; retrying");
        }
    }
}
