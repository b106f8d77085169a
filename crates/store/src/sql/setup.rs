//! Opening a store: migrations, the cluster id, whether it is sealed, and SQLite's periodic
//! WAL checkpoint.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Row, SqlSafeStr};
use switchyard_core::SessionId;

use super::{Backend, micros, unavailable};
use crate::{Result, StoreError};

/// How often an SQLite store checkpoints its WAL beside the append lanes.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// Frames in the WAL past which a WAL copied whole is truncated: twice what a lane's own
/// checkpoints let it reach (4 000 pages) before it starts over.
const TRUNCATE_AFTER_FRAMES: i64 = 8_000;

/// Checkpoints the WAL every [`CHECKPOINT_INTERVAL`].
///
/// A passive checkpoint copies what it can into the database and syncs it without holding
/// up a writer; under appends, each lane's own helper does so far more often (see
/// `lane_checkpoint`), and this covers what the lanes leave, such as a WAL that a reader
/// kept from starting over. Once every frame is copied, the next commit starts the WAL over
/// from its beginning. A full checkpoint blocks every writer
/// while it is pending, through its copy and its sync of the database: run every 30 s in
/// a soak at 400 calls/s, the run's p99.9 was 340 ms, against 11.6 ms with passive ones
/// every second (BENCHMARKS.md, command K). So the WAL is truncated only when it has grown
/// long without starting over (readers kept reading it) and the passive checkpoint has
/// just copied all of it: nothing is left to copy, and no reader is behind, so the wait is
/// for the readers of its last frames alone.
pub(super) async fn checkpoint_periodically(pool: AnyPool) {
    let mut interval = tokio::time::interval(CHECKPOINT_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    loop {
        interval.tick().await;
        // Its row: whether it was kept from finishing, the frames in the WAL, the frames
        // copied into the database.
        let passive = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&pool)
            .await
            .and_then(|row| {
                Ok((
                    row.try_get::<i64, _>(0)?,
                    row.try_get::<i64, _>(1)?,
                    row.try_get::<i64, _>(2)?,
                ))
            });
        let frames = match passive {
            Ok((0, frames, copied)) if frames > TRUNCATE_AFTER_FRAMES && copied == frames => frames,
            Ok(_) => continue,
            Err(error) => {
                tracing::warn!(%error, "WAL checkpoint failed; trying again later");
                continue;
            }
        };
        tracing::info!(frames, "the WAL has not started over; truncating it");
        if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&pool)
            .await
        {
            tracing::warn!(%error, "WAL checkpoint failed; trying again later");
        }
    }
}

pub(super) async fn migrate(pool: &AnyPool, backend: Backend) -> Result<()> {
    let migrations: Vec<Migration> = backend
        .migrations()
        .iter()
        .enumerate()
        .map(|(index, (description, sql))| {
            Migration::new(
                index as i64 + 1,
                Cow::Borrowed(*description),
                MigrationType::Simple,
                sql.into_sql_str(),
                false,
            )
        })
        .collect();
    let migrator = Migrator {
        migrations: Cow::Owned(migrations),
        ..Migrator::DEFAULT
    };
    let failed = |error: sqlx::migrate::MigrateError| {
        StoreError::Unavailable(format!("store migration failed: {error}"))
    };
    match backend {
        // PostgreSQL: the migrator takes an advisory lock, so nodes starting together
        // migrate one at a time.
        Backend::Postgres => migrator.run(pool).await.map_err(failed),
        // SQLite has no such lock: hold the write lock around the whole migration instead,
        // so processes sharing one file do not race (each migration runs as a savepoint).
        Backend::Sqlite => {
            let mut transaction = pool
                .begin_with("BEGIN IMMEDIATE")
                .await
                .map_err(unavailable)?;
            migrator.run(&mut *transaction).await.map_err(failed)?;
            transaction.commit().await.map_err(unavailable)
        }
    }
}

