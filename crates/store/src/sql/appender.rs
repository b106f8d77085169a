//! Group commit of appends: each lane's task drains its queue into one transaction.

use std::collections::HashMap;
use std::time::SystemTime;

use sqlx::{AnyPool, Row};
use switchyard_core::{Message, SessionId};
use tokio::sync::{mpsc, oneshot};

use super::{Backend, check_fence, micros, unavailable};
use crate::{Fence, Result, StoreError};

/// Queued appends per lane before callers wait for room.
const QUEUE_DEPTH: usize = 4096;

struct AppendRequest {
    fence: Fence,
    session_id: SessionId,
    messages: Vec<Message>,
    at: SystemTime,
    reply: oneshot::Sender<Result<u64>>,
}

pub(super) struct Appender {
    lanes: Vec<mpsc::Sender<AppendRequest>>,
}

impl Appender {
    pub(super) fn start(pool: AnyPool, backend: Backend, lanes: usize, max_batch: usize) -> Self {
        let lanes = (0..lanes)
            .map(|_| {
                let (sender, receiver) = mpsc::channel(QUEUE_DEPTH);
                tokio::spawn(run_lane(pool.clone(), backend, receiver, max_batch));
                sender
            })
            .collect();
        Appender { lanes }
    }

    /// Queues an append and waits for its batch to commit.
    pub(super) async fn append(
        &self,
        fence: Fence,
        session_id: SessionId,
        messages: Vec<Message>,
        at: SystemTime,
    ) -> Result<u64> {
        // One slot always goes to one lane, so a session's appends commit in order.
        let lane = &self.lanes[fence.slot as usize % self.lanes.len()];
        let (reply, answer) = oneshot::channel();
        let request = AppendRequest {
            fence,
            session_id,
            messages,
            at,
            reply,
        };
        lane.send(request)
            .await
            .map_err(|_| StoreError::Unavailable("the store's appender has stopped".into()))?;
        answer.await.map_err(|_| {
            StoreError::Unavailable("the store's appender stopped before committing".into())
        })?
    }
}

async fn run_lane(
    pool: AnyPool,
    backend: Backend,
    mut receiver: mpsc::Receiver<AppendRequest>,
    max_batch: usize,
) {
    let mut batch = Vec::with_capacity(max_batch);
    while receiver.recv_many(&mut batch, max_batch).await > 0 {
        let requests = std::mem::take(&mut batch);
        let (outcomes, committed) = match commit_batch(&pool, backend, &requests).await {
            Ok(outcomes) => (outcomes, true),
            Err(error) => (requests.iter().map(|_| Err(error.clone())).collect(), false),
        };
        if !committed {
            tracing::warn!(
                appends = requests.len(),
                "append batch failed; nothing in it was committed"
            );
        }
        for (request, outcome) in requests.into_iter().zip(outcomes) {
            // A caller that went away no longer needs its answer.
            let _ = request.reply.send(outcome);
        }
    }
}

/// Commits every request whose fence holds and whose session exists, in one transaction.
/// Returns one outcome per request; an error of the whole transaction fails them all.
async fn commit_batch(
    pool: &AnyPool,
    backend: Backend,
    requests: &[AppendRequest],
) -> Result<Vec<Result<u64>>> {
    let mut transaction = pool
        .begin_with(backend.begin_write())
        .await
        .map_err(unavailable)?;
    let mut fences: HashMap<&Fence, bool> = HashMap::new();
    let mut outcomes = Vec::with_capacity(requests.len());
    let mut rows: Vec<(&AppendRequest, u64)> = Vec::with_capacity(requests.len());

    for request in requests {
        let fence_holds = match fences.get(&request.fence) {
            Some(holds) => *holds,
            None => {
                let holds = match check_fence(&mut transaction, backend, &request.fence).await {
                    Ok(()) => true,
                    Err(StoreError::Fenced { .. }) => false,
                    Err(error) => return Err(error),
                };
                fences.insert(&request.fence, holds);
                holds
            }
        };
        if !fence_holds {
            outcomes.push(Err(StoreError::Fenced {
                slot: request.fence.slot,
                epoch: request.fence.epoch,
            }));
            continue;
        }
        let added = request.messages.len() as i64;
        let updated = sqlx::query(
            "UPDATE sessions SET message_count = message_count + $2, last_activity_us = $3 \
             WHERE session_id = $1 RETURNING message_count",
        )
        .bind(request.session_id.as_bytes().to_vec())
        .bind(added)
        .bind(micros(request.at))
        .fetch_optional(&mut *transaction)
        .await
        .map_err(unavailable)?;
        match updated {
            None => outcomes.push(Err(StoreError::SessionNotFound(request.session_id))),
            Some(row) => {
                let last_seq: i64 = row.try_get("message_count").map_err(unavailable)?;
                let last_seq = u64::try_from(last_seq).unwrap_or(0);
                outcomes.push(Ok(last_seq));
                rows.push((request, last_seq));
            }
        }
    }

    insert_messages(&mut transaction, backend, &rows).await?;
    transaction.commit().await.map_err(unavailable)?;
    Ok(outcomes)
}

/// Inserts the messages of every accepted request, numbered up to its `last_seq`, with one
/// statement whose text never changes (the rows travel as one JSON parameter).
async fn insert_messages(
    transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
    rows: &[(&AppendRequest, u64)],
) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut messages = Vec::new();
    for (request, last_seq) in rows {
        let session_hex: String = request
            .session_id
            .as_bytes()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        let first_seq = last_seq + 1 - request.messages.len() as u64;
        for (offset, message) in request.messages.iter().enumerate() {
            messages.push(serde_json::json!({
                "s": session_hex,
                "q": first_seq + offset as u64,
                "r": message.role.as_str(),
                "c": message.content,
                "n": message.name,
                "t": micros(request.at),
            }));
        }
    }
    let messages = serde_json::to_string(&messages)
        .map_err(|error| StoreError::Corrupt(format!("messages do not encode: {error}")))?;
    sqlx::query(backend.insert_messages_query())
        .bind(messages)
        .execute(&mut **transaction)
        .await
        .map_err(unavailable)?;
    Ok(())
}
