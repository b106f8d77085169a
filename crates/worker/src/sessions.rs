//! Hot sessions over the store: limits, eviction, passivation, idle expiry and the order of
//! turns.
//!
//! The store is the source of truth. A session is "hot" while this worker holds a small
//! in-memory entry for it: its activity clock, the count of calls in progress and the lock
//! that runs its turns one at a time. Idle expiry, passivation and a call starting all take
//! the entry's lock, so a session never expires or leaves memory under a call that began.
//!
//! - here: the types, and the session calls (create, begin, end);
//! - `appends`: appends, at once or queued to commit beside a turn's agent;
//! - `turns`: the order of turns on a session and their request ids;
//! - `reads`: contexts, pages and windows, from the tail cache or the store;
//! - `expiry`: idle expiry, passivation and the loads heartbeats report;
//! - `handoff`: handing slots over to another worker and releasing them.

mod appends;
mod expiry;
mod handoff;
mod reads;
mod turns;

pub use appends::PendingAppend;
pub use reads::history_start;
use turns::KnownRequestIds;
pub use turns::TurnRequest;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::SystemTime;

use switchyard_core::{DoubleText, Epoch, Limits, Session, SessionId, Slot, UserId, slot_of};
use switchyard_store::{Fence, SessionStore, StoreError};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::context_cache::ContextCache;
use crate::error::{Result, WorkerError};
use crate::health::{Alerts, SessionHealth};
use crate::ownership::SlotOwnership;
use crate::quotas::{QuotaConfig, Quotas};

/// A session this worker has in memory.
pub struct HotSession {
    pub session_id: SessionId,
    pub slot: Slot,
    pub double_text: DoubleText,
    activity: Mutex<Activity>,
    /// Held for the whole of a turn; tokio's mutex is fair, so turns run in arrival order.
    turn: tokio::sync::Mutex<()>,
    /// What its turns did while it is hot here.
    pub health: Mutex<SessionHealth>,
}

struct Activity {
    in_flight: u32,
    last_activity_at: SystemTime,
    message_count: u64,
    state: EntryState,
    /// The newest messages, when known; `None` until a read loads them.
    cache: Option<ContextCache>,
    /// The lease epoch the cache was loaded under.
    cache_epoch: Epoch,
    /// Turns waiting behind the running one.
    queued: u16,
    /// Cancels the running turn, for the interrupt policy and handoffs.
    running: Option<CancellationToken>,
    /// The session's slot is being handed to another worker: no turn starts any more.
    handing_over: bool,
    /// Request ids of the turns running or queued here: a repeat of one is refused.
    turn_requests: HashSet<String>,
    /// Which request ids the store may hold for the session, under the cache's lease.
    known_request_ids: KnownRequestIds,
    /// Interrupting messages so far; a waiting one that is no longer the newest gives up.
    interrupts: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum EntryState {
    Live,
    /// Left memory; the session lives on in the store. A call holding this entry reloads.
    Passivated,
    /// Ended, evicted or expired: gone from the store too.
    Ended,
}

impl HotSession {
    fn new(
        session_id: SessionId,
        slot: Slot,
        last_activity_at: SystemTime,
        message_count: u64,
        double_text: DoubleText,
    ) -> Self {
        HotSession {
            session_id,
            slot,
            double_text,
            activity: Mutex::new(Activity {
                in_flight: 0,
                last_activity_at,
                message_count,
                state: EntryState::Live,
                cache: None,
                cache_epoch: Epoch::default(),
                queued: 0,
                running: None,
                handing_over: false,
                turn_requests: HashSet::new(),
                known_request_ids: KnownRequestIds::Unknown,
                interrupts: 0,
            }),
            turn: tokio::sync::Mutex::new(()),
            health: Mutex::default(),
        }
    }

    fn activity(&self) -> MutexGuard<'_, Activity> {
        self.activity
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn message_count(&self) -> u64 {
        self.activity().message_count
    }

