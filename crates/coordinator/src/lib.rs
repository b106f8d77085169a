//! The Switchyard coordinator: membership, placement authority, routing and admin.

mod admin;
mod error;
mod membership;
mod raw;
mod router;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchyard::pb::admin_service_server::AdminServiceServer;
use switchyard::pb::membership_service_server::MembershipServiceServer;
use switchyard_core::{DEFAULT_SLOT_COUNT, Epoch, TokenKey};
use switchyard_server::GrpcServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use error::CoordinatorError;
pub use membership::{Membership, MembershipConfig, RoutingTable, WorkerRecord, WorkerState};

use crate::admin::Admin;
use crate::membership::MembershipGrpc;
use crate::router::{Router, SessionProxy};

#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    pub token_key: TokenKey,
    /// The id of the cluster's store; workers on another store are refused.
    pub cluster_id: String,
    /// The highest placement epoch already used (the store's newest lease): new tables
    /// start above it, so no epoch is ever handed out twice.
    pub epoch_floor: Epoch,
    pub slot_count: u32,
    pub heartbeat_interval: Duration,
    pub lease: Duration,
}

impl CoordinatorConfig {
    pub fn new(token_key: TokenKey, cluster_id: String, epoch_floor: Epoch) -> Self {
        CoordinatorConfig {
            token_key,
            cluster_id,
            epoch_floor,
            slot_count: DEFAULT_SLOT_COUNT,
            heartbeat_interval: Duration::from_millis(500),
            lease: Duration::from_secs(2),
        }
    }
}

/// A running coordinator.
pub struct CoordinatorHandle {
    pub address: SocketAddr,
    pub membership: Arc<Membership>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl CoordinatorHandle {
    /// Stops serving once the calls in progress have finished.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }

    /// Resolves when the coordinator has stopped (after `shutdown` was cancelled).
    pub async fn wait(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Serves the coordinator's services on `listener` until `shutdown` is cancelled.
pub fn start(
    config: CoordinatorConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<CoordinatorHandle> {
    let address = listener.local_addr()?;
    let membership = Arc::new(Membership::new(MembershipConfig {
        slot_count: config.slot_count,
        heartbeat_interval: config.heartbeat_interval,
        lease: config.lease,
        token_key_id: config.token_key.id(),
        cluster_id: config.cluster_id.clone(),
        epoch_floor: config.epoch_floor,
    }));
    let server = GrpcServer::new()
        .add_service(SessionProxy::new(Router::new(
            membership.clone(),
            config.token_key.clone(),
        )))
        .add_service(AdminServiceServer::new(Admin::new(membership.clone())))
        .add_service(MembershipServiceServer::new(MembershipGrpc::new(
            membership.clone(),
        )));
    let server_task = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(error) = server.serve(listener, shutdown).await {
                tracing::error!(%error, "coordinator server failed");
            }
        })
    };
    let lease_task = tokio::spawn(membership.clone().watch_leases(shutdown.clone()));
    tracing::info!(%address, slot_count = config.slot_count, "coordinator serving");
    Ok(CoordinatorHandle {
        address,
        membership,
        shutdown,
        tasks: vec![server_task, lease_task],
    })
}
