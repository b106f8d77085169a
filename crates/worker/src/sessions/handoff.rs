//! Handing slots to another worker: calls finish or are cancelled, then leases go back.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use switchyard_core::{SessionId, Slot};

use super::{EntryState, HotSession, SessionManager};
use crate::ownership::CANCEL_WAIT;

/// How many sessions' activity a handoff saves at once.
const SAVE_CONCURRENCY: usize = 8;

impl SessionManager {
    /// The first half of handing `slots` to another worker (the table already routes new
    /// calls there): lets the calls in progress finish for up to `grace`, then cancels the
    /// turns still running (they end UNAVAILABLE, committing no reply) and forgets the
    /// sessions. Returns how many calls were still in progress at the end of the grace.
    /// The slots stay refused to new calls until [`SessionManager::handed_over`].
    pub async fn hand_over(&self, slots: &HashSet<Slot>, grace: Duration) -> u32 {
        self.placement.begin_handover(slots.iter().copied());
        // Taken once: from here no call on these slots begins (`begin` checks the slot's
        // ownership after counting itself in flight), so no session joins this list later.
        let sessions: Vec<Arc<HotSession>> = self
            .hot_read()
            .values()
            .filter(|session| slots.contains(&session.slot))
            .cloned()
            .collect();
        let in_flight = || -> u32 {
            sessions
                .iter()
                .map(|session| session.activity().in_flight)
                .sum()
        };
        let deadline = tokio::time::Instant::now() + grace;
        let mut cancelled = 0;
        if !self.wait_for_calls(in_flight, deadline).await {
            cancelled = in_flight();
            for session in &sessions {
                let mut activity = session.activity();
                activity.handing_over = true;
                if let Some(running) = &activity.running {
                    running.cancel();
                }
            }
            let cancelled_by = tokio::time::Instant::now() + CANCEL_WAIT;
            self.wait_for_calls(in_flight, cancelled_by).await;
        }
        self.release_slots(|slot| !slots.contains(&slot)).await;
        // The users' usage goes to the store while the leases still allow, for the new owner.
        self.quotas.hand_over(slots).await;
        cancelled
    }

    /// Waits until `in_flight` counts no call (woken as each call ends), or `deadline`;
    /// returns whether the calls all ended.
    async fn wait_for_calls(
        &self,
        in_flight: impl Fn() -> u32,
        deadline: tokio::time::Instant,
    ) -> bool {
        loop {
            let ended = self.call_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if in_flight() == 0 {
                return true;
            }
            tokio::select! {
                () = ended => {}
                () = tokio::time::sleep_until(deadline) => return in_flight() == 0,
            }
        }
    }

    /// The end of a handoff: the slots' leases are released, and calls on them may begin
    /// again should they come back (under a new lease).
    pub fn handed_over(&self, slots: &HashSet<Slot>) {
        self.placement.end_handover(slots);
    }

    /// Drops every session from memory without saving anything, cancelling the turns still
    /// running: this worker's leases lapsed, and other workers may have written since.
    pub fn forget_all(&self) {
        let mut hot = self.hot();
        for session in hot.values() {
            let mut activity = session.activity();
            activity.state = EntryState::Passivated;
            activity.handing_over = true;
            if let Some(running) = &activity.running {
                running.cancel();
            }
        }
        hot.clear();
        hot.shrink_to_fit();
        self.quotas.forget_all();
    }

    /// Forgets hot sessions of slots this worker no longer owns, saving their activity
    /// while its fences still hold.
    pub async fn release_slots(&self, still_owned: impl Fn(Slot) -> bool) {
        let released: Vec<(Arc<HotSession>, SystemTime)> = {
            let mut hot = self.hot();
            let ids: Vec<SessionId> = hot
                .values()
                .filter(|session| !still_owned(session.slot))
                .map(|session| session.session_id)
                .collect();
            ids.iter()
                .filter_map(|id| hot.remove(id))
                .map(|session| {
                    let mut activity = session.activity();
                    activity.state = EntryState::Passivated;
                    let at = activity.last_activity_at;
                    drop(activity);
                    (session, at)
                })
                .collect()
        };
        // A few at a time: each is a round trip of its own, and a handoff waits for them all.
        futures::stream::iter(released)
            .for_each_concurrent(SAVE_CONCURRENCY, |(session, at)| async move {
                self.save_activity(&session, at).await;
            })
            .await;
    }
}
