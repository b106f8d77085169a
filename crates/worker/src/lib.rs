//! The Switchyard worker: hosts the sessions of the slots the coordinator placed on it.

pub mod audit;
mod context_cache;
mod error;
mod gate;
pub mod health;
mod membership;
mod ownership;
pub mod quotas;
mod service;
mod sessions;
mod status;
mod turn;
mod user_state;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard::pb::session_service_server::SessionServiceServer;
use switchyard::pb::user_state_service_server::UserStateServiceServer;
use switchyard::pb::worker_status_service_server::WorkerStatusServiceServer;
use switchyard::tls::ClientTls;
use switchyard_agents::AgentCatalog;
use switchyard_core::{ClusterKey, Limits, Slot, TokenKey, WorkerId};
use switchyard_server::{GrpcServer, LocalNodes, ServerLimits, ServerTls};
use switchyard_store::{Fence, SessionStore, SlotLease};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use error::WorkerError;
pub use membership::MembershipError;
pub use ownership::SlotOwnership;
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
    /// Derived from the cluster secret: the worker proves membership with it, and serves
    /// only calls that carry the coordinator's credential made with it.
    pub cluster_key: ClusterKey,
    pub limits: Limits,
    pub agents: AgentCatalog,
    pub server_limits: ServerLimits,
    /// Serve server reflection.
    pub reflection: bool,
    /// Write one access-log line per call.
    pub access_log: bool,
    /// TLS on the listener; with the cluster CA it asks every client (the coordinator) for
    /// a certificate: mutual TLS.
    pub tls: Option<Arc<ServerTls>>,
    /// TLS towards the coordinator (an `https://` coordinator URL).
    pub coordinator_tls: Option<Arc<ClientTls>>,
    /// Every user's quota defaults and rate limits.
    pub quotas: quotas::QuotaConfig,
    /// Where the worker lists its server for a coordinator in the same process
    /// (`switchyard dev`), which then calls it in place. `None` for a worker process.
    pub local: Option<LocalNodes>,
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
    let placement = Arc::new(SlotOwnership::new(
        worker_id.clone(),
        slot_count_unknown_yet,
    ));
    let membership = MembershipClient::new(
        &config,
        advertise.clone(),
        store.cluster_id().await?,
        placement.clone(),
    )?;
    // Until it has registered (the coordinator may not be up yet), the worker answers
    // health checks alone: alive, not ready. A second handle to the same socket serves
    // them, and stops accepting once the worker's own server is about to.
    let (listener, early) = {
        let listener = listener.into_std().map_err(StartError::Listener)?;
        let early = listener.try_clone().map_err(StartError::Listener)?;
        (
            TcpListener::from_std(listener).map_err(StartError::Listener)?,
            TcpListener::from_std(early).map_err(StartError::Listener)?,
        )
    };
    let registered = CancellationToken::new();
    let early_health = tokio::spawn(serve_health_only(early, registered.clone()));
    let registration = membership.register(&shutdown).await;
    // Its connections are dropped: a caller that reached it reconnects to the real server.
    registered.cancel();
    early_health.abort();
    let registration = registration?;
    let slot_count = placement.current().slot_count();
    let sessions = Arc::new(
        SessionManager::new(
            store.clone(),
            placement.clone(),
            config.limits.clone(),
            slot_count,
        )
        .with_quotas(config.quotas.clone()),
    );
    let quotas_task = tokio::spawn(sessions.quotas().clone().run(shutdown.clone()));

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
    let user_state = user_state::WorkerUserState::new(
        placement.clone(),
        sessions.quotas().clone(),
        sessions.clone(),
    );
    let status = status::WorkerStatus::new(worker_id.clone(), sessions.clone());
    let service = WorkerSessionService::new(
        worker_id.clone(),
        placement.clone(),
        sessions.clone(),
        config.agents.clone(),
        config.token_key.clone(),
    );
    // Ready once registered and holding the leases of every slot the table gives it.
    let (ready_tx, ready) = tokio::sync::watch::channel(false);
    {
        let placement = placement.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(READINESS_CHECK);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    () = shutdown.cancelled() => break,
                }
                let holds = placement.holds_its_slots();
                ready_tx.send_if_modified(|ready| std::mem::replace(ready, holds) != holds);
            }
            ready_tx.send_replace(false);
        });
    }
    let server_task = {
        let worker_id = worker_id.clone();
        let cluster_key = config.cluster_key.clone();
        let server_limits = config.server_limits;
        let reflection = config.reflection;
        let access_log = config.access_log;
        let tls = config.tls.clone();
        let local = config.local.clone().map(|nodes| (nodes, advertise.clone()));
        tokio::spawn(async move {
            let max_message_bytes = server_limits.max_message_bytes;
            let server = GrpcServer::new()
                .with_node(worker_id.as_str())
                .with_call_log(switchyard_server::metrics::CallLog {
                    start_traces: false,
                    access_log,
                })
                .with_gate(Arc::new(gate::WorkerGate::new(cluster_key)))
                .with_limits(server_limits)
                .with_reflection(reflection)
                .with_readiness(READINESS_SERVICE, ready)
                .with_tls(tls)
                .add_service(
                    SessionServiceServer::new(service)
                        .max_decoding_message_size(max_message_bytes)
                        .max_encoding_message_size(max_message_bytes),
                )
                .add_service(UserStateServiceServer::new(user_state))
                .add_service(WorkerStatusServiceServer::new(status));
            let server = match local {
                Some((nodes, address)) => server.with_local(nodes, address),
                None => server,
            };
            if let Err(error) = server.serve(listener, server_shutdown).await {
                tracing::error!(%worker_id, %error, "worker server failed");
            }
        })
    };
    let upkeep_task = tokio::spawn(upkeep(placement, sessions, store, shutdown.clone()));
    if let Some(coordinator_tls) = &config.coordinator_tls {
        tokio::spawn(
            coordinator_tls
                .clone()
                .watch(shutdown.clone().cancelled_owned()),
        );
    }
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
        tasks: vec![
            membership_task,
            server_task,
            upkeep_task,
            agents_task,
            quotas_task,
        ],
    })
}

