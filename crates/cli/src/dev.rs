//! `DevCluster`: a coordinator and N workers in one process on loopback, sharing one store.
//! `switchyard dev` runs it, and so do the cluster tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchyard::tls::{ClientTlsFiles, TlsError};
use switchyard_agents::AgentCatalog;
use switchyard_coordinator::{CallerAuth, CoordinatorConfig, CoordinatorHandle};
use switchyard_core::{ClusterKey, DEFAULT_SLOT_COUNT, Limits, TokenKey, WorkerId};
use switchyard_server::{ClientCertificates, LocalNodes, ServerLimits, ServerTlsFiles};

use crate::tls::DevTlsFiles;
use switchyard_store::SessionStore;
use switchyard_worker::quotas::QuotaConfig;
use switchyard_worker::{WorkerConfig, WorkerHandle};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] switchyard_store::StoreError),
    #[error("the coordinator failed to start: {0}")]
    Coordinator(#[from] switchyard_coordinator::StartError),
    #[error(transparent)]
    Keys(crate::keys::KeyError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("worker {worker_id} failed to start: {source}")]
    Worker {
        worker_id: String,
        source: switchyard_worker::StartError,
    },
}

#[derive(Clone)]
pub struct DevClusterConfig {
    /// The coordinator's address; port 0 picks a free one.
    pub listen: SocketAddr,
    pub workers: usize,
    pub token_key: TokenKey,
    /// What the nodes prove membership with; random unless set.
    pub cluster_key: ClusterKey,
    /// How callers authenticate at the coordinator; open unless set.
    pub callers: CallerAuth,
    pub limits: Limits,
    /// In-flight, receive-budget and HTTP/2 limits of every node's server.
    pub server_limits: ServerLimits,
    pub reflection: bool,
    /// Every node writes one access-log line per call.
    pub access_log: bool,
    /// TLS on the coordinator's listener and mutual TLS between the nodes.
    pub tls: Option<DevTlsFiles>,
    pub slot_count: u32,
    pub heartbeat_interval: Duration,
    pub lease: Duration,
    /// How long a worker losing a slot lets its calls finish before handing it over.
    pub handoff_grace: Duration,
    /// The bounded-load placement's ε.
    pub epsilon: f64,
    pub agents: AgentCatalog,
    /// The one store every in-process node shares.
    pub store: Arc<dyn SessionStore>,
    /// Every user's quota defaults and rate limits (none unless set).
    pub quotas: QuotaConfig,
}

impl DevClusterConfig {
    /// A cluster on `store`; `MemoryStore::new()` for one that keeps nothing. Its nodes
    /// share a random cluster secret, and callers need no API key.
    pub fn new(
        listen: SocketAddr,
        workers: usize,
        token_key: TokenKey,
        store: Arc<dyn SessionStore>,
    ) -> Result<Self, DevError> {
        let secret = crate::keys::random_hex(32).map_err(DevError::Keys)?;
        let cluster_key = ClusterKey::from_secret(secret.as_bytes()).map_err(|error| {
            DevError::Keys(crate::keys::KeyError::Invalid {
                origin: "a random cluster secret".into(),
                reason: error.to_string(),
            })
        })?;
        Ok(DevClusterConfig {
            listen,
            workers,
            token_key,
            cluster_key,
            callers: CallerAuth::Open,
            store,
            quotas: QuotaConfig::default(),
            limits: Limits::default(),
            server_limits: ServerLimits::default(),
            reflection: true,
            access_log: false,
            tls: None,
            slot_count: DEFAULT_SLOT_COUNT,
            heartbeat_interval: Duration::from_millis(500),
            lease: Duration::from_secs(2),
            handoff_grace: Duration::from_secs(5),
            epsilon: switchyard_core::bounded::DEFAULT_EPSILON,
            agents: AgentCatalog::with_builtin(),
        })
    }
}

/// A node's TLS as a client of another: the dev CA, and the node certificate.
fn node_client_tls(tls: &DevTlsFiles) -> ClientTlsFiles {
    ClientTlsFiles {
        ca: tls.ca.clone(),
        identity: Some((tls.node_cert.clone(), tls.node_key.clone())),
    }
}

/// Every node's server takes messages as large as the limits allow.
fn server_limits(config: &DevClusterConfig) -> ServerLimits {
    ServerLimits {
        max_message_bytes: config.limits.max_grpc_message_bytes,
        ..config.server_limits
    }
}

pub struct DevCluster {
    config: DevClusterConfig,
    pub coordinator: CoordinatorHandle,
    /// `None` where a worker was stopped.
    pub workers: Vec<Option<WorkerHandle>>,
    shutdown: CancellationToken,
    /// The workers' servers, which the coordinator calls in place.
    local: LocalNodes,
}

