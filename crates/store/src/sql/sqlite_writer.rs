//! SQLite: a lane's at-once batches ([`Backend::sqlite_append_batch`]) on a connection
//! that calls SQLite directly, from the lane's own thread.
//!
//! Through sqlx, each statement of a batch's script hands its result from the connection's
//! thread to the lane, a wake-up each: eight per batch, about half of what a lone turn's
//! commit cost beside SQLite's own work and the sync. Here the whole script runs on the
//! lane's thread, which waits for nothing else while it does.
//!
//! The writer holds a second connection to the lane's database file, set up as the pool's
//! connections are. The lane uses one of its two connections at a time, so they never wait
//! on each other's write lock.
//!
//! [`Backend::sqlite_append_batch`]: super::Backend::sqlite_append_batch

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::appender::Counters;
use super::backend::SQLITE_CONNECTION_PRAGMAS;
use super::lane_checkpoint::{self, LaneCheckpoints};
use crate::{Result, StoreError};

/// How long a statement waits for another connection's write lock (sqlx's default).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Prepared statements kept: a script's statements, in every combination of its parts.
const STATEMENT_CACHE: usize = 32;

/// Why a script did not commit.
#[derive(Debug)]
pub(super) enum ScriptError {
    /// A statement failed and the transaction was rolled back: nothing was written.
    /// `unique`: it broke a uniqueness constraint.
    Refused { unique: bool, error: String },
    /// The commit failed, or the transaction could not be rolled back: whether anything
    /// was written is unknown.
    Unknown(String),
}

/// What a script's statements returned: each updated session's id (hex) and message count.
pub(super) type ScriptRows = Vec<(String, i64)>;

/// A lane's direct connection, and how it syncs. Its calls block: only a lane on a thread
/// of its own holds one.
pub(super) struct SqliteWriter {
    connection: Connection,
    checkpoints: LaneCheckpoints,
    /// The last `PRAGMA synchronous` that ran on the connection. SQLite parses such a
    /// statement anew each time it runs, cached or not; one that changes nothing is skipped.
    synchronous: Option<&'static str>,
}

impl SqliteWriter {
    /// Opens a connection to the database at `path`, and the thread that checkpoints its
    /// WAL beside it ([`lane_checkpoint`]).
    pub(super) fn open(path: &Path, counters: Arc<Counters>) -> Result<Self> {
        let connection = connect(path)?;
        lane_checkpoint::watch(&connection);
        Ok(SqliteWriter {
            connection,
            checkpoints: LaneCheckpoints::start(path, connect, counters)?,
            synchronous: None,
        })
    }
}

fn connect(path: &Path) -> Result<Connection> {
    let failed = |error: rusqlite::Error| {
        StoreError::Unavailable(format!(
            "cannot open {} for the append lane: {error}",
            path.display()
        ))
    };
    let connection = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(failed)?;
    connection.busy_timeout(BUSY_TIMEOUT).map_err(failed)?;
    connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // As the pool's connections and the lane's are set up (`SqlStore::open`, `Lane`);
    // foreign keys are sqlx's default.
    for pragmas in ["PRAGMA foreign_keys = ON", SQLITE_CONNECTION_PRAGMAS] {
        connection.execute_batch(pragmas).map_err(failed)?;
    }
    Ok(connection)
}

/// The statements of a script, in order.
fn statements(script: &str) -> impl Iterator<Item = &str> {
    script
        .split(';')
        .map(str::trim)
        .filter(|statement| !statement.is_empty())
}

impl SqliteWriter {
    /// Runs `script` (statements separated by `;`) with `params` bound to `$1`…`$6`.
    pub(super) fn run(
        &mut self,
        script: &'static str,
        params: &[String; 6],
    ) -> Result<ScriptRows, ScriptError> {
        let connection = &self.connection;
        match run_statements(connection, &mut self.synchronous, script, params) {
            Ok(rows) => Ok(rows),
            // The transaction is over: the COMMIT itself failed (or SQLite rolled it back).
            Err(error) if connection.is_autocommit() => {
                Err(ScriptError::Unknown(error.to_string()))
            }
            Err(error) => match connection.execute_batch("ROLLBACK") {
                Ok(()) => Err(ScriptError::Refused {
                    unique: is_unique_violation(&error),
                    error: error.to_string(),
                }),
                Err(rollback) => Err(ScriptError::Unknown(format!(
                    "{error}; then the rollback failed: {rollback}"
                ))),
            },
        }
    }