pub(super) async fn ensure_cluster_id(pool: &AnyPool) -> Result<String> {
    let candidate = format!("cluster-{}", SessionId::new_random());
    sqlx::query(
        "INSERT INTO cluster (singleton, cluster_id, created_at_us) VALUES (1, $1, $2) \
         ON CONFLICT (singleton) DO NOTHING",
    )
    .bind(candidate)
    .bind(micros(SystemTime::now()))
    .execute(pool)
    .await
    .map_err(unavailable)?;
    let row = sqlx::query("SELECT cluster_id FROM cluster WHERE singleton = 1")
        .fetch_one(pool)
        .await
        .map_err(unavailable)?;
    row.try_get("cluster_id").map_err(unavailable)
}

/// Whether the store says its contents are sealed.
pub(super) async fn is_sealed(pool: &AnyPool) -> Result<bool> {
    let row = sqlx::query("SELECT sealed FROM cluster WHERE singleton = 1")
        .fetch_one(pool)
        .await
        .map_err(unavailable)?;
    let sealed: i64 = row.try_get("sealed").map_err(unavailable)?;
    Ok(sealed != 0)
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use crate::sql::Backend;

    /// A store written before its messages were kept in write order keeps every message,
    /// its seq's uniqueness and its system messages' index; new messages go after the old.
    #[test]
    fn messages_move_to_write_order_with_everything_they_held() {
        let connection = Connection::open_in_memory().unwrap();
        let migrations = Backend::Sqlite.migrations();
        let moved = migrations
            .iter()
            .position(|(description, _)| *description == "messages in write order")
            .expect("the migration is listed");
        for (_, sql) in &migrations[..moved] {
            connection.execute_batch(sql).unwrap();
        }
        let insert = "INSERT INTO messages (session_id, seq, role, content, name, created_at_us) \
                      VALUES (?1, ?2, ?3, ?4, '', ?2)";
        // Two sessions, written interleaved; one message of each is a system message.
        for seq in 1..=3_i64 {
            for session in [[2_u8; 16], [1_u8; 16]] {
                let role = if seq == 2 { "system" } else { "user" };
                let content = format!("{}-{seq}", session[0]);
                connection
                    .execute(insert, rusqlite::params![&session[..], seq, role, content])
                    .unwrap();
            }
        }
        connection.execute_batch(migrations[moved].1).unwrap();

        let rows: Vec<(Vec<u8>, i64, String)> = connection
            .prepare("SELECT session_id, seq, content FROM messages ORDER BY id")
            .unwrap()
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let contents: Vec<&str> = rows
            .iter()
            .map(|(_, _, content)| content.as_str())
            .collect();
        assert_eq!(contents, ["1-1", "1-2", "1-3", "2-1", "2-2", "2-3"]);
        // A forked seq is refused as before.
        let forked = connection.execute(
            insert,
            rusqlite::params![&[1_u8; 16][..], 3_i64, "user", "fork"],
        );
        let code = forked.unwrap_err().sqlite_error().unwrap().extended_code;
        assert_eq!(code, rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE);
        // Reads by seq and the system messages' look-up use the indexes.
        for (query, index) in [
            (
                "SELECT content FROM messages WHERE session_id = x'01010101010101010101010101010101' AND seq >= 2 ORDER BY seq",
                "messages_by_seq",
            ),
            (
                "SELECT seq FROM messages WHERE session_id = x'01010101010101010101010101010101' AND role = 'system' ORDER BY seq",
                "messages_system",
            ),
        ] {
            let plan: String = connection
                .query_row(&format!("EXPLAIN QUERY PLAN {query}"), [], |row| row.get(3))
                .unwrap();
            assert!(plan.contains(index), "{query}: {plan}");
        }
        // A new message is written after every old one.
        connection
            .execute(
                insert,
                rusqlite::params![&[1_u8; 16][..], 4_i64, "user", "1-4"],
            )
            .unwrap();
        let last_content: String = connection
            .query_row(
                "SELECT content FROM messages ORDER BY id DESC LIMIT 1",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(last_content, "1-4");
    }
}
