//! One group-commit batch: which of its appends write, their seqs, and the statements that
//! write them, in one transaction whatever the batch size.
//!
//! A batch is first tried at once ([`at_once`]): one call to the database, which numbers
//! the messages itself from the counts it updates, assuming every fence holds and every
//! session exists (nearly always). When one does not, a statement fails before anything is
//! committed, and the batch is staged ([`staged`]): the fences and counts are read first,
//! so that each append gets its own outcome.

mod at_once;
mod staged;

use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

use sqlx::{AnyConnection, Row};
use switchyard_core::SessionId;
use tokio::sync::oneshot;

use self::at_once::AtOnce;
use super::backend::Synchronous;
use super::sealed::sealing_error;
use super::sqlite_writer::SqliteWriter;
use super::{Backend, micros, requests, unavailable};
use crate::sealing::{Dek, KeyRing, message_aad};
use crate::{Append, AppendKey, AppendTicket, Appended, Fence, Result, StoreError, TurnUsage};
use std::sync::Arc;

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

/// A lane's connection, and how it is set to commit.
pub(super) struct LaneConnection {
    pub(super) connection: AnyConnection,
    /// PostgreSQL: the session commits without waiting for its WAL to be flushed.
    pub(super) asynchronous_commit: bool,
    /// SQLite with a database file: the direct connection that commits at-once batches,
    /// on the lane's own thread.
    pub(super) writer: Option<SqliteWriter>,
}

impl LaneConnection {
    pub(super) fn new(connection: AnyConnection, writer: Option<SqliteWriter>) -> Self {
        LaneConnection {
            connection,
            asynchronous_commit: false,
            writer,
        }
    }
}

/// A batch committed.
pub(super) struct Committed {
    /// One per request.
    pub(super) outcomes: Vec<Result<Appended>>,
    /// Whether it could not commit at once.
    pub(super) staged: bool,
}

/// How a batch of a sealed store seals its messages.
pub(super) struct BatchSeal<'a> {
    pub(super) keys: &'a KeyRing,
    /// The data key of every session of the batch that has one.
    pub(super) deks: &'a HashMap<SessionId, Arc<Dek>>,
    /// Each session's message count after the lane's last commit of it: the batch numbers
    /// its messages from these, and the statement checks them.
    pub(super) counts: &'a HashMap<SessionId, u64>,
}

impl BatchSeal<'_> {
    /// `content` sealed for message `seq` of `session_id`.
    pub(super) fn content(&self, session_id: SessionId, seq: u64, content: &str) -> Result<String> {
        let dek = self
            .deks
            .get(&session_id)
            .ok_or_else(|| StoreError::Corrupt(format!("session {session_id} has no data key")))?;
        self.keys
            .seal(dek, &message_aad(session_id, seq), content)
            .map_err(sealing_error)
    }
}

/// Commits every request whose fence holds, whose session exists and whose predecessor
/// committed. Returns one outcome per request; an error of the whole transaction fails them
/// all. `synchronous` says whether the commit waits for the disk.
pub(super) async fn commit_batch(
    lane: &mut LaneConnection,
    backend: Backend,
    requests: &[AppendRequest],
    synchronous: Synchronous,
    seal: Option<&BatchSeal<'_>>,
) -> Result<Committed, BatchError> {
    // Repeated request ids are rare (a retry after a failure): first assume there are none
    // in the store, which the insert of the ids confirms; if one was, start again looking.
    for look_up_ids in [false, true] {
        // Ids only ever appear, so looking them up before the transaction is safe: one that
        // appears in between fails the insert of the ids, and the batch is staged again.
        let repeats = find_repeats(&mut lane.connection, backend, requests, look_up_ids)
            .await
            .map_err(BatchError::Statement)?;
        match at_once::commit(
            lane,
            backend,
            requests,
            &repeats,
            look_up_ids,
            synchronous,
            seal,
        )
        .await
        {
            AtOnce::Committed(outcomes) => {
                return Ok(Committed {
                    outcomes,
                    staged: false,
                });
            }
            AtOnce::RequestIdKept => continue,
            AtOnce::Failed(error) => return Err(error),
            // A fence that moved, a session that is gone, a row refused: staged, which
            // finds which.
            AtOnce::Refused => {}
        }
        let staged = match backend {
            Backend::Sqlite => {
                staged::commit_sqlite(
                    &mut lane.connection,
                    requests,
                    &repeats,
                    look_up_ids,
                    synchronous,
                    seal,
                )
                .await?
            }
            Backend::Postgres => {
                let defer = synchronous != Synchronous::Full;
                staged::commit_postgres(&mut lane.connection, requests, look_up_ids, defer, seal)
                    .await?
            }
        };
        if let Some(outcomes) = staged {
            return Ok(Committed {
                outcomes,
                staged: true,
            });
        }
    }
    Err(BatchError::Statement(StoreError::Unavailable(
        "a request id was kept by another writer during the batch".into(),
    )))
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

fn is_unique_violation(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .is_some_and(|error| error.is_unique_violation())
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
        #[derive(serde::Serialize)]
        struct Row<'a> {
            s: u32,
            o: &'a str,
            e: u64,
        }
        let fences: Vec<Row<'_>> = self
            .distinct
            .iter()
            .map(|fence| Row {
                s: fence.slot,
                o: fence.owner.as_str(),
                e: fence.epoch.0,
            })
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
    #[derive(serde::Serialize)]
    struct Count {
        i: Hex,
        n: u64,
        t: i64,
    }
    let sessions: Vec<Count> = per_session
        .iter()
        .map(|(session_id, (added, at))| Count {
            i: Hex::of(session_id),
            n: *added,
            t: micros(*at),
        })
        .collect();
    serde_json::to_string(&sessions)
        .map_err(|error| StoreError::Corrupt(format!("sessions do not encode: {error}")))
}

