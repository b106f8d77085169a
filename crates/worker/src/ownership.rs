//! `SlotOwnership`: the one answer to "may this worker serve slot X now". A slot is
//! servable while the coordinator's table (under a fresh lease from the coordinator) places
//! it here, this worker holds its lease in the store (its fence), and it is not being handed
//! over. The lease keeper (`lib.rs`) drives the handoff through here: it marks slots as
//! handed over when they move away, and takes fences for slots that arrive.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use switchyard_core::{Epoch, PlacementTable, Slot, WorkerId};
use switchyard_store::{Fence, SlotLease};
use tokio::sync::{Notify, watch};

use crate::error::{Result, WorkerError};

/// How long a call waits for the worker to catch up with a newer epoch it was sent.
const CATCH_UP_WAIT: Duration = Duration::from_secs(1);
/// How much longer than the handoff grace (plus a heartbeat interval, which the old owner
/// may take to learn of the move, and the time cancelled turns get to end) a new owner waits
/// for the old owner to release a slot before taking it anyway.
pub const HANDOFF_MARGIN: Duration = Duration::from_secs(1);
/// How long cancelled turns get to end before their slot is released regardless.
pub const CANCEL_WAIT: Duration = Duration::from_millis(500);
/// The handoff grace until the coordinator says otherwise.
const DEFAULT_HANDOFF_GRACE: Duration = Duration::from_secs(5);

/// The latest table the coordinator sent, and until when the worker may act on it.
pub struct SlotOwnership {
    worker_id: WorkerId,
    table: watch::Sender<Arc<PlacementTable>>,
    /// When the coordinator's lease on this worker ends, in nanoseconds after `started`
    /// (0: no lease). Atomic, since every call reads it.
    lease_valid_until: AtomicU64,
    started: Instant,
    /// Asks the membership loop to heartbeat now rather than at its next tick.
    refresh: Notify,
    /// Slots whose lease in the store this worker holds, with the epoch it was taken at.
    /// Writes to a slot carry this fence; a slot without one is not served.
    fences: watch::Sender<HashMap<Slot, Epoch>>,
    /// How long in-flight calls get to finish when a slot moves, in milliseconds.
    handoff_grace_ms: AtomicU64,
    /// The coordinator's heartbeat interval, in milliseconds.
    heartbeat_interval_ms: AtomicU64,
    /// The coordinator asked this worker to hand over everything and leave.
    draining: watch::Sender<bool>,
    /// False from a re-registration (this worker was declared dead, or the coordinator
    /// restarted) until the worker has forgotten the fences and sessions it held: while it
    /// was out of touch its slots may have moved and moved back, leaving them stale.
    fences_verified: watch::Sender<bool>,
    /// Slots moving to another worker: no call on them begins, the calls in flight finish
    /// or are cancelled, then their leases are released.
    handing_over: Mutex<HashSet<Slot>>,
    /// Slots placed here whose previous owner is still handing them over, since when.
    arriving: Mutex<HashMap<Slot, Instant>>,
}

impl SlotOwnership {
    pub fn new(worker_id: WorkerId, slot_count: u32) -> Self {
        let (table, _) = watch::channel(Arc::new(PlacementTable::empty(slot_count)));
        SlotOwnership {
            worker_id,
            table,
            lease_valid_until: AtomicU64::new(0),
            started: Instant::now(),
            refresh: Notify::new(),
            fences: watch::channel(HashMap::new()).0,
            handoff_grace_ms: AtomicU64::new(DEFAULT_HANDOFF_GRACE.as_millis() as u64),
            heartbeat_interval_ms: AtomicU64::new(500),
            draining: watch::channel(false).0,
            fences_verified: watch::channel(true).0,
            handing_over: Mutex::new(HashSet::new()),
            arriving: Mutex::new(HashMap::new()),
        }
    }

    fn arriving(&self) -> MutexGuard<'_, HashMap<Slot, Instant>> {
        self.arriving
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The handoff's first step after `table` came: slots held here but placed elsewhere
    /// begin to be handed over (no call on them begins from now). Returns those newly so;
    /// the caller finishes or cancels their calls and releases their leases.
    pub fn slots_moving_away(&self, table: &PlacementTable) -> Vec<Slot> {
        let owned: HashSet<Slot> = table.slots_of(&self.worker_id).into_iter().collect();
        let held = self.fenced_slots();
        self.begin_handover(held.into_iter().filter(|slot| !owned.contains(slot)))
    }

