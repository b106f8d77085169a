//! Workers, their leases, and the placement table built from the live ones.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use switchyard::conversions::placement_to_wire;
use switchyard::pb;
use switchyard::pb::membership_service_server::MembershipService;
use switchyard_core::{Epoch, PlacementTable, WorkerId};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::error::{CoordinatorError, Result};

/// Dead workers kept for `ListWorkers`, newest first; older ones are forgotten.
const DEAD_WORKERS_KEPT: usize = 64;
/// Longest accepted worker address.
const MAX_ADDRESS_BYTES: usize = 256;

#[derive(Debug, Clone)]
pub struct MembershipConfig {
    pub slot_count: u32,
    pub heartbeat_interval: Duration,
    pub lease: Duration,
    pub token_key_id: String,
    pub cluster_id: String,
    pub epoch_floor: Epoch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    Active,
    Dead,
}

#[derive(Debug, Clone)]
pub struct WorkerRecord {
    pub worker_id: WorkerId,
    pub address: String,
    pub registration_id: String,
    pub state: WorkerState,
    pub registered_at: SystemTime,
    pub last_heartbeat_at: SystemTime,
    pub session_count: u64,
    last_heartbeat: Instant,
}

/// What the router needs: the table and where each owner listens.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    pub placement: PlacementTable,
    pub addresses: HashMap<WorkerId, String>,
}

pub struct Membership {
    config: MembershipConfig,
    state: Mutex<MembershipState>,
    routing: watch::Sender<Arc<RoutingTable>>,
}

struct MembershipState {
    workers: BTreeMap<WorkerId, WorkerRecord>,
    placement: PlacementTable,
    /// The highest epoch any worker reported: a restarted coordinator continues above it.
    epoch_floor: Epoch,
}

impl Membership {
    pub fn new(config: MembershipConfig) -> Self {
        let epoch_floor = config.epoch_floor;
        let placement = PlacementTable::empty(config.slot_count).with_epoch(config.epoch_floor);
        let (routing, _) = watch::channel(Arc::new(RoutingTable {
            placement: placement.clone(),
            addresses: HashMap::new(),
        }));
        Membership {
            config,
            state: Mutex::new(MembershipState {
                workers: BTreeMap::new(),
                placement,
                epoch_floor,
            }),
            routing,
        }
    }

    pub fn config(&self) -> &MembershipConfig {
        &self.config
    }

    fn state(&self) -> MutexGuard<'_, MembershipState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn routing(&self) -> Arc<RoutingTable> {
        self.routing.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<RoutingTable>> {
        self.routing.subscribe()
    }

    pub fn workers(&self) -> Vec<WorkerRecord> {
        self.state().workers.values().cloned().collect()
    }

    pub fn register(
        &self,
        worker_id: WorkerId,
        address: String,
        token_key_id: &str,
        cluster_id: &str,
        known_epoch: Epoch,
    ) -> Result<(String, pb::PlacementTable)> {
        if cluster_id != self.config.cluster_id {
            return Err(CoordinatorError::ClusterMismatch {
                worker_id: worker_id.to_string(),
                worker_cluster: cluster_id.to_string(),
                coordinator_cluster: self.config.cluster_id.clone(),
            });
        }
        if token_key_id != self.config.token_key_id {
            return Err(CoordinatorError::TokenKeyMismatch {
                worker_id: worker_id.to_string(),
                worker_key: token_key_id.to_string(),
                coordinator_key: self.config.token_key_id.clone(),
            });
        }
        validate_address(&address)?;
        let registration_id = uuid::Uuid::new_v4().to_string();
        let now = SystemTime::now();
        let mut state = self.state();
        state.epoch_floor = state.epoch_floor.max(known_epoch);
        if let Some(previous) = state.workers.get(&worker_id)
            && previous.state == WorkerState::Active
        {
            tracing::warn!(%worker_id, old_address = %previous.address, new_address = %address, "worker registered again; the earlier registration is replaced");
        }
        state.workers.insert(
            worker_id.clone(),
            WorkerRecord {
                worker_id: worker_id.clone(),
                address: address.clone(),
                registration_id: registration_id.clone(),
                state: WorkerState::Active,
                registered_at: now,
                last_heartbeat_at: now,
                session_count: 0,
                last_heartbeat: Instant::now(),
            },
        );
        tracing::info!(%worker_id, %address, "worker registered");
        self.rebalance(&mut state);
        let table = self.wire_table(&state);
        Ok((registration_id, table))
    }

