//! One group-commit batch: which of its appends write, their seqs, and the statements that
//! write them, in one transaction whatever the batch size.
//!
//! On SQLite every statement is a call to the connection's own thread, and under load each
//! call waits for that thread and then for the runtime, so a batch is two calls: take the
//! lock, check the fences and count the sessions' new messages, assuming every fence holds
//! (if one does not, that transaction is rolled back and the batch staged again); then write
//! everything and commit. PostgreSQL runs the same statements one by one in a transaction.

use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

use sqlx::{AnyConnection, Connection, Executor, Row};
use switchyard_core::SessionId;
use tokio::sync::oneshot;

use super::backend::Synchronous;
use super::{Backend, micros, requests, unavailable};
use crate::{Append, AppendKey, AppendTicket, Appended, Fence, Result, StoreError, TurnUsage};

pub(super) struct AppendRequest {
    pub(super) append: Append,
    /// Commits only if this append, queued earlier, did.
    pub(super) after: Option<AppendTicket>,
    /// Settled with this append's fate before its answer is sent.
    pub(super) ticket: AppendTicket,
    pub(super) reply: oneshot::Sender<Result<Appended>>,
}

/// Why a batch failed as a whole.
#[derive(Debug)]
pub(super) enum BatchError {
    /// Before the commit: the transaction was rolled back, nothing was written.
    Statement(StoreError),
    /// At the commit: whether it took effect is unknown, so nothing is tried again here.
    Commit(StoreError),
}

impl BatchError {
    pub(super) fn into_inner(self) -> StoreError {
        match self {
            BatchError::Statement(error) | BatchError::Commit(error) => error,
        }
    }
}

/// Commits every request whose fence holds, whose session exists and whose predecessor
/// committed. Returns one outcome per request; an error of the whole transaction fails them
/// all. `synchronous` says whether the commit waits for the disk.
pub(super) async fn commit_batch(
    connection: &mut AnyConnection,
    backend: Backend,
    requests: &[AppendRequest],
    synchronous: Synchronous,
) -> Result<Vec<Result<Appended>>, BatchError> {
    // Repeated request ids are rare (a retry after a failure): first assume there are none
    // in the store, which the insert of the ids confirms; if one was, start again looking.
    for look_up_ids in [false, true] {
        let committed = match backend {
            Backend::Sqlite => {
                commit_sqlite(connection, requests, look_up_ids, synchronous).await?
            }
            Backend::Postgres => {
                let defer = synchronous != Synchronous::Full;
                commit_postgres(connection, requests, look_up_ids, defer).await?
            }
        };
        if let Some(outcomes) = committed {
            return Ok(outcomes);
        }
    }
    Err(BatchError::Statement(StoreError::Unavailable(
        "a request id was kept by another writer during the batch".into(),
    )))
}

/// How often a batch is staged again because a fence it assumed held did not.
const FENCE_ATTEMPTS: usize = 3;