/// Keeps the store leases in step with the placement table, expires idle sessions, hands
/// over the slots that moved away, and stops the worker once a drain has handed over all.
async fn upkeep(
    placement: Arc<SlotOwnership>,
    sessions: Arc<SessionManager>,
    store: Arc<dyn SessionStore>,
    shutdown: CancellationToken,
) {
    let worker_id = placement.worker_id().clone();
    let mut tables = placement.subscribe();
    let mut reap = tokio::time::interval(sessions.reap_interval());
    let mut counted_at: Option<Instant> = None;
    reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leases = LeaseKeeper::new(placement.clone(), sessions.clone(), store);
    let mut verified = placement.subscribe_fences_verified();
    let mut draining = placement.subscribe_draining();
    loop {
        let retry = leases.retry_in();
        tokio::select! {
            _ = reap.tick() => {
                leases.sync().await;
                let held = placement.fenced_slots();
                if let Err(error) = sessions.expire_idle(&held).await {
                    tracing::warn!(%worker_id, %error, "idle session expiry failed");
                }
                metrics::gauge!("switchyard_sessions_active", "node" => worker_id.to_string(), "state" => "hot")
                    .set(sessions.hot_count() as f64);
                // Passivated: held in the store in our slots, not hot here. One count by
                // the slot index, at most every PASSIVATED_COUNT_EVERY.
                if counted_at.is_none_or(|at: Instant| at.elapsed() >= PASSIVATED_COUNT_EVERY) {
                    counted_at = Some(Instant::now());
                    match sessions.stored_count(&held).await {
                        Ok(stored) => {
                            metrics::gauge!("switchyard_sessions_active", "node" => worker_id.to_string(), "state" => "passivated")
                                .set(stored.saturating_sub(sessions.hot_count() as u64) as f64);
                        }
                        Err(error) => tracing::debug!(%worker_id, %error, "sessions not counted"),
                    }
                }
                metrics::gauge!("switchyard_worker_load", "node" => worker_id.to_string())
                    .set(sessions.hot_count() as f64);
            }
            changed = tables.changed() => {
                if changed.is_err() {
                    break;
                }
                tables.borrow_and_update();
                leases.sync().await;
            }
            _ = leases.handed_over.notified() => leases.sync().await,
            _ = tokio::time::sleep(retry.unwrap_or_default()), if retry.is_some() => leases.sync().await,
            changed = verified.changed() => {
                if changed.is_err() {
                    break;
                }
                verified.borrow_and_update();
                leases.sync().await;
            }
            changed = draining.changed() => {
                if changed.is_err() {
                    break;
                }
                draining.borrow_and_update();
            }
            _ = shutdown.cancelled() => break,
        }
        if placement.is_draining()
            && placement.current().slots_of(&worker_id).is_empty()
            && placement.fenced_slots().is_empty()
            && !leases.is_handing_over()
        {
            tracing::info!(%worker_id, "drained: every slot handed over; leaving the cluster");
            shutdown.cancel();
            break;
        }
    }
}

