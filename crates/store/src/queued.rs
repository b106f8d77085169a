//! Appends queued for a group commit: what a caller hands the store, and the handle it
//! waits on, so that a turn can queue its user message, run its agent meanwhile, and queue
//! its reply to follow.

use std::sync::Arc;
use std::time::SystemTime;

use switchyard_core::{Message, SessionId};
use tokio::sync::{oneshot, watch};

use crate::{AppendKey, Appended, Fence, Result, StoreError, StoredUsage};

/// When an append must be on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Durable before its outcome is known.
    #[default]
    Now,
    /// Committed, and visible to reads, when its outcome is known, but durable only once
    /// a durable commit that began after it is: a turn's user message, made durable by its
    /// reply's commit. A crash may lose it, never an append that was durable after it.
    WithNext,
}

/// One append, as a store queues it.
#[derive(Debug, Clone)]
pub struct Append {
    pub fence: Fence,
    pub session_id: SessionId,
    /// Shared, so that the caller can keep them (for a cache) without a copy.
    pub messages: Arc<[Message]>,
    pub at: SystemTime,
    pub key: AppendKey,
    /// The session keeps its newest this many messages.
    pub keep_last: u64,
    pub durability: Durability,
    /// Usage of the session's user, saved in the append's transaction if it commits (under
    /// the same fence: a user's sessions are in the user's slot).
    pub usage: Vec<StoredUsage>,
}

/// Whether a queued append was committed, once that is known: what an append queued to
/// follow it looks at.
#[derive(Debug, Clone)]
pub struct AppendTicket(Arc<watch::Sender<Option<bool>>>);

impl Default for AppendTicket {
    fn default() -> Self {
        AppendTicket(Arc::new(watch::channel(None).0))
    }
}

impl AppendTicket {
    /// Records the append's fate; the first word stands.
    pub fn settle(&self, committed: bool) {
        self.0.send_if_modified(|state| {
            if state.is_some() {
                return false;
            }
            *state = Some(committed);
            true
        });
    }

    /// Whether the append was committed, if that is known yet.
    pub fn settled(&self) -> Option<bool> {
        *self.0.borrow()
    }

    /// Waits until the append's fate is known: whether it was committed.
    pub async fn committed(&self) -> bool {
        let mut state = self.0.subscribe();
        match state.wait_for(Option::is_some).await {
            Ok(settled) => settled.unwrap_or(false),
            // The sender lives in `self`, so this cannot happen; an unknown fate is a failure.
            Err(_) => false,
        }
    }

    /// Whether two tickets are those of one append.
    pub fn is(&self, other: &AppendTicket) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// An append in a store's queue.
pub struct QueuedAppend {
    ticket: AppendTicket,
    outcome: Outcome,
}

enum Outcome {
    Settled(Result<Appended>),
    Waiting(oneshot::Receiver<Result<Appended>>),
}

impl QueuedAppend {
    /// An append already committed (or refused): a store that commits at once.
    pub fn settled(outcome: Result<Appended>) -> Self {
        let ticket = AppendTicket::default();
        ticket.settle(outcome.is_ok());
        QueuedAppend {
            ticket,
            outcome: Outcome::Settled(outcome),
        }
    }

    /// An append whose outcome `answer` will bring; whoever answers settles `ticket` first.
    pub fn waiting(ticket: AppendTicket, answer: oneshot::Receiver<Result<Appended>>) -> Self {
        QueuedAppend {
            ticket,
            outcome: Outcome::Waiting(answer),
        }
    }

    /// What an append queued to follow this one passes as `after`.
    pub fn ticket(&self) -> &AppendTicket {
        &self.ticket
    }

    /// Waits for the commit (for a durable one, until it is on disk).
    pub async fn outcome(self) -> Result<Appended> {
        match self.outcome {
            Outcome::Settled(outcome) => outcome,
            Outcome::Waiting(answer) => answer.await.unwrap_or_else(|_| {
                Err(StoreError::Unavailable(
                    "the store's appender stopped before committing".into(),
                ))
            }),
        }
    }
}