    /// Renews a worker's lease; returns the table when the worker's is older.
    pub fn heartbeat(
        &self,
        worker_id: &WorkerId,
        registration_id: &str,
        known_epoch: Epoch,
        session_count: u64,
    ) -> Result<Option<pb::PlacementTable>> {
        let mut state = self.state();
        let record = state
            .workers
            .get_mut(worker_id)
            .filter(|record| {
                record.registration_id == registration_id && record.state == WorkerState::Active
            })
            .ok_or_else(|| CoordinatorError::UnknownRegistration(worker_id.to_string()))?;
        record.last_heartbeat = Instant::now();
        record.last_heartbeat_at = SystemTime::now();
        record.session_count = session_count;
        if known_epoch < state.placement.epoch() {
            return Ok(Some(self.wire_table(&state)));
        }
        Ok(None)
    }

    pub fn leave(&self, worker_id: &WorkerId, registration_id: &str) -> Result<()> {
        let mut state = self.state();
        let record = state
            .workers
            .get_mut(worker_id)
            .filter(|record| record.registration_id == registration_id)
            .ok_or_else(|| CoordinatorError::UnknownRegistration(worker_id.to_string()))?;
        record.state = WorkerState::Dead;
        tracing::info!(%worker_id, "worker left");
        self.rebalance(&mut state);
        Ok(())
    }

    /// Declares dead every worker whose lease ran out; returns how many.
    pub fn expire_leases(&self) -> usize {
        let now = Instant::now();
        let mut state = self.state();
        let mut expired = 0;
        for record in state.workers.values_mut() {
            if record.state == WorkerState::Active
                && now.duration_since(record.last_heartbeat) > self.config.lease
            {
                record.state = WorkerState::Dead;
                expired += 1;
                tracing::warn!(worker_id = %record.worker_id, "worker missed its lease, declared dead");
            }
        }
        if expired > 0 {
            self.rebalance(&mut state);
        }
        expired
    }

    fn rebalance(&self, state: &mut MembershipState) {
        let live: Vec<WorkerId> = state
            .workers
            .values()
            .filter(|record| record.state == WorkerState::Active)
            .map(|record| record.worker_id.clone())
            .collect();
        if let Some(next) = state.placement.rebalanced(&live) {
            let epoch = next.epoch().max(state.epoch_floor.next());
            state.placement = next.with_epoch(epoch);
            tracing::info!(epoch = %epoch, live_workers = live.len(), unassigned_slots = state.placement.unassigned_slots(), "placement changed");
        }
        forget_old_dead_workers(&mut state.workers);
        let addresses = state
            .workers
            .values()
            .filter(|record| record.state == WorkerState::Active)
            .map(|record| (record.worker_id.clone(), record.address.clone()))
            .collect();
        self.routing.send_replace(Arc::new(RoutingTable {
            placement: state.placement.clone(),
            addresses,
        }));
    }

    fn wire_table(&self, state: &MembershipState) -> pb::PlacementTable {
        placement_to_wire(&state.placement, |worker| {
            state
                .workers
                .get(worker)
                .map(|record| record.address.clone())
                .unwrap_or_default()
        })
    }

    /// Expires leases until `shutdown`.
    pub async fn watch_leases(self: Arc<Self>, shutdown: CancellationToken) {
        let period = (self.config.lease / 4).max(Duration::from_millis(20));
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => { self.expire_leases(); }
                _ = shutdown.cancelled() => break,
            }
        }
    }
}

fn validate_address(address: &str) -> Result<()> {
    let valid = !address.is_empty()
        && address.len() <= MAX_ADDRESS_BYTES
        && address.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port > 0)
        })
        && !address.contains("://")
        && address.chars().all(|c| c.is_ascii_graphic());
    if valid {
        return Ok(());
    }
    Err(CoordinatorError::InvalidAddress(format!(
        "{:?} is not host:port",
        address.chars().take(64).collect::<String>()
    )))
}