/// Health checks alone on `listener` until `stop`: the worker is alive ("" SERVING) and
/// not ready ([`READINESS_SERVICE`] NOT_SERVING).
async fn serve_health_only(listener: TcpListener, stop: CancellationToken) {
    use tonic_health::ServingStatus;
    let (health, service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::Serving).await;
    health
        .set_service_status(READINESS_SERVICE, ServingStatus::NotServing)
        .await;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    if let Err(error) = tonic::transport::Server::builder()
        .add_service(service)
        .add_service(Starting::<SESSION_SERVICE>)
        .add_service(Starting::<USER_STATE_SERVICE>)
        .add_service(Starting::<WORKER_STATUS_SERVICE>)
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await
    {
        tracing::warn!(%error, "health checks before registration stopped");
    }
}

const SESSION_SERVICE: u8 = 0;
const USER_STATE_SERVICE: u8 = 1;
const WORKER_STATUS_SERVICE: u8 = 2;

/// A worker's service before it has registered: every call is UNAVAILABLE (which callers
/// retry), never UNIMPLEMENTED.
#[derive(Clone)]
struct Starting<const SERVICE: u8>;

impl<const SERVICE: u8> tonic::server::NamedService for Starting<SERVICE> {
    const NAME: &'static str = match SERVICE {
        SESSION_SERVICE => "switchyard.v1.SessionService",
        USER_STATE_SERVICE => "switchyard.v1.UserStateService",
        _ => "switchyard.v1.WorkerStatusService",
    };
}

impl<const SERVICE: u8, B> tower_service::Service<http::Request<B>> for Starting<SERVICE> {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: http::Request<B>) -> Self::Future {
        let mut status = tonic::Status::unavailable("this worker is starting: not registered yet");
        status.metadata_mut().insert(
            switchyard::metadata::WORKER_STARTING,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        std::future::ready(Ok(status.into_http()))
    }
}

/// The health name a worker's readiness probe asks: SERVING once it has registered and
/// holds its slots (the whole server, "", is SERVING while it runs).
pub const READINESS_SERVICE: &str = "switchyard.v1.SessionService";
/// How often a worker checks whether it holds its slots, for its readiness.
const READINESS_CHECK: Duration = Duration::from_millis(100);
/// How often the sessions of the slots held are counted for the passivated gauge.
const PASSIVATED_COUNT_EVERY: Duration = Duration::from_secs(5);
/// How often a new owner checks whether the previous owner has released a slot.
const LEASE_RETRY: Duration = Duration::from_millis(25);
/// Pause before trying the store again after it failed.
const STORE_RETRY: Duration = Duration::from_millis(500);

/// Takes the store leases of slots placed here and gives up those of slots moved away,
/// following DESIGN.md's handoff: the old owner finishes or cancels the slot's calls and
/// releases the lease; the new owner takes it then, or at once when the old owner is no
/// longer a member (it died), or after the grace and a margin when the release never comes.
struct LeaseKeeper {
    placement: Arc<SlotOwnership>,
    sessions: Arc<SessionManager>,
    store: Arc<dyn SessionStore>,
    /// Signalled when a handover ends.
    handed_over: Arc<Notify>,
    /// The store failed: try again after a pause.
    store_failed: bool,
}

impl LeaseKeeper {
    fn new(
        placement: Arc<SlotOwnership>,
        sessions: Arc<SessionManager>,
        store: Arc<dyn SessionStore>,
    ) -> Self {
        LeaseKeeper {
            placement,
            sessions,
            store,
            handed_over: Arc::default(),
            store_failed: false,
        }
    }

    /// When to sync again without being woken: soon while waiting for a handoff or to
    /// forget stale leases, after a pause when the store failed.
    fn retry_in(&self) -> Option<Duration> {
        if self.store_failed {
            Some(STORE_RETRY)
        } else if self.placement.is_waiting() || !self.placement.fences_verified() {
            Some(LEASE_RETRY)
        } else {
            None
        }
    }

    fn is_handing_over(&self) -> bool {
        self.placement.handovers_in_progress()
    }