/// `None`: a request id was kept already; nothing was written.
async fn commit_sqlite(
    connection: &mut AnyConnection,
    requests: &[AppendRequest],
    look_up_ids: bool,
    synchronous: Synchronous,
) -> Result<Option<Vec<Result<Appended>>>, BatchError> {
    // Ids only ever appear, so looking them up before the transaction is safe: one that
    // appears in between fails the insert of the ids, and the batch is staged again.
    let repeats = find_repeats(connection, Backend::Sqlite, requests, look_up_ids)
        .await
        .map_err(BatchError::Statement)?;
    let fences = FenceSet::of(requests);
    let fences_json = fences.json().map_err(BatchError::Statement)?;
    let fast = commit_sqlite_at_once(
        connection,
        requests,
        &fences,
        &repeats,
        look_up_ids,
        synchronous,
    )
    .await;
    match fast {
        AtOnce::Committed(outcomes) => return Ok(Some(outcomes)),
        AtOnce::RequestIdKept => return Ok(None),
        AtOnce::Failed(error) => return Err(error),
        // A fence that moved or a session that is gone: staged below, which finds which.
        AtOnce::Refused => {}
    }
    let mut assumed = fences.distinct.clone();
    for _ in 0..FENCE_ATTEMPTS {
        let plan = plan(requests, &assumed, &repeats);
        let counts_json = counts_json(&plan.per_session).map_err(BatchError::Statement)?;
        let rows = sqlx::query(Backend::sqlite_begin_batch(synchronous))
            .bind(fences_json.clone())
            .bind(counts_json)
            .fetch_all(&mut *connection)
            .await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(error) => return Err(rolled_back(connection, unavailable(error)).await),
        };
        let (fence_rows, count_rows): (Vec<_>, Vec<_>) = rows
            .into_iter()
            .partition(|row| row.try_column("slot").is_ok());
        let read = fences
            .holding(&fence_rows)
            .and_then(|holding| Ok((holding, parse_counts(&count_rows)?)));
        let (holding, counts) = match read {
            Ok(read) => read,
            Err(error) => return Err(rolled_back(connection, error).await),
        };
        if holding != assumed {
            // A lease moved: the counts added for its appends must not stand.
            if let Err(error) = connection.execute("ROLLBACK").await {
                return Err(BatchError::Statement(unavailable(error)));
            }
            assumed = holding;
            continue;
        }
        let staged = outcomes(requests, &holding, &repeats, &plan, &counts);
        return write_sqlite(connection, staged, look_up_ids).await;
    }
    Err(BatchError::Statement(StoreError::Unavailable(
        "the slots' leases kept changing during the batch".into(),
    )))
}

/// What [`commit_sqlite_at_once`] did.
enum AtOnce {
    Committed(Vec<Result<Appended>>),
    /// A request id of the batch was kept already: rolled back, nothing written.
    RequestIdKept,
    /// A statement refused the batch (a fence, a session, a row): rolled back.
    Refused,
    /// The commit failed, or the connection is in an unknown state.
    Failed(BatchError),
}

/// The whole batch in one call, assuming every fence holds and every session exists
/// ([`Backend::sqlite_append_batch`]).
async fn commit_sqlite_at_once(
    connection: &mut AnyConnection,
    requests: &[AppendRequest],
    fences: &FenceSet<'_>,
    repeats: &[Repeat],
    look_up_ids: bool,
    synchronous: Synchronous,
) -> AtOnce {
    let plan = plan(requests, &fences.distinct, repeats);
    let params = match at_once_params(requests, &fences.distinct, repeats, &plan) {
        Ok(params) => params,
        Err(error) => return AtOnce::Failed(BatchError::Statement(error)),
    };
    let [counts, messages, bounds, ids, replies] = params;
    let rows = sqlx::query(Backend::sqlite_append_batch(synchronous))
        .bind(counts)
        .bind(messages)
        .bind(bounds)
        .bind(ids)
        .bind(replies)
        .fetch_all(&mut *connection)
        .await;
    let error = match rows {
        Ok(rows) => {
            // Committed: the counts tell each append's seqs.
            return match parse_counts(&rows) {
                Ok(counts) => AtOnce::Committed(
                    outcomes(requests, &fences.distinct, repeats, &plan, &counts).outcomes,
                ),
                Err(error) => AtOnce::Failed(BatchError::Commit(error)),
            };
        }
        Err(error) => error,
    };
    // A statement before COMMIT failed and the transaction is still open: roll it back.
    // If there is none to roll back, the COMMIT itself failed, and its effect is unknown.
    match connection.execute("ROLLBACK").await {
        Ok(_) if !look_up_ids && is_unique_violation(&error) && has_new_ids(requests, repeats) => {
            AtOnce::RequestIdKept
        }
        Ok(_) => AtOnce::Refused,
        Err(_) => AtOnce::Failed(BatchError::Commit(unavailable(error))),
    }
}

fn has_new_ids(requests: &[AppendRequest], repeats: &[Repeat]) -> bool {
    requests.iter().zip(repeats).any(|(request, repeat)| {
        matches!(repeat, Repeat::No) && matches!(request.append.key, AppendKey::Request { .. })
    })
}

