//! Request ids on the SQL stores: found, kept and completed inside the group-commit
//! transaction of the appends they belong to, each as one statement for the whole batch.

use std::collections::HashMap;

use sqlx::{AnyPool, Row};
use switchyard_core::SessionId;

use super::batch::{hex, parse_hex_id};
use super::{Backend, unavailable};
use crate::{RequestRecord, Result, StoreError, TurnUsage};

type Transaction = sqlx::AnyConnection;

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// What the store keeps of one request id.
pub(super) async fn record(
    pool: &AnyPool,
    session_id: SessionId,
    request_id: &str,
) -> Result<Option<RequestRecord>> {
    let row = sqlx::query(
        "SELECT turn, last_seq, reply_seq, prompt_tokens, completion_tokens, compute_us \
         FROM request_ids WHERE session_id = $1 AND request_id = $2",
    )
    .bind(session_id.as_bytes().to_vec())
    .bind(request_id.to_string())
    .fetch_optional(pool)
    .await
    .map_err(unavailable)?;
    let Some(row) = row else {
        return Ok(None);
    };
    let reply_seq: Option<i64> = row.try_get("reply_seq").map_err(unavailable)?;
    let reply = match reply_seq {
        None => None,
        Some(seq) => {
            let prompt: Option<i64> = row.try_get("prompt_tokens").map_err(unavailable)?;
            let completion: Option<i64> = row.try_get("completion_tokens").map_err(unavailable)?;
            let compute_us: Option<i64> = row.try_get("compute_us").map_err(unavailable)?;
            Some((
                to_u64(seq),
                TurnUsage {
                    prompt_tokens: to_u64(prompt.unwrap_or(0)),
                    completion_tokens: to_u64(completion.unwrap_or(0)),
                    compute_seconds: to_u64(compute_us.unwrap_or(0)) as f64 / 1e6,
                },
            ))
        }
    };
    let turn: i64 = row.try_get("turn").map_err(unavailable)?;
    let last_seq: i64 = row.try_get("last_seq").map_err(unavailable)?;
    Ok(Some(RequestRecord {
        turn: turn != 0,
        last_seq: to_u64(last_seq),
        reply,
    }))
}

/// The request ids among `keys` the store already keeps: whether each was a turn, and its
/// last seq.
pub(super) async fn known(
    transaction: &mut Transaction,
    backend: Backend,
    keys: &[(SessionId, &str)],
) -> Result<HashMap<(SessionId, String), (bool, u64)>> {
    let keys: Vec<serde_json::Value> = keys
        .iter()
        .map(|(session_id, id)| serde_json::json!({ "s": hex(session_id), "r": id }))
        .collect();
    let keys = encode(&keys)?;
    let query = match backend {
        Backend::Sqlite => {
            "SELECT lower(hex(q.session_id)) AS s, q.request_id AS r, q.turn AS turn, q.last_seq AS last_seq \
             FROM request_ids AS q JOIN json_each($1) AS j \
               ON q.session_id = unhex(json_extract(j.value, '$.s')) \
              AND q.request_id = json_extract(j.value, '$.r')"
        }
        Backend::Postgres => {
            "SELECT encode(q.session_id, 'hex') AS s, q.request_id AS r, q.turn AS turn, q.last_seq AS last_seq \
             FROM request_ids AS q JOIN json_to_recordset($1::json) AS j(s text, r text) \
               ON q.session_id = decode(j.s, 'hex') AND q.request_id = j.r"
        }
    };
    let rows = sqlx::query(query)
        .bind(keys)
        .fetch_all(&mut *transaction)
        .await
        .map_err(unavailable)?;
    let mut known = HashMap::with_capacity(rows.len());
    for row in rows {
        let session: String = row.try_get("s").map_err(unavailable)?;
        let session_id = parse_hex_id(&session)
            .ok_or_else(|| StoreError::Corrupt(format!("a session id came back as {session:?}")))?;
        let request_id: String = row.try_get("r").map_err(unavailable)?;
        let turn: i64 = row.try_get("turn").map_err(unavailable)?;
        let last_seq: i64 = row.try_get("last_seq").map_err(unavailable)?;
        known.insert((session_id, request_id), (turn != 0, to_u64(last_seq)));
    }
    Ok(known)
}