impl DevCluster {
    pub async fn start(config: DevClusterConfig) -> Result<Self, DevError> {
        let shutdown = CancellationToken::new();
        let listener = switchyard_server::bind(config.listen).await?;
        let mut coordinator_config = CoordinatorConfig::new(
            config.token_key.clone(),
            config.cluster_key.clone(),
            config.callers.clone(),
        );
        coordinator_config.server_limits = server_limits(&config);
        coordinator_config.reflection = config.reflection;
        coordinator_config.access_log = config.access_log;
        if let Some(tls) = &config.tls {
            coordinator_config.tls = Some(
                ServerTlsFiles {
                    cert: tls.coordinator_cert.clone(),
                    key: tls.coordinator_key.clone(),
                    clients: ClientCertificates::Optional(tls.ca.clone()),
                }
                .load()?,
            );
            coordinator_config.worker_tls = Some(node_client_tls(tls).load()?);
        }
        coordinator_config.slot_count = config.slot_count;
        coordinator_config.heartbeat_interval = config.heartbeat_interval;
        coordinator_config.lease = config.lease;
        coordinator_config.handoff_grace = config.handoff_grace;
        coordinator_config.epsilon = config.epsilon;
        let local = LocalNodes::new();
        coordinator_config.local = local.clone();
        let coordinator = switchyard_coordinator::start(
            coordinator_config,
            config.store.clone(),
            listener,
            shutdown.child_token(),
        )
        .await?;
        let mut cluster = DevCluster {
            config,
            coordinator,
            workers: Vec::new(),
            shutdown,
            local,
        };
        for _ in 0..cluster.config.workers {
            cluster.add_worker().await?;
        }
        Ok(cluster)
    }

    pub fn coordinator_address(&self) -> SocketAddr {
        self.coordinator.address
    }

    /// The certificates the cluster serves TLS with, if it does.
    pub fn tls_files(&self) -> Option<&DevTlsFiles> {
        self.config.tls.as_ref()
    }

    /// `https://…` when the cluster serves TLS.
    pub fn coordinator_url(&self) -> String {
        let scheme = if self.config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.coordinator.address)
    }

    /// Starts one more worker, named `dev-worker-N`, on a free loopback port.
    pub async fn add_worker(&mut self) -> Result<&WorkerHandle, DevError> {
        let index = self.workers.len();
        let worker_id = WorkerId::parse(format!("dev-worker-{index}")).map_err(|error| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, error.to_string())
        })?;
        let listener = switchyard_server::bind(SocketAddr::new(self.config.listen.ip(), 0)).await?;
        let config = WorkerConfig {
            worker_id: worker_id.clone(),
            coordinator_url: self.coordinator_url(),
            advertise_address: None,
            token_key: self.config.token_key.clone(),
            cluster_key: self.config.cluster_key.clone(),
            limits: self.config.limits.clone(),
            agents: self.config.agents.clone(),
            server_limits: server_limits(&self.config),
            reflection: self.config.reflection,
            access_log: self.config.access_log,
            tls: match &self.config.tls {
                Some(tls) => Some(
                    ServerTlsFiles {
                        cert: tls.node_cert.clone(),
                        key: tls.node_key.clone(),
                        clients: ClientCertificates::Required(tls.ca.clone()),
                    }
                    .load()?,
                ),
                None => None,
            },
            coordinator_tls: match &self.config.tls {
                Some(tls) => Some(node_client_tls(tls).load()?),
                None => None,
            },
            quotas: self.config.quotas.clone(),
            local: Some(self.local.clone()),
        };
        let handle = switchyard_worker::start(
            config,
            listener,
            self.config.store.clone(),
            self.shutdown.child_token(),
        )
        .await
        .map_err(|source| DevError::Worker {
            worker_id: worker_id.to_string(),
            source,
        })?;
        self.workers.push(Some(handle));
        Ok(self.workers[index].as_ref().expect("just pushed"))
    }

    /// The running workers.
    pub fn live_workers(&self) -> impl Iterator<Item = &WorkerHandle> {
        self.workers.iter().flatten()
    }

    /// Stops a worker gracefully: it leaves the cluster and finishes its calls.
    pub async fn stop_worker(&mut self, index: usize) {
        if let Some(worker) = self.workers.get_mut(index).and_then(Option::take) {
            worker.stop().await;
        }
    }

    /// Stops a worker abruptly, as a crash would; the coordinator notices at lease expiry.
    /// Returns the id of the worker stopped, if one was running at `index`.
    pub fn kill_worker(&mut self, index: usize) -> Option<WorkerId> {
        let worker = self.workers.get_mut(index).and_then(Option::take)?;
        let worker_id = worker.worker_id.clone();
        worker.abort();
        Some(worker_id)
    }

    /// Stops the workers (each leaves the cluster first), then the coordinator.
    pub async fn stop(self) {
        for worker in self.workers.into_iter().flatten() {
            worker.stop().await;
        }
        self.coordinator.stop().await;
    }
}
