//! Appends to a session's context: at once (AppendContext), or queued so that a turn's
//! agent runs while its user message commits, and its reply follows it.

use std::sync::Arc;
use std::time::SystemTime;

use switchyard_core::Message;
use switchyard_store::{Append, AppendKey, AppendTicket, Appended, Durability, QueuedAppend};

use super::{SessionCall, SessionManager, history_start};
use crate::error::Result;
use crate::quotas::{StorageCharge, UnsavedUsage};

/// An append in the store's queue; [`PendingAppend::finish`] waits for its commit and
/// brings the session's cached tail up to date.
pub struct PendingAppend {
    queued: QueuedAppend,
    /// The bytes reserved of the user's `storage_bytes`, given back if the append fails.
    storage: StorageCharge,
    /// The user's usage, saved in the append's transaction; marked saved once committed.
    usage: Option<UnsavedUsage>,
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
        let appended = match self.queued.outcome().await {
            Ok(appended) => appended,
            Err(error) => {
                self.storage.give_back();
                return Err(sessions.store_error(slot, error));
            }
        };
        if appended.written {
            self.storage.keep();
            if let Some(usage) = &self.usage {
                sessions.quotas.saved_with(usage);
            }
        } else {
            // A repeat of a request id: nothing new was stored.
            self.storage.give_back();
        }
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
        let storage = match &call.user_id {
            Some(user_id) => {
                let bytes = messages
                    .iter()
                    .map(|message| message.content.len() as u64)
                    .sum();
                self.quotas.reserve_storage(user_id, bytes).await?
            }
            None => StorageCharge::none(),
        };
        if let AppendKey::Request { id, .. } = &key {
            call.session.record_request(id);
        }
        let at = SystemTime::now();
        // The context keeps its newest max_context_messages: older ones are dropped in the
        // same transaction.
        let keep_last = self.limits.max_context_messages;
        // A durable append carries the user's usage: a turn's reply carries what the turn
        // used (its user message, made durable by the reply, need not).
        let usage = call
            .user_id
            .as_ref()
            .filter(|_| durability == Durability::Now)
            .and_then(|user_id| self.quotas.unsaved(user_id));
        let (usage, carried) = match usage {
            Some((usage, carried)) => (Some(usage), carried),
            None => (None, Vec::new()),
        };
        let append = Append {
            fence,
            session_id: call.session.session_id,
            messages: messages.clone(),
            at,
            key,
            keep_last,
            durability,
            usage: carried,
        };
        let queued = self
            .store
            .queue_append(append, after)
            .await
            .map_err(|error| self.store_error(slot, error))?;
        Ok(PendingAppend {
            queued,
            storage,
            usage,
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
        if first_kept > 1
            && let Some(user_id) = &call.user_id
        {
            // Dropped history no longer counts against the user's storage.
            self.quotas.storage_changed(user_id);
        }
        match &mut activity.cache {
            Some(cache) if cache.first_seq() < first_kept => activity.cache = None,
            Some(cache) => cache.forget_before(first_kept),
            None => {}
        }
    }
}
