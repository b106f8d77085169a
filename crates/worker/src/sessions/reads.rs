//! Reads of a context: from the tail cache when it covers them, otherwise from the store.

use switchyard_core::window::MAX_OLDER_SYSTEM_MESSAGES;
use switchyard_core::{ContextMessage, ContextWindow, Message};
use switchyard_store::RequestRecord;

use super::{SessionCall, SessionManager};
use crate::context_cache::{self, ContextCache};
use crate::error::Result;

/// The oldest seq a context of `last_seq` messages still holds when it keeps `keep_last`.
pub fn history_start(last_seq: u64, keep_last: u64) -> u64 {
    last_seq.saturating_sub(keep_last.max(1)) + 1
}

impl SessionManager {
    /// What a turn sends its agent: the newest messages that fit `window`, after the system
    /// messages before them. `pending` is the turn's own message when its commit has only
    /// begun: it ends the window, numbered as it will be stored.
    pub async fn context_window(
        &self,
        call: &SessionCall,
        window: &ContextWindow,
        pending: Option<&Message>,
    ) -> Result<Vec<ContextMessage>> {
        let stored = window
            .max_messages
            .saturating_sub(usize::from(pending.is_some()))
            .max(1);
        let last_n = u32::try_from(stored).unwrap_or(u32::MAX);
        let mut newest = self.context(call, last_n, 0).await?;
        if let Some(message) = pending {
            let last = newest
                .last()
                .map_or(0, |message| message.seq)
                .max(call.session.message_count());
            newest.push(ContextMessage {
                seq: last + 1,
                role: message.role,
                content: message.content.clone(),
                name: message.name.clone(),
                created_at: std::time::SystemTime::now(),
            });
        }
        let first = newest.first().map_or(1, |message| message.seq);
        let older_system = if first > 1 {
            self.system_before(call, first).await?
        } else {
            Vec::new()
        };
        Ok(window.select(older_system, newest))
    }

    /// The newest system messages before `before_seq`: from the tail cache, which asks the
    /// store once for those before it and then keeps them as the tail moves on.
    async fn system_before(
        &self,
        call: &SessionCall,
        before_seq: u64,
    ) -> Result<Vec<ContextMessage>> {
        let session_id = call.session.session_id;
        let tail_first = {
            let activity = call.session.activity();
            match activity.cache.as_ref() {
                Some(cache) => {
                    if let Some(found) = cache.system_before(before_seq) {
                        return Ok(found);
                    }
                    (!cache.knows_system_before_tail() && before_seq >= cache.first_seq())
                        .then(|| cache.first_seq())
                }
                None => None,
            }
        };
        if let Some(tail_first) = tail_first {
            let older = self
                .store
                .read_system_messages(session_id, tail_first, MAX_OLDER_SYSTEM_MESSAGES as u32)
                .await?;
            let mut activity = call.session.activity();
            // Kept only if the tail has not moved meanwhile.
            if let Some(cache) = activity.cache.as_mut()
                && cache.first_seq() == tail_first
            {
                cache.set_system_before_tail(older);
                if let Some(found) = cache.system_before(before_seq) {
                    return Ok(found);
                }
            }
        }
        Ok(self
            .store
            .read_system_messages(session_id, before_seq, MAX_OLDER_SYSTEM_MESSAGES as u32)
            .await?)
    }

    /// The message at `seq` of the call's session, if it is still stored.
    pub async fn message_at(&self, call: &SessionCall, seq: u64) -> Result<Option<ContextMessage>> {
        let page = self
            .store
            .read_context_page(call.session.session_id, seq.saturating_sub(1), 1)
            .await?;
        Ok(page.into_iter().find(|message| message.seq == seq))
    }

    /// What the store keeps of a request id of the call's session.
    pub async fn request_record(
        &self,
        call: &SessionCall,
        request_id: &str,
    ) -> Result<Option<RequestRecord>> {
        Ok(self
            .store
            .request_record(call.session.session_id, request_id)
            .await?)
    }

    /// Reads a context: from memory when the cached tail covers the request, otherwise
    /// from the store (loading the tail for the next reads).
    pub async fn context(
        &self,
        call: &SessionCall,
        last_n: u32,
        after_seq: u64,
    ) -> Result<Vec<ContextMessage>> {
        if let Some(messages) = self.cached_context(call, last_n, after_seq) {
            return Ok(messages);
        }
        let session_id = call.session.session_id;
        if call.session.activity().cache.is_none() {
            let expected_last = call.session.message_count();
            let tail = self
                .store
                .read_context(session_id, context_cache::MAX_MESSAGES as u32, 0)
                .await?;
            let mut activity = call.session.activity();
            // Installed only if no append landed while the tail was read.
            if activity.cache.is_none() && activity.message_count == expected_last {
                activity.cache = ContextCache::from_tail(&tail, expected_last);
            }
            drop(activity);
            if let Some(messages) = self.cached_context(call, last_n, after_seq) {
                return Ok(messages);
            }
        }
        Ok(self
            .store
            .read_context(session_id, last_n, after_seq)
            .await?)
    }

    /// One page of a context: the messages after `after_seq` (only the last `last_n` when
    /// positive), at most `max_page_messages` of them and `max_page_bytes` of content
    /// (always at least one). The flag says whether more follow.
    pub async fn context_page(
        &self,
        call: &SessionCall,
        last_n: u32,
        after_seq: u64,
    ) -> Result<(Vec<ContextMessage>, bool)> {
        let mut after = after_seq;
        if last_n > 0 {
            after = after.max(
                call.session
                    .message_count()
                    .saturating_sub(u64::from(last_n)),
            );
        }
        // One more than a page, to learn whether more follow.
        let wanted = self.limits.max_page_messages.saturating_add(1);
        let mut messages = match self.cached_context(call, 0, after) {
            Some(mut cached) => {
                cached.truncate(wanted);
                cached
            }
            None => {
                let limit = u32::try_from(wanted).unwrap_or(u32::MAX);
                self.store
                    .read_context_page(call.session.session_id, after, limit)
                    .await?
            }
        };
        let mut bytes = 0usize;
        let fits = messages
            .iter()
            .take(self.limits.max_page_messages)
            .position(|message| {
                bytes = bytes.saturating_add(message.content.len());
                bytes > self.limits.max_page_bytes
            })
            .map_or(messages.len().min(self.limits.max_page_messages), |over| {
                over.max(1)
            });
        let truncated = messages.len() > fits;
        messages.truncate(fits);
        Ok((messages, truncated))
    }

    pub(super) fn cached_context(
        &self,
        call: &SessionCall,
        last_n: u32,
        after_seq: u64,
    ) -> Option<Vec<ContextMessage>> {
        call.session
            .activity()
            .cache
            .as_ref()?
            .read(last_n, after_seq)
    }
}
