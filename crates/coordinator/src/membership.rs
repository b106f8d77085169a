//! Workers, their leases and states, and the placement table built from the live ones.
//!
//! Placement changes only when a worker joins, leaves, dies or is drained, or when an
//! operator asks (`AdminService.Rebalance`); never continuously. Each change raises the
//! epoch, and the table is kept in the store so a restarted coordinator serves the same
//! assignment at a higher epoch.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use switchyard::pb;
use switchyard_core::alerts::{AlertLog, Raise, Severity};
use switchyard_core::{Epoch, PlacementTable, Slot, WorkerId};
use switchyard_store::StoredPlacement;
use tokio::sync::watch;

use crate::error::{CoordinatorError, Result};

mod grpc;
mod keeper;
mod placement;

pub use grpc::MembershipGrpc;
use placement::max_over_average;

/// Dead workers kept for `ListWorkers`, newest first; older ones are forgotten.
const DEAD_WORKERS_KEPT: usize = 64;
/// Alerts the coordinator keeps of its own.
const COORDINATOR_ALERTS: usize = 256;
/// Longest accepted worker address.
const MAX_ADDRESS_BYTES: usize = 256;
/// How long a call that changed the table waits for it to be kept in the store and
/// published: well under the workers' 2 s membership call timeout.
pub const PUBLISH_WAIT: Duration = Duration::from_millis(500);
/// Longest accepted incarnation id (workers send a UUID).
const MAX_INCARNATION_BYTES: usize = 64;
/// The most sessions a heartbeat may report for one slot.
const MAX_SLOT_LOAD: u64 = u32::MAX as u64;
/// Pause before saving the placement table again after the store failed.
const SAVE_RETRY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct MembershipConfig {
    pub slot_count: u32,
    pub heartbeat_interval: Duration,
    pub lease: Duration,
    /// How long a worker losing a slot lets its in-flight calls finish.
    pub handoff_grace: Duration,
    /// The bounded-load placement's ε: no worker above ⌈(1+ε)·total/N⌉.
    pub epsilon: f64,
    /// Ids of the token keys this cluster accepts; a worker must sign with one of them.
    pub token_key_ids: Vec<String>,
    pub cluster_id: String,
    /// The highest epoch already used anywhere (store leases, stored table): new tables
    /// start above it.
    pub epoch_floor: Epoch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Registered; receives slots, not yet confirmed by a heartbeat.
    Joining,
    Active,
    /// Owns no slots; hands over what it held, then leaves.
    Draining,
    Dead,
}

impl WorkerState {
    /// Still running: counted as a member of the table.
    pub fn is_member(self) -> bool {
        self != WorkerState::Dead
    }

    /// Receives slots.
    pub fn is_placeable(self) -> bool {
        matches!(self, WorkerState::Joining | WorkerState::Active)
    }
}

#[derive(Debug, Clone)]
pub struct WorkerRecord {
    pub worker_id: WorkerId,
    pub address: String,
    pub registration_id: String,
    /// The worker process's random id at this registration; empty for a worker restored
    /// from the store that has not registered again yet.
    pub incarnation: String,
    pub state: WorkerState,
    pub registered_at: SystemTime,
    pub last_heartbeat_at: SystemTime,
    pub session_count: u64,
    last_heartbeat: Instant,
}

/// What the router needs: the table and where each member listens; and which members are
/// draining, kept with the table so a restarted coordinator goes on draining them.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    pub placement: PlacementTable,
    pub addresses: HashMap<WorkerId, String>,
    pub draining: Vec<WorkerId>,
}

impl RoutingTable {
    /// The table as the store keeps it.
    pub fn to_stored(&self) -> StoredPlacement {
        StoredPlacement {
            epoch: self.placement.epoch(),
            table: self.placement.clone(),
            addresses: self
                .addresses
                .iter()
                .map(|(worker, address)| (worker.clone(), address.clone()))
                .collect(),
            draining: self.draining.clone(),
        }
    }
}

/// The result of a placement change an operator asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rebalanced {
    pub epoch: Epoch,
    pub slots_moved: u32,
    /// The most loaded placeable worker over the average, by the loads the placement was
    /// computed from.
    pub max_over_average_load: f64,
}

