//! The order of turns on a session (its double-text policy), the request ids of the turns
//! in flight, and which request ids the session can hold at all.

use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use switchyard_core::DoubleText;

use super::{EntryState, HotSession};
use crate::error::WorkerError;

/// Request ids one session may have before this worker stops keeping them and asks the
/// store about each turn's instead.
const MAX_KNOWN_REQUEST_IDS: usize = 1024;

/// What this worker knows of a session's request ids without asking the store.
pub(super) enum KnownRequestIds {
    /// Every request id the store may hold for the session (hashed): the session was created
    /// here under the current lease, and each id was recorded before its write was queued.
    All(HashSet<u64>),
    /// The store may hold ids this worker has not seen.
    Unknown,
}

impl KnownRequestIds {
    pub(super) fn none_yet() -> Self {
        KnownRequestIds::All(HashSet::new())
    }
}

fn request_id_hash(request_id: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    request_id.hash(&mut hasher);
    hasher.finish()
}

/// A turn's request id, in flight on this worker while this lives.
pub struct TurnRequest {
    session: Arc<HotSession>,
    pub request_id: String,
}

impl TurnRequest {
    /// No longer in flight: its result is committed, and a repeat now replays it.
    pub fn finish(&self) {
        self.session
            .activity()
            .turn_requests
            .remove(&self.request_id);
    }
}

impl Drop for TurnRequest {
    fn drop(&mut self) {
        self.finish();
    }
}

impl HotSession {
    /// Marks the turn of `request_id` as in flight on this worker until the guard drops;
    /// `None` when a turn with that id already is.
    pub fn begin_turn_request(self: &Arc<Self>, request_id: &str) -> Option<TurnRequest> {
        if !self.activity().turn_requests.insert(request_id.to_string()) {
            return None;
        }
        Some(TurnRequest {
            session: self.clone(),
            request_id: request_id.to_string(),
        })
    }

    /// Joins the turns waiting for this session's, unless `max_queued` already wait; `then`
    /// runs under the same lock.
    fn join_queue<T>(
        &self,
        max_queued: usize,
        then: impl FnOnce(&mut super::Activity) -> T,
    ) -> Result<T, WorkerError> {
        let mut activity = self.activity();
        if usize::from(activity.queued) >= max_queued {
            return Err(WorkerError::TurnQueueFull {
                session_id: self.session_id,
                queued: max_queued,
            });
        }
        activity.queued += 1;
        Ok(then(&mut activity))
    }

    /// Takes the session's turn according to its double-text policy: at once if no turn
    /// runs; otherwise refused (reject), after the running and queued turns (enqueue, within
    /// `max_queued`), or after cancelling the running turn (interrupt). The token cancels the
    /// turn that takes it, should a newer message interrupt it.
    pub async fn take_turn(
        &self,
        max_queued: usize,
    ) -> Result<(tokio::sync::MutexGuard<'_, ()>, CancellationToken), WorkerError> {
        let guard = match self.turn.try_lock() {
            Ok(guard) => guard,
            Err(_) => match self.double_text {
                DoubleText::Reject => return Err(WorkerError::TurnInProgress(self.session_id)),
                DoubleText::Enqueue => {
                    self.join_queue(max_queued, |_| ())?;
                    // Leaves the queue however the wait ends, cancellation included.
                    let _leave = scopeguard(|| self.activity().queued -= 1);
                    self.turn.lock().await
                }
                DoubleText::Interrupt => {
                    // Bounded like the enqueue policy's queue.
                    let generation = self.join_queue(max_queued, |activity| {
                        if let Some(running) = &activity.running {
                            running.cancel();
                        }
                        activity.interrupts += 1;
                        activity.interrupts
                    })?;
                    let _leave = scopeguard(|| self.activity().queued -= 1);
                    let guard = self.turn.lock().await;
                    // A newer message interrupted while this one waited: only the newest runs.
                    if self.activity().interrupts != generation {
                        return Err(WorkerError::Interrupted);
                    }
                    guard
                }
            },
        };
        let token = CancellationToken::new();
        let mut activity = self.activity();
        if activity.handing_over {
            return Err(WorkerError::HandedOver(self.session_id));
        }
        activity.running = Some(token.clone());
        Ok((guard, token))
    }

    /// Whether the store may hold `request_id` for this session: false only when this worker
    /// knows every id the session has, and not this one. A new turn needs no look-up then.
    pub fn may_hold_request(&self, request_id: &str) -> bool {
        match &self.activity().known_request_ids {
            KnownRequestIds::All(known) => known.contains(&request_id_hash(request_id)),
            KnownRequestIds::Unknown => true,
        }
    }

    /// Records a request id before its write is queued, so that even a write whose outcome
    /// is never learned counts.
    pub(super) fn record_request(&self, request_id: &str) {
        let mut activity = self.activity();
        if let KnownRequestIds::All(known) = &mut activity.known_request_ids {
            known.insert(request_id_hash(request_id));
            if known.len() > MAX_KNOWN_REQUEST_IDS {
                activity.known_request_ids = KnownRequestIds::Unknown;
            }
        }
    }

    /// The session was ended (EndSession, eviction or expiry) while this entry was held.
    pub fn is_ended(&self) -> bool {
        self.activity().state == EntryState::Ended
    }

    /// Whether the running turn was cancelled because the session's slot is moving.
    pub fn is_handing_over(&self) -> bool {
        self.activity().handing_over
    }
}

/// Runs `action` when dropped.
fn scopeguard(action: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(action) = self.0.take() {
                action();
            }
        }
    }
    Guard(Some(action))
}
