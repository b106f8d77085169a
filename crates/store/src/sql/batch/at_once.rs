//! A whole batch in one call to the database, assuming every fence holds and every session
//! exists: the statements number the messages themselves from the counts they update
//! ([`Backend::sqlite_append_batch`], [`Backend::POSTGRES_APPEND_BATCH`]). Anything else
//! makes a statement fail before anything is committed.

use std::borrow::Cow;
use std::collections::HashMap;

use serde::Serialize;

use sqlx::Executor;
use switchyard_core::SessionId;

use super::{
    AppendRequest, BatchError, BatchSeal, FenceSet, Hex, LaneConnection, Plan, Repeat, counts_json,
    counts_of, is_unique_violation, outcomes, parse_counts, plan, to_i64, writes,
};
use crate::sql::backend::{SqliteBatchParts, Synchronous};
use crate::sql::quota::batch_usage_json;
use crate::sql::sqlite_writer::ScriptError;
use crate::sql::{Backend, micros, unavailable};
use crate::{AppendKey, Appended, Result, StoreError};

/// What [`commit`] did.
pub(super) enum AtOnce {
    Committed(Vec<Result<Appended>>),
    /// A request id of the batch was kept already: nothing was written.
    RequestIdKept,
    /// A statement refused the batch (a fence, a session, a row): nothing was written.
    Refused,
    /// The commit failed, or the connection is in an unknown state.
    Failed(BatchError),
}

/// Commits the batch in one call if it can.
pub(super) async fn commit(
    lane: &mut LaneConnection,
    backend: Backend,
    requests: &[AppendRequest],
    repeats: &[Repeat],
    look_up_ids: bool,
    synchronous: Synchronous,
    seal: Option<&BatchSeal<'_>>,
) -> AtOnce {
    let fences = FenceSet::of(requests);
    let plan = plan(requests, &fences.distinct, repeats);
    // A sealed batch numbers its messages itself, to seal each to its seq: only from counts
    // the lane knows. Else it is staged, which reads them.
    if let Some(seal) = seal
        && plan.per_session.keys().any(|session_id| {
            !seal.counts.contains_key(session_id) || !seal.deks.contains_key(session_id)
        })
    {
        return AtOnce::Refused;
    }
    let params = match Params::of(requests, &fences, repeats, &plan, seal) {
        Ok(params) => params,
        Err(error) => return AtOnce::Failed(BatchError::Statement(error)),
    };
    // PostgreSQL's statement takes the fences first; SQLite's script checks them per row.
    let (statement, fences_json) = match backend {
        Backend::Sqlite => (
            Backend::sqlite_append_batch(synchronous, params.sqlite_parts()),
            None,
        ),
        Backend::Postgres => {
            // PostgreSQL's statement cannot drop what it inserts itself.
            if params.trims_new_messages {
                return AtOnce::Refused;
            }
            let asynchronous = synchronous != Synchronous::Full;
            if lane.asynchronous_commit != asynchronous {
                let set = if asynchronous {
                    "SET synchronous_commit = off"
                } else {
                    "SET synchronous_commit = on"
                };
                if let Err(error) = lane.connection.execute(set).await {
                    return AtOnce::Failed(BatchError::Statement(unavailable(error)));
                }
                lane.asynchronous_commit = asynchronous;
            }
            match fences.json() {
                Ok(json) => (Backend::POSTGRES_APPEND_BATCH, Some(json)),
                Err(error) => return AtOnce::Failed(BatchError::Statement(error)),
            }
        }
    };
    if let (Backend::Sqlite, Some(writer)) = (backend, &mut lane.writer) {
        let params = [
            params.counts,
            params.messages,
            params.bounds,
            params.ids,
            params.replies,
            params.usage,
        ];
        return match writer.run(statement, &params) {
            Ok(rows) => committed(requests, &fences, repeats, &plan, counts_of(rows)),
            Err(ScriptError::Refused { unique, error }) => {
                if !look_up_ids && unique && has_new_ids(requests, repeats) {
                    AtOnce::RequestIdKept
                } else {
                    tracing::debug!(%error, "an at-once batch was refused; staging it");
                    AtOnce::Refused
                }
            }
            Err(ScriptError::Unknown(error)) => {
                AtOnce::Failed(BatchError::Commit(StoreError::Unavailable(error)))
            }
        };
    }
    let mut query = sqlx::query(statement);
    if let Some(fences_json) = fences_json {
        query = query.bind(fences_json);
    }
    let rows = query
        .bind(params.counts)
        .bind(params.messages)
        .bind(params.bounds)
        .bind(params.ids)
        .bind(params.replies)
        .bind(params.usage)
        .fetch_all(&mut lane.connection)
        .await;
    let error = match rows {
        // Committed: the counts tell each append's seqs.
        Ok(rows) => return committed(requests, &fences, repeats, &plan, parse_counts(&rows)),
        Err(error) => error,
    };
    let kept_already =
        !look_up_ids && is_unique_violation(&error) && has_new_ids(requests, repeats);
    match backend {
        // A statement before COMMIT failed and the transaction is still open: roll it back.
        // If there is none to roll back, the COMMIT itself failed, and its effect is unknown.
        Backend::Sqlite => match lane.connection.execute("ROLLBACK").await {
            Ok(_) if kept_already => AtOnce::RequestIdKept,
            Ok(_) => AtOnce::Refused,
            Err(_) => AtOnce::Failed(BatchError::Commit(unavailable(error))),
        },
        // One statement is its own transaction: one that failed wrote nothing. A broken
        // connection is not a refusal.
        Backend::Postgres if error.as_database_error().is_none() => {
            AtOnce::Failed(BatchError::Commit(unavailable(error)))
        }
        Backend::Postgres if kept_already => AtOnce::RequestIdKept,
        Backend::Postgres => AtOnce::Refused,
    }
}

