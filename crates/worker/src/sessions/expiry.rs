//! Idle expiry and passivation, and the loads heartbeats report.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use switchyard_core::{DoubleText, Slot};

use super::{EntryState, HotSession, SessionManager};
use crate::error::Result;

impl SessionManager {
    /// Ends sessions idle for longer than the idle timeout in the slots this worker holds,
    /// and passivates hot ones idle for longer than `passivate_after`.
    pub async fn expire_idle(&self, owned_slots: &[Slot]) -> Result<usize> {
        let now = SystemTime::now();
        let expiry_cutoff = now
            .checked_sub(self.limits.idle_timeout)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let passivation_cutoff = now
            .checked_sub(self.limits.passivate_after)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut expired = 0;

        // Idle long enough for at least one of the two.
        let candidate_cutoff = expiry_cutoff.max(passivation_cutoff);
        let idle_hot: Vec<Arc<HotSession>> = self
            .hot()
            .values()
            .filter(|session| {
                let activity = session.activity();
                activity.in_flight == 0 && activity.last_activity_at < candidate_cutoff
            })
            .cloned()
            .collect();
        for session in idle_hot {
            if self.expire_if_idle(&session, expiry_cutoff).await? {
                expired += 1;
            } else {
                self.passivate_if_idle(&session, passivation_cutoff).await;
            }
        }

        // Sessions not in memory: passivated, or never loaded since their slot came here.
        let idle_cold = self
            .store
            .idle_sessions(owned_slots, expiry_cutoff, 1000)
            .await?;
        for idle in idle_cold {
            let entry = {
                let mut hot = self.hot();
                if hot.contains_key(&idle.id) {
                    continue;
                }
                let entry = Arc::new(HotSession::new(
                    idle.id,
                    idle.slot,
                    idle.last_activity_at,
                    0,
                    DoubleText::default(),
                ));
                hot.insert(idle.id, entry.clone());
                entry
            };
            let outcome = self.expire_if_idle(&entry, expiry_cutoff).await;
            // Not expired after all (a call came in, or the lease is gone): forget the entry.
            {
                let mut hot = self.hot();
                if hot
                    .get(&idle.id)
                    .is_some_and(|current| Arc::ptr_eq(current, &entry))
                    && entry.activity().in_flight == 0
                {
                    entry.activity().state = EntryState::Passivated;
                    hot.remove(&idle.id);
                }
            }
            if outcome? {
                expired += 1;
            }
        }
        self.shrink();
        Ok(expired)
    }

    pub(super) async fn expire_if_idle(
        &self,
        session: &Arc<HotSession>,
        cutoff: SystemTime,
    ) -> Result<bool> {
        let Some(fence) = self.placement.fence(session.slot) else {
            return Ok(false);
        };
        {
            let mut activity = session.activity();
            if activity.state != EntryState::Live
                || activity.in_flight > 0
                || activity.last_activity_at >= cutoff
            {
                return Ok(false);
            }
            // From here on a call that tries to begin sees the session as ended.
            activity.state = EntryState::Ended;
        }
        // Whose it was, for the audit trail (expiry is rare: one read is nothing).
        let user_id = match self.store.get_session(session.session_id).await {
            Ok(Some(stored)) => Some(stored.user_id),
            _ => None,
        };
        let deleted = self.store.delete_session(&fence, session.session_id).await;
        self.hot().remove(&session.session_id);
        let deleted = deleted.map_err(|error| self.store_error(session.slot, error))?;
        if deleted {
            self.quotas.storage_changed_in(session.slot);
            if let Some(user_id) = &user_id {
                crate::audit::event(
                    "session expired",
                    "switchyard",
                    user_id,
                    Some(session.session_id),
                    "idle past the idle timeout",
                );
            }
            tracing::info!(session_id = %session.session_id, "idle session expired");
        }
        Ok(deleted)
    }

    /// Drops a session from memory, keeping its activity time in the store.
    pub(super) async fn passivate_if_idle(&self, session: &Arc<HotSession>, cutoff: SystemTime) {
        let last_activity_at = {
            let mut hot = self.hot();
            let mut activity = session.activity();
            if activity.state != EntryState::Live
                || activity.in_flight > 0
                || activity.last_activity_at >= cutoff
            {
                return;
            }
            activity.state = EntryState::Passivated;
            hot.remove(&session.session_id);
            activity.last_activity_at
        };
        self.save_activity(session, last_activity_at).await;
    }

    pub(super) async fn save_activity(&self, session: &HotSession, at: SystemTime) {
        let Some(fence) = self.placement.fence(session.slot) else {
            return;
        };
        if let Err(error) = self
            .store
            .touch_session(&fence, session.session_id, at)
            .await
        {
            tracing::debug!(session_id = %session.session_id, %error, "activity not saved");
        }
    }

    /// Active (in-memory) sessions per slot, for the heartbeat: the load placement balances.
    pub fn slot_loads(&self) -> Vec<(Slot, u64)> {
        let mut loads: HashMap<Slot, u64> = HashMap::new();
        for session in self.hot_read().values() {
            *loads.entry(session.slot).or_default() += 1;
        }
        let mut loads: Vec<(Slot, u64)> = loads.into_iter().collect();
        loads.sort_unstable();
        loads
    }

    /// Passivates every hot session with no call in progress (used on shutdown and by the
    /// memory benchmark).
    pub async fn passivate_all(&self) {
        let all: Vec<Arc<HotSession>> = self.hot().values().cloned().collect();
        let now = SystemTime::now() + Duration::from_secs(1);
        for session in all {
            self.passivate_if_idle(&session, now).await;
        }
        self.shrink();
    }

    /// Gives back the memory of a map that emptied out, so passivation frees what it should.
    pub(super) fn shrink(&self) {
        let mut hot = self.hot();
        if hot.capacity() > 64 && hot.len() < hot.capacity() / 4 {
            hot.shrink_to_fit();
        }
    }

    /// How often the idle reaper should run for these timeouts.
    pub fn reap_interval(&self) -> Duration {
        (self.limits.idle_timeout.min(self.limits.passivate_after) / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(5))
    }
}
