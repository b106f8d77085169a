//! The `SessionStore` trait and its implementations.

mod memory;

use std::time::SystemTime;

use async_trait::async_trait;
use switchyard_core::{
    ContextMessage, ErrorCode, Message, ServiceError, Session, SessionId, Slot, UserId,
};

pub use memory::MemoryStore;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("session {0} not found")]
    SessionNotFound(SessionId),
    #[error("session {0} already exists")]
    SessionExists(SessionId),
    #[error("session store unavailable: {0}")]
    Unavailable(String),
}

impl ServiceError for StoreError {
    fn error_code(&self) -> ErrorCode {
        match self {
            StoreError::SessionNotFound(_) => ErrorCode::NotFound,
            StoreError::SessionExists(_) => ErrorCode::Internal,
            StoreError::Unavailable(_) => ErrorCode::Unavailable,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A session that has seen no call since `last_activity_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdleSession {
    pub id: SessionId,
    pub slot: Slot,
    pub last_activity_at: SystemTime,
}

/// Durable home of sessions and their contexts. Every method returns only after its write
/// is committed.
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    async fn create_session(&self, session: &Session) -> Result<()>;

    async fn get_session(&self, session_id: SessionId) -> Result<Option<Session>>;

    /// A user's sessions, least recently created first.
    async fn list_user_sessions(&self, user_id: &UserId) -> Result<Vec<Session>>;

    /// Deletes a session and its context; false when there was nothing to delete.
    async fn delete_session(&self, session_id: SessionId) -> Result<bool>;

    /// Appends messages in order and returns the sequence number of the last one. The
    /// session's activity time becomes `at`.
    async fn append_messages(
        &self,
        session_id: SessionId,
        messages: &[Message],
        at: SystemTime,
    ) -> Result<u64>;

    /// Messages with `seq > after_seq`, only the last `last_n` of them when it is positive.
    async fn read_context(
        &self,
        session_id: SessionId,
        last_n: u32,
        after_seq: u64,
    ) -> Result<Vec<ContextMessage>>;

    /// Records activity on a session that wrote nothing.
    async fn touch_session(&self, session_id: SessionId, at: SystemTime) -> Result<()>;

    /// Up to `limit` sessions in `slots` whose last activity is before `before`.
    async fn idle_sessions(
        &self,
        slots: &[Slot],
        before: SystemTime,
        limit: usize,
    ) -> Result<Vec<IdleSession>>;
}