    /// On a re-registration, forgets every lease and session held (cancelling running turns):
    /// while this worker was out of touch its slots may have moved away and back, so neither
    /// its fences nor its caches can be trusted. Calls are refused until this has run, and
    /// slots are then taken again through the store's epoch order like any new slot (at once
    /// where the store still shows this worker's lease), their sessions loading afresh.
    fn forget_everything(&mut self) {
        let worker_id = self.placement.worker_id();
        let held = self.placement.fenced_slots();
        tracing::info!(%worker_id, slots = held.len(), "registered again: leases and sessions are taken afresh");
        self.placement.remove_fences(&held);
        self.sessions.forget_all();
        self.placement.stop_waiting(|_| false);
        self.placement.set_fences_verified(true);
    }

    async fn sync(&mut self) {
        self.store_failed = false;
        if !self.placement.fences_verified() {
            self.forget_everything();
        }
        let table = self.placement.current();
        let worker_id = self.placement.worker_id().clone();
        // The transitions are SlotOwnership's; what needs the store happens here.
        let moving = self.placement.slots_moving_away(&table);
        if !moving.is_empty() {
            tokio::spawn(hand_over(
                self.placement.clone(),
                self.sessions.clone(),
                self.store.clone(),
                moving,
                self.handed_over.clone(),
            ));
        }
        let arriving = self.placement.slots_arriving(&table);
        if arriving.is_empty() {
            return;
        }
        let leases = match self.store.slot_leases(&arriving).await {
            Ok(leases) => leases,
            Err(error) => {
                tracing::warn!(%worker_id, %error, "cannot read slot leases; retrying");
                self.store_failed = true;
                return;
            }
        };
        let leases: HashMap<Slot, SlotLease> = leases
            .into_iter()
            .map(|lease| (lease.slot, lease))
            .collect();
        let take = self
            .placement
            .slots_to_take(&table, &arriving, &leases, Instant::now());
        if take.is_empty() {
            return;
        }
        match self
            .store
            .acquire_slots(&worker_id, table.epoch(), &take)
            .await
        {
            Ok(acquired) => {
                if acquired.len() < take.len() {
                    tracing::warn!(%worker_id, epoch = %table.epoch(), refused = take.len() - acquired.len(), "some slot leases are held at a newer epoch");
                }
                self.placement.slots_taken(&take, &acquired, table.epoch());
                tracing::debug!(%worker_id, epoch = %table.epoch(), acquired = acquired.len(), "slot leases taken");
            }
            Err(error) => {
                tracing::warn!(%worker_id, %error, "cannot take slot leases; retrying");
                self.store_failed = true;
            }
        }
    }
}

/// Hands `slots` over: lets their calls finish within the grace (cancelling the rest),
/// stops writing them, and releases their leases so the new owner can take them at once.
async fn hand_over(
    placement: Arc<SlotOwnership>,
    sessions: Arc<SessionManager>,
    store: Arc<dyn SessionStore>,
    slots: Vec<Slot>,
    handed_over: Arc<Notify>,
) {
    let worker_id = placement.worker_id().clone();
    let started = Instant::now();
    let set: HashSet<Slot> = slots.iter().copied().collect();
    // However this task ends, the slots stop being "handed over" and upkeep looks again.
    let _done = HandoverDone {
        sessions: sessions.clone(),
        slots: set.clone(),
        handed_over,
    };
    // The leases being given up, as held now: one taken again later (at a newer epoch, after
    // a re-registration) is not this handoff's to release.
    let fences: Vec<Fence> = slots
        .iter()
        .filter_map(|slot| placement.fence(*slot))
        .collect();
    let cancelled = sessions.hand_over(&set, placement.handoff_grace()).await;
    placement.remove_fences_held_at(&fences);
    let mut attempt = 0;
    loop {
        match store.release_slots(&fences).await {
            Ok(released) => {
                tracing::info!(%worker_id, slots = slots.len(), released, cancelled_calls = cancelled, took_ms = started.elapsed().as_millis() as u64, "slots handed over");
                break;
            }
            Err(error) if attempt < 3 => {
                attempt += 1;
                tracing::warn!(%worker_id, %error, "cannot release slot leases; retrying");
                tokio::time::sleep(LEASE_RETRY * 4).await;
            }
            Err(error) => {
                tracing::warn!(%worker_id, %error, "cannot release slot leases; the new owners take them after the handoff grace");
                break;
            }
        }
    }
}

/// Ends a handoff when dropped: its slots may be served again should they come back, and
/// upkeep is woken to take them or to let a drained worker go.
struct HandoverDone {
    sessions: Arc<SessionManager>,
    slots: HashSet<Slot>,
    handed_over: Arc<Notify>,
}

impl Drop for HandoverDone {
    fn drop(&mut self) {
        self.sessions.handed_over(&self.slots);
        self.handed_over.notify_one();
    }
}