/// The sessions' new counts, from the rows of a count statement.
fn parse_counts(rows: &[sqlx::any::AnyRow]) -> Result<HashMap<SessionId, u64>> {
    let rows = rows
        .iter()
        .map(|row| Ok((row.try_get("id")?, row.try_get("message_count")?)))
        .collect::<Result<Vec<(String, i64)>, sqlx::Error>>()
        .map_err(unavailable)?;
    counts_of(rows)
}

/// Each session's message count, from its id in hex and its count.
fn counts_of(rows: Vec<(String, i64)>) -> Result<HashMap<SessionId, u64>> {
    let mut counts = HashMap::with_capacity(rows.len());
    for (id, count) in rows {
        let session_id = parse_hex_id(&id)
            .ok_or_else(|| StoreError::Corrupt(format!("a session id came back as {id:?}")))?;
        counts.insert(session_id, u64::try_from(count).unwrap_or(0));
    }
    Ok(counts)
}

pub(super) fn hex(session_id: &SessionId) -> String {
    Hex::of(session_id).as_str().to_string()
}

/// A session id in lower-case hex, as the statements take it, without allocating.
#[derive(Clone, Copy)]
pub(super) struct Hex([u8; 32]);

impl Hex {
    pub(super) fn of(session_id: &SessionId) -> Self {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut text = [0u8; 32];
        for (pair, byte) in text.chunks_exact_mut(2).zip(session_id.as_bytes()) {
            pair[0] = DIGITS[usize::from(byte >> 4)];
            pair[1] = DIGITS[usize::from(byte & 15)];
        }
        Hex(text)
    }

    pub(super) fn as_str(&self) -> &str {
        // Only ASCII digits are ever written.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl serde::Serialize for Hex {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
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
fn messages_json(rows: &[(&AppendRequest, u64)], seal: Option<&BatchSeal<'_>>) -> Result<String> {
    let mut messages = Vec::new();
    for (request, last_seq) in rows {
        let append = &request.append;
        let session_hex = hex(&append.session_id);
        let first_seq = last_seq + 1 - append.messages.len() as u64;
        for (offset, message) in append.messages.iter().enumerate() {
            let seq = first_seq + offset as u64;
            let content = match seal {
                Some(seal) => seal.content(append.session_id, seq, &message.content)?,
                None => message.content.clone(),
            };
            messages.push(serde_json::json!({
                "s": session_hex,
                "q": seq,
                "r": message.role.as_str(),
                "c": content,
                "n": message.name,
                "t": micros(append.at),
            }));
        }
    }
    serde_json::to_string(&messages)
        .map_err(|error| StoreError::Corrupt(format!("messages do not encode: {error}")))
}

#[cfg(test)]
mod tests {
    use super::{Hex, parse_hex_id};
    use switchyard_core::SessionId;

    #[test]
    fn a_session_id_in_hex_reads_back() {
        for _ in 0..64 {
            let id = SessionId::new_random();
            let text = Hex::of(&id).as_str().to_string();
            assert_eq!(text.len(), 32);
            assert!(
                text.bytes()
                    .all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f')),
                "{text}"
            );
            assert_eq!(parse_hex_id(&text), Some(id));
        }
    }
}
