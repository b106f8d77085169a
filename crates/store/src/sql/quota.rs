//! Quota overrides and windowed usage in SQL: small, per-user reads, and usage saved many
//! users at a time in one statement.

use std::collections::BTreeMap;
use std::fmt::Write;

use sqlx::Row;
use switchyard_core::UserId;

use super::backend::Backend;
use super::{SqlStore, corrupt, epoch_param, unavailable};
use crate::{Append, Fence, Result, StoredLimit, StoredUsage, UserQuotaRecord};

impl Backend {
    /// Content bytes of a user's messages (`$1`: the user id); of a sealed store, the
    /// plaintext's, from each record's length (unpadded base64 of nonce, text and tag).
    fn storage_bytes_query(self, sealed: bool) -> &'static str {
        match (self, sealed) {
            (Backend::Sqlite, true) => {
                "SELECT COALESCE(SUM(length(m.content) * 3 / 4 - 28), 0) AS bytes \
                 FROM sessions AS s JOIN messages AS m ON m.session_id = s.session_id \
                 WHERE s.user_id = $1"
            }
            (Backend::Postgres, true) => {
                "SELECT COALESCE(SUM(octet_length(m.content) * 3 / 4 - 28), 0)::bigint AS bytes \
                 FROM sessions AS s JOIN messages AS m ON m.session_id = s.session_id \
                 WHERE s.user_id = $1"
            }
            _ => self.plain_storage_bytes_query(),
        }
    }

    fn plain_storage_bytes_query(self) -> &'static str {
        match self {
            Backend::Sqlite => {
                "SELECT COALESCE(SUM(length(CAST(m.content AS BLOB))), 0) AS bytes \
                 FROM sessions AS s JOIN messages AS m ON m.session_id = s.session_id \
                 WHERE s.user_id = $1"
            }
            Backend::Postgres => {
                "SELECT COALESCE(SUM(octet_length(m.content)), 0)::bigint AS bytes \
                 FROM sessions AS s JOIN messages AS m ON m.session_id = s.session_id \
                 WHERE s.user_id = $1"
            }
        }
    }
}

/// A usage version as the statements take it.
fn version_param(version: u64) -> i64 {
    i64::try_from(version).unwrap_or(i64::MAX)
}

/// The usage that the writing appends of a batch carry, as [`usage_json`] writes it under
/// each append's fence. The batch statements save it in the appends' transaction.
pub(in crate::sql) fn batch_usage_json<'a>(appends: impl Iterator<Item = &'a Append>) -> String {
    usage_json(
        appends.flat_map(|append| append.usage.iter().map(move |usage| (&append.fence, usage))),
    )
}

/// Usage as the save statements take it: `[{u: user, r: resource, s: state, v: version, l:
/// slot, o: owner, e: epoch}]`, one row per user and resource (the newest version). Each is
/// saved while its fence holds and never over a newer version.
fn usage_json<'a>(usage: impl Iterator<Item = (&'a Fence, &'a StoredUsage)>) -> String {
    let mut newest: BTreeMap<(&str, &str), (&Fence, &StoredUsage)> = BTreeMap::new();
    for (fence, usage) in usage {
        let key = (usage.user_id.as_str(), usage.resource.as_str());
        if newest
            .get(&key)
            .is_none_or(|(_, kept)| kept.version <= usage.version)
        {
            newest.insert(key, (fence, usage));
        }
    }
    // Written out directly: this is on the path of every append of a limited user's.
    let quote = |text: &str| serde_json::Value::from(text).to_string();
    let mut json = String::from("[");
    for (fence, usage) in newest.values() {
        if json.len() > 1 {
            json.push(',');
        }
        let _ = write!(
            json,
            "{{\"u\":{},\"r\":{},\"s\":{},\"v\":{},\"l\":{},\"o\":{},\"e\":{}}}",
            quote(usage.user_id.as_str()),
            quote(&usage.resource),
            quote(&usage.state),
            version_param(usage.version),
            i64::from(fence.slot),
            quote(fence.owner.as_str()),
            epoch_param(fence.epoch),
        );
    }
    json.push(']');
    json
}

/// SQLite: saves usage from the JSON array parameter given (see [`usage_json`]), one
/// statement ending in `;`: in a batch's script, or alone for the periodic save.
macro_rules! sqlite_save_batch_usage {
    ($param:literal) => {
        concat!(
            "INSERT INTO user_usage_windows (user_id, resource, state, version) \
             SELECT json_extract(value, '$.u'), json_extract(value, '$.r'), \
                    json_extract(value, '$.s'), json_extract(value, '$.v') \
             FROM jsonb_each(",
            $param,
            ") \
             WHERE EXISTS (SELECT 1 FROM slot_leases AS l \
                           WHERE l.slot = json_extract(value, '$.l') AND l.owner = json_extract(value, '$.o') \
                             AND l.epoch = json_extract(value, '$.e') AND l.released = 0) \
             ON CONFLICT (user_id, resource) DO UPDATE SET state = excluded.state, version = excluded.version \
             WHERE excluded.version >= user_usage_windows.version; "
        )
    };
}
pub(super) use sqlite_save_batch_usage;