/// The parameters of [`Backend::sqlite_append_batch`] after `$1`: counts, messages, bounds,
/// new request ids, replies. A message is numbered `count − k`, where `k` is how many of its
/// session's new messages in this batch follow it.
fn at_once_params(
    requests: &[AppendRequest],
    holding: &HashSet<&Fence>,
    repeats: &[Repeat],
    plan: &Plan,
) -> Result<[String; 5]> {
    let mut left: HashMap<SessionId, u64> = plan
        .per_session
        .iter()
        .map(|(session_id, (added, _))| (*session_id, *added))
        .collect();
    let mut messages = Vec::new();
    let mut ids = Vec::new();
    let mut replies = Vec::new();
    let mut bounds: HashMap<SessionId, u64> = HashMap::new();
    for (index, request) in requests.iter().enumerate() {
        let append = &request.append;
        let bound = bounds.entry(append.session_id).or_insert(u64::MAX);
        *bound = (*bound).min(append.keep_last.max(1));
        if !writes(&plan.orphaned, holding, repeats, index, append) {
            continue;
        }
        let Some(left) = left.get_mut(&append.session_id) else {
            continue;
        };
        let session_hex = hex(&append.session_id);
        for message in append.messages.iter() {
            *left -= 1;
            messages.push(serde_json::json!({
                "s": session_hex,
                "k": *left,
                "r": message.role.as_str(),
                "c": message.content,
                "n": message.name,
                "t": micros(append.at),
                "l": append.fence.slot,
                "o": append.fence.owner.as_str(),
                "e": append.fence.epoch.0,
            }));
        }
        match &append.key {
            AppendKey::None => {}
            AppendKey::Request { id, turn } => ids.push(serde_json::json!({
                "s": session_hex, "r": id, "k": i64::from(*turn), "b": *left,
            })),
            AppendKey::Reply { id, usage } => replies.push(serde_json::json!({
                "s": session_hex,
                "r": id,
                "b": *left,
                "p": to_i64(usage.prompt_tokens),
                "c": to_i64(usage.completion_tokens),
                "u": (usage.compute_seconds.max(0.0) * 1e6).round() as i64,
            })),
        }
    }
    let bounds: Vec<serde_json::Value> = bounds
        .into_iter()
        .filter(|(session_id, bound)| {
            *bound < u64::MAX && plan.per_session.contains_key(session_id)
        })
        .map(|(session_id, bound)| serde_json::json!({ "s": hex(&session_id), "q": to_i64(bound) }))
        .collect();
    let encode = |what: &str, values: &[serde_json::Value]| {
        serde_json::to_string(values)
            .map_err(|error| StoreError::Corrupt(format!("{what} do not encode: {error}")))
    };
    Ok([
        counts_json(&plan.per_session)?,
        encode("messages", &messages)?,
        encode("bounds", &bounds)?,
        encode("request ids", &ids)?,
        encode("replies", &replies)?,
    ])
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Whether a request writes: its predecessor committed (`orphaned` says which did not),
/// its fence holds, and its request id is new.
fn writes(
    orphaned: &[bool],
    holding: &HashSet<&Fence>,
    repeats: &[Repeat],
    index: usize,
    append: &Append,
) -> bool {
    !orphaned[index] && holding.contains(&append.fence) && matches!(repeats[index], Repeat::No)
}

/// The writes of a staged batch and its commit, in one call.
async fn write_sqlite(
    connection: &mut AnyConnection,
    staged: Staged<'_>,
    look_up_ids: bool,
) -> Result<Option<Vec<Result<Appended>>>, BatchError> {
    let params = match staged.sqlite_params() {
        Ok(params) => params,
        Err(error) => return Err(rolled_back(connection, error).await),
    };
    let [messages, trims, ids, replies] = params;
    let written = sqlx::query(Backend::SQLITE_WRITE_AND_COMMIT)
        .bind(messages)
        .bind(trims)
        .bind(ids)
        .bind(replies)
        .execute(&mut *connection)
        .await;
    let Err(error) = written else {
        return Ok(Some(staged.outcomes));
    };
    // A statement before COMMIT failed and the transaction is still open: roll it back.
    // If there is none to roll back, the COMMIT itself failed, and its effect is unknown.
    match connection.execute("ROLLBACK").await {
        Ok(_) if !look_up_ids && !staged.kept.is_empty() && is_unique_violation(&error) => Ok(None),
        Ok(_) => Err(BatchError::Statement(unavailable(error))),
        Err(_) => Err(BatchError::Commit(unavailable(error))),
    }
}

/// Rolls back an open SQLite transaction after a failed statement.
async fn rolled_back(connection: &mut AnyConnection, error: StoreError) -> BatchError {
    if connection.execute("ROLLBACK").await.is_err() {
        // Without a transaction to roll back the connection is in an unknown state; the lane
        // drops it on any error anyway.
        tracing::debug!("no transaction to roll back after a failed statement");
    }
    BatchError::Statement(error)
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .is_some_and(|error| error.is_unique_violation())
}

/// `None`: a request id was kept already; nothing was written.
async fn commit_postgres(
    connection: &mut AnyConnection,
    requests: &[AppendRequest],
    look_up_ids: bool,
    defer: bool,
) -> Result<Option<Vec<Result<Appended>>>, BatchError> {
    let statement = |error| BatchError::Statement(unavailable(error));
    let mut transaction = connection
        .begin_with(Backend::Postgres.begin_write())
        .await
        .map_err(statement)?;
    if defer {
        transaction
            .execute("SET LOCAL synchronous_commit = off")
            .await
            .map_err(statement)?;
    }
    let fences = FenceSet::of(requests);
    let rows = sqlx::query(Backend::Postgres.holding_fences_query())
        .bind(fences.json().map_err(BatchError::Statement)?)
        .fetch_all(&mut *transaction)
        .await
        .map_err(statement)?;
    let holding = fences.holding(&rows).map_err(BatchError::Statement)?;
    let staged = async {
        let repeats =
            find_repeats(&mut transaction, Backend::Postgres, requests, look_up_ids).await?;
        let plan = plan(requests, &holding, &repeats);
        let counts = count_messages(&mut transaction, &plan.per_session).await?;
        Ok(outcomes(requests, &holding, &repeats, &plan, &counts))
    }
    .await
    .map_err(BatchError::Statement)?;
    let written = async {
        insert_messages_postgres(&mut transaction, &staged.rows).await?;
        for (session_id, up_to) in &staged.trims {
            sqlx::query("DELETE FROM messages WHERE session_id = $1 AND seq <= $2")
                .bind(session_id.as_bytes().to_vec())
                .bind(i64::try_from(*up_to).unwrap_or(i64::MAX))
                .execute(&mut *transaction)
                .await
                .map_err(unavailable)?;
        }
        let inserted = requests::insert(&mut transaction, Backend::Postgres, &staged.kept).await?;
        if inserted < staged.kept.len() {
            return Ok(false);
        }
        requests::record_replies(&mut transaction, Backend::Postgres, &staged.replies).await?;
        Ok(true)
    }
    .await
    .map_err(BatchError::Statement)?;
    if !written {
        // Dropped, the transaction rolls back.
        return Ok(None);
    }
    transaction
        .commit()
        .await
        .map_err(|error| BatchError::Commit(unavailable(error)))?;
    Ok(Some(staged.outcomes))
}

/// The distinct fences of a batch.
struct FenceSet<'r> {
    distinct: HashSet<&'r Fence>,
}

