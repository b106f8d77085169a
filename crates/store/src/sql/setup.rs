//! Opening a store: migrations, the cluster id, whether it is sealed, and SQLite's periodic
//! WAL checkpoint.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Row, SqlSafeStr};
use switchyard_core::SessionId;

use super::{Backend, micros, unavailable};
use crate::{Result, StoreError};

/// How often an SQLite store checkpoints its WAL in full. The passive checkpoints that
/// SQLite runs after commits (the append lane's every 4 000 pages, other connections'
/// every 1 000) cannot finish while a reader is behind; this one waits for readers, and
/// truncates the WAL.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(30);

/// Checkpoints the WAL into the database and truncates it, every [`CHECKPOINT_INTERVAL`].
pub(super) async fn checkpoint_periodically(pool: AnyPool) {
    let mut interval = tokio::time::interval(CHECKPOINT_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    loop {
        interval.tick().await;
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