    pub fn last_activity_at(&self) -> SystemTime {
        self.activity().last_activity_at
    }
}

/// A call in progress on a session. The session cannot expire or leave memory while one exists.
pub struct SessionCall {
    pub session: Arc<HotSession>,
    /// The user the call's token named: its quotas apply to what the call does. `None`
    /// only for calls made inside the worker.
    pub user_id: Option<UserId>,
    /// The epoch of the slot's lease when the call began: its writes need that same lease,
    /// so a call that outlives its worker's hold on the slot can never write under a later one.
    fence_epoch: Epoch,
    /// Woken when the call ends, for a handoff waiting for its slots' calls.
    ended: Arc<Notify>,
}

impl Drop for SessionCall {
    fn drop(&mut self) {
        {
            let mut activity = self.session.activity();
            activity.in_flight -= 1;
            activity.last_activity_at = SystemTime::now();
        }
        self.ended.notify_waiters();
    }
}

pub struct SessionManager {
    store: Arc<dyn SessionStore>,
    quotas: Arc<Quotas>,
    alerts: Alerts,
    placement: Arc<SlotOwnership>,
    limits: Limits,
    slot_count: u32,
    /// Looked up on every call (read), changed when sessions load or leave (write).
    hot: RwLock<HashMap<SessionId, Arc<HotSession>>>,
    /// Serialises session creation and eviction per slot, so a user never goes over the limit.
    slot_locks: Vec<tokio::sync::Mutex<()>>,
    /// Woken whenever a call ends: a handoff waits on it, not on a clock.
    call_ended: Arc<Notify>,
}

impl SessionManager {
    pub fn new(
        store: Arc<dyn SessionStore>,
        placement: Arc<SlotOwnership>,
        limits: Limits,
        slot_count: u32,
    ) -> Self {
        let alerts = Alerts::default();
        SessionManager {
            quotas: Arc::new(
                Quotas::new(
                    QuotaConfig::default(),
                    store.clone(),
                    placement.clone(),
                    slot_count,
                )
                .with_alerts(alerts.clone()),
            ),
            alerts,
            store,
            placement,
            limits,
            slot_count,
            hot: RwLock::new(HashMap::new()),
            slot_locks: (0..slot_count)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            call_ended: Arc::new(Notify::new()),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Limits users by `config` from now on.
    pub fn with_quotas(mut self, config: QuotaConfig) -> Self {
        self.quotas = Arc::new(
            Quotas::new(
                config,
                self.store.clone(),
                self.placement.clone(),
                self.slot_count,
            )
            .with_alerts(self.alerts.clone()),
        );
        self
    }

    pub fn quotas(&self) -> &Arc<Quotas> {
        &self.quotas
    }

    /// The worker's alert log.
    pub fn alerts(&self) -> &Alerts {
        &self.alerts
    }

    fn hot(&self) -> RwLockWriteGuard<'_, HashMap<SessionId, Arc<HotSession>>> {
        self.hot
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn hot_read(&self) -> RwLockReadGuard<'_, HashMap<SessionId, Arc<HotSession>>> {
        self.hot
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn hot_count(&self) -> usize {
        self.hot_read().len()
    }

    /// Sessions the store holds in `slots`, hot or not.
    pub async fn stored_count(&self, slots: &[Slot]) -> Result<u64> {
        Ok(self.store.count_sessions(slots).await?)
    }

    /// A session this worker holds (its slot's lease is ours), with its health if it is hot
    /// here; `None` for a session that does not exist or is another worker's.
    pub async fn health_of(
        &self,
        session_id: SessionId,
    ) -> Result<Option<(Session, Option<SessionHealth>)>> {
        let Some(session) = self.store.get_session(session_id).await? else {
            return Ok(None);
        };
        // Ours in the current table, and under our lease: a slot being handed over is the
        // new owner's to answer for.
        let ours = self.placement.current().owner(session.slot) == Some(self.placement.worker_id());
        if !ours || self.placement.fence(session.slot).is_none() {
            return Ok(None);
        }
        let health = self
            .hot_read()
            .get(&session_id)
            .filter(|hot| !hot.is_ended())
            .map(|hot| {
                hot.health
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .clone()
            });
        Ok(Some((session, health)))
    }

    pub fn slot_of(&self, user_id: &UserId) -> Slot {
        slot_of(user_id.as_str(), self.slot_count)
    }

    fn fence(&self, slot: Slot) -> Result<Fence> {
        self.placement
            .fence(slot)
            .ok_or(WorkerError::LeaseNotHeld(slot))
    }

    /// A write refused by its fence means another worker took the slot: stop serving it.
    fn store_error(&self, slot: Slot, error: StoreError) -> WorkerError {
        if let StoreError::Fenced { .. } = error {
            tracing::warn!(
                slot,
                "slot lease was taken by another worker; dropping the slot"
            );
            self.placement.remove_fences(&[slot]);
            self.hot().retain(|_, session| session.slot != slot);
        }
        error.into()
    }

    /// Creates a session, first ending the user's oldest sessions if it is at its limit.
    /// Returns the new session and the ids of the sessions it evicted.
    pub async fn create(
        &self,
        user_id: UserId,
        metadata: BTreeMap<String, String>,
        double_text: DoubleText,
    ) -> Result<(Session, Vec<SessionId>)> {
        self.limits.validate_metadata(&metadata)?;
        let slot = self.slot_of(&user_id);
        let _creating = self.slot_locks[slot as usize].lock().await;
        let fence = self.slot_fence(slot)?;

        let existing = self.store.list_user_sessions(&user_id).await?;
        // The `sessions` quota, where one applies, is the cap; else the worker's limit.
        let excess = match self.quotas.session_cap(&user_id).await? {
            Some(cap) => (existing.len() + 1).saturating_sub(cap),
            None => self.limits.evictions_before_create(existing.len()),
        };
        let mut evicted = Vec::with_capacity(excess);
        for victim in existing.iter().take(excess) {
            if self.end(victim.id, slot).await? {
                tracing::info!(session_id = %victim.id, user_id = %user_id, "session evicted by the per-user limit");
                evicted.push(victim.id);
            }
        }

        let now = SystemTime::now();
        let session = Session {
            id: SessionId::new_random(),
            user_id,
            slot,
            created_at: now,
            last_activity_at: now,
            metadata,
            message_count: 0,
            double_text,
        };
        self.store
            .create_session(&fence, &session)
            .await
            .map_err(|error| self.store_error(slot, error))?;
        let entry = hot_entry(&session);
        {
            let mut activity = entry.activity();
            activity.cache = Some(ContextCache::empty_after(0));
            activity.cache_epoch = fence.epoch;
            activity.known_request_ids = KnownRequestIds::none_yet();
        }
        {
            // A create is a call like any other: if the slot's handoff began meanwhile, the
            // new session is left to the store (its next call goes to the new owner) rather
            // than kept here, where the handoff would not see it.
            let mut hot = self.hot();
            if !self.placement.is_handing_over(slot) {
                hot.insert(session.id, Arc::new(entry));
            }
        }
        tracing::debug!(session_id = %session.id, user_id = %session.user_id, "session created");
        Ok((session, evicted))
    }

    /// Starts a call on a session, loading it from the store if it is not in memory. A
    /// session of a slot being handed over, or whose lease this worker does not hold, is
    /// refused (UNAVAILABLE: the caller retries on the new owner) and never enters memory.
    pub async fn begin_for(&self, session_id: SessionId, user_id: &UserId) -> Result<SessionCall> {
        let mut call = self.begin(session_id).await?;
        call.user_id = Some(user_id.clone());
        Ok(call)
    }

    /// As [`SessionManager::begin_for`], for a call no user's quota pays for.
    pub async fn begin(&self, session_id: SessionId) -> Result<SessionCall> {
        loop {
            let cached = self.hot_read().get(&session_id).cloned();
            let session = match cached {
                Some(session) => session,
                None => {
                    let stored = self
                        .store
                        .get_session(session_id)
                        .await?
                        .ok_or(switchyard_core::Error::SessionNotFound(session_id))?;
                    self.servable(stored.slot)?;
                    self.hot()
                        .entry(session_id)
                        .or_insert_with(|| Arc::new(hot_entry(&stored)))
                        .clone()
                }
            };
            {
                let mut activity = session.activity();
                match activity.state {
                    EntryState::Ended => {
                        return Err(switchyard_core::Error::SessionNotFound(session_id).into());
                    }
                    // It left memory between the lookup and now: look it up again.
                    EntryState::Passivated => continue,
                    EntryState::Live => {}
                }
                activity.in_flight += 1;
                activity.last_activity_at = SystemTime::now();
            }
            // Checked again now that the call counts as in flight: a handoff that began in
            // between either waits for this call or is seen here.
            let fence_epoch = match self.servable(session.slot) {
                Ok(epoch) => epoch,
                Err(error) => {
                    // The refused call leaves; an entry nobody else uses leaves memory with
                    // it (its activity saved while the lease still allows), so a slot that
                    // moved keeps no session here.
                    let left_at = {
                        let mut activity = session.activity();
                        activity.in_flight -= 1;
                        (activity.in_flight == 0 && activity.state == EntryState::Live).then(|| {
                            activity.state = EntryState::Passivated;
                            activity.last_activity_at
                        })
                    };
                    if let Some(at) = left_at {
                        {
                            let mut hot = self.hot();
                            if hot
                                .get(&session_id)
                                .is_some_and(|entry| Arc::ptr_eq(entry, &session))
                            {
                                hot.remove(&session_id);
                            }
                        }
                        self.save_activity(&session, at).await;
                    }
                    return Err(error);
                }
            };
            {
                // The cache belongs to the lease it was loaded under: a slot that moved away
                // and came back finds its sessions' contexts (and request ids) anew in the
                // store.
                let mut activity = session.activity();
                if activity.cache_epoch != fence_epoch {
                    activity.cache = None;
                    activity.known_request_ids = KnownRequestIds::Unknown;
                    activity.cache_epoch = fence_epoch;
                }
            }
            return Ok(SessionCall {
                session,
                user_id: None,
                fence_epoch,
                ended: self.call_ended.clone(),
            });
        }
    }

    /// The epoch of the lease under which `slot`'s sessions may be served now.
    fn servable(&self, slot: Slot) -> Result<Epoch> {
        self.placement
            .servable(slot)
            .ok_or(WorkerError::LeaseNotHeld(slot))
    }

    /// The fence for writing `slot` outside a session call (creating, ending sessions).
    fn slot_fence(&self, slot: Slot) -> Result<Fence> {
        self.servable(slot)?;
        self.fence(slot)
    }

    /// The fence for a call's write: the lease it began under, still held (a call in flight
    /// when its slot's handoff began may still write: the handoff waits for it).
    fn call_fence(&self, call: &SessionCall) -> Result<Fence> {
        let slot = call.session.slot;
        let fence = self.fence(slot)?;
        if fence.epoch != call.fence_epoch {
            return Err(WorkerError::LeaseNotHeld(slot));
        }
        Ok(fence)
    }

    /// The session as stored, with this worker's view of its activity.
    pub async fn describe(&self, call: &SessionCall) -> Result<Session> {
        let session_id = call.session.session_id;
        let mut session = self
            .store
            .get_session(session_id)
            .await?
            .ok_or(switchyard_core::Error::SessionNotFound(session_id))?;
        session.last_activity_at = session
            .last_activity_at
            .max(call.session.last_activity_at());
        Ok(session)
    }

    /// A user's sessions, least recently created first.
    pub async fn list(&self, user_id: &UserId) -> Result<Vec<Session>> {
        let mut sessions = self.store.list_user_sessions(user_id).await?;
        let hot = self.hot();
        for session in &mut sessions {
            if let Some(entry) = hot.get(&session.id) {
                session.last_activity_at = session.last_activity_at.max(entry.last_activity_at());
            }
        }
        Ok(sessions)
    }

    /// Ends every session of the user (for an erasure); returns those it ended.
    pub async fn end_all_of(&self, user_id: &UserId) -> Result<Vec<SessionId>> {
        let slot = self.slot_of(user_id);
        let mut ended = Vec::new();
        for session in self.store.list_user_sessions(user_id).await? {
            if self.end(session.id, slot).await? {
                ended.push(session.id);
            }
        }
        Ok(ended)
    }

    /// Ends a session of `slot` and deletes everything it held; false when it had already ended.
    pub async fn end(&self, session_id: SessionId, slot: Slot) -> Result<bool> {
        let fence = self.slot_fence(slot)?;
        {
            let mut hot = self.hot();
            // An entry that is not hot still gets one, marked ended, so that a call loading
            // the session concurrently finds it ended rather than bringing it back.
            let entry = hot.entry(session_id).or_insert_with(|| {
                Arc::new(HotSession::new(
                    session_id,
                    slot,
                    SystemTime::now(),
                    0,
                    DoubleText::default(),
                ))
            });
            let mut activity = entry.activity();
            activity.state = EntryState::Ended;
            // A running turn ends now and commits nothing.
            if let Some(running) = &activity.running {
                running.cancel();
            }
        }
        let deleted = self.store.delete_session(&fence, session_id).await;
        self.hot().remove(&session_id);
        // Its bytes no longer count against its user's storage.
        self.quotas.storage_changed_in(slot);
        deleted.map_err(|error| self.store_error(slot, error))
    }
}

fn hot_entry(session: &Session) -> HotSession {
    HotSession::new(
        session.id,
        session.slot,
        session.last_activity_at,
        session.message_count,
        session.double_text,
    )
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use switchyard_core::{Message, PlacementTable, Role, WorkerId};
    use switchyard_store::MemoryStore;

    use super::*;

    const SLOTS: u32 = 4;

    /// A manager owning every slot, with the lease of `user`'s slot taken at epoch 1.
    async fn manager(user: &UserId) -> (SessionManager, Arc<SlotOwnership>, Arc<MemoryStore>) {
        let store = Arc::new(MemoryStore::new());
        let (manager, placement) = manager_on(store.clone(), user).await;
        (manager, placement, store)
    }

    /// A manager on `store` that owns `user`'s slot.
    async fn manager_on(
        store: Arc<dyn SessionStore>,
        user: &UserId,
    ) -> (SessionManager, Arc<SlotOwnership>) {
        let me = WorkerId::parse("w").unwrap();
        let placement = Arc::new(SlotOwnership::new(me.clone(), SLOTS));
        placement.renew_lease(Instant::now(), Duration::from_secs(60));
        placement.install(
            PlacementTable::empty(SLOTS)
                .rebalanced(std::slice::from_ref(&me))
                .unwrap(),
        );
        let slot = slot_of(user.as_str(), SLOTS);
        store.acquire_slots(&me, Epoch(1), &[slot]).await.unwrap();
        placement.add_fences(&[slot], Epoch(1));
        let manager = SessionManager::new(store, placement.clone(), Limits::default(), SLOTS);
        (manager, placement)
    }

    fn text(content: &str) -> Message {
        Message {
            role: Role::User,
            content: content.to_string(),
            name: String::new(),
        }
    }

    #[tokio::test]
    async fn a_call_never_writes_under_a_lease_taken_after_it_began() {
        let user = UserId::parse("ann").unwrap();
        let (manager, placement, store) = manager(&user).await;
        let (session, _) = manager
            .create(user.clone(), BTreeMap::new(), DoubleText::default())
            .await
            .unwrap();
        let call = manager.begin(session.id).await.unwrap();
        manager.append(&call, &[text("one")]).await.unwrap();

        // The worker lost touch, forgot everything and took the slot again at epoch 3.
        manager.forget_all();
        placement.remove_fences(&[session.slot]);
        store
            .acquire_slots(placement.worker_id(), Epoch(3), &[session.slot])
            .await
            .unwrap();
        placement.add_fences(&[session.slot], Epoch(3));
        assert!(matches!(
            manager.append(&call, &[text("stale")]).await,
            Err(WorkerError::LeaseNotHeld(_))
        ));
        drop(call);
        let call = manager.begin(session.id).await.unwrap();
        assert_eq!(manager.append(&call, &[text("two")]).await.unwrap(), 2);
        let context = manager.context(&call, 0, 0).await.unwrap();
        let contents: Vec<&str> = context.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(contents, ["one", "two"]);
    }

    #[tokio::test]
    async fn a_create_racing_a_handoff_leaves_no_session_in_memory() {
        let user = UserId::parse("carla").unwrap();
        let store = Arc::new(switchyard_store::testing::GatedStore::new(Arc::new(
            MemoryStore::new(),
        )));
        let (manager, _) = manager_on(store.clone(), &user).await;
        let manager = Arc::new(manager);
        let slot = slot_of(user.as_str(), SLOTS);
        // The create passes its checks, then its write waits while the slot's handoff begins.
        store.creates().close();
        let create = {
            let manager = manager.clone();
            let user = user.clone();
            tokio::spawn(async move {
                manager
                    .create(user, BTreeMap::new(), DoubleText::default())
                    .await
            })
        };
        store.creates().reached().await;
        let slots: HashSet<Slot> = [slot].into();
        let handoff = {
            let manager = manager.clone();
            let slots = slots.clone();
            tokio::spawn(async move { manager.hand_over(&slots, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        store.creates().open();
        let (session, _) = create.await.unwrap().unwrap();
        handoff.await.unwrap();
        // Created in the store, for the next owner to load; not kept here, where the
        // handoff already looked.
        assert!(store.get_session(session.id).await.unwrap().is_some());
        assert_eq!(manager.hot_count(), 0);
    }

    #[tokio::test]
    async fn a_handoff_waits_for_calls_in_flight_and_refuses_new_ones() {
        let user = UserId::parse("bob").unwrap();
        let (manager, _, _) = manager(&user).await;
        let manager = Arc::new(manager);
        let (session, _) = manager
            .create(user.clone(), BTreeMap::new(), DoubleText::default())
            .await
            .unwrap();
        let in_flight = manager.begin(session.id).await.unwrap();
        let slots: HashSet<Slot> = [session.slot].into();
        let handoff = {
            let manager = manager.clone();
            let slots = slots.clone();
            tokio::spawn(async move { manager.hand_over(&slots, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(matches!(
            manager.begin(session.id).await,
            Err(WorkerError::LeaseNotHeld(_))
        ));
        // The call in flight still writes, and the handoff ends when it does.
        assert_eq!(
            manager.append(&in_flight, &[text("last")]).await.unwrap(),
            1
        );
        assert!(!handoff.is_finished());
        drop(in_flight);
        assert_eq!(handoff.await.unwrap(), 0, "nothing had to be cancelled");
        assert_eq!(manager.hot_count(), 0);
        manager.handed_over(&slots);
    }
}
