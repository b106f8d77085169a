//! Appends to a session's context: at once (AppendContext), or queued so that a turn's
//! agent runs while its user message commits, and its reply follows it.

use std::sync::Arc;
use std::time::SystemTime;

use switchyard_core::Message;
use switchyard_store::{Append, AppendKey, AppendTicket, Appended, Durability, QueuedAppend};

use super::{SessionCall, SessionManager, history_start};
use crate::error::Result;

/// An append in the store's queue; [`PendingAppend::finish`] waits for its commit and
/// brings the session's cached tail up to date.
pub struct PendingAppend {
    queued: QueuedAppend,
    /// The messages, for the cached tail (shared with the store's queue).
    messages: Arc<[Message]>,
    at: SystemTime,
    keep_last: u64,
}

impl PendingAppend {
    /// What an append queued to follow this one passes as `after`.
    pub fn ticket(&self) -> &AppendTicket {
        self.queued.ticket()
    }

    /// Waits for the commit, then records it on the session.
    pub async fn finish(self, sessions: &SessionManager, call: &SessionCall) -> Result<Appended> {
        let slot = call.session.slot;
        let appended = self
            .queued
            .outcome()
            .await
            .map_err(|error| sessions.store_error(slot, error))?;
        sessions.record_append(call, &self.messages, self.at, self.keep_last, appended);
        Ok(appended)
    }
}

impl SessionManager {
    /// Appends messages to a session's context and returns the last seq.
    pub async fn append(&self, call: &SessionCall, messages: &[Message]) -> Result<u64> {
        Ok(self
            .append_keyed(call, messages, &AppendKey::None)
            .await?
            .last_seq)
    }

    /// Appends once per request id (see [`AppendKey`]); a repeat writes nothing. Durable
    /// when it returns.
    pub async fn append_keyed(
        &self,
        call: &SessionCall,
        messages: &[Message],
        key: &AppendKey,
    ) -> Result<Appended> {
        self.queue_append(call, messages.into(), key.clone(), Durability::Now, None)
            .await?
            .finish(self, call)
            .await
    }

    /// Queues an append and returns once it has its place in the session's order, before it
    /// commits. With `after`, it commits only if that append (queued earlier on this
    /// session) did.
    pub async fn queue_append(
        &self,
        call: &SessionCall,
        messages: Arc<[Message]>,
        key: AppendKey,
        durability: Durability,
        after: Option<&AppendTicket>,
    ) -> Result<PendingAppend> {
        let slot = call.session.slot;
        let fence = self.call_fence(call)?;
        if let AppendKey::Request { id, .. } = &key {
            call.session.record_request(id);
        }
        let at = SystemTime::now();
        // The context keeps its newest max_context_messages: older ones are dropped in the
        // same transaction.
        let keep_last = self.limits.max_context_messages;
        let append = Append {
            fence,
            session_id: call.session.session_id,
            messages: messages.clone(),
            at,
            key,
            keep_last,
            durability,
        };
        let queued = self
            .store
            .queue_append(append, after)
            .await
            .map_err(|error| self.store_error(slot, error))?;
        Ok(PendingAppend {
            queued,
            messages,
            at,
            keep_last,
        })
    }

    /// Brings the session's count and cached tail up to date with a committed append.
    fn record_append(
        &self,
        call: &SessionCall,
        messages: &[Message],
        at: SystemTime,
        keep_last: u64,
        appended: Appended,
    ) {
        if !appended.written {
            return;
        }
        let last_seq = appended.last_seq;
        let mut activity = call.session.activity();
        activity.message_count = activity.message_count.max(last_seq);
        let first_seq = last_seq + 1 - messages.len() as u64;
        if let Some(cache) = &mut activity.cache
            && !cache.append(first_seq, messages, at)
        {
            // Another append committed in between: reload on the next read.
            activity.cache = None;
        }
        // A bound below the cache's size: the cache may hold what the store dropped.
        let first_kept = history_start(last_seq, keep_last);
        match &mut activity.cache {
            Some(cache) if cache.first_seq() < first_kept => activity.cache = None,
            Some(cache) => cache.forget_before(first_kept),
            None => {}
        }
    }
}
