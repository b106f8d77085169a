//! `MemoryStore`: sessions and contexts in process memory.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use switchyard_core::{ContextMessage, Message, Session, SessionId, Slot, UserId};

use crate::{IdleSession, Result, SessionStore, StoreError};

#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    sessions: HashMap<SessionId, StoredSession>,
    /// Session ids per user, in creation order.
    by_user: HashMap<UserId, Vec<SessionId>>,
}

struct StoredSession {
    session: Session,
    messages: Vec<ContextMessage>,
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
    async fn create_session(&self, session: &Session) -> Result<()> {
        let mut inner = self.lock();
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

    async fn delete_session(&self, session_id: SessionId) -> Result<bool> {
        let mut inner = self.lock();
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

    async fn append_messages(
        &self,
        session_id: SessionId,
        messages: &[Message],
        at: SystemTime,
    ) -> Result<u64> {
        let mut inner = self.lock();
        let stored = inner
            .sessions
            .get_mut(&session_id)
            .ok_or(StoreError::SessionNotFound(session_id))?;
        for message in messages {
            let seq = stored.messages.len() as u64 + 1;
            stored.messages.push(ContextMessage {
                seq,
                role: message.role,
                content: message.content.clone(),
                name: message.name.clone(),
                created_at: at,
            });
        }
        stored.session.message_count = stored.messages.len() as u64;
        stored.session.last_activity_at = at;
        Ok(stored.session.message_count)
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
        // Seqs are 1, 2, 3, … so seq `n` sits at index `n - 1`.
        let start = usize::try_from(after_seq)
            .unwrap_or(usize::MAX)
            .min(stored.messages.len());
        let mut selected = &stored.messages[start..];
        if last_n > 0 && selected.len() > last_n as usize {
            selected = &selected[selected.len() - last_n as usize..];
        }
        Ok(selected.to_vec())
    }

    async fn touch_session(&self, session_id: SessionId, at: SystemTime) -> Result<()> {
        let mut inner = self.lock();
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
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use switchyard_core::Role;

    use super::*;

    fn session(user: &str) -> Session {
        let now = SystemTime::now();
        Session {
            id: SessionId::new_random(),
            user_id: UserId::parse(user).unwrap(),
            slot: 3,
            created_at: now,
            last_activity_at: now,
            metadata: BTreeMap::new(),
            message_count: 0,
        }
    }

    fn text(content: &str) -> Message {
        Message {
            role: Role::User,
            content: content.to_string(),
            name: String::new(),
        }
    }

    #[tokio::test]
    async fn context_windows() {
        let store = MemoryStore::new();
        let session = session("alice");
        store.create_session(&session).await.unwrap();
        let batch: Vec<Message> = (1..=5).map(|i| text(&format!("m{i}"))).collect();
        assert_eq!(
            store
                .append_messages(session.id, &batch, SystemTime::now())
                .await,
            Ok(5)
        );
        let seqs =
            |messages: Vec<ContextMessage>| messages.iter().map(|m| m.seq).collect::<Vec<_>>();
        assert_eq!(
            seqs(store.read_context(session.id, 0, 0).await.unwrap()),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(
            seqs(store.read_context(session.id, 2, 0).await.unwrap()),
            [4, 5]
        );
        assert_eq!(
            seqs(store.read_context(session.id, 0, 3).await.unwrap()),
            [4, 5]
        );
        assert_eq!(
            seqs(store.read_context(session.id, 1, 2).await.unwrap()),
            [5]
        );
        assert!(
            store
                .read_context(session.id, 0, u64::MAX)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn delete_removes_everything() {
        let store = MemoryStore::new();
        let first = session("alice");
        let second = session("alice");
        store.create_session(&first).await.unwrap();
        store.create_session(&second).await.unwrap();
        assert!(store.delete_session(first.id).await.unwrap());
        assert!(!store.delete_session(first.id).await.unwrap());
        let left = store.list_user_sessions(&first.user_id).await.unwrap();
        assert_eq!(left.iter().map(|s| s.id).collect::<Vec<_>>(), [second.id]);
        assert_eq!(
            store
                .append_messages(first.id, &[text("x")], SystemTime::now())
                .await,
            Err(StoreError::SessionNotFound(first.id))
        );
    }

    #[tokio::test]
    async fn idle_sessions_respect_slots_and_time() {
        let store = MemoryStore::new();
        let old = session("alice");
        store.create_session(&old).await.unwrap();
        let later = SystemTime::now() + Duration::from_secs(60);
        let idle = store.idle_sessions(&[3], later, 10).await.unwrap();
        assert_eq!(idle.len(), 1);
        assert!(
            store
                .idle_sessions(&[4], later, 10)
                .await
                .unwrap()
                .is_empty()
        );
        store.touch_session(old.id, later).await.unwrap();
        assert!(
            store
                .idle_sessions(&[3], later, 10)
                .await
                .unwrap()
                .is_empty()
        );
    }
}