impl<'r> FenceSet<'r> {
    fn of(requests: &'r [AppendRequest]) -> Self {
        FenceSet {
            distinct: requests
                .iter()
                .map(|request| &request.append.fence)
                .collect(),
        }
    }

    /// `[{s: slot, o: owner, e: epoch}]`, as the fence statements take them.
    fn json(&self) -> Result<String> {
        let fences: Vec<serde_json::Value> = self
            .distinct
            .iter()
            .map(|fence| serde_json::json!({ "s": fence.slot, "o": fence.owner.as_str(), "e": fence.epoch.0 }))
            .collect();
        serde_json::to_string(&fences)
            .map_err(|error| StoreError::Corrupt(format!("fences do not encode: {error}")))
    }

    /// The fences that hold, from the rows of the fence statement.
    fn holding(&self, rows: &[sqlx::any::AnyRow]) -> Result<HashSet<&'r Fence>> {
        let mut held: HashSet<(i64, String, i64)> = HashSet::with_capacity(rows.len());
        for row in rows {
            held.insert((
                row.try_get("slot").map_err(unavailable)?,
                row.try_get("owner").map_err(unavailable)?,
                row.try_get("epoch").map_err(unavailable)?,
            ));
        }
        Ok(self
            .distinct
            .iter()
            .copied()
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

/// A batch staged: each request's outcome, and what the transaction writes.
struct Staged<'r> {
    outcomes: Vec<Result<Appended>>,
    /// Each writing request, with its last seq.
    rows: Vec<(&'r AppendRequest, u64)>,
    /// New request ids: (session, id, a turn, last seq).
    kept: Vec<(SessionId, &'r str, bool, u64)>,
    /// Replies completing their turns' ids.
    replies: Vec<(SessionId, &'r str, u64, TurnUsage)>,
    /// Sessions over their bound, and the last seq to drop.
    trims: Vec<(SessionId, u64)>,
}

impl Staged<'_> {
    /// The four JSON parameters of [`Backend::SQLITE_WRITE_AND_COMMIT`].
    fn sqlite_params(&self) -> Result<[String; 4]> {
        let trims: Vec<serde_json::Value> = self
            .trims
            .iter()
            .map(|(session_id, up_to)| serde_json::json!({ "s": hex(session_id), "q": up_to }))
            .collect();
        let trims = serde_json::to_string(&trims)
            .map_err(|error| StoreError::Corrupt(format!("trims do not encode: {error}")))?;
        Ok([
            messages_json(&self.rows)?,
            trims,
            requests::new_ids_json(&self.kept)?,
            requests::replies_json(&self.replies)?,
        ])
    }
}

/// Which requests write, as far as fences, request ids and predecessors tell.
struct Plan {
    /// Following an append that was not (or will not be) committed.
    orphaned: Vec<bool>,
    /// New messages per session, and its newest activity time.
    per_session: HashMap<SessionId, (u64, SystemTime)>,
}

fn plan(requests: &[AppendRequest], holding: &HashSet<&Fence>, repeats: &[Repeat]) -> Plan {
    let orphaned = predecessors_failed(requests, holding, repeats);
    let mut per_session: HashMap<SessionId, (u64, SystemTime)> = HashMap::new();
    for (index, request) in requests.iter().enumerate() {
        if !writes(&orphaned, holding, repeats, index, &request.append) {
            continue;
        }
        let entry = per_session
            .entry(request.append.session_id)
            .or_insert((0, request.append.at));
        entry.0 += request.append.messages.len() as u64;
        entry.1 = entry.1.max(request.append.at);
    }
    Plan {
        orphaned,
        per_session,
    }
}

/// Each request's outcome and seqs, from the plan and the sessions' counts after it (a
/// session missing from `counts` does not exist).
fn outcomes<'r>(
    requests: &'r [AppendRequest],
    holding: &HashSet<&Fence>,
    repeats: &[Repeat],
    plan: &Plan,
    counts: &HashMap<SessionId, u64>,
) -> Staged<'r> {
    // Each request's seqs follow those of the requests before it in the batch.
    let mut next_seq: HashMap<SessionId, u64> = counts
        .iter()
        .filter_map(|(session_id, last_seq)| {
            let added = plan.per_session.get(session_id)?.0;
            Some((*session_id, last_seq - added + 1))
        })
        .collect();
    let mut staged = Staged {
        outcomes: Vec::with_capacity(requests.len()),
        rows: Vec::with_capacity(requests.len()),
        kept: Vec::new(),
        replies: Vec::new(),
        trims: trims(requests, counts),
    };
    for (index, request) in requests.iter().enumerate() {
        let append = &request.append;
        if plan.orphaned[index] {
            staged
                .outcomes
                .push(Err(StoreError::PredecessorNotCommitted(append.session_id)));
            continue;
        }
        if !holding.contains(&append.fence) {
            staged.outcomes.push(Err(StoreError::Fenced {
                slot: append.fence.slot,
                epoch: append.fence.epoch,
            }));
            continue;
        }
        let repeated = match repeats[index] {
            Repeat::No => None,
            Repeat::Kept(turn, last_seq) => Some((turn, Ok(last_seq))),
            Repeat::InBatch(first) => Some((
                is_turn(&requests[first].append.key),
                staged.outcomes[first]
                    .clone()
                    .map(|appended| appended.last_seq),
            )),
        };
        if let (Some((turn, first)), AppendKey::Request { id, turn: wanted }) =
            (repeated, &append.key)
        {
            staged.outcomes.push(if turn != *wanted {
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
        let Some(next) = next_seq.get_mut(&append.session_id) else {
            staged
                .outcomes
                .push(Err(StoreError::SessionNotFound(append.session_id)));
            continue;
        };
        let last_seq = *next + append.messages.len() as u64 - 1;
        *next = last_seq + 1;
        staged.outcomes.push(Ok(Appended {
            last_seq,
            written: true,
        }));
        staged.rows.push((request, last_seq));
        match &append.key {
            AppendKey::None => {}
            AppendKey::Request { id, turn } => {
                staged
                    .kept
                    .push((append.session_id, id.as_str(), *turn, last_seq))
            }
            AppendKey::Reply { id, usage } => {
                staged
                    .replies
                    .push((append.session_id, id.as_str(), last_seq, *usage))
            }
        }
    }
    staged
}

fn is_turn(key: &AppendKey) -> bool {
    matches!(key, AppendKey::Request { turn: true, .. })
}

/// Which requests follow an append that was not committed, or will not be in this batch:
/// they are refused.
fn predecessors_failed(
    requests: &[AppendRequest],
    holding: &HashSet<&Fence>,
    repeats: &[Repeat],
) -> Vec<bool> {
    // Whether a repeat of a request id is answered (rather than refused as reused).
    let answered = |index: usize| {
        let turn = is_turn(&requests[index].append.key);
        match repeats[index] {
            Repeat::No => true,
            Repeat::Kept(kept_turn, _) => kept_turn == turn,
            Repeat::InBatch(first) => is_turn(&requests[first].append.key) == turn,
        }
    };
    let mut failed = vec![false; requests.len()];
    for index in 0..requests.len() {
        let Some(after) = &requests[index].after else {
            continue;
        };
        failed[index] = match after.settled() {
            Some(committed) => !committed,
            None => match requests[..index]
                .iter()
                .position(|earlier| earlier.ticket.is(after))
            {
                Some(first) => {
                    failed[first]
                        || requests[first].append.session_id != requests[index].append.session_id
                        || !holding.contains(&requests[first].append.fence)
                        || !answered(first)
                }
                // Queued after its predecessor, it is in this batch or that one is settled:
                // anything else would commit out of order.
                None => true,
            },
        };
    }
    failed
}

/// Which requests of the batch repeat a request id already kept, or one earlier in the
/// batch: one statement, only when some request carries an id and ids are looked up.
async fn find_repeats(
    connection: &mut AnyConnection,
    backend: Backend,
    requests: &[AppendRequest],
    look_up_ids: bool,
) -> Result<Vec<Repeat>> {
    let keyed: Vec<(SessionId, &str)> = requests
        .iter()
        .filter_map(|request| match &request.append.key {
            AppendKey::Request { id, .. } => Some((request.append.session_id, id.as_str())),
            _ => None,
        })
        .collect();
    if keyed.is_empty() {
        return Ok(vec![Repeat::No; requests.len()]);
    }
    let known = if look_up_ids {
        requests::known(connection, backend, &keyed).await?
    } else {
        HashMap::new()
    };
    let mut first_in_batch: HashMap<(SessionId, &str), usize> = HashMap::new();
    Ok(requests
        .iter()
        .enumerate()
        .map(|(index, request)| {
            let AppendKey::Request { id, .. } = &request.append.key else {
                return Repeat::No;
            };
            if let Some((turn, last_seq)) = known.get(&(request.append.session_id, id.clone())) {
                return Repeat::Kept(*turn, *last_seq);
            }
            match first_in_batch.entry((request.append.session_id, id.as_str())) {
                std::collections::hash_map::Entry::Occupied(first) => Repeat::InBatch(*first.get()),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(index);
                    Repeat::No
                }
            }
        })
        .collect())
}

/// The sessions now over their bound, and the last seq each drops. Rare: a context reaches
/// its bound once, then sheds a message per message.
fn trims(requests: &[AppendRequest], counts: &HashMap<SessionId, u64>) -> Vec<(SessionId, u64)> {
    let mut bounds: HashMap<SessionId, u64> = HashMap::new();
    for request in requests {
        let bound = bounds.entry(request.append.session_id).or_insert(u64::MAX);
        *bound = (*bound).min(request.append.keep_last.max(1));
    }
    counts
        .iter()
        .filter_map(|(session_id, last_seq)| {
            let bound = bounds.get(session_id).copied().unwrap_or(u64::MAX);
            (*last_seq > bound).then(|| (*session_id, last_seq - bound))
        })
        .collect()
}

/// `[{i: session hex, n: added, t: activity time}]`, as the count statements take them.
fn counts_json(per_session: &HashMap<SessionId, (u64, SystemTime)>) -> Result<String> {
    let sessions: Vec<serde_json::Value> = per_session
        .iter()
        .map(|(session_id, (added, at))| {
            serde_json::json!({ "i": hex(session_id), "n": added, "t": micros(*at) })
        })
        .collect();
    serde_json::to_string(&sessions)
        .map_err(|error| StoreError::Corrupt(format!("sessions do not encode: {error}")))
}

/// The sessions' new counts, from the rows of a count statement.
fn parse_counts(rows: &[sqlx::any::AnyRow]) -> Result<HashMap<SessionId, u64>> {
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

/// PostgreSQL: adds each session's new messages to its count in one statement and returns
/// the new counts.
async fn count_messages(
    connection: &mut AnyConnection,
    per_session: &HashMap<SessionId, (u64, SystemTime)>,
) -> Result<HashMap<SessionId, u64>> {
    if per_session.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = sqlx::query(Backend::Postgres.count_messages_query())
        .bind(counts_json(per_session)?)
        .fetch_all(&mut *connection)
        .await
        .map_err(unavailable)?;
    parse_counts(&rows)
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

/// The messages of every writing request, numbered up to its `last_seq`, as one JSON array
/// (so the statement's text never changes).
fn messages_json(rows: &[(&AppendRequest, u64)]) -> Result<String> {
    let mut messages = Vec::new();
    for (request, last_seq) in rows {
        let append = &request.append;
        let session_hex = hex(&append.session_id);
        let first_seq = last_seq + 1 - append.messages.len() as u64;
        for (offset, message) in append.messages.iter().enumerate() {
            messages.push(serde_json::json!({
                "s": session_hex,
                "q": first_seq + offset as u64,
                "r": message.role.as_str(),
                "c": message.content,
                "n": message.name,
                "t": micros(append.at),
            }));
        }
    }
    serde_json::to_string(&messages)
        .map_err(|error| StoreError::Corrupt(format!("messages do not encode: {error}")))
}

async fn insert_messages_postgres(
    connection: &mut AnyConnection,
    rows: &[(&AppendRequest, u64)],
) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(Backend::Postgres.insert_messages_query())
        .bind(messages_json(rows)?)
        .execute(&mut *connection)
        .await
        .map_err(unavailable)?;
    Ok(())
}