/// A committed batch's outcomes, from the counts its statement returned.
fn committed(
    requests: &[AppendRequest],
    fences: &FenceSet<'_>,
    repeats: &[Repeat],
    plan: &Plan,
    counts: Result<HashMap<SessionId, u64>>,
) -> AtOnce {
    match counts {
        Ok(counts) => {
            AtOnce::Committed(outcomes(requests, &fences.distinct, repeats, plan, &counts).outcomes)
        }
        Err(error) => AtOnce::Failed(BatchError::Commit(error)),
    }
}

fn has_new_ids(requests: &[AppendRequest], repeats: &[Repeat]) -> bool {
    requests.iter().zip(repeats).any(|(request, repeat)| {
        matches!(repeat, Repeat::No) && matches!(request.append.key, AppendKey::Request { .. })
    })
}

/// The JSON parameters of the statements. A message is numbered `count − k`, where `k` is
/// how many of its session's new messages in this batch follow it; a request id's last seq
/// and a reply's seq are given the same way (`b`, `rb`).
struct Params {
    counts: String,
    messages: String,
    bounds: String,
    /// New request ids; a turn's reply in the same batch fills in its id's row at once.
    ids: String,
    /// Replies to turns whose ids were kept by an earlier batch.
    replies: String,
    /// Usage that the writing appends carry.
    usage: String,
    /// Whether a session's bound drops messages of this very batch.
    trims_new_messages: bool,
}

impl Params {
    /// The statements of the SQLite script that have something to do.
    fn sqlite_parts(&self) -> SqliteBatchParts {
        let mut parts = 0;
        for (json, part) in [
            (&self.ids, SqliteBatchParts::IDS),
            (&self.bounds, SqliteBatchParts::BOUNDS),
            (&self.replies, SqliteBatchParts::REPLIES),
            (&self.usage, SqliteBatchParts::USAGE),
        ] {
            if json != "[]" {
                parts |= part;
            }
        }
        SqliteBatchParts(parts)
    }

