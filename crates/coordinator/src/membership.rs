//! Workers, their leases and states, and the placement table built from the live ones.
//!
//! Placement changes only when a worker joins, leaves, dies or is drained, or when an
//! operator asks (`AdminService.Rebalance`); never continuously. Each change raises the
//! epoch, and the table is kept in the store so a restarted coordinator serves the same
//! assignment at a higher epoch.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use switchyard::conversions::placement_to_wire;
use switchyard::pb;
use switchyard::pb::membership_service_server::MembershipService;
use switchyard_core::{Epoch, NodeClaims, PlacementInput, PlacementTable, Slot, WorkerId};
use switchyard_store::{SessionStore, StoredPlacement};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::error::{CoordinatorError, Result};

/// Dead workers kept for `ListWorkers`, newest first; older ones are forgotten.
const DEAD_WORKERS_KEPT: usize = 64;
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
    pub token_key_id: String,
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
        };
        membership.publish(&mut membership.state());
        membership
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

    /// The highest epoch this coordinator has computed, kept or been told of: a node that
    /// reports more reports something no coordinator of this cluster handed out.
    fn highest_epoch(&self, state: &MembershipState) -> Epoch {
        state
            .placement
            .epoch()
            .max(state.epoch_floor)
            .max(self.routing.borrow().placement.epoch())
            .max(self.computed.borrow().placement.epoch())
    }

    fn check_reported_epoch(
        &self,
        state: &MembershipState,
        worker_id: &WorkerId,
        reported: Epoch,
    ) -> Result<()> {
        let highest = self.highest_epoch(state);
        if reported > highest {
            tracing::warn!(%worker_id, %reported, %highest, "a worker reported an epoch above every one kept; refused");
            return Err(CoordinatorError::EpochAhead {
                reported: reported.0,
                highest: highest.0,
            });
        }
        Ok(())
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

    /// Recomputes the placement from the current loads.
    pub fn rebalance_now(&self) -> Rebalanced {
        let mut state = self.state();
        self.rebalance(&mut state)
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
            }
        }
        if expired > 0 {
            self.rebalance(&mut state);
        }
        expired
    }

    fn rebalance(&self, state: &mut MembershipState) -> Rebalanced {
        let placeable = workers_where(&state.workers, WorkerState::is_placeable);
        let members = workers_where(&state.workers, WorkerState::is_member);
        let mut slots_moved = 0;
        if let Some(next) = state.placement.placed(&PlacementInput {
            placeable: &placeable,
            members: &members,
            loads: &state.loads,
            epsilon: self.config.epsilon,
        }) {
            slots_moved = next.moved_slots(&state.placement);
            let epoch = next.epoch().max(state.epoch_floor.next());
            state.placement = next.with_epoch(epoch);
            tracing::info!(epoch = %epoch, workers = placeable.len(), slots_moved, unassigned_slots = state.placement.unassigned_slots(), "placement changed");
        }
        self.publish(state);
        Rebalanced {
            epoch: state.placement.epoch(),
            slots_moved,
            max_over_average_load: max_over_average(state),
        }
    }

    /// Waits until every placeable worker has heartbeated since the call began, so that a
    /// placement computed next uses the loads of now, not of a heartbeat ago; gives up after
    /// `patience` (a worker that does not heartbeat is declared dead at its lease anyway).
    pub async fn wait_for_fresh_loads(&self, patience: Duration) -> bool {
        let asked = Instant::now();
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let heartbeat = self.heartbeat_seen.notified();
            tokio::pin!(heartbeat);
            heartbeat.as_mut().enable();
            let fresh = self
                .state()
                .workers
                .values()
                .filter(|record| record.state.is_placeable())
                .all(|record| record.last_heartbeat >= asked);
            if fresh {
                return true;
            }
            tokio::select! {
                () = heartbeat => {}
                () = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }

    /// Hands the current table to the store keeper, which publishes it once kept. A change
    /// of addresses or draining workers alone raises the epoch too, so that it is kept and
    /// reaches the router and the workers like any other.
    fn publish(&self, state: &mut MembershipState) {
        forget_old_dead_workers(&mut state.workers);
        let members = state
            .workers
            .values()
            .filter(|record| record.state.is_member());
        let addresses: HashMap<WorkerId, String> = members
            .clone()
            .map(|record| (record.worker_id.clone(), record.address.clone()))
            .collect();
        let draining: Vec<WorkerId> = members
            .filter(|record| record.state == WorkerState::Draining)
            .map(|record| record.worker_id.clone())
            .collect();
        {
            let last = self.computed.borrow();
            if last.placement.epoch() == state.placement.epoch()
                && last.placement.epoch() > Epoch(0)
                && (last.addresses != addresses || last.draining != draining)
            {
                let epoch = state.placement.epoch().max(state.epoch_floor).next();
                state.placement = state.placement.clone().with_epoch(epoch);
            }
        }
        let table = Arc::new(RoutingTable {
            placement: state.placement.clone(),
            addresses,
            draining,
        });
        self.computed.send_replace(table.clone());
        if !self.kept_in_store {
            self.routing.send_replace(table);
        }
    }

    /// The published table for a worker, with every member's address.
    pub fn wire_table(&self) -> pb::PlacementTable {
        let routing = self.routing();
        placement_to_wire(&routing.placement, |worker| {
            routing.addresses.get(worker).cloned().unwrap_or_default()
        })
    }

    /// Expires leases until `shutdown`.
    pub async fn watch_leases(self: Arc<Self>, shutdown: CancellationToken) {
        // A fine tick: a dead worker's slots move within a tenth of a lease of its expiry.
        let period = (self.config.lease / 10).max(Duration::from_millis(10));
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => { self.expire_leases(); }
                _ = shutdown.cancelled() => break,
            }
        }
    }

    /// Keeps every new table in the store, then publishes it, until `shutdown`. When tables
    /// change faster than the store writes, only the newest is written.
    pub async fn keep_placement(
        self: Arc<Self>,
        store: Arc<dyn SessionStore>,
        shutdown: CancellationToken,
    ) {
        let mut tables = self.computed.subscribe();
        loop {
            let table = tables.borrow_and_update().clone();
            if table.placement.epoch() > self.routing().placement.epoch() {
                let stored = table.to_stored();
                match store.save_placement(&stored).await {
                    Ok(true) => {
                        self.routing.send_replace(table);
                    }
                    Ok(false) if kept_already(&*store, &stored).await => {
                        self.routing.send_replace(table);
                    }
                    Ok(false) => {
                        tracing::error!(epoch = %stored.epoch, "the store already holds a placement table at this epoch or newer: is another coordinator running on this store? Not publishing it");
                        tokio::select! {
                            _ = tokio::time::sleep(SAVE_RETRY) => continue,
                            _ = shutdown.cancelled() => break,
                        }
                    }
                    Err(error) => {
                        tracing::warn!(epoch = %stored.epoch, %error, "cannot keep the placement table in the store; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(SAVE_RETRY) => continue,
                            _ = shutdown.cancelled() => break,
                        }
                    }
                }
            }
            tokio::select! {
                changed = tables.changed() => if changed.is_err() { break },
                _ = shutdown.cancelled() => break,
            }
        }
    }

    /// Waits until the newest computed table is published, for at most `patience`.
    pub async fn wait_until_published(&self, patience: Duration) {
        let target = self.computed.borrow().placement.epoch();
        let mut published = self.routing.subscribe();
        let _ = tokio::time::timeout(
            patience,
            published.wait_for(|table| table.placement.epoch() >= target),
        )
        .await;
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

/// Whether the store already holds exactly `placement`: a save that committed although its
/// reply was lost.
/// The most loaded placeable worker's load over the average, in the current table.
fn max_over_average(state: &MembershipState) -> f64 {
    let mut loads: HashMap<&WorkerId, u64> = HashMap::new();
    for slot in 0..state.placement.slot_count() {
        if let Some(owner) = state.placement.owner(slot) {
            *loads.entry(owner).or_default() += state.loads[slot as usize].max(1);
        }
    }
    let placeable = state
        .workers
        .values()
        .filter(|record| record.state.is_placeable())
        .count()
        .max(1);
    let total: u64 = loads.values().sum();
    if total == 0 {
        return 0.0;
    }
    let most = loads.values().copied().max().unwrap_or(0);
    most as f64 / (total as f64 / placeable as f64)
}

async fn kept_already(store: &dyn SessionStore, placement: &StoredPlacement) -> bool {
    match store.load_placement().await {
        Ok(Some(kept)) => {
            kept.epoch == placement.epoch
                && kept.table.moved_slots(&placement.table) == 0
                && kept.table.members() == placement.table.members()
        }
        _ => false,
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
        let (_, extensions, message) = request.into_parts();
        let worker_id = WorkerId::parse(message.worker_id).map_err(CoordinatorError::from)?;
        check_credential_names(extensions.get::<NodeClaims>(), &worker_id)?;
        if message.incarnation_id.is_empty() || message.incarnation_id.len() > MAX_INCARNATION_BYTES
        {
            return Err(CoordinatorError::from(switchyard_core::Error::invalid(
                "incarnation_id",
                format!("must be 1 to {MAX_INCARNATION_BYTES} bytes"),
            ))
            .into());
        }
        let (registration_id, _) = self.membership.register(
            worker_id,
            message.address,
            &message.token_key_id,
            &message.cluster_id,
            Epoch(message.known_epoch),
            &message.incarnation_id,
        )?;
        // The table with this worker in it, once it is kept (milliseconds); failing that,
        // the worker learns it in a heartbeat.
        self.membership.wait_until_published(PUBLISH_WAIT).await;
        let placement = self.membership.wire_table();
        let config = self.membership.config();
        Ok(Response::new(pb::RegisterResponse {
            registration_id,
            heartbeat_interval_ms: millis(config.heartbeat_interval),
            lease_ms: millis(config.lease),
            placement: Some(placement),
            handoff_grace_ms: millis(config.handoff_grace),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let (_, extensions, message) = request.into_parts();
        let worker_id = WorkerId::parse(message.worker_id).map_err(CoordinatorError::from)?;
        check_credential_names(extensions.get::<NodeClaims>(), &worker_id)?;
        let slot_count = self.membership.config().slot_count;
        let mut slot_loads = Vec::with_capacity(message.slot_loads.len());
        for load in &message.slot_loads {
            if load.slot >= slot_count {
                return Err(CoordinatorError::from(switchyard_core::Error::invalid(
                    "slot_loads.slot",
                    format!(
                        "slot {} is out of range (the cluster has {slot_count})",
                        load.slot
                    ),
                ))
                .into());
            }
            // Sessions per slot are far below this; a larger figure is clamped, not trusted.
            slot_loads.push((load.slot, load.sessions.min(MAX_SLOT_LOAD)));
        }
        let (placement, drain) = self.membership.heartbeat(
            &worker_id,
            &message.registration_id,
            Epoch(message.known_epoch),
            message.session_count,
            &slot_loads,
        )?;
        Ok(Response::new(pb::HeartbeatResponse { placement, drain }))
    }

    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let (_, extensions, message) = request.into_parts();
        let worker_id = WorkerId::parse(message.worker_id).map_err(CoordinatorError::from)?;
        check_credential_names(extensions.get::<NodeClaims>(), &worker_id)?;
        self.membership
            .leave(&worker_id, &message.registration_id)?;
        Ok(Response::new(pb::LeaveResponse {}))
    }
}

/// A worker speaks only for itself: the credential must be its own. (Without claims, the
/// service runs behind no gate: unit tests.)
fn check_credential_names(claims: Option<&NodeClaims>, worker_id: &WorkerId) -> Result<()> {
    match claims {
        Some(claims) if claims.node_id != worker_id.as_str() => {
            Err(CoordinatorError::CredentialForAnotherNode {
                credential: claims.node_id.clone(),
                worker_id: worker_id.to_string(),
            })
        }
        _ => Ok(()),
    }
}

fn millis(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(lease: Duration) -> MembershipConfig {
        MembershipConfig {
            slot_count: 64,
            heartbeat_interval: Duration::from_millis(10),
            lease,
            handoff_grace: Duration::from_secs(1),
            epsilon: 0.25,
            token_key_id: "key".into(),
            cluster_id: "cluster".into(),
            epoch_floor: Epoch(0),
        }
    }

    /// Registers `id` at 127.0.0.1:`port`, having seen `known_epoch`.
    fn register(
        membership: &Membership,
        id: &str,
        port: u16,
        known_epoch: u64,
    ) -> (String, pb::PlacementTable) {
        membership
            .register(
                worker(id),
                format!("127.0.0.1:{port}"),
                "key",
                "cluster",
                Epoch(known_epoch),
                &format!("incarnation-of-{id}"),
            )
            .unwrap()
    }

    fn join(membership: &Membership, id: &str, port: u16) -> String {
        register(membership, id, port, 0).0
    }

    fn membership(lease: Duration) -> Membership {
        Membership::new(config(lease), None, false)
    }

    fn worker(id: &str) -> WorkerId {
        WorkerId::parse(id).unwrap()
    }

    #[test]
    fn joins_and_leaves_raise_the_epoch() {
        let membership = membership(Duration::from_secs(60));
        let (first, table) = register(&membership, "a", 1, 0);
        assert_eq!(table.epoch, 1);
        register(&membership, "b", 2, 0);
        assert_eq!(membership.routing().placement.epoch(), Epoch(2));
        membership.leave(&worker("a"), &first).unwrap();
        let routing = membership.routing();
        assert_eq!(routing.placement.epoch(), Epoch(3));
        assert_eq!(routing.placement.slots_of(&worker("b")).len(), 64);
    }

    #[test]
    fn a_restarted_coordinator_continues_above_the_workers_epoch() {
        // The store held leases at epoch 41, which the worker saw.
        let membership = Membership::new(
            MembershipConfig {
                epoch_floor: Epoch(41),
                ..config(Duration::from_secs(60))
            },
            None,
            false,
        );
        let (_, table) = register(&membership, "a", 1, 41);
        assert_eq!(table.epoch, 42);
    }

    #[test]
    fn epochs_above_every_kept_one_are_refused_and_placement_goes_on() {
        let membership = membership(Duration::from_secs(60));
        let (a, _) = register(&membership, "a", 1, 0);
        for reported in [u64::MAX, i64::MAX as u64, 1_000] {
            let error = membership
                .register(
                    worker("b"),
                    "127.0.0.1:2".into(),
                    "key",
                    "cluster",
                    Epoch(reported),
                    "incarnation-of-b",
                )
                .unwrap_err();
            assert!(
                matches!(error, CoordinatorError::EpochAhead { .. }),
                "{error}"
            );
            assert!(matches!(
                membership.heartbeat(&worker("a"), &a, Epoch(reported), 0, &[]),
                Err(CoordinatorError::EpochAhead { .. })
            ));
        }
        let before = membership.routing().placement.epoch();
        register(&membership, "b", 2, before.0);
        let after = membership.routing();
        assert_eq!(after.placement.epoch(), before.next());
        assert_eq!(
            after.placement.slots_of(&worker("b")).len()
                + after.placement.slots_of(&worker("a")).len(),
            64
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Whatever epochs nodes report, the coordinator refuses exactly those above every
        /// epoch it has kept, and its own epoch only grows, never wrapping.
        #[test]
        fn reported_epochs_never_move_placement_backwards_or_past_what_was_kept(
            reports in proptest::collection::vec(
                proptest::prop_oneof![0u64..8, proptest::prelude::any::<u64>(), (u64::MAX - 2)..=u64::MAX],
                1..12,
            )
        ) {
            let membership = membership(Duration::from_secs(60));
            let (a, _) = register(&membership, "a", 1, 0);
            let mut last = membership.routing().placement.epoch();
            for (index, reported) in reports.into_iter().enumerate() {
                let highest = {
                    let state = membership.state();
                    membership.highest_epoch(&state)
                };
                let heartbeat = membership.heartbeat(&worker("a"), &a, Epoch(reported), 0, &[]);
                proptest::prop_assert_eq!(heartbeat.is_err(), Epoch(reported) > highest);
                let joined = membership.register(
                    worker(&format!("w{index}")),
                    format!("127.0.0.1:{}", 10 + index),
                    "key",
                    "cluster",
                    Epoch(reported),
                    "incarnation",
                );
                proptest::prop_assert_eq!(joined.is_err(), Epoch(reported) > highest);
                let now = membership.routing().placement.epoch();
                proptest::prop_assert!(now >= last);
                proptest::prop_assert!(now <= Epoch::MAX);
                last = now;
            }
        }
    }

    #[test]
    fn a_live_workers_id_cannot_be_taken_by_another_instance() {
        let lease = Duration::from_millis(200);
        let membership = membership(lease);
        register(&membership, "a", 1, 0);
        let take = |incarnation: &str| {
            membership.register(
                worker("a"),
                "127.0.0.1:666".into(),
                "key",
                "cluster",
                Epoch(0),
                incarnation,
            )
        };
        assert!(matches!(
            take("intruder"),
            Err(CoordinatorError::WorkerIdTaken(_))
        ));
        assert_eq!(membership.routing().addresses[&worker("a")], "127.0.0.1:1");
        // The same instance may register again (after a coordinator restart, say).
        assert!(take("incarnation-of-a").is_ok());
        // Once the holder's lease has run out, a new instance takes the id.
        std::thread::sleep(lease + Duration::from_millis(50));
        assert!(take("restarted").is_ok());
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
                "i",
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
                "i",
            )
            .unwrap_err();
        assert!(matches!(error, CoordinatorError::ClusterMismatch { .. }));
        assert!(error.to_string().contains("elsewhere"), "{error}");
        for address in ["", "nohost", "h:0", "http://h:1", "h:99999", "a b:1"] {
            assert!(
                membership
                    .register(worker("a"), address.into(), "key", "cluster", Epoch(0), "i")
                    .is_err(),
                "{address}"
            );
        }
        let error = membership
            .heartbeat(&worker("ghost"), "x", Epoch(0), 0, &[])
            .unwrap_err();
        assert!(matches!(error, CoordinatorError::UnknownRegistration(_)));
    }

    #[test]
    fn a_missed_lease_kills_the_worker_and_moves_its_slots() {
        let membership = membership(Duration::from_millis(30));
        let (a, _) = register(&membership, "a", 1, 0);
        let (b, _) = register(&membership, "b", 2, 0);
        std::thread::sleep(Duration::from_millis(50));
        membership
            .heartbeat(&worker("a"), &a, Epoch(2), 0, &[])
            .unwrap();
        assert_eq!(membership.expire_leases(), 1);
        assert_eq!(
            membership.routing().placement.slots_of(&worker("a")).len(),
            64
        );
        let error = membership
            .heartbeat(&worker("b"), &b, Epoch(2), 0, &[])
            .unwrap_err();
        assert!(matches!(error, CoordinatorError::UnknownRegistration(_)));
    }

    #[test]
    fn a_drained_worker_owns_nothing_but_stays_a_member_until_it_leaves() {
        let membership = membership(Duration::from_secs(60));
        let a = join(&membership, "a", 1);
        join(&membership, "b", 2);
        let before = membership.routing().placement.clone();
        let owned_by_a = before.slots_of(&worker("a")).len() as u32;
        let drained = membership.drain(&worker("a")).unwrap();
        assert_eq!(drained.slots_moved, owned_by_a);
        let routing = membership.routing();
        assert_eq!(routing.placement.epoch(), drained.epoch);
        assert!(routing.placement.slots_of(&worker("a")).is_empty());
        assert!(routing.placement.is_member(&worker("a")));
        let (_, drain) = membership
            .heartbeat(&worker("a"), &a, Epoch(0), 0, &[])
            .unwrap();
        assert!(drain, "the heartbeat reply tells the worker to drain");
        assert_eq!(
            membership.drain(&worker("b")).unwrap_err().to_string(),
            CoordinatorError::LastWorker("b".into()).to_string()
        );
        membership.leave(&worker("a"), &a).unwrap();
        assert!(!membership.routing().placement.is_member(&worker("a")));
        assert!(matches!(
            membership.drain(&worker("a")),
            Err(CoordinatorError::WorkerDead(_))
        ));
        assert!(matches!(
            membership.drain(&worker("nobody")),
            Err(CoordinatorError::UnknownWorker(_))
        ));
    }

    #[test]
    fn rebalance_follows_reported_loads_and_changes_nothing_when_they_fit() {
        let membership = membership(Duration::from_secs(60));
        let a = join(&membership, "a", 1);
        join(&membership, "b", 2);
        assert_eq!(membership.rebalance_now().slots_moved, 0);
        // Every session on a's slots: a is far above 1.25 × the average.
        let heavy: Vec<(Slot, u64)> = membership
            .routing()
            .placement
            .slots_of(&worker("a"))
            .into_iter()
            .map(|slot| (slot, 100))
            .collect();
        membership
            .heartbeat(&worker("a"), &a, Epoch(0), 0, &heavy)
            .unwrap();
        let loads = membership.worker_loads();
        assert!(loads[&worker("a")] > loads[&worker("b")]);
        let rebalanced = membership.rebalance_now();
        assert!(rebalanced.slots_moved > 0);
        let loads = membership.worker_loads();
        let total: u64 = loads.values().sum();
        let most = *loads.values().max().unwrap();
        assert!(
            most as f64 <= 1.25 * total as f64 / 2.0 + 100.0,
            "{loads:?}"
        );
    }

    #[test]
    fn a_restored_table_keeps_its_assignment_above_every_used_epoch() {
        let first = membership(Duration::from_secs(60));
        join(&first, "a", 1);
        join(&first, "b", 2);
        let routing = first.routing();
        let stored = routing.to_stored();
        let restarted = Membership::new(
            MembershipConfig {
                epoch_floor: Epoch(40),
                ..config(Duration::from_secs(60))
            },
            Some(stored),
            false,
        );
        let restored = restarted.routing();
        assert!(restored.placement.epoch() > routing.placement.epoch());
        assert_eq!(restored.placement.moved_slots(&routing.placement), 0);
        assert_eq!(restored.addresses, routing.addresses);
        // The members register again: nothing moves, and the epoch climbs above theirs.
        let (_, table) = register(&restarted, "a", 1, 40);
        assert_eq!(table.epoch, 41);
        assert_eq!(
            restarted
                .routing()
                .placement
                .moved_slots(&routing.placement),
            0
        );
    }

    #[tokio::test]
    async fn a_table_is_published_only_once_it_is_kept_in_the_store() {
        let store: Arc<dyn SessionStore> = Arc::new(switchyard_store::MemoryStore::new());
        let membership = Arc::new(Membership::new(config(Duration::from_secs(60)), None, true));
        join(&membership, "a", 1);
        // Computed, not kept: nobody sees it yet.
        assert_eq!(membership.routing().placement.epoch(), Epoch(0));

        let shutdown = CancellationToken::new();
        let keeper = tokio::spawn(
            membership
                .clone()
                .keep_placement(store.clone(), shutdown.clone()),
        );
        membership
            .wait_until_published(Duration::from_secs(5))
            .await;
        let published = membership.routing();
        assert_eq!(published.placement.epoch(), Epoch(1));
        let kept = store.load_placement().await.unwrap().unwrap();
        assert_eq!(kept.epoch, Epoch(1));
        assert_eq!(kept.table.moved_slots(&published.placement), 0);

        // A store that already holds a newer table (another coordinator) blocks publication.
        let mut newer = kept.clone();
        newer.epoch = Epoch(50);
        newer.table = newer.table.with_epoch(Epoch(50));
        assert!(store.save_placement(&newer).await.unwrap());
        join(&membership, "b", 2);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(membership.routing().placement.epoch(), Epoch(1));
        shutdown.cancel();
        keeper.await.unwrap();
    }

    #[test]
    fn a_restored_coordinator_goes_on_draining() {
        let first = membership(Duration::from_secs(60));
        join(&first, "a", 1);
        join(&first, "b", 2);
        first.drain(&worker("a")).unwrap();
        let routing = first.routing();
        assert_eq!(routing.draining, vec![worker("a")]);
        let stored = routing.to_stored();
        let restarted = Membership::new(config(Duration::from_secs(60)), Some(stored), false);
        assert_eq!(
            restarted.worker(&worker("a")).unwrap().state,
            WorkerState::Draining
        );
        let a = register(&restarted, "a", 1, 0).0;
        let (_, drain) = restarted
            .heartbeat(&worker("a"), &a, Epoch(0), 0, &[])
            .unwrap();
        assert!(drain);
        assert!(
            restarted
                .routing()
                .placement
                .slots_of(&worker("a"))
                .is_empty()
        );
    }

    #[test]
    fn a_new_address_alone_raises_the_epoch_and_reaches_the_router() {
        let membership = membership(Duration::from_secs(60));
        join(&membership, "a", 1);
        let before = membership.routing();
        // Registered again (a restarted pod keeps its id, gets a new address).
        join(&membership, "a", 7);
        let after = membership.routing();
        assert!(after.placement.epoch() > before.placement.epoch());
        assert_eq!(after.placement.moved_slots(&before.placement), 0);
        assert_eq!(after.addresses[&worker("a")], "127.0.0.1:7");
    }

    #[tokio::test]
    async fn a_table_kept_by_a_save_whose_reply_was_lost_is_published() {
        let store: Arc<dyn SessionStore> = Arc::new(switchyard_store::MemoryStore::new());
        let membership = Arc::new(Membership::new(config(Duration::from_secs(60)), None, true));
        join(&membership, "a", 1);
        let computed = membership.computed.borrow().clone();
        // The save committed, but its reply never came back: the store holds this table.
        let kept = computed.to_stored();
        assert!(store.save_placement(&kept).await.unwrap());
        let shutdown = CancellationToken::new();
        let keeper = tokio::spawn(membership.clone().keep_placement(store, shutdown.clone()));
        membership
            .wait_until_published(Duration::from_secs(5))
            .await;
        assert_eq!(membership.routing().placement.epoch(), kept.epoch);
        shutdown.cancel();
        keeper.await.unwrap();
    }
}