    /// Slots placed here whose lease this worker does not hold yet, in order; slots no
    /// longer placed here stop being waited for.
    pub fn slots_arriving(&self, table: &PlacementTable) -> Vec<Slot> {
        let owned: HashSet<Slot> = table.slots_of(&self.worker_id).into_iter().collect();
        self.stop_waiting(|slot| owned.contains(&slot));
        let held: HashSet<Slot> = self.fenced_slots().into_iter().collect();
        let mut arriving: Vec<Slot> = owned.difference(&held).copied().collect();
        arriving.sort_unstable();
        arriving
    }

    /// Which arriving slots to take now, by their leases in the store (`leases`, those
    /// leased at all): a slot never leased, released by its holder, held by this worker, or
    /// held by a worker that is no longer a member is taken at once; one a member still
    /// holds once it has been waited for longer than the handoff allows.
    pub fn slots_to_take(
        &self,
        table: &PlacementTable,
        arriving: &[Slot],
        leases: &HashMap<Slot, SlotLease>,
        now: Instant,
    ) -> Vec<Slot> {
        let patience = self.handoff_patience();
        let mut take = Vec::with_capacity(arriving.len());
        for &slot in arriving {
            let free = leases.get(&slot).is_none_or(|lease| {
                lease.released || lease.owner == self.worker_id || !table.is_member(&lease.owner)
            });
            if free {
                take.push(slot);
                continue;
            }
            if now.duration_since(self.waiting_since(slot, now)) >= patience {
                tracing::warn!(worker_id = %self.worker_id, slot, previous_owner = %leases[&slot].owner, "the previous owner did not hand the slot over in time; taking it");
                take.push(slot);
            }
        }
        take
    }

    /// The handoff's last step on the new owner: `acquired` (of the `taken` slots) are held
    /// at `epoch`, and served from now.
    pub fn slots_taken(&self, taken: &[Slot], acquired: &[Slot], epoch: Epoch) {
        self.stop_waiting(|slot| !taken.contains(&slot));
        self.add_fences(acquired, epoch);
    }

    /// Since when this worker has waited for the previous owner to hand `slot` over
    /// (from now, if it had not been waiting).
    pub fn waiting_since(&self, slot: Slot, now: Instant) -> Instant {
        *self.arriving().entry(slot).or_insert(now)
    }

    /// Stops waiting for slots that were taken, or are no longer placed here (`keep`).
    pub fn stop_waiting(&self, keep: impl Fn(Slot) -> bool) {
        self.arriving().retain(|slot, _| keep(*slot));
    }

    /// Whether some slot placed here is still being handed over by its previous owner.
    pub fn is_waiting(&self) -> bool {
        !self.arriving().is_empty()
    }

    fn handing_over(&self) -> MutexGuard<'_, HashSet<Slot>> {
        self.handing_over
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Marks `slots` as being handed over; returns those that were not already.
    pub fn begin_handover(&self, slots: impl IntoIterator<Item = Slot>) -> Vec<Slot> {
        let mut handing_over = self.handing_over();
        slots
            .into_iter()
            .filter(|slot| handing_over.insert(*slot))
            .collect()
    }

    /// The end of a handoff: the slots may be served again should they come back (under a
    /// new lease).
    pub fn end_handover(&self, slots: &HashSet<Slot>) {
        self.handing_over().retain(|slot| !slots.contains(slot));
    }

    pub fn is_handing_over(&self, slot: Slot) -> bool {
        self.handing_over().contains(&slot)
    }

    /// Whether any handoff is still in progress.
    pub fn handovers_in_progress(&self) -> bool {
        !self.handing_over().is_empty()
    }

    /// The epoch of the lease under which `slot`'s sessions may be served now: held here,
    /// and not being handed over.
    pub fn servable(&self, slot: Slot) -> Option<Epoch> {
        if self.is_handing_over(slot) {
            return None;
        }
        self.fence_epoch(slot)
    }

    pub fn fences_verified(&self) -> bool {
        *self.fences_verified.borrow()
    }

