//! Group commit of appends: each lane's task drains its queue into one transaction.

use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

use sqlx::{AnyPool, Row};
use switchyard_core::{Message, SessionId};
use tokio::sync::{mpsc, oneshot};

use super::{Backend, micros, requests, unavailable};
use crate::{AppendKey, Appended, Fence, Result, StoreError};

/// Queued appends per lane before callers wait for room.
const QUEUE_DEPTH: usize = 4096;

struct AppendRequest {
    fence: Fence,
    session_id: SessionId,
    messages: Vec<Message>,
    at: SystemTime,
    key: AppendKey,
    /// The session keeps its newest this many messages.
    keep_last: u64,
    reply: oneshot::Sender<Result<Appended>>,
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
        key: AppendKey,
        keep_last: u64,
    ) -> Result<Appended> {
        // One slot always goes to one lane, so a session's appends commit in order.
        let lane = &self.lanes[fence.slot as usize % self.lanes.len()];
        let (reply, answer) = oneshot::channel();
        let request = AppendRequest {
            fence,
            session_id,
            messages,
            at,
            key,
            keep_last,
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
        let outcomes = match commit_batch(&pool, backend, &requests).await {
            Ok(outcomes) => outcomes,
            // A statement failed, so the transaction committed nothing: one bad row (one
            // the database refuses) must not fail the others' appends. Each goes alone.
            Err(BatchError::Statement(error)) if requests.len() > 1 => {
                tracing::warn!(appends = requests.len(), %error, "append batch failed; committing its appends one by one");
                let mut outcomes = Vec::with_capacity(requests.len());
                for index in 0..requests.len() {
                    outcomes.push(
                        match commit_batch(&pool, backend, &requests[index..=index]).await {
                            Ok(mut alone) => alone.pop().unwrap_or_else(|| Err(error.clone())),
                            Err(alone) => Err(alone.into_inner()),
                        },
                    );
                }
                outcomes
            }
            Err(error) => {
                let error = error.into_inner();
                tracing::warn!(appends = requests.len(), %error, "append batch failed; nothing in it was committed");
                requests.iter().map(|_| Err(error.clone())).collect()
            }
        };
        for (request, outcome) in requests.into_iter().zip(outcomes) {
            // A caller that went away no longer needs its answer.
            let _ = request.reply.send(outcome);
        }
    }
}

/// Why a batch failed as a whole.
#[derive(Debug)]
enum BatchError {
    /// Before the commit: the transaction was rolled back, nothing was written.
    Statement(StoreError),
    /// At the commit: whether it took effect is unknown, so nothing is tried again here.
    Commit(StoreError),
}

impl BatchError {
    fn into_inner(self) -> StoreError {
        match self {
            BatchError::Statement(error) | BatchError::Commit(error) => error,
        }
    }
}

/// Commits every request whose fence holds and whose session exists, in one transaction
/// of four statements whatever the batch size: check every fence, count every session's
/// new messages, insert them all, commit. Returns one outcome per request; an error of the
/// whole transaction fails them all.
async fn commit_batch(
    pool: &AnyPool,
    backend: Backend,
    requests: &[AppendRequest],
) -> Result<Vec<Result<Appended>>, BatchError> {
    // Repeated request ids are rare (a retry after a failure): first assume there are none
    // in the store, which the insert of the ids confirms; if one was, start again looking.
    for look_up_ids in [false, true] {
        let mut transaction = pool
            .begin_with(backend.begin_write())
            .await
            .map_err(|error| BatchError::Statement(unavailable(error)))?;
        let Some(outcomes) = stage_batch(&mut transaction, backend, requests, look_up_ids)
            .await
            .map_err(BatchError::Statement)?
        else {
            // Dropped, the transaction rolls back.
            continue;
        };
        transaction
            .commit()
            .await
            .map_err(|error| BatchError::Commit(unavailable(error)))?;
        return Ok(outcomes);
    }
    Err(BatchError::Statement(StoreError::Unavailable(
        "a request id was kept by another writer during the batch".into(),
    )))
}

/// Whether a request repeats one whose request id is already known.
#[derive(Clone, Copy)]
enum Repeat {
    /// New: it writes.
    No,
    /// Its id is kept in the store: (a turn, last seq).
    Kept(bool, u64),
    /// An earlier request of this batch has its id.
    InBatch(usize),
}

