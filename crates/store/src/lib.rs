//! The `SessionStore` trait and its implementations: `MemoryStore`, and `SqlStore` on
//! SQLite (the default, embedded) or PostgreSQL (for many nodes), both through sqlx.

mod memory;
mod placement;
mod queued;
pub mod sealing;
mod sql;
#[cfg(feature = "testing")]
pub mod testing;

use std::time::SystemTime;

use async_trait::async_trait;
use switchyard_core::{
    ContextMessage, Epoch, ErrorCode, Message, ServiceError, Session, SessionId, Slot, UserId,
    WorkerId,
};

pub use memory::MemoryStore;
pub use placement::StoredPlacement;
pub use queued::{Append, AppendTicket, Durability, QueuedAppend};
pub use sql::{GroupCommitStats, SqlStore, SqlStoreOptions};

/// How far a session's stored activity time lags its appends at most. An append moves it
/// only once it is this much newer, so most appends leave the activity index alone (on
/// PostgreSQL, their update of the session's row stays in place). The worker keeps the
/// exact time in memory and saves it when the session leaves memory or is handed over
/// ([`SessionStore::touch_session`]); only a worker that stops without a drain, or dies,
/// loses up to this much of it, against idle timeouts of minutes.
pub const ACTIVITY_STEP: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("session {0} not found")]
    SessionNotFound(SessionId),
    #[error("session {0} already exists")]
    SessionExists(SessionId),
    /// The writer no longer holds the slot's lease at its epoch: another worker owns it.
    #[error(
        "slot {slot} has moved to another worker (this worker's lease at epoch {epoch} is gone); retry"
    )]
    Fenced { slot: Slot, epoch: Epoch },
    #[error("session store unavailable: {0}")]
    Unavailable(String),
    #[error("session store holds invalid data: {0}")]
    Corrupt(String),
    /// A request id sent with another kind of call than the one that first used it.
    #[error("request_id: {request_id:?} was used on this session by a call of another kind")]
    RequestIdReused { request_id: String },
    /// An append queued to follow another (a turn's reply after its user message) whose
    /// predecessor was not committed: it is not committed either.
    #[error("session {0}: the message this append follows was not committed")]
    PredecessorNotCommitted(SessionId),
}

impl ServiceError for StoreError {
    fn error_code(&self) -> ErrorCode {
        match self {
            StoreError::SessionNotFound(_) => ErrorCode::NotFound,
            StoreError::SessionExists(_) | StoreError::Corrupt(_) => ErrorCode::Internal,
            StoreError::Fenced { .. }
            | StoreError::Unavailable(_)
            | StoreError::PredecessorNotCommitted(_) => ErrorCode::Unavailable,
            StoreError::RequestIdReused { .. } => ErrorCode::InvalidArgument,
        }
    }

    fn field_violation(&self) -> Option<(&str, &str)> {
        match self {
            StoreError::RequestIdReused { .. } => Some((
                "request_id",
                "was used on this session by a call of another kind",
            )),
            _ => None,
        }
    }
}

/// What a turn consumed, as kept with its request id so that a retry can answer with it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TurnUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub compute_seconds: f64,
}

/// How a caller's request id makes an append happen once.
#[derive(Debug, Clone, PartialEq)]
pub enum AppendKey {
    /// Every call appends.
    None,
    /// The first append with `id` on the session writes; a repeat writes nothing and is
    /// answered with the first's last seq. `turn` marks a turn's user message.
    Request { id: String, turn: bool },
    /// A turn's reply: its seq and usage are kept with the turn's request id, in the same
    /// transaction as the reply.
    Reply { id: String, usage: TurnUsage },
}

/// The outcome of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub last_seq: u64,
    /// False when an earlier append with the same request id had written it.
    pub written: bool,
}

/// What the store keeps of a request id.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord {
    /// A SendMessage (true) or an AppendContext.
    pub turn: bool,
    /// The last seq the call appended: a turn's user message.
    pub last_seq: u64,
    /// A turn's committed reply: its seq and usage.
    pub reply: Option<(u64, TurnUsage)>,
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The right to write a slot's data: the slot's lease, held by `owner` since `epoch`.
/// Every write carries one and is refused unless the lease is still exactly that.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fence {
    pub slot: Slot,
    pub owner: WorkerId,
    pub epoch: Epoch,
}