impl Backend {
    /// The periodic save of usage that came without an append (`$1`, see [`usage_json`]).
    fn save_usage_query(self) -> &'static str {
        match self {
            Backend::Sqlite => sqlite_save_batch_usage!("$1"),
            Backend::Postgres => Backend::POSTGRES_SAVE_BATCH_USAGE,
        }
    }

    /// PostgreSQL: saves usage (`$1`, see [`usage_json`]): a staged batch's, in its
    /// transaction, and the periodic save's.
    pub(super) const POSTGRES_SAVE_BATCH_USAGE: &'static str = "\
         INSERT INTO user_usage_windows (user_id, resource, state, version) \
         SELECT w.u, w.r, w.s, w.v \
         FROM json_to_recordset($1::json) AS w(u text, r text, s text, v bigint, l bigint, o text, e bigint) \
         WHERE EXISTS (SELECT 1 FROM slot_leases AS f \
                       WHERE f.slot = w.l AND f.owner = w.o AND f.epoch = w.e AND f.released = 0) \
         ON CONFLICT (user_id, resource) DO UPDATE SET state = excluded.state, version = excluded.version \
         WHERE excluded.version >= user_usage_windows.version";
}

impl SqlStore {
    pub(super) async fn load_user_quota_sql(&self, user_id: &UserId) -> Result<UserQuotaRecord> {
        let overrides = sqlx::query(
            "SELECT resource, limit_value, window_us FROM user_quota_overrides \
             WHERE user_id = $1 ORDER BY resource",
        )
        .bind(user_id.as_str().to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?
        .iter()
        .map(|row| {
            let window_us: i64 = row.try_get("window_us").map_err(unavailable)?;
            Ok(StoredLimit {
                resource: row.try_get("resource").map_err(unavailable)?,
                limit: row.try_get("limit_value").map_err(unavailable)?,
                window_us: u64::try_from(window_us)
                    .map_err(|_| corrupt("a quota window is negative"))?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
        let usage = sqlx::query(
            "SELECT resource, state, version FROM user_usage_windows \
             WHERE user_id = $1 ORDER BY resource",
        )
        .bind(user_id.as_str().to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?
        .iter()
        .map(|row| {
            let version: i64 = row.try_get("version").map_err(unavailable)?;
            Ok(StoredUsage {
                user_id: user_id.clone(),
                resource: row.try_get("resource").map_err(unavailable)?,
                state: row.try_get("state").map_err(unavailable)?,
                version: u64::try_from(version)
                    .map_err(|_| corrupt("a usage version is negative"))?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
        Ok(UserQuotaRecord { overrides, usage })
    }

    pub(super) async fn set_user_quota_sql(
        &self,
        fence: &Fence,
        user_id: &UserId,
        overrides: &[StoredLimit],
        clear: bool,
    ) -> Result<()> {
        let mut transaction = self.begin_fenced(fence).await?;
        if clear {
            sqlx::query("DELETE FROM user_quota_overrides WHERE user_id = $1")
                .bind(user_id.as_str().to_string())
                .execute(&mut *transaction)
                .await
                .map_err(unavailable)?;
        }
        for limit in overrides {
            sqlx::query(
                "INSERT INTO user_quota_overrides (user_id, resource, limit_value, window_us) \
                 VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (user_id, resource) DO UPDATE \
                 SET limit_value = excluded.limit_value, window_us = excluded.window_us",
            )
            .bind(user_id.as_str().to_string())
            .bind(limit.resource.clone())
            .bind(limit.limit)
            .bind(i64::try_from(limit.window_us).unwrap_or(i64::MAX))
            .execute(&mut *transaction)
            .await
            .map_err(unavailable)?;
        }
        transaction.commit().await.map_err(unavailable)
    }

    pub(super) async fn save_usage_sql(&self, usage: &[(Fence, StoredUsage)]) -> Result<usize> {
        if usage.is_empty() {
            return Ok(0);
        }
        let rows = usage_json(usage.iter().map(|(fence, usage)| (fence, usage)));
        let result = sqlx::query(self.backend.save_usage_query())
            .bind(rows)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(result.rows_affected() as usize)
    }

    pub(super) async fn erase_user_quota_sql(
        &self,
        fence: &Fence,
        user_id: &UserId,
    ) -> Result<(bool, bool)> {
        let mut transaction = self.begin_fenced(fence).await?;
        let mut erased = [false; 2];
        for (index, statement) in [
            "DELETE FROM user_usage_windows WHERE user_id = $1",
            "DELETE FROM user_quota_overrides WHERE user_id = $1",
        ]
        .into_iter()
        .enumerate()
        {
            erased[index] = sqlx::query(statement)
                .bind(user_id.as_str().to_string())
                .execute(&mut *transaction)
                .await
                .map_err(unavailable)?
                .rows_affected()
                > 0;
        }
        transaction.commit().await.map_err(unavailable)?;
        Ok((erased[0], erased[1]))
    }

    pub(super) async fn user_storage_bytes_sql(&self, user_id: &UserId) -> Result<u64> {
        let row = sqlx::query(self.backend.storage_bytes_query(self.sealed))
            .bind(user_id.as_str().to_string())
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)?;
        let bytes: i64 = row.try_get("bytes").map_err(unavailable)?;
        Ok(u64::try_from(bytes).unwrap_or(0))
    }
}