/// The statements of [`commit_batch`] before its commit: three whatever the batch size,
/// and one or two more for request ids. Without `look_up_ids`, the ids are assumed new in
/// the store (repeats within the batch are still found); `None` says one was not, and the
/// batch must be staged again looking them up.
async fn stage_batch(
    transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
    requests: &[AppendRequest],
    look_up_ids: bool,
) -> Result<Option<Vec<Result<Appended>>>> {
    let holding = holding_fences(transaction, backend, requests).await?;
    let repeats = find_repeats(transaction, backend, requests, look_up_ids).await?;

    // New messages per session, in arrival order within the batch.
    let writes = |index: usize| {
        holding.contains(&requests[index].fence) && matches!(repeats[index], Repeat::No)
    };
    let mut per_session: HashMap<SessionId, (u64, SystemTime)> = HashMap::new();
    for (index, request) in requests.iter().enumerate() {
        if !writes(index) {
            continue;
        }
        let entry = per_session
            .entry(request.session_id)
            .or_insert((0, request.at));
        entry.0 += request.messages.len() as u64;
        entry.1 = entry.1.max(request.at);
    }
    let counts = count_messages(transaction, backend, &per_session).await?;

    // Each request's seqs follow those of the requests before it in the batch.
    let mut next_seq: HashMap<SessionId, u64> = counts
        .iter()
        .map(|(session_id, last_seq)| (*session_id, last_seq - per_session[session_id].0 + 1))
        .collect();
    let mut outcomes: Vec<Result<Appended>> = Vec::with_capacity(requests.len());
    let mut rows: Vec<(&AppendRequest, u64)> = Vec::with_capacity(requests.len());
    let mut kept = Vec::new();
    let mut replies = Vec::new();
    for (index, request) in requests.iter().enumerate() {
        if !holding.contains(&request.fence) {
            outcomes.push(Err(StoreError::Fenced {
                slot: request.fence.slot,
                epoch: request.fence.epoch,
            }));
            continue;
        }
        let repeated = match repeats[index] {
            Repeat::No => None,
            Repeat::Kept(turn, last_seq) => Some((turn, Ok(last_seq))),
            Repeat::InBatch(first) => {
                let turn = matches!(requests[first].key, AppendKey::Request { turn: true, .. });
                Some((
                    turn,
                    outcomes[first].clone().map(|appended| appended.last_seq),
                ))
            }
        };
        if let (Some((turn, first)), AppendKey::Request { id, turn: wanted }) =
            (repeated, &request.key)
        {
            outcomes.push(if turn != *wanted {
                Err(StoreError::RequestIdReused {
                    request_id: id.clone(),
                })
            } else {
                first.map(|last_seq| Appended {
                    last_seq,
                    written: false,
                })
            });
            continue;
        }
        let Some(next) = next_seq.get_mut(&request.session_id) else {
            outcomes.push(Err(StoreError::SessionNotFound(request.session_id)));
            continue;
        };
        let last_seq = *next + request.messages.len() as u64 - 1;
        *next = last_seq + 1;
        outcomes.push(Ok(Appended {
            last_seq,
            written: true,
        }));
        rows.push((request, last_seq));
        match &request.key {
            AppendKey::None => {}
            AppendKey::Request { id, turn } => {
                kept.push((request.session_id, id.as_str(), *turn, last_seq))
            }
            AppendKey::Reply { id, usage } => {
                replies.push((request.session_id, id.as_str(), last_seq, *usage))
            }
        }
    }

    insert_messages(transaction, backend, &rows).await?;
    trim_contexts(transaction, requests, &counts).await?;
    let inserted = requests::insert(transaction, backend, &kept).await?;
    if inserted < kept.len() {
        return Ok(None);
    }
    requests::record_replies(transaction, backend, &replies).await?;
    Ok(Some(outcomes))
}

/// Which requests of the batch repeat a request id already kept, or one earlier in the
/// batch: one statement, only when some request carries an id.
async fn find_repeats(
    transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
    requests: &[AppendRequest],
    look_up_ids: bool,
) -> Result<Vec<Repeat>> {
    let keyed: Vec<(SessionId, &str)> = requests
        .iter()
        .filter_map(|request| match &request.key {
            AppendKey::Request { id, .. } => Some((request.session_id, id.as_str())),
            _ => None,
        })
        .collect();
    if keyed.is_empty() {
        return Ok(vec![Repeat::No; requests.len()]);
    }
    let known = if look_up_ids {
        requests::known(transaction, backend, &keyed).await?
    } else {
        HashMap::new()
    };
    let mut first_in_batch: HashMap<(SessionId, &str), usize> = HashMap::new();
    Ok(requests
        .iter()
        .enumerate()
        .map(|(index, request)| {
            let AppendKey::Request { id, .. } = &request.key else {
                return Repeat::No;
            };
            if let Some((turn, last_seq)) = known.get(&(request.session_id, id.clone())) {
                return Repeat::Kept(*turn, *last_seq);
            }
            match first_in_batch.entry((request.session_id, id.as_str())) {
                std::collections::hash_map::Entry::Occupied(first) => Repeat::InBatch(*first.get()),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(index);
                    Repeat::No
                }
            }
        })
        .collect())
}