pub struct Membership {
    config: MembershipConfig,
    state: Mutex<MembershipState>,
    /// Every table as computed; the keeper writes each to the store before publishing it.
    computed: watch::Sender<Arc<RoutingTable>>,
    /// The newest table kept in the store: the only one the router and workers see, so a
    /// restarted coordinator can never hand out an epoch anyone has seen with another table.
    routing: watch::Sender<Arc<RoutingTable>>,
    /// Without a store (unit tests) tables are published as computed.
    kept_in_store: bool,
    /// Woken by every heartbeat, for those waiting on fresh loads.
    heartbeat_seen: tokio::sync::Notify,
    /// The coordinator's own alerts: workers lost.
    alerts: AlertLog,
}

struct MembershipState {
    workers: BTreeMap<WorkerId, WorkerRecord>,
    placement: PlacementTable,
    /// The highest epoch any worker reported: a restarted coordinator continues above it.
    epoch_floor: Epoch,
    /// Active sessions per slot, as the owners last reported them.
    loads: Vec<u64>,
}

impl Membership {
    /// A coordinator's membership, starting from the table kept in the store if any: its
    /// members are presumed alive (they have one lease to register again) and its assignment
    /// is served at once, above every epoch used before.
    pub fn new(
        config: MembershipConfig,
        restored: Option<StoredPlacement>,
        kept_in_store: bool,
    ) -> Self {
        let mut epoch_floor = config.epoch_floor;
        let mut workers = BTreeMap::new();
        let placement = match restored {
            Some(stored) if stored.table.slot_count() == config.slot_count => {
                epoch_floor = epoch_floor.max(stored.epoch);
                let now = SystemTime::now();
                for (worker_id, address) in stored.addresses {
                    if !stored.table.is_member(&worker_id) {
                        continue;
                    }
                    let state = if stored.draining.contains(&worker_id) {
                        WorkerState::Draining
                    } else {
                        WorkerState::Active
                    };
                    workers.insert(
                        worker_id.clone(),
                        WorkerRecord {
                            worker_id,
                            address,
                            // Matches no heartbeat: each worker registers again.
                            registration_id: String::new(),
                            incarnation: String::new(),
                            state,
                            registered_at: now,
                            last_heartbeat_at: now,
                            session_count: 0,
                            last_heartbeat: Instant::now(),
                        },
                    );
                }
                tracing::info!(epoch = %stored.epoch, workers = workers.len(), "placement restored from the store");
                stored.table.with_epoch(epoch_floor.next())
            }
            Some(stored) => {
                tracing::warn!(
                    stored_slots = stored.table.slot_count(),
                    slot_count = config.slot_count,
                    "the stored placement has another slot count and is not used"
                );
                epoch_floor = epoch_floor.max(stored.epoch);
                PlacementTable::empty(config.slot_count).with_epoch(epoch_floor)
            }
            None => PlacementTable::empty(config.slot_count).with_epoch(epoch_floor),
        };
        let loads = vec![0; config.slot_count as usize];
        let nothing_yet = Arc::new(RoutingTable {
            placement: PlacementTable::empty(config.slot_count),
            addresses: HashMap::new(),
            draining: Vec::new(),
        });
        let membership = Membership {
            config,
            state: Mutex::new(MembershipState {
                workers,
                placement,
                epoch_floor,
                loads,
            }),
            computed: watch::channel(nothing_yet.clone()).0,
            routing: watch::channel(nothing_yet).0,
            kept_in_store,
            heartbeat_seen: tokio::sync::Notify::new(),
            alerts: AlertLog::new(COORDINATOR_ALERTS),
        };
        membership.publish(&mut membership.state());
        membership
    }

    pub fn config(&self) -> &MembershipConfig {
        &self.config
    }