    fn of(
        requests: &[AppendRequest],
        fences: &FenceSet<'_>,
        repeats: &[Repeat],
        plan: &Plan,
        seal: Option<&BatchSeal<'_>>,
    ) -> Result<Self> {
        let mut left: HashMap<SessionId, u64> = plan
            .per_session
            .iter()
            .map(|(session_id, (added, _))| (*session_id, *added))
            .collect();
        let mut messages = Vec::new();
        let mut ids: Vec<IdRow<'_>> = Vec::new();
        // Where each new id of this batch is in `ids`.
        let mut new_ids: HashMap<(SessionId, &str), usize> = HashMap::new();
        let mut replies = Vec::new();
        let mut bounds: HashMap<SessionId, u64> = HashMap::new();
        let mut writing = Vec::with_capacity(requests.len());
        for (index, request) in requests.iter().enumerate() {
            let append = &request.append;
            let bound = bounds.entry(append.session_id).or_insert(u64::MAX);
            *bound = (*bound).min(append.keep_last.max(1));
            if !writes(&plan.orphaned, &fences.distinct, repeats, index, append) {
                continue;
            }
            writing.push(append);
            let Some(left) = left.get_mut(&append.session_id) else {
                continue;
            };
            let session = Hex::of(&append.session_id);
            for message in append.messages.iter() {
                *left -= 1;
                // Sealed: the seq this message will have if the session's count is still
                // the one the lane knows (the statement checks it), sealed to it.
                let (seq, content) = match seal {
                    Some(seal) => {
                        let added = plan
                            .per_session
                            .get(&append.session_id)
                            .map_or(0, |(added, _)| *added);
                        let known = seal.counts.get(&append.session_id).copied().unwrap_or(0);
                        let seq = known + added - *left;
                        let sealed = seal.content(append.session_id, seq, &message.content)?;
                        (Some(seq), Cow::Owned(sealed))
                    }
                    None => (None, Cow::Borrowed(message.content.as_str())),
                };
                messages.push(MessageRow {
                    s: session,
                    k: *left,
                    q: seq,
                    r: message.role.as_str(),
                    c: content,
                    n: &message.name,
                    t: micros(append.at),
                    l: append.fence.slot,
                    o: append.fence.owner.as_str(),
                    e: append.fence.epoch.0,
                });
            }
            match &append.key {
                AppendKey::None => {}
                AppendKey::Request { id, turn } => {
                    new_ids.insert((append.session_id, id.as_str()), ids.len());
                    ids.push(IdRow {
                        s: session,
                        r: id,
                        k: i64::from(*turn),
                        b: *left,
                        rb: None,
                        p: None,
                        c: None,
                        u: None,
                    });
                }
                AppendKey::Reply { id, usage } => {
                    let reply = ReplyRow {
                        s: session,
                        r: id,
                        b: *left,
                        p: to_i64(usage.prompt_tokens),
                        c: to_i64(usage.completion_tokens),
                        u: (usage.compute_seconds.max(0.0) * 1e6).round() as i64,
                    };
                    match new_ids.get(&(append.session_id, id.as_str())) {
                        Some(&row) => {
                            let row = &mut ids[row];
                            row.rb = Some(reply.b);
                            row.p = Some(reply.p);
                            row.c = Some(reply.c);
                            row.u = Some(reply.u);
                        }
                        None => replies.push(reply),
                    }
                }
            }
        }
        let trims_new_messages = plan.per_session.iter().any(|(session_id, (added, _))| {
            bounds.get(session_id).is_some_and(|bound| added > bound)
        });
        let bounds: Vec<BoundRow> = bounds
            .into_iter()
            .filter(|(session_id, bound)| {
                *bound < u64::MAX && plan.per_session.contains_key(session_id)
            })
            .map(|(session_id, bound)| BoundRow {
                s: Hex::of(&session_id),
                q: to_i64(bound),
            })
            .collect();
        fn encode<T: Serialize>(what: &str, values: &[T]) -> Result<String> {
            serde_json::to_string(values)
                .map_err(|error| StoreError::Corrupt(format!("{what} do not encode: {error}")))
        }
        Ok(Params {
            counts: counts_json(&plan.per_session)?,
            messages: encode("messages", &messages)?,
            bounds: encode("bounds", &bounds)?,
            ids: encode("request ids", &ids)?,
            replies: encode("replies", &replies)?,
            usage: batch_usage_json(writing.into_iter()),
            trims_new_messages,
        })
    }
}

/// A message: `count − k` is its seq, `q` the seq it was sealed to.
#[derive(Serialize)]
struct MessageRow<'a> {
    s: Hex,
    k: u64,
    q: Option<u64>,
    r: &'a str,
    c: Cow<'a, str>,
    n: &'a str,
    t: i64,
    l: u32,
    o: &'a str,
    e: u64,
}

/// A new request id; `rb` (its reply's seq, `count − rb`) and the usage are filled in when
/// its turn's reply is in the same batch.
#[derive(Serialize)]
struct IdRow<'a> {
    s: Hex,
    r: &'a str,
    k: i64,
    b: u64,
    rb: Option<u64>,
    p: Option<i64>,
    c: Option<i64>,
    u: Option<i64>,
}

/// A turn's reply: its seq (`count − b`) and usage.
#[derive(Serialize)]
struct ReplyRow<'a> {
    s: Hex,
    r: &'a str,
    b: u64,
    p: i64,
    c: i64,
    u: i64,
}

#[derive(Serialize)]
struct BoundRow {
    s: Hex,
    q: i64,
}