    /// After a batch's appends are answered: checkpoints the WAL, or has it checkpointed
    /// beside the lane, if its last commit left it long enough. A checkpoint the lane makes
    /// itself holds up the appends queued behind it, but not those of the batch just
    /// committed.
    pub(super) fn checkpoint_if_due(&self) {
        self.checkpoints.after_commit(&self.connection);
    }
}

fn run_statements(
    connection: &Connection,
    synchronous: &mut Option<&'static str>,
    script: &'static str,
    params: &[String; 6],
) -> rusqlite::Result<ScriptRows> {
    let mut counts = Vec::new();
    for sql in statements(script) {
        let sets_synchronous = sql.starts_with("PRAGMA synchronous");
        if sets_synchronous && *synchronous == Some(sql) {
            continue;
        }
        let mut statement = connection.prepare_cached(sql)?;
        for index in 1..=statement.parameter_count() {
            let param = statement
                .parameter_name(index)
                .and_then(|name| name.strip_prefix('$'))
                .and_then(|number| number.parse::<usize>().ok())
                .and_then(|number| params.get(number.checked_sub(1)?))
                .ok_or_else(|| rusqlite::Error::InvalidParameterName(sql.to_string()))?;
            statement.raw_bind_parameter(index, param.as_str())?;
        }
        let returns_counts = statement.column_count() == 2
            && statement.column_name(0).is_ok_and(|name| name == "id");
        let mut rows = statement.raw_query();
        while let Some(row) = rows.next()? {
            if returns_counts {
                counts.push((row.get(0)?, row.get(1)?));
            }
        }
        if sets_synchronous {
            *synchronous = Some(sql);
        }
    }
    Ok(counts)
}

fn is_unique_violation(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error().map(|error| error.extended_code),
        Some(rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
    )
}

#[cfg(test)]
mod tests {
    use super::{SqliteWriter, statements};
    use crate::sql::backend::{Backend, SqliteBatchParts, Synchronous};

    /// A batch's setting of `synchronous` runs only when it changes the connection's.
    #[test]
    fn a_sync_setting_runs_only_when_it_changes() {
        const FULL: &str = "PRAGMA synchronous = FULL; BEGIN IMMEDIATE; \
             INSERT INTO counts (id) VALUES ($1); COMMIT";
        const NORMAL: &str = "PRAGMA synchronous = NORMAL; BEGIN IMMEDIATE; \
             INSERT INTO counts (id) VALUES ($1); COMMIT";
        let dir = std::env::temp_dir().join(format!("sqlite-writer-sync-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lane.db");
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE counts (id TEXT PRIMARY KEY)")
            .unwrap();
        let mut writer = SqliteWriter::open(&path, Default::default()).unwrap();
        let level = |writer: &SqliteWriter| -> i64 {
            writer
                .connection
                .pragma_query_value(None, "synchronous", |row| row.get(0))
                .unwrap()
        };
        let mut runs = 0;
        for (script, level_after) in [(FULL, 2), (NORMAL, 1), (FULL, 2)] {
            runs += 1;
            let params = std::array::from_fn(|index| format!("{runs}-{index}"));
            writer.run(script, &params).unwrap();
            assert_eq!(level(&writer), level_after, "after run {runs}");
        }
        // Changed behind the writer's back, the setting is not restored: the writer skipped
        // a FULL it believed in force.
        writer
            .connection
            .execute_batch("PRAGMA synchronous = OFF")
            .unwrap();
        let params = std::array::from_fn(|index| format!("last-{index}"));
        writer.run(FULL, &params).unwrap();
        assert_eq!(level(&writer), 0);
        let rows: i64 = writer
            .connection
            .query_row("SELECT count(*) FROM counts", [], |row| row.get(0))
            .unwrap();
        assert_eq!(rows, 4);
        drop(writer);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Every script splits into whole statements: none holds a `;` of its own.
    #[test]
    fn every_batch_script_splits_into_its_statements() {
        for synchronous in [Synchronous::Full, Synchronous::Normal, Synchronous::Off] {
            for parts in 0..16 {
                let script = Backend::sqlite_append_batch(synchronous, SqliteBatchParts(parts));
                let statements: Vec<&str> = statements(script).collect();
                assert_eq!(statements.first(), Some(&synchronous.pragma()));
                assert_eq!(statements.get(1), Some(&"BEGIN IMMEDIATE"));
                assert_eq!(statements.last(), Some(&"COMMIT"));
                // The pragma, BEGIN, the counts, the activity, the messages, COMMIT, and one
                // per part.
                assert_eq!(
                    statements.len(),
                    6 + parts.count_ones() as usize,
                    "{script}"
                );
            }
        }
    }
}