    /// The coordinator's alerts (workers lost).
    pub fn alerts(&self) -> &AlertLog {
        &self.alerts
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

    pub fn worker(&self, worker_id: &WorkerId) -> Option<WorkerRecord> {
        self.state().workers.get(worker_id).cloned()
    }

    /// Each worker's load: the sessions in the slots it owns, a slot weighing at least 1.
    /// Counted over the published table, as `ListWorkers` shows its slots.
    pub fn worker_loads(&self) -> HashMap<WorkerId, u64> {
        let published = self.routing();
        let state = self.state();
        let mut loads = HashMap::new();
        for slot in 0..published.placement.slot_count() {
            if let Some(owner) = published.placement.owner(slot) {
                *loads.entry(owner.clone()).or_default() += state.loads[slot as usize].max(1);
            }
        }
        loads
    }

    pub fn register(
        &self,
        worker_id: WorkerId,
        address: String,
        token_key_id: &str,
        cluster_id: &str,
        known_epoch: Epoch,
        incarnation: &str,
    ) -> Result<(String, pb::PlacementTable)> {
        if cluster_id != self.config.cluster_id {
            return Err(CoordinatorError::ClusterMismatch {
                worker_id: worker_id.to_string(),
                worker_cluster: cluster_id.to_string(),
                coordinator_cluster: self.config.cluster_id.clone(),
            });
        }
        if !self
            .config
            .token_key_ids
            .iter()
            .any(|id| id == token_key_id)
        {
            return Err(CoordinatorError::TokenKeyMismatch {
                worker_id: worker_id.to_string(),
                worker_key: token_key_id.to_string(),
                coordinator_key: self.config.token_key_ids.join(", "),
            });
        }
        validate_address(&address)?;
        let registration_id = uuid::Uuid::new_v4().to_string();
        let now = SystemTime::now();
        let mut state = self.state();
        self.check_reported_epoch(&state, &worker_id, known_epoch)?;
        if let Some(holder) = state.workers.get(&worker_id)
            && holder.state.is_member()
            && !holder.incarnation.is_empty()
            && holder.incarnation != incarnation
            && holder.last_heartbeat.elapsed() < self.config.lease
        {
            tracing::warn!(%worker_id, %address, holder_address = %holder.address, "registration of a live worker's id by another instance refused");
            return Err(CoordinatorError::WorkerIdTaken(worker_id.to_string()));
        }
        state.epoch_floor = state.epoch_floor.max(known_epoch);
        let rejoining = state
            .workers
            .get(&worker_id)
            .filter(|previous| previous.state.is_member())
            .map(|previous| {
                (
                    previous.state,
                    previous.address.clone(),
                    previous.registered_at,
                )
            });
        let (worker_state, registered_at) = match &rejoining {
            // A member registering again (this coordinator restarted, or the worker did
            // within its lease) keeps its slots: nothing moves.
            Some((previous_state, previous_address, registered_at)) => {
                if *previous_address != address {
                    tracing::warn!(%worker_id, old_address = %previous_address, new_address = %address, "worker registered again at another address");
                }
                (*previous_state, *registered_at)
            }
            None => (WorkerState::Joining, now),
        };
        state.workers.insert(
            worker_id.clone(),
            WorkerRecord {
                worker_id: worker_id.clone(),
                address: address.clone(),
                registration_id: registration_id.clone(),
                incarnation: incarnation.to_string(),
                state: worker_state,
                registered_at,
                last_heartbeat_at: now,
                session_count: 0,
                last_heartbeat: Instant::now(),
            },
        );
        if rejoining.is_some() {
            tracing::info!(%worker_id, %address, "worker registered again");
            if state.placement.epoch() <= state.epoch_floor {
                // The worker saw an epoch this coordinator has not: serve the same
                // assignment above it.
                let epoch = state.epoch_floor.next();
                state.placement = state.placement.clone().with_epoch(epoch);
            }
            self.publish(&mut state);
        } else {
            tracing::info!(%worker_id, %address, "worker joined");
            self.rebalance(&mut state);
        }
        drop(state);
        Ok((registration_id, self.wire_table()))
    }

    /// Renews a worker's lease and records its loads. Returns the table when the worker's is
    /// older, and whether the worker is being drained.
    pub fn heartbeat(
        &self,
        worker_id: &WorkerId,
        registration_id: &str,
        known_epoch: Epoch,
        session_count: u64,
        slot_loads: &[(Slot, u64)],
    ) -> Result<(Option<pb::PlacementTable>, bool)> {
        let mut state = self.state();
        self.check_reported_epoch(&state, worker_id, known_epoch)?;
        let record = state
            .workers
            .get_mut(worker_id)
            .filter(|record| {
                !registration_id.is_empty()
                    && record.registration_id == registration_id
                    && record.state.is_member()
            })
            .ok_or_else(|| CoordinatorError::UnknownRegistration(worker_id.to_string()))?;
        record.last_heartbeat = Instant::now();
        record.last_heartbeat_at = SystemTime::now();
        record.session_count = session_count;
        self.heartbeat_seen.notify_waiters();
        if record.state == WorkerState::Joining {
            record.state = WorkerState::Active;
            tracing::info!(%worker_id, "worker active");
        }
        let draining = record.state == WorkerState::Draining;
        let state = &mut *state;
        let owned = state.placement.slots_of(worker_id);
        for slot in &owned {
            state.loads[*slot as usize] = 0;
        }
        for (slot, sessions) in slot_loads {
            if state.placement.is_owner(*slot, worker_id) {
                state.loads[*slot as usize] = *sessions;
            }
        }
        let published = self.routing.borrow().placement.epoch();
        let table = (known_epoch < published).then(|| self.wire_table());
        Ok((table, draining))
    }

    pub fn leave(&self, worker_id: &WorkerId, registration_id: &str) -> Result<()> {
        let mut state = self.state();
        let record = state
            .workers
            .get_mut(worker_id)
            .filter(|record| {
                !registration_id.is_empty() && record.registration_id == registration_id
            })
            .ok_or_else(|| CoordinatorError::UnknownRegistration(worker_id.to_string()))?;
        record.state = WorkerState::Dead;
        tracing::info!(%worker_id, "worker left");
        self.rebalance(&mut state);
        Ok(())
    }

    /// Moves every slot off `worker_id`; the worker learns it in its next heartbeat,
    /// hands its slots over and leaves.
    pub fn drain(&self, worker_id: &WorkerId) -> Result<Rebalanced> {
        let mut state = self.state();
        let record = state
            .workers
            .get(worker_id)
            .ok_or_else(|| CoordinatorError::UnknownWorker(worker_id.to_string()))?;
        match record.state {
            WorkerState::Dead => return Err(CoordinatorError::WorkerDead(worker_id.to_string())),
            WorkerState::Draining => {
                return Ok(Rebalanced {
                    epoch: state.placement.epoch(),
                    slots_moved: 0,
                    max_over_average_load: max_over_average(&state),
                });
            }
            WorkerState::Joining | WorkerState::Active => {}
        }
        let others = state
            .workers
            .values()
            .filter(|other| other.worker_id != *worker_id && other.state.is_placeable())
            .count();
        if others == 0 {
            return Err(CoordinatorError::LastWorker(worker_id.to_string()));
        }
        if let Some(record) = state.workers.get_mut(worker_id) {
            record.state = WorkerState::Draining;
        }
        tracing::info!(%worker_id, "draining worker");
        Ok(self.rebalance(&mut state))
    }

    /// Declares dead every worker whose lease ran out; returns how many.
    pub fn expire_leases(&self) -> usize {
        let now = Instant::now();
        let mut state = self.state();
        let mut expired = 0;
        for record in state.workers.values_mut() {
            if record.state.is_member()
                && now.duration_since(record.last_heartbeat) > self.config.lease
            {
                record.state = WorkerState::Dead;
                expired += 1;
                tracing::warn!(worker_id = %record.worker_id, "worker missed its lease, declared dead");
                metrics::counter!("switchyard_failovers_total").increment(1);
                metrics::counter!("switchyard_alerts_total", "kind" => "worker_lost").increment(1);
                let silent = now.duration_since(record.last_heartbeat);
                self.alerts.raise(
                    Raise {
                        kind: "worker_lost",
                        subject: record.worker_id.to_string(),
                        severity: Severity::Critical,
                        message: format!(
                            "worker {} missed its lease: no heartbeat for {} (lease {}); its slots moved to the others",
                            record.worker_id,
                            humantime::format_duration(Duration::from_millis(silent.as_millis() as u64)),
                            humantime::format_duration(self.config.lease),
                        ),
                        user_id: None,
                        session_id: None,
                    },
                    SystemTime::now(),
                );
            }
        }
        if expired > 0 {
            self.rebalance(&mut state);
        }
        expired
    }

    /// Workers that receive slots.
    pub fn placeable_workers(&self) -> usize {
        self.state()
            .workers
            .values()
            .filter(|record| record.state.is_placeable())
            .count()
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

fn workers_where(
    workers: &BTreeMap<WorkerId, WorkerRecord>,
    state_is: impl Fn(WorkerState) -> bool,
) -> Vec<WorkerId> {
    workers
        .values()
        .filter(|record| state_is(record.state))
        .map(|record| record.worker_id.clone())
        .collect()
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

#[cfg(test)]
mod tests;