    /// Whether this worker is in the current table, its lease with the coordinator is
    /// fresh (a worker cut off stops serving, and so stops being ready), and it holds the
    /// lease of every slot the table gives it: what its readiness reports.
    pub fn holds_its_slots(&self) -> bool {
        let table = self.current();
        if !table.is_member(&self.worker_id)
            || !self.lease_is_fresh()
            || !self.fences_verified()
            || self.is_waiting()
        {
            return false;
        }
        let fences = self.fences.borrow();
        table
            .slots_of(&self.worker_id)
            .iter()
            .all(|slot| fences.contains_key(slot))
    }

    pub fn subscribe_fences_verified(&self) -> watch::Receiver<bool> {
        self.fences_verified.subscribe()
    }

    pub fn set_fences_verified(&self, verified: bool) {
        self.fences_verified.send_replace(verified);
    }

    pub fn handoff_grace(&self) -> Duration {
        Duration::from_millis(self.handoff_grace_ms.load(Ordering::Relaxed))
    }

    /// Sets the handoff grace and the heartbeat interval the coordinator gave.
    pub fn set_handoff_timing(&self, grace: Duration, heartbeat_interval: Duration) {
        let millis = |duration: Duration| u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        self.handoff_grace_ms
            .store(millis(grace), Ordering::Relaxed);
        self.heartbeat_interval_ms
            .store(millis(heartbeat_interval), Ordering::Relaxed);
    }

    /// How long a new owner waits for the previous owner to release a slot: the old owner
    /// learns of the move within a heartbeat, then lets calls finish for the grace and
    /// cancelled turns end.
    pub fn handoff_patience(&self) -> Duration {
        self.handoff_grace()
            + Duration::from_millis(self.heartbeat_interval_ms.load(Ordering::Relaxed))
            + CANCEL_WAIT
            + HANDOFF_MARGIN
    }

    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    pub fn set_draining(&self, draining: bool) {
        self.draining.send_if_modified(|current| {
            let changed = *current != draining;
            *current = draining;
            changed
        });
    }

