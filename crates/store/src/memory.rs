//! `MemoryStore`: sessions and contexts in process memory.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use switchyard_core::{ContextMessage, Epoch, Message, Session, SessionId, Slot, UserId, WorkerId};

use crate::{
    AppendKey, Appended, Fence, IdleSession, RequestRecord, Result, SessionStore, SlotLease,
    StoreError, StoredLimit, StoredPlacement, StoredUsage, UserQuotaRecord,
};

/// Everything in process memory: nothing survives the process. `switchyard dev --store
/// memory` and tests use it; its fencing is the same as the SQL stores'.
pub struct MemoryStore {
    cluster_id: String,
    inner: Mutex<Inner>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            cluster_id: format!("memory-{}", SessionId::new_random()),
            inner: Mutex::default(),
        }
    }
}

#[derive(Default)]
struct Inner {
    sessions: HashMap<SessionId, StoredSession>,
    /// Session ids per user, in creation order.
    by_user: HashMap<UserId, Vec<SessionId>>,
    /// Holder, epoch, and whether the holder released it.
    leases: HashMap<Slot, (WorkerId, Epoch, bool)>,
    placement: Option<StoredPlacement>,
    /// Quota overrides per user, by resource.
    overrides: HashMap<UserId, BTreeMap<String, StoredLimit>>,
    /// Saved usage per user, by resource.
    usage: HashMap<UserId, BTreeMap<String, (String, u64)>>,
}

impl Inner {
    fn check(&self, fence: &Fence) -> Result<()> {
        match self.leases.get(&fence.slot) {
            Some((owner, epoch, false)) if *owner == fence.owner && *epoch == fence.epoch => Ok(()),
            _ => Err(StoreError::Fenced {
                slot: fence.slot,
                epoch: fence.epoch,
            }),
        }
    }
}

struct StoredSession {
    session: Session,
    /// The stored messages, oldest first: seqs `dropped + 1` onwards.
    messages: Vec<ContextMessage>,
    /// Messages dropped from the front to keep the context bounded.
    dropped: u64,
    /// Request ids seen on the session, kept as long as it lives.
    requests: HashMap<String, RequestRecord>,
}

