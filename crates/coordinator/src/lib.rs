//! The Switchyard coordinator: membership, placement authority, routing and admin.

mod admin;
pub mod api_keys;
mod error;
mod gate;
mod membership;
mod raw;
mod router;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchyard::pb::admin_service_server::AdminServiceServer;
use switchyard::pb::membership_service_server::MembershipServiceServer;
use switchyard::tls::ClientTls;
use switchyard_core::bounded::DEFAULT_EPSILON;
use switchyard_core::{ClusterKey, DEFAULT_SLOT_COUNT, TokenKey};
use switchyard_server::{GrpcServer, LocalNodes, ServerLimits, ServerTls};
use switchyard_store::SessionStore;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use api_keys::{ApiKeyFileError, ApiKeyRegistry};
pub use error::CoordinatorError;
pub use gate::{Caller, CallerAuth, CoordinatorGate};
pub use membership::{
    Membership, MembershipConfig, Rebalanced, RoutingTable, WorkerRecord, WorkerState,
};

use crate::admin::Admin;
use crate::gate::CoordinatorGate as Gate;
use crate::membership::MembershipGrpc;
use crate::router::{Router, SessionProxy};

#[derive(Clone)]
pub struct CoordinatorConfig {
    pub token_key: TokenKey,
    /// Derived from the cluster secret: what workers prove membership with, and what marks
    /// every call the coordinator forwards.
    pub cluster_key: ClusterKey,
    /// How callers of SessionService and AdminService authenticate.
    pub callers: CallerAuth,
    pub server_limits: ServerLimits,
    /// Serve server reflection (grpcurl list/describe).
    pub reflection: bool,
    /// Write one access-log line per call.
    pub access_log: bool,
    /// TLS on the listener (callers and workers), re-read when its files change.
    pub tls: Option<Arc<ServerTls>>,
    /// Mutual TLS towards the workers (the cluster CA and this node's certificate). When
    /// set, membership calls must also come over a connection with a verified client
    /// certificate.
    pub worker_tls: Option<Arc<ClientTls>>,
    pub slot_count: u32,
    pub heartbeat_interval: Duration,
    pub lease: Duration,
    /// How long a worker that loses a slot lets the slot's in-flight calls finish before
    /// cancelling them (UNAVAILABLE) and handing the slot over.
    pub handoff_grace: Duration,
    /// The bounded-load placement's ε: no worker carries more than ⌈(1+ε)·total/N⌉.
    pub epsilon: f64,
    /// Workers in this process (`switchyard dev`), called in place rather than through a
    /// socket. Empty when the workers are processes of their own.
    pub local: LocalNodes,
}

impl CoordinatorConfig {
    pub fn new(token_key: TokenKey, cluster_key: ClusterKey, callers: CallerAuth) -> Self {
        CoordinatorConfig {
            token_key,
            cluster_key,
            callers,
            server_limits: ServerLimits::default(),
            reflection: true,
            access_log: false,
            tls: None,
            worker_tls: None,
            local: LocalNodes::new(),
            slot_count: DEFAULT_SLOT_COUNT,
            heartbeat_interval: Duration::from_millis(500),
            lease: Duration::from_secs(2),
            handoff_grace: Duration::from_secs(5),
            epsilon: DEFAULT_EPSILON,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot read the listener address: {0}")]
    Listener(#[from] std::io::Error),
    #[error("cannot read the cluster's state from the store: {0}")]
    Store(#[from] switchyard_store::StoreError),
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

/// Serves the coordinator's services on `listener` until `shutdown` is cancelled. The
/// store gives the cluster id, the epochs already used and the last placement table, which
/// the coordinator keeps there as it changes.
pub async fn start(
    config: CoordinatorConfig,
    store: Arc<dyn SessionStore>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<CoordinatorHandle, StartError> {
    let address = listener.local_addr()?;
    let restored = store.load_placement().await?;
    let membership = Arc::new(Membership::new(
        MembershipConfig {
            slot_count: config.slot_count,
            heartbeat_interval: config.heartbeat_interval,
            lease: config.lease,
            handoff_grace: config.handoff_grace,
            epsilon: config.epsilon,
            token_key_ids: config.token_key.ids(),
            cluster_id: store.cluster_id().await?,
            epoch_floor: store.max_lease_epoch().await?,
        },
        restored,
        true,
    ));
    let max_message_bytes = config.server_limits.max_message_bytes;
    let router = Arc::new(Router::new(
        membership.clone(),
        config.token_key.clone(),
        config.cluster_key.clone(),
        max_message_bytes,
        config.worker_tls.clone(),
        config.local.clone(),
    ));
    let server = GrpcServer::new()
        .with_node("coordinator")
        .with_call_log(switchyard_server::metrics::CallLog {
            start_traces: true,
            access_log: config.access_log,
        })
        .with_gate(Arc::new(Gate::new(
            config.cluster_key.clone(),
            config.callers.clone(),
            config.worker_tls.is_some(),
        )))
        .with_tls(config.tls.clone())
        .with_limits(config.server_limits)
        .with_reflection(config.reflection)
        .add_service(SessionProxy::new(router.clone()))
        .add_service(AdminServiceServer::new(Admin::new(
            membership.clone(),
            router,
        )))
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
    let keeper_task = tokio::spawn(membership.clone().keep_placement(store, shutdown.clone()));
    let mut tasks = vec![server_task, lease_task, keeper_task];
    match &config.callers {
        CallerAuth::ApiKeys(registry) => {
            tracing::info!(%address, keys = registry.current().len(), "callers authenticate with API keys");
            tasks.push(tokio::spawn(registry.clone().watch(shutdown.clone())));
        }
        CallerAuth::Open => {
            tracing::warn!(%address, "no API keys: anyone who reaches this address acts as every user and as an operator");
        }
    }
    if let Some(worker_tls) = &config.worker_tls {
        tasks.push(tokio::spawn(
            worker_tls.clone().watch(shutdown.clone().cancelled_owned()),
        ));
    }
    tracing::info!(%address, slot_count = config.slot_count, tls = config.tls.is_some(), "coordinator serving");
    Ok(CoordinatorHandle {
        address,
        membership,
        shutdown,
        tasks,
    })
}