/// A slot's lease as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotLease {
    pub slot: Slot,
    pub owner: WorkerId,
    pub epoch: Epoch,
    /// Given up by `owner` at the end of a handoff: the next owner takes it at once.
    pub released: bool,
}

/// A session that has seen no call since `last_activity_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdleSession {
    pub id: SessionId,
    pub slot: Slot,
    pub last_activity_at: SystemTime,
}

/// A user's quota override of one resource, as the store keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredLimit {
    /// The resource's name (`tokens`, `api_calls`, …).
    pub resource: String,
    pub limit: f64,
    /// Zero for resources that are a level, not a rate.
    pub window_us: u64,
}

/// A user's usage of one windowed resource, encoded by its owner (the store keeps it whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredUsage {
    pub user_id: UserId,
    pub resource: String,
    pub state: String,
    /// The owner's count of changes to the user's windows: a write never replaces a newer
    /// version with an older one, whichever of two writes commits last.
    pub version: u64,
}

/// What the store keeps of a user's quota: overrides, and windowed usage.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UserQuotaRecord {
    pub overrides: Vec<StoredLimit>,
    pub usage: Vec<StoredUsage>,
}

/// Durable home of sessions and their contexts. Every write returns only after it is
/// committed, and only if its [`Fence`] still holds, checked in the same transaction.
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// The id of the cluster this store belongs to, created with the store.
    async fn cluster_id(&self) -> Result<String>;

    /// Takes the leases of `slots` for `owner` at `epoch`, where no lease at `epoch` or
    /// later exists. Returns the slots now held (at `epoch`); the others are held by a
    /// newer epoch and must not be written by `owner`.
    async fn acquire_slots(
        &self,
        owner: &WorkerId,
        epoch: Epoch,
        slots: &[Slot],
    ) -> Result<Vec<Slot>>;

    /// The highest epoch any lease was taken at, so a restarted coordinator continues above it.
    async fn max_lease_epoch(&self) -> Result<Epoch>;

    /// The leases held on `slots` (slots never leased are left out), in slot order.
    async fn slot_leases(&self, slots: &[Slot]) -> Result<Vec<SlotLease>>;

    /// Gives up leases at the end of a handoff, each only if still held exactly as `fences`
    /// says; returns how many were released. A released lease admits no more writes.
    async fn release_slots(&self, fences: &[Fence]) -> Result<usize>;

    /// Keeps the coordinator's placement table, unless one at the same or a newer epoch is
    /// already kept; returns whether it was written.
    async fn save_placement(&self, placement: &StoredPlacement) -> Result<bool>;

    /// The newest placement table kept, if any.
    async fn load_placement(&self) -> Result<Option<StoredPlacement>>;

    async fn create_session(&self, fence: &Fence, session: &Session) -> Result<()>;

    async fn get_session(&self, session_id: SessionId) -> Result<Option<Session>>;

    /// A user's sessions, least recently created first.
    async fn list_user_sessions(&self, user_id: &UserId) -> Result<Vec<Session>>;

    /// Deletes a session and its context; false when there was nothing to delete.
    async fn delete_session(&self, fence: &Fence, session_id: SessionId) -> Result<bool>;

    /// Appends messages in order and returns the sequence number of the last one. The
    /// session's activity time becomes `at` once `at` is [`ACTIVITY_STEP`] past it.
    async fn append_messages(
        &self,
        fence: &Fence,
        session_id: SessionId,
        messages: &[Message],
        at: SystemTime,
    ) -> Result<u64> {
        Ok(self
            .append_keyed(fence, session_id, messages, at, &AppendKey::None, u64::MAX)
            .await?
            .last_seq)
    }

    /// Appends as [`SessionStore::append_messages`] does, once per request id: the id is
    /// kept in the same transaction as the messages, and a repeat writes nothing. The
    /// session then keeps only its newest `keep_last` messages: older ones are dropped in
    /// the same transaction, and seqs go on from where they were.
    async fn append_keyed(
        &self,
        fence: &Fence,
        session_id: SessionId,
        messages: &[Message],
        at: SystemTime,
        key: &AppendKey,
        keep_last: u64,
    ) -> Result<Appended>;

    /// Queues an append and returns as soon as it has its place in its session's order
    /// (at once, unless the store's queue is full), before it commits: its outcome comes
    /// from [`QueuedAppend::outcome`]. With `after`, it commits only if that append, queued
    /// earlier on the same session, did: a turn's reply follows its user message. An
    /// append of [`Durability::WithNext`] is durable once a later durable commit is.
    ///
    /// This default commits at once, in full, and saves the usage after the append: right
    /// for a store with no disk, which a crash empties whole.
    async fn queue_append(
        &self,
        append: Append,
        after: Option<&AppendTicket>,
    ) -> Result<QueuedAppend> {
        let committed = match after {
            Some(after) => after.committed().await,
            None => true,
        };
        let outcome = if committed {
            self.append_keyed(
                &append.fence,
                append.session_id,
                &append.messages,
                append.at,
                &append.key,
                append.keep_last,
            )
            .await
        } else {
            Err(StoreError::PredecessorNotCommitted(append.session_id))
        };
        if matches!(outcome, Ok(Appended { written: true, .. })) && !append.usage.is_empty() {
            let usage: Vec<(Fence, StoredUsage)> = append
                .usage
                .into_iter()
                .map(|usage| (append.fence.clone(), usage))
                .collect();
            self.save_usage(&usage).await?;
        }
        Ok(QueuedAppend::settled(outcome))
    }

    /// What the store keeps of a request id of the session, if it has seen it (nothing for a
    /// session that does not exist).
    async fn request_record(
        &self,
        session_id: SessionId,
        request_id: &str,
    ) -> Result<Option<RequestRecord>>;

    /// The newest `limit` system messages with `seq < before_seq`, in seq order: the
    /// instructions a turn sends its agent from before its window.
    async fn read_system_messages(
        &self,
        session_id: SessionId,
        before_seq: u64,
        limit: u32,
    ) -> Result<Vec<ContextMessage>>;

    /// Messages with `seq > after_seq`, only the last `last_n` of them when it is positive.
    async fn read_context(
        &self,
        session_id: SessionId,
        last_n: u32,
        after_seq: u64,
    ) -> Result<Vec<ContextMessage>>;

    /// At most `limit` messages with `seq > after_seq`, in seq order: one page.
    async fn read_context_page(
        &self,
        session_id: SessionId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<ContextMessage>>;

    /// Records activity on a session that wrote nothing (when it leaves memory).
    async fn touch_session(
        &self,
        fence: &Fence,
        session_id: SessionId,
        at: SystemTime,
    ) -> Result<()>;

    /// Up to `limit` sessions in `slots` whose last activity is before `before`.
    async fn idle_sessions(
        &self,
        slots: &[Slot],
        before: SystemTime,
        limit: usize,
    ) -> Result<Vec<IdleSession>>;

    /// How many sessions the store holds in `slots`, hot or not.
    async fn count_sessions(&self, slots: &[Slot]) -> Result<u64>;

    /// A user's quota overrides and saved usage.
    async fn load_user_quota(&self, user_id: &UserId) -> Result<UserQuotaRecord>;

    /// Sets overrides of a user's quota (each replaces the one of its resource); `clear`
    /// first drops every override the user has. One transaction, fenced by the user's slot.
    async fn set_user_quota(
        &self,
        fence: &Fence,
        user_id: &UserId,
        overrides: &[StoredLimit],
        clear: bool,
    ) -> Result<()>;

    /// Saves usage, each under the fence of its user's slot; entries whose fence no longer
    /// holds are skipped; of several for one user and resource, the last counts. One
    /// statement; returns how many (user, resource) rows were saved.
    async fn save_usage(&self, usage: &[(Fence, StoredUsage)]) -> Result<usize>;

    /// Drops a user's saved usage and quota overrides, in one transaction fenced by the
    /// user's slot; returns whether there was usage, and whether there were overrides.
    async fn erase_user_quota(&self, fence: &Fence, user_id: &UserId) -> Result<(bool, bool)>;

    /// Content bytes of every message of every session of the user.
    async fn user_storage_bytes(&self, user_id: &UserId) -> Result<u64>;
}