impl StoredSession {
    /// The index of the first message after `after_seq`. Seqs are dense: seq `n` sits at
    /// index `n - dropped - 1`.
    fn index_after(&self, after_seq: u64) -> usize {
        usize::try_from(after_seq.saturating_sub(self.dropped))
            .unwrap_or(usize::MAX)
            .min(self.messages.len())
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied write: every mutation
        // below is a single insert, remove or push after all checks.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl SessionStore for MemoryStore {
    async fn cluster_id(&self) -> Result<String> {
        Ok(self.cluster_id.clone())
    }

    async fn acquire_slots(
        &self,
        owner: &WorkerId,
        epoch: Epoch,
        slots: &[Slot],
    ) -> Result<Vec<Slot>> {
        let mut inner = self.lock();
        let mut acquired = Vec::with_capacity(slots.len());
        for &slot in slots {
            let free = match inner.leases.get(&slot) {
                None => true,
                Some((holder, held_at, _)) => {
                    *held_at < epoch || (*held_at == epoch && holder == owner)
                }
            };
            if free {
                inner.leases.insert(slot, (owner.clone(), epoch, false));
                acquired.push(slot);
            }
        }
        Ok(acquired)
    }

    async fn max_lease_epoch(&self) -> Result<Epoch> {
        Ok(self
            .lock()
            .leases
            .values()
            .map(|(_, epoch, _)| *epoch)
            .max()
            .unwrap_or_default())
    }

    async fn slot_leases(&self, slots: &[Slot]) -> Result<Vec<SlotLease>> {
        let inner = self.lock();
        let mut slots = slots.to_vec();
        slots.sort_unstable();
        slots.dedup();
        Ok(slots
            .into_iter()
            .filter_map(|slot| {
                let (owner, epoch, released) = inner.leases.get(&slot)?;
                Some(SlotLease {
                    slot,
                    owner: owner.clone(),
                    epoch: *epoch,
                    released: *released,
                })
            })
            .collect())
    }

    async fn release_slots(&self, fences: &[Fence]) -> Result<usize> {
        let mut inner = self.lock();
        let mut released = 0;
        for fence in fences {
            if let Some((owner, epoch, gone)) = inner.leases.get_mut(&fence.slot)
                && *owner == fence.owner
                && *epoch == fence.epoch
                && !*gone
            {
                *gone = true;
                released += 1;
            }
        }
        Ok(released)
    }

    async fn save_placement(&self, placement: &StoredPlacement) -> Result<bool> {
        let mut inner = self.lock();
        if inner
            .placement
            .as_ref()
            .is_some_and(|kept| kept.epoch >= placement.epoch)
        {
            return Ok(false);
        }
        inner.placement = Some(placement.clone());
        Ok(true)
    }

    async fn load_placement(&self) -> Result<Option<StoredPlacement>> {
        Ok(self.lock().placement.clone())
    }

    async fn create_session(&self, fence: &Fence, session: &Session) -> Result<()> {
        let mut inner = self.lock();
        inner.check(fence)?;
        if inner.sessions.contains_key(&session.id) {
            return Err(StoreError::SessionExists(session.id));
        }
        inner
            .by_user
            .entry(session.user_id.clone())
            .or_default()
            .push(session.id);
        inner.sessions.insert(
            session.id,
            StoredSession {
                session: session.clone(),
                messages: Vec::new(),
                dropped: 0,
                requests: HashMap::new(),
            },
        );
        Ok(())
    }

    async fn get_session(&self, session_id: SessionId) -> Result<Option<Session>> {
        Ok(self
            .lock()
            .sessions
            .get(&session_id)
            .map(|stored| stored.session.clone()))
    }

    async fn list_user_sessions(&self, user_id: &UserId) -> Result<Vec<Session>> {
        let inner = self.lock();
        let Some(ids) = inner.by_user.get(user_id) else {
            return Ok(Vec::new());
        };
        Ok(ids
            .iter()
            .filter_map(|id| inner.sessions.get(id))
            .map(|stored| stored.session.clone())
            .collect())
    }

    async fn delete_session(&self, fence: &Fence, session_id: SessionId) -> Result<bool> {
        let mut inner = self.lock();
        inner.check(fence)?;
        let Some(stored) = inner.sessions.remove(&session_id) else {
            return Ok(false);
        };
        let user_id = stored.session.user_id;
        if let Some(ids) = inner.by_user.get_mut(&user_id) {
            ids.retain(|id| *id != session_id);
            if ids.is_empty() {
                inner.by_user.remove(&user_id);
            }
        }
        Ok(true)
    }

    async fn append_keyed(
        &self,
        fence: &Fence,
        session_id: SessionId,
        messages: &[Message],
        at: SystemTime,
        key: &AppendKey,
        keep_last: u64,
    ) -> Result<Appended> {
        let mut inner = self.lock();
        inner.check(fence)?;
        let stored = inner
            .sessions
            .get_mut(&session_id)
            .ok_or(StoreError::SessionNotFound(session_id))?;
        if let AppendKey::Request { id, turn } = key
            && let Some(record) = stored.requests.get(id)
        {
            if record.turn != *turn {
                return Err(StoreError::RequestIdReused {
                    request_id: id.clone(),
                });
            }
            return Ok(Appended {
                last_seq: record.last_seq,
                written: false,
            });
        }
        for message in messages {
            let seq = stored.dropped + stored.messages.len() as u64 + 1;
            stored.messages.push(ContextMessage {
                seq,
                role: message.role,
                content: message.content.clone(),
                name: message.name.clone(),
                created_at: at,
            });
        }
        stored.session.message_count = stored.dropped + stored.messages.len() as u64;
        if at >= stored.session.last_activity_at + crate::ACTIVITY_STEP {
            stored.session.last_activity_at = at;
        }
        let last_seq = stored.session.message_count;
        let excess = (stored.messages.len() as u64).saturating_sub(keep_last.max(1));
        if excess > 0 {
            stored.messages.drain(..excess as usize);
            stored.dropped += excess;
        }
        match key {
            AppendKey::None => {}
            AppendKey::Request { id, turn } => {
                stored.requests.insert(
                    id.clone(),
                    RequestRecord {
                        turn: *turn,
                        last_seq,
                        reply: None,
                    },
                );
            }
            AppendKey::Reply { id, usage } => {
                if let Some(record) = stored.requests.get_mut(id) {
                    record.reply = Some((last_seq, *usage));
                }
            }
        }
        Ok(Appended {
            last_seq,
            written: true,
        })
    }

    async fn read_system_messages(
        &self,
        session_id: SessionId,
        before_seq: u64,
        limit: u32,
    ) -> Result<Vec<ContextMessage>> {
        let inner = self.lock();
        let stored = inner
            .sessions
            .get(&session_id)
            .ok_or(StoreError::SessionNotFound(session_id))?;
        let mut system: Vec<ContextMessage> = stored
            .messages
            .iter()
            .rev()
            .filter(|message| {
                message.seq < before_seq && message.role == switchyard_core::Role::System
            })
            .take(limit as usize)
            .cloned()
            .collect();
        system.reverse();
        Ok(system)
    }

    async fn request_record(
        &self,
        session_id: SessionId,
        request_id: &str,
    ) -> Result<Option<RequestRecord>> {
        Ok(self
            .lock()
            .sessions
            .get(&session_id)
            .and_then(|stored| stored.requests.get(request_id).cloned()))
    }

    async fn read_context(
        &self,
        session_id: SessionId,
        last_n: u32,
        after_seq: u64,
    ) -> Result<Vec<ContextMessage>> {
        let inner = self.lock();
        let stored = inner
            .sessions
            .get(&session_id)
            .ok_or(StoreError::SessionNotFound(session_id))?;
        let start = stored.index_after(after_seq);
        let mut selected = &stored.messages[start..];
        if last_n > 0 && selected.len() > last_n as usize {
            selected = &selected[selected.len() - last_n as usize..];
        }
        Ok(selected.to_vec())
    }

    async fn read_context_page(
        &self,
        session_id: SessionId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<ContextMessage>> {
        let inner = self.lock();
        let stored = inner
            .sessions
            .get(&session_id)
            .ok_or(StoreError::SessionNotFound(session_id))?;
        let start = stored.index_after(after_seq);
        let end = start
            .saturating_add(limit as usize)
            .min(stored.messages.len());
        Ok(stored.messages[start..end].to_vec())
    }

    async fn touch_session(
        &self,
        fence: &Fence,
        session_id: SessionId,
        at: SystemTime,
    ) -> Result<()> {
        let mut inner = self.lock();
        inner.check(fence)?;
        let stored = inner
            .sessions
            .get_mut(&session_id)
            .ok_or(StoreError::SessionNotFound(session_id))?;
        if at > stored.session.last_activity_at {
            stored.session.last_activity_at = at;
        }
        Ok(())
    }

    async fn idle_sessions(
        &self,
        slots: &[Slot],
        before: SystemTime,
        limit: usize,
    ) -> Result<Vec<IdleSession>> {
        let slots: HashSet<Slot> = slots.iter().copied().collect();
        let inner = self.lock();
        Ok(inner
            .sessions
            .values()
            .map(|stored| &stored.session)
            .filter(|session| slots.contains(&session.slot) && session.last_activity_at < before)
            .take(limit)
            .map(|session| IdleSession {
                id: session.id,
                slot: session.slot,
                last_activity_at: session.last_activity_at,
            })
            .collect())
    }

    async fn count_sessions(&self, slots: &[Slot]) -> Result<u64> {
        let slots: HashSet<Slot> = slots.iter().copied().collect();
        let inner = self.lock();
        Ok(inner
            .sessions
            .values()
            .filter(|stored| slots.contains(&stored.session.slot))
            .count() as u64)
    }

    async fn load_user_quota(&self, user_id: &UserId) -> Result<UserQuotaRecord> {
        let inner = self.lock();
        Ok(UserQuotaRecord {
            overrides: inner
                .overrides
                .get(user_id)
                .map(|overrides| overrides.values().cloned().collect())
                .unwrap_or_default(),
            usage: inner
                .usage
                .get(user_id)
                .map(|usage| {
                    usage
                        .iter()
                        .map(|(resource, (state, version))| StoredUsage {
                            user_id: user_id.clone(),
                            resource: resource.clone(),
                            state: state.clone(),
                            version: *version,
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    async fn set_user_quota(
        &self,
        fence: &Fence,
        user_id: &UserId,
        overrides: &[StoredLimit],
        clear: bool,
    ) -> Result<()> {
        let mut inner = self.lock();
        inner.check(fence)?;
        let mut kept = if clear {
            BTreeMap::new()
        } else {
            inner.overrides.get(user_id).cloned().unwrap_or_default()
        };
        for limit in overrides {
            kept.insert(limit.resource.clone(), limit.clone());
        }
        if kept.is_empty() {
            inner.overrides.remove(user_id);
        } else {
            inner.overrides.insert(user_id.clone(), kept);
        }
        Ok(())
    }

    async fn save_usage(&self, usage: &[(Fence, StoredUsage)]) -> Result<usize> {
        let mut inner = self.lock();
        let mut saved = HashSet::new();
        for (fence, usage) in usage {
            if inner.check(fence).is_err() {
                continue;
            }
            let windows = inner.usage.entry(usage.user_id.clone()).or_default();
            match windows.get(&usage.resource) {
                Some((_, kept)) if *kept > usage.version => {}
                _ => {
                    windows.insert(usage.resource.clone(), (usage.state.clone(), usage.version));
                    saved.insert((&usage.user_id, &usage.resource));
                }
            }
        }
        Ok(saved.len())
    }

    async fn erase_user_quota(&self, fence: &Fence, user_id: &UserId) -> Result<(bool, bool)> {
        let mut inner = self.lock();
        inner.check(fence)?;
        Ok((
            inner.usage.remove(user_id).is_some(),
            inner.overrides.remove(user_id).is_some(),
        ))
    }

    async fn user_storage_bytes(&self, user_id: &UserId) -> Result<u64> {
        let inner = self.lock();
        Ok(inner
            .by_user
            .get(user_id)
            .into_iter()
            .flatten()
            .filter_map(|id| inner.sessions.get(id))
            .flat_map(|stored| stored.messages.iter())
            .map(|message| message.content.len() as u64)
            .sum())
    }
}