    pub fn subscribe_draining(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// Forgets the leases of `fences` that are still held exactly at their epoch (a lease
    /// taken again since, at a newer epoch, stays).
    pub fn remove_fences_held_at(&self, fences: &[Fence]) {
        if fences.is_empty() {
            return;
        }
        self.fences.send_modify(|held| {
            for fence in fences {
                if held.get(&fence.slot) == Some(&fence.epoch) {
                    held.remove(&fence.slot);
                }
            }
        });
    }

    pub fn worker_id(&self) -> &WorkerId {
        &self.worker_id
    }

    /// The epoch of `slot`'s lease, if this worker holds it.
    pub fn fence_epoch(&self, slot: Slot) -> Option<Epoch> {
        self.fences.borrow().get(&slot).copied()
    }

    /// The fence for writing `slot`'s data, if this worker holds its lease.
    pub fn fence(&self, slot: Slot) -> Option<Fence> {
        let epoch = *self.fences.borrow().get(&slot)?;
        Some(Fence {
            slot,
            owner: self.worker_id.clone(),
            epoch,
        })
    }

    pub fn fenced_slots(&self) -> Vec<Slot> {
        self.fences.borrow().keys().copied().collect()
    }

    pub fn add_fences(&self, slots: &[Slot], epoch: Epoch) {
        if slots.is_empty() {
            return;
        }
        self.fences.send_modify(|fences| {
            for slot in slots {
                fences.insert(*slot, epoch);
            }
        });
    }

    /// Forgets leases: the slots moved away, or a write found the lease taken.
    pub fn remove_fences(&self, slots: &[Slot]) {
        if slots.is_empty() {
            return;
        }
        self.fences.send_modify(|fences| {
            for slot in slots {
                fences.remove(slot);
            }
        });
    }

    pub fn current(&self) -> Arc<PlacementTable> {
        self.table.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<PlacementTable>> {
        self.table.subscribe()
    }

    /// Installs a table if it is newer than the one held; older ones are ignored, so the
    /// worker never acts on an epoch older than one it has seen.
    pub fn install(&self, table: PlacementTable) -> bool {
        self.table.send_if_modified(|current| {
            // Epoch 0 is the placeholder held before registration; any real table replaces it.
            let placeholder = current.epoch() == Epoch(0) && current.workers().is_empty();
            if table.epoch() <= current.epoch() && !placeholder {
                return false;
            }
            *current = Arc::new(table);
            true
        })
    }

    /// Extends the lease: `sent_at` is when the request the coordinator answered was sent,
    /// so the worker's lease always ends before the coordinator's view of it.
    pub fn renew_lease(&self, sent_at: Instant, lease: Duration) {
        let until = (sent_at + lease).saturating_duration_since(self.started);
        let nanos = u64::try_from(until.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.lease_valid_until.store(nanos, Ordering::Release);
    }

    pub fn expire_lease(&self) {
        self.lease_valid_until.store(0, Ordering::Release);
    }

    fn lease_is_fresh(&self) -> bool {
        let until = self.lease_valid_until.load(Ordering::Acquire);
        let now = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        until != 0 && now < until
    }

    pub fn refresh_requested(&self) -> &Notify {
        &self.refresh
    }

    /// Succeeds when this worker owns `slot` at `requested` (the epoch the coordinator
    /// routed with) or later. A worker behind the request's epoch catches up first.
    pub async fn check_owner(&self, slot: Slot, requested: Option<Epoch>) -> Result<()> {
        if !self.lease_is_fresh() {
            return Err(WorkerError::LeaseExpired);
        }
        if !self.fences_verified() {
            let mut verified = self.fences_verified.subscribe();
            let checked =
                tokio::time::timeout(CATCH_UP_WAIT, verified.wait_for(|verified| *verified)).await;
            if !matches!(checked, Ok(Ok(_))) {
                return Err(WorkerError::LeaseExpired);
            }
        }
        let mut table = self.current();
        if let Some(requested) = requested.filter(|requested| table.epoch() < *requested) {
            self.refresh.notify_one();
            let mut receiver = self.table.subscribe();
            let caught_up = tokio::time::timeout(
                CATCH_UP_WAIT,
                receiver.wait_for(|table| table.epoch() >= requested),
            )
            .await;
            table = self.current();
            if !matches!(caught_up, Ok(Ok(_))) {
                return Err(WorkerError::PlacementBehind {
                    known: table.epoch(),
                    requested,
                });
            }
        }
        if table.is_owner(slot, &self.worker_id) {
            return self.wait_for_fence(slot).await;
        }
        Err(WorkerError::NotOwner {
            slot,
            epoch: table.epoch(),
            owner: table.owner(slot).cloned(),
        })
    }
}

impl SlotOwnership {
    /// A slot just placed here is served once its lease is taken in the store, which may
    /// wait for the previous owner to hand it over.
    async fn wait_for_fence(&self, slot: Slot) -> Result<()> {
        if self.fences.borrow().contains_key(&slot) {
            return Ok(());
        }
        let mut receiver = self.fences.subscribe();
        let taken = tokio::time::timeout(
            self.handoff_patience(),
            receiver.wait_for(|fences| fences.contains_key(&slot)),
        )
        .await;
        match taken {
            Ok(Ok(_)) => Ok(()),
            _ => Err(WorkerError::LeaseNotHeld(slot)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(id: &str) -> WorkerId {
        WorkerId::parse(id).unwrap()
    }

    #[tokio::test]
    async fn ownership_follows_the_newest_table() {
        let me = worker("a");
        let view = SlotOwnership::new(me.clone(), 16);
        view.renew_lease(Instant::now(), Duration::from_secs(60));
        let first = PlacementTable::empty(16)
            .rebalanced(std::slice::from_ref(&me))
            .unwrap();
        assert!(view.install(first.clone()));
        view.add_fences(&[3], Epoch(1));
        assert!(view.check_owner(3, Some(Epoch(1))).await.is_ok());

        let second = first.rebalanced(&[worker("b")]).unwrap();
        assert!(view.install(second.clone()));
        assert!(!view.install(first), "an older epoch must be ignored");
        let error = view.check_owner(3, None).await.unwrap_err();
        assert!(
            matches!(
                error,
                WorkerError::NotOwner {
                    epoch: Epoch(2),
                    ..
                }
            ),
            "{error}"
        );
    }

    #[tokio::test]
    async fn an_owned_slot_without_its_store_lease_is_not_served() {
        let me = worker("a");
        let view = SlotOwnership::new(me.clone(), 4);
        view.set_handoff_timing(Duration::ZERO, Duration::ZERO);
        view.renew_lease(Instant::now(), Duration::from_secs(60));
        view.install(PlacementTable::empty(4).rebalanced(&[me]).unwrap());
        assert!(matches!(
            view.check_owner(1, None).await,
            Err(WorkerError::LeaseNotHeld(1))
        ));
        view.add_fences(&[1], Epoch(1));
        assert!(view.check_owner(1, None).await.is_ok());
        assert_eq!(view.fence(1).map(|fence| fence.epoch), Some(Epoch(1)));
        view.remove_fences(&[1]);
        assert!(view.fence(1).is_none());
    }

    #[tokio::test]
    async fn an_expired_lease_refuses_calls() {
        let me = worker("a");
        let view = SlotOwnership::new(me.clone(), 4);
        view.install(PlacementTable::empty(4).rebalanced(&[me]).unwrap());
        assert!(matches!(
            view.check_owner(0, None).await,
            Err(WorkerError::LeaseExpired)
        ));
    }

    #[tokio::test]
    async fn a_newer_requested_epoch_waits_then_gives_up() {
        let me = worker("a");
        let view = SlotOwnership::new(me.clone(), 4);
        view.renew_lease(Instant::now(), Duration::from_secs(60));
        view.install(PlacementTable::empty(4).rebalanced(&[me]).unwrap());
        let error = view.check_owner(0, Some(Epoch(9))).await.unwrap_err();
        assert!(
            matches!(error, WorkerError::PlacementBehind { .. }),
            "{error}"
        );
    }

    #[test]
    fn the_handoff_transitions() {
        let (me, other) = (worker("a"), worker("b"));
        let ownership = SlotOwnership::new(me.clone(), 4);
        ownership.set_handoff_timing(Duration::from_millis(100), Duration::ZERO);
        let mine = PlacementTable::empty(4)
            .rebalanced(std::slice::from_ref(&me))
            .unwrap();
        ownership.install(mine.clone());
        // Every slot arrives; the leases: 0 never taken, 1 released, 2 held by a member,
        // 3 held by a worker that is gone.
        let arriving = ownership.slots_arriving(&mine);
        assert_eq!(arriving, [0, 1, 2, 3]);
        let lease = |slot, owner: &WorkerId, released| SlotLease {
            slot,
            owner: owner.clone(),
            epoch: Epoch(1),
            released,
        };
        let gone = worker("gone");
        let both = mine.rebalanced(&[me.clone(), other.clone()]).unwrap();
        let member_table = both.clone().with_epoch(mine.epoch());
        let leases: HashMap<Slot, SlotLease> = [
            (1, lease(1, &other, true)),
            (2, lease(2, &other, false)),
            (3, lease(3, &gone, false)),
        ]
        .into_iter()
        .collect();
        let now = Instant::now();
        assert_eq!(
            ownership.slots_to_take(&member_table, &arriving, &leases, now),
            [0, 1, 3]
        );
        assert!(ownership.is_waiting());
        // Past the handoff's patience, the member's slot is taken too.
        let later = now + ownership.handoff_patience();
        assert_eq!(
            ownership.slots_to_take(&member_table, &[2], &leases, later),
            [2]
        );
        ownership.slots_taken(&arriving, &arriving, Epoch(1));
        assert!(!ownership.is_waiting());
        assert_eq!(ownership.servable(2), Some(Epoch(1)));

        // Half the slots move to b: they stop being served at once, until handed over.
        ownership.install(both.clone());
        let moving = ownership.slots_moving_away(&both);
        assert!(!moving.is_empty());
        assert!(ownership.handovers_in_progress());
        for slot in &moving {
            assert_eq!(ownership.servable(*slot), None);
        }
        // Asked again, nothing new moves: the handoff is under way already.
        assert!(ownership.slots_moving_away(&both).is_empty());
        ownership.end_handover(&moving.iter().copied().collect());
        assert!(!ownership.handovers_in_progress());
    }
}