fn forget_old_dead_workers(workers: &mut BTreeMap<WorkerId, WorkerRecord>) {
    let mut dead: Vec<(SystemTime, WorkerId)> = workers
        .values()
        .filter(|record| record.state == WorkerState::Dead)
        .map(|record| (record.last_heartbeat_at, record.worker_id.clone()))
        .collect();
    if dead.len() <= DEAD_WORKERS_KEPT {
        return;
    }
    dead.sort();
    for (_, worker_id) in dead.iter().take(dead.len() - DEAD_WORKERS_KEPT) {
        workers.remove(worker_id);
    }
}

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
        let message = request.into_inner();
        let worker_id = WorkerId::parse(message.worker_id).map_err(CoordinatorError::from)?;
        let (registration_id, placement) = self.membership.register(
            worker_id,
            message.address,
            &message.token_key_id,
            &message.cluster_id,
            Epoch(message.known_epoch),
        )?;
        let config = self.membership.config();
        Ok(Response::new(pb::RegisterResponse {
            registration_id,
            heartbeat_interval_ms: millis(config.heartbeat_interval),
            lease_ms: millis(config.lease),
            placement: Some(placement),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let message = request.into_inner();
        let worker_id = WorkerId::parse(message.worker_id).map_err(CoordinatorError::from)?;
        let placement = self.membership.heartbeat(
            &worker_id,
            &message.registration_id,
            Epoch(message.known_epoch),
            message.session_count,
        )?;
        Ok(Response::new(pb::HeartbeatResponse { placement }))
    }

    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let message = request.into_inner();
        let worker_id = WorkerId::parse(message.worker_id).map_err(CoordinatorError::from)?;
        self.membership
            .leave(&worker_id, &message.registration_id)?;
        Ok(Response::new(pb::LeaveResponse {}))
    }
}

fn millis(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn membership(lease: Duration) -> Membership {
        Membership::new(MembershipConfig {
            slot_count: 64,
            heartbeat_interval: Duration::from_millis(10),
            lease,
            token_key_id: "key".into(),
            cluster_id: "cluster".into(),
            epoch_floor: Epoch(0),
        })
    }

    fn worker(id: &str) -> WorkerId {
        WorkerId::parse(id).unwrap()
    }

    #[test]
    fn joins_and_leaves_raise_the_epoch() {
        let membership = membership(Duration::from_secs(60));
        let (first, table) = membership
            .register(
                worker("a"),
                "127.0.0.1:1".into(),
                "key",
                "cluster",
                Epoch(0),
            )
            .unwrap();
        assert_eq!(table.epoch, 1);
        membership
            .register(
                worker("b"),
                "127.0.0.1:2".into(),
                "key",
                "cluster",
                Epoch(0),
            )
            .unwrap();
        assert_eq!(membership.routing().placement.epoch(), Epoch(2));
        membership.leave(&worker("a"), &first).unwrap();
        let routing = membership.routing();
        assert_eq!(routing.placement.epoch(), Epoch(3));
        assert_eq!(routing.placement.slots_of(&worker("b")).len(), 64);
    }

    #[test]
    fn a_restarted_coordinator_continues_above_the_workers_epoch() {
        let membership = membership(Duration::from_secs(60));
        let (_, table) = membership
            .register(
                worker("a"),
                "127.0.0.1:1".into(),
                "key",
                "cluster",
                Epoch(41),
            )
            .unwrap();
        assert_eq!(table.epoch, 42);
    }

    #[test]
    fn refusals() {
        let membership = membership(Duration::from_secs(60));
        let error = membership
            .register(
                worker("a"),
                "127.0.0.1:1".into(),
                "other",
                "cluster",
                Epoch(0),
            )
            .unwrap_err();
        assert!(matches!(error, CoordinatorError::TokenKeyMismatch { .. }));
        let error = membership
            .register(
                worker("a"),
                "127.0.0.1:1".into(),
                "key",
                "elsewhere",
                Epoch(0),
            )
            .unwrap_err();
        assert!(matches!(error, CoordinatorError::ClusterMismatch { .. }));
        assert!(error.to_string().contains("elsewhere"), "{error}");
        for address in ["", "nohost", "h:0", "http://h:1", "h:99999", "a b:1"] {
            assert!(
                membership
                    .register(worker("a"), address.into(), "key", "cluster", Epoch(0))
                    .is_err(),
                "{address}"
            );
        }
        let error = membership
            .heartbeat(&worker("ghost"), "x", Epoch(0), 0)
            .unwrap_err();
        assert!(matches!(error, CoordinatorError::UnknownRegistration(_)));
    }

    #[test]
    fn a_missed_lease_kills_the_worker_and_moves_its_slots() {
        let membership = membership(Duration::from_millis(30));
        let (a, _) = membership
            .register(
                worker("a"),
                "127.0.0.1:1".into(),
                "key",
                "cluster",
                Epoch(0),
            )
            .unwrap();
        let (b, _) = membership
            .register(
                worker("b"),
                "127.0.0.1:2".into(),
                "key",
                "cluster",
                Epoch(0),
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        membership.heartbeat(&worker("a"), &a, Epoch(2), 0).unwrap();
        assert_eq!(membership.expire_leases(), 1);
        assert_eq!(
            membership.routing().placement.slots_of(&worker("a")).len(),
            64
        );
        let error = membership
            .heartbeat(&worker("b"), &b, Epoch(2), 0)
            .unwrap_err();
        assert!(matches!(error, CoordinatorError::UnknownRegistration(_)));
    }
}