/// Keeps new request ids: (session, id, is a turn, last seq). An id already kept is left
/// as it is; returns how many were new.
pub(super) async fn insert(
    transaction: &mut Transaction,
    backend: Backend,
    rows: &[(SessionId, &str, bool, u64)],
) -> Result<usize> {
    if rows.is_empty() {
        return Ok(0);
    }
    let query = match backend {
        Backend::Sqlite => {
            "INSERT INTO request_ids (session_id, request_id, turn, last_seq) \
             SELECT unhex(json_extract(value, '$.s')), json_extract(value, '$.r'), \
                    json_extract(value, '$.k'), json_extract(value, '$.l') \
             FROM json_each($1) WHERE true ON CONFLICT DO NOTHING"
        }
        Backend::Postgres => {
            "INSERT INTO request_ids (session_id, request_id, turn, last_seq) \
             SELECT decode(j.s, 'hex'), j.r, j.k, j.l \
             FROM json_to_recordset($1::json) AS j(s text, r text, k bigint, l bigint) \
             ON CONFLICT DO NOTHING"
        }
    };
    let inserted = sqlx::query(query)
        .bind(new_ids_json(rows)?)
        .execute(&mut *transaction)
        .await
        .map_err(unavailable)?;
    Ok(usize::try_from(inserted.rows_affected()).unwrap_or(usize::MAX))
}

/// Completes turns' request ids with their replies: (session, id, reply seq, usage).
pub(super) async fn record_replies(
    transaction: &mut Transaction,
    backend: Backend,
    rows: &[(SessionId, &str, u64, TurnUsage)],
) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let query = match backend {
        Backend::Sqlite => {
            "UPDATE request_ids SET reply_seq = j.q, prompt_tokens = j.p, completion_tokens = j.c, compute_us = j.u \
             FROM (SELECT unhex(json_extract(value, '$.s')) AS s, json_extract(value, '$.r') AS r, \
                          json_extract(value, '$.q') AS q, json_extract(value, '$.p') AS p, \
                          json_extract(value, '$.c') AS c, json_extract(value, '$.u') AS u \
                   FROM json_each($1)) AS j \
             WHERE request_ids.session_id = j.s AND request_ids.request_id = j.r"
        }
        Backend::Postgres => {
            "UPDATE request_ids AS q SET reply_seq = j.q, prompt_tokens = j.p, completion_tokens = j.c, compute_us = j.u \
             FROM json_to_recordset($1::json) AS j(s text, r text, q bigint, p bigint, c bigint, u bigint) \
             WHERE q.session_id = decode(j.s, 'hex') AND q.request_id = j.r"
        }
    };
    sqlx::query(query)
        .bind(replies_json(rows)?)
        .execute(&mut *transaction)
        .await
        .map_err(unavailable)?;
    Ok(())
}

/// New request ids as the statements take them: `{s, r, k, l}`.
pub(super) fn new_ids_json(rows: &[(SessionId, &str, bool, u64)]) -> Result<String> {
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|(session_id, id, turn, last_seq)| {
            serde_json::json!({ "s": hex(session_id), "r": id, "k": i64::from(*turn), "l": to_i64(*last_seq) })
        })
        .collect();
    encode(&rows)
}

/// Replies completing their turns' request ids, as the statements take them.
pub(super) fn replies_json(rows: &[(SessionId, &str, u64, TurnUsage)]) -> Result<String> {
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|(session_id, id, seq, usage)| {
            serde_json::json!({
                "s": hex(session_id),
                "r": id,
                "q": to_i64(*seq),
                "p": to_i64(usage.prompt_tokens),
                "c": to_i64(usage.completion_tokens),
                "u": (usage.compute_seconds.max(0.0) * 1e6).round() as i64,
            })
        })
        .collect();
    encode(&rows)
}

fn encode(rows: &[serde_json::Value]) -> Result<String> {
    serde_json::to_string(rows)
        .map_err(|error| StoreError::Corrupt(format!("request ids do not encode: {error}")))
}