/// Drops the oldest messages of sessions now over their bound. Rare (a context reaches
/// its bound once, then sheds a message per message), so one statement per session.
async fn trim_contexts(
    transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    requests: &[AppendRequest],
    counts: &HashMap<SessionId, u64>,
) -> Result<()> {
    let mut bounds: HashMap<SessionId, u64> = HashMap::new();
    for request in requests {
        let bound = bounds.entry(request.session_id).or_insert(u64::MAX);
        *bound = (*bound).min(request.keep_last.max(1));
    }
    for (session_id, last_seq) in counts {
        let bound = bounds.get(session_id).copied().unwrap_or(u64::MAX);
        if *last_seq <= bound {
            continue;
        }
        sqlx::query("DELETE FROM messages WHERE session_id = $1 AND seq <= $2")
            .bind(session_id.as_bytes().to_vec())
            .bind(i64::try_from(last_seq - bound).unwrap_or(i64::MAX))
            .execute(&mut **transaction)
            .await
            .map_err(unavailable)?;
    }
    Ok(())
}

/// The fences of `requests` that hold, checked in one statement.
async fn holding_fences<'r>(
    transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
    requests: &'r [AppendRequest],
) -> Result<HashSet<&'r Fence>> {
    let distinct: HashSet<&Fence> = requests.iter().map(|request| &request.fence).collect();
    let fences: Vec<serde_json::Value> = distinct
        .iter()
        .map(|fence| serde_json::json!({ "s": fence.slot, "o": fence.owner.as_str(), "e": fence.epoch.0 }))
        .collect();
    let fences = serde_json::to_string(&fences)
        .map_err(|error| StoreError::Corrupt(format!("fences do not encode: {error}")))?;
    let rows = sqlx::query(backend.holding_fences_query())
        .bind(fences)
        .fetch_all(&mut **transaction)
        .await
        .map_err(unavailable)?;
    let mut held: HashSet<(i64, String, i64)> = HashSet::with_capacity(rows.len());
    for row in rows {
        held.insert((
            row.try_get("slot").map_err(unavailable)?,
            row.try_get("owner").map_err(unavailable)?,
            row.try_get("epoch").map_err(unavailable)?,
        ));
    }
    Ok(distinct
        .into_iter()
        .filter(|fence| {
            let key = (
                i64::from(fence.slot),
                fence.owner.as_str().to_string(),
                i64::try_from(fence.epoch.0).unwrap_or(i64::MAX),
            );
            held.contains(&key)
        })
        .collect())
}

/// Adds each session's new messages to its count in one statement and returns the new
/// counts; a session missing from the result does not exist.
async fn count_messages(
    transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    backend: Backend,
    per_session: &HashMap<SessionId, (u64, SystemTime)>,
) -> Result<HashMap<SessionId, u64>> {
    if per_session.is_empty() {
        return Ok(HashMap::new());
    }
    let sessions: Vec<serde_json::Value> = per_session
        .iter()
        .map(|(session_id, (added, at))| {
            serde_json::json!({ "i": hex(session_id), "n": added, "t": micros(*at) })
        })
        .collect();
    let sessions = serde_json::to_string(&sessions)
        .map_err(|error| StoreError::Corrupt(format!("sessions do not encode: {error}")))?;
    let rows = sqlx::query(backend.count_messages_query())
        .bind(sessions)
        .fetch_all(&mut **transaction)
        .await
        .map_err(unavailable)?;
    let mut counts = HashMap::with_capacity(rows.len());
    for row in rows {
        let id: String = row.try_get("id").map_err(unavailable)?;
        let count: i64 = row.try_get("message_count").map_err(unavailable)?;
        let session_id = parse_hex_id(&id)
            .ok_or_else(|| StoreError::Corrupt(format!("a session id came back as {id:?}")))?;
        counts.insert(session_id, u64::try_from(count).unwrap_or(0));
    }
    Ok(counts)
}

pub(super) fn hex(session_id: &SessionId) -> String {
    session_id
        .as_bytes()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

pub(super) fn parse_hex_id(text: &str) -> Option<SessionId> {
    if text.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (index, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(index * 2..index * 2 + 2)?, 16).ok()?;
    }
    Some(SessionId::from_bytes(bytes))
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
        let session_hex = hex(&request.session_id);
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
