//! A batch staged: the fences that hold and the sessions' new counts are read first, then
//! each append is numbered and written, so that each gets its own outcome.

use std::collections::HashMap;
use std::time::SystemTime;

use sqlx::{AnyConnection, Connection, Executor, Row};
use switchyard_core::SessionId;

use super::{
    AppendRequest, BatchError, BatchSeal, FenceSet, Repeat, Staged, counts_json, find_repeats, hex,
    is_unique_violation, messages_json, outcomes, parse_counts, plan,
};
use crate::sql::backend::Synchronous;
use crate::sql::quota::batch_usage_json;
use crate::sql::{Backend, requests, unavailable};
use crate::{Appended, Result, StoreError};

/// How often a batch is staged again because a fence it assumed held did not.
const FENCE_ATTEMPTS: usize = 3;

/// `None`: a request id was kept already; nothing was written.
pub(super) async fn commit_sqlite(
    connection: &mut AnyConnection,
    requests: &[AppendRequest],
    repeats: &[Repeat],
    look_up_ids: bool,
    synchronous: Synchronous,
    seal: Option<&BatchSeal<'_>>,
) -> Result<Option<Vec<Result<Appended>>>, BatchError> {
    let fences = FenceSet::of(requests);
    let fences_json = fences.json().map_err(BatchError::Statement)?;
    let mut assumed = fences.distinct.clone();
    for _ in 0..FENCE_ATTEMPTS {
        let plan = plan(requests, &assumed, repeats);
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
        let staged = outcomes(requests, &holding, repeats, &plan, &counts);
        return write_sqlite(connection, staged, look_up_ids, seal).await;
    }
    Err(BatchError::Statement(StoreError::Unavailable(
        "the slots' leases kept changing during the batch".into(),
    )))
}

/// The writes of a staged batch and its commit, in one call.
async fn write_sqlite(
    connection: &mut AnyConnection,
    staged: Staged<'_>,
    look_up_ids: bool,
    seal: Option<&BatchSeal<'_>>,
) -> Result<Option<Vec<Result<Appended>>>, BatchError> {
    let params = match staged.sqlite_params(seal) {
        Ok(params) => params,
        Err(error) => return Err(rolled_back(connection, error).await),
    };
    let [messages, trims, ids, replies, usage] = params;
    let written = sqlx::query(Backend::SQLITE_WRITE_AND_COMMIT)
        .bind(messages)
        .bind(trims)
        .bind(ids)
        .bind(replies)
        .bind(usage)
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

/// PostgreSQL: the statements one by one in a transaction. `None`: a request id was kept
/// already; nothing was written.
pub(super) async fn commit_postgres(
    connection: &mut AnyConnection,
    requests: &[AppendRequest],
    look_up_ids: bool,
    defer: bool,
    seal: Option<&BatchSeal<'_>>,
) -> Result<Option<Vec<Result<Appended>>>, BatchError> {
    let statement = |error| BatchError::Statement(unavailable(error));
    let mut transaction = connection
        .begin_with(Backend::Postgres.begin_write())
        .await
        .map_err(statement)?;
    // Said either way: the lane's session may be set to the other.
    transaction
        .execute(if defer {
            "SET LOCAL synchronous_commit = off"
        } else {
            "SET LOCAL synchronous_commit = on"
        })
        .await
        .map_err(statement)?;
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
        insert_messages_postgres(&mut transaction, &staged.rows, seal).await?;
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
        if staged
            .rows
            .iter()
            .any(|(request, _)| !request.append.usage.is_empty())
        {
            sqlx::query(Backend::POSTGRES_SAVE_BATCH_USAGE)
                .bind(staged.usage_json())
                .execute(&mut *transaction)
                .await
                .map_err(unavailable)?;
        }
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

impl Staged<'_> {
    /// The usage of the writing appends (`batch_usage_json`).
    fn usage_json(&self) -> String {
        batch_usage_json(self.rows.iter().map(|(request, _)| &request.append))
    }

    /// The five JSON parameters of [`Backend::SQLITE_WRITE_AND_COMMIT`].
    fn sqlite_params(&self, seal: Option<&BatchSeal<'_>>) -> Result<[String; 5]> {
        let trims: Vec<serde_json::Value> = self
            .trims
            .iter()
            .map(|(session_id, up_to)| serde_json::json!({ "s": hex(session_id), "q": up_to }))
            .collect();
        let trims = serde_json::to_string(&trims)
            .map_err(|error| StoreError::Corrupt(format!("trims do not encode: {error}")))?;
        Ok([
            messages_json(&self.rows, seal)?,
            trims,
            requests::new_ids_json(&self.kept)?,
            requests::replies_json(&self.replies)?,
            self.usage_json(),
        ])
    }
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

async fn insert_messages_postgres(
    connection: &mut AnyConnection,
    rows: &[(&AppendRequest, u64)],
    seal: Option<&BatchSeal<'_>>,
) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(Backend::Postgres.insert_messages_query())
        .bind(messages_json(rows, seal)?)
        .execute(&mut *connection)
        .await
        .map_err(unavailable)?;
    Ok(())
}
