//! `SqlStore`: the session store on SQLite (embedded, the default) or PostgreSQL, through
//! sqlx's `Any` driver so that one implementation serves both.
//!
//! Appends are group-committed: an appender task per lane takes every request waiting in
//! its queue and commits them in one transaction, so durability costs one commit per batch
//! rather than one per call. Every write checks its fence in the same transaction.

mod appender;
mod backend;
mod batch;
mod lane_checkpoint;
mod quota;
mod requests;
mod sealed;
mod setup;
mod sqlite_writer;
mod wal_sync;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};
use switchyard_core::{
    ContextMessage, DoubleText, Epoch, Message, Role, Session, SessionId, Slot, UserId, WorkerId,
};

use self::appender::Appender;
pub use self::appender::GroupCommitStats;
use self::backend::{Backend, SQLITE_CONNECTION_PRAGMAS};
use self::sealed::{Sealer, sealing_error};
use self::setup::{checkpoint_periodically, ensure_cluster_id, is_sealed, migrate};
use crate::sealing::{KeyRing, metadata_aad};
use crate::{
    Append, AppendKey, AppendTicket, Appended, Durability, Fence, IdleSession, QueuedAppend,
    RequestRecord, Result, SessionStore, SlotLease, StoreError, StoredLimit, StoredPlacement,
    StoredUsage, UserQuotaRecord,
};

/// How to open a [`SqlStore`].
#[derive(Debug, Clone)]
pub struct SqlStoreOptions {
    /// `sqlite://PATH?mode=rwc` or `postgres://USER@HOST:PORT/DATABASE`.
    pub url: String,
    /// The pool's connections at most: 16 on PostgreSQL; on SQLite twice the cores, from
    /// 4 to 16.
    pub max_connections: u32,
    /// Parallel group-commit queues: on PostgreSQL one per core, from 1 to 4; SQLite has
    /// one writer, so it always uses one.
    pub append_lanes: usize,
    /// Most appends committed in one transaction.
    pub max_batch: usize,
    /// SQLite only: wait for the disk on every commit. Turned off only by benchmarks that
    /// measure memory with a million sessions, never by a server.
    pub durable: bool,
    /// The key-encryption keys: with them, contents and metadata are sealed at rest (a
    /// plaintext store is sealed when it opens); without them, a sealed store's contents
    /// cannot be read or written.
    pub keys: Option<KeyRing>,
}

/// Connections a PostgreSQL store's pool holds at most.
const POSTGRES_CONNECTIONS: u32 = 16;

/// Connections an SQLite store's pool holds at most, by default: its readers, since the
/// append lane writes on connections of its own. Each is a thread with a page cache of its
/// own (up to 2 MB, SQLite's default) that fills as the database grows: readers beyond what
/// the machine runs at once add memory rather than reads.
fn sqlite_connections() -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get());
    u32::try_from(2 * cores).unwrap_or(u32::MAX).clamp(4, 16)
}

/// A PostgreSQL store's group-commit lanes, by default. A lane's batch is one statement,
/// whose fixed costs (its parameters, its plan, its commit) PostgreSQL pays per batch:
/// lanes beyond the cores that run them split the same appends into more, smaller
/// batches. On 2 cores, 2 lanes committed 10% more turns at 32 in flight than 4 did.
fn postgres_lanes() -> usize {
    std::thread::available_parallelism().map_or(1, |cores| cores.get().clamp(1, 4))
}

impl SqlStoreOptions {
    pub fn new(url: impl Into<String>) -> Self {
        let url = url.into();
        let max_connections = match Backend::of_url(&url) {
            Some(Backend::Sqlite) => sqlite_connections(),
            _ => POSTGRES_CONNECTIONS,
        };
        SqlStoreOptions {
            url,
            max_connections,
            append_lanes: postgres_lanes(),
            max_batch: 256,
            durable: true,
            keys: None,
        }
    }

    /// Seals contents and metadata at rest with `keys`.
    pub fn with_keys(mut self, keys: KeyRing) -> Self {
        self.keys = Some(keys);
        self
    }

    /// The embedded store: a SQLite file, created if missing.
    pub fn sqlite_file(path: &Path) -> Self {
        Self::new(format!("sqlite://{}?mode=rwc", path.display()))
    }
}

pub struct SqlStore {
    pool: AnyPool,
    backend: Backend,
    cluster_id: String,
    appender: Appender,
    /// Whether the store's contents are sealed, and the keys to open them when this node
    /// holds them.
    sealed: bool,
    sealer: Option<Arc<Sealer>>,
    /// SQLite: checkpoints the WAL back into the database now and then.
    checkpointer: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for SqlStore {
    fn drop(&mut self) {
        if let Some(checkpointer) = self.checkpointer.take() {
            checkpointer.abort();
        }
    }
}

fn unavailable(error: sqlx::Error) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

fn corrupt(what: impl Into<String>) -> StoreError {
    StoreError::Corrupt(what.into())
}

pub(crate) fn micros(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map(|since| i64::try_from(since.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn time_from_micros(micros: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(u64::try_from(micros).unwrap_or(0))
}

fn epoch_param(epoch: Epoch) -> i64 {
    i64::try_from(epoch.0).unwrap_or(i64::MAX)
}

fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

impl SqlStore {
    /// Connects, runs the migrations and reads (or creates) the cluster id.
    pub async fn open(options: SqlStoreOptions) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let Some(backend) = Backend::of_url(&options.url) else {
            return Err(StoreError::Unavailable(format!(
                "store URL must start with sqlite:// or postgres://, not {:?}",
                options.url.split(':').next().unwrap_or_default()
            )));
        };
        let mut pool_options = AnyPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(Duration::from_secs(10));
        if backend == Backend::Sqlite {
            // An SQLite connection is a thread of this process: it cannot drop like a
            // network one, and a ping before each checkout is one more thread hop per query.
            pool_options = pool_options.test_before_acquire(false);
            let synchronous = if options.durable {
                "PRAGMA synchronous = FULL"
            } else {
                "PRAGMA synchronous = OFF"
            };
            pool_options = pool_options.after_connect(move |connection, _| {
                Box::pin(async move {
                    // WAL lets readers run beside the one writer; FULL makes every commit
                    // durable before it returns. The append lane commits without it and
                    // syncs the WAL itself, beside its next commit (see `wal_sync`).
                    connection.execute("PRAGMA journal_mode = WAL").await?;
                    connection.execute(synchronous).await?;
                    connection.execute(SQLITE_CONNECTION_PRAGMAS).await?;
                    Ok(())
                })
            });
        } else {
            pool_options = pool_options.after_connect(|connection, _| {
                Box::pin(async move {
                    // A worker paused (SIGSTOP) or partitioned inside a transaction would keep
                    // its lease row locked and stall the takeover of its slots. Every
                    // transaction here is a few statements long; one idle this long is dead.
                    connection
                        .execute("SET idle_in_transaction_session_timeout = 1500")
                        .await?;
                    Ok(())
                })
            });
        }
        let pool = pool_options
            .connect(&options.url)
            .await
            .map_err(|error| StoreError::Unavailable(format!("cannot open the store: {error}")))?;
        migrate(&pool, backend).await?;
        let cluster_id = ensure_cluster_id(&pool).await?;
        let sealer = options
            .keys
            .clone()
            .map(|keys| Arc::new(Sealer::new(keys, backend)));
        let mut sealed = is_sealed(&pool).await?;
        if let Some(sealer) = &sealer
            && !sealed
        {
            sealed::seal_store(&pool, backend, sealer).await?;
            sealed = true;
        }
        if sealed && sealer.is_none() {
            tracing::warn!(
                "the store is encrypted at rest and this node has no --kek-file: it cannot read or write contexts"
            );
        }
        let lanes = match backend {
            Backend::Sqlite => 1,
            Backend::Postgres => options.append_lanes.max(1),
        };
        let appender = Appender::start(
            pool.clone(),
            backend,
            lanes,
            options.max_batch.max(1),
            options.durable,
            sealer.clone(),
        )?;
        tracing::info!(backend = ?backend, %cluster_id, "session store open");
        let checkpointer = (backend == Backend::Sqlite)
            .then(|| tokio::spawn(checkpoint_periodically(pool.clone())));
        Ok(SqlStore {
            pool,
            backend,
            cluster_id,
            appender,
            sealed,
            sealer,
            checkpointer,
        })
    }

    /// What the group commit has done since the store opened.
    pub fn group_commit_stats(&self) -> GroupCommitStats {
        self.appender.stats()
    }

    /// Begins a write transaction in which `fence` holds.
    async fn begin_fenced(&self, fence: &Fence) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        let mut transaction = self
            .pool
            .begin_with(self.backend.begin_write())
            .await
            .map_err(unavailable)?;
        check_fence(&mut transaction, self.backend, fence).await?;
        Ok(transaction)
    }
}

async fn check_fence(
    connection: &mut sqlx::AnyConnection,
    backend: Backend,
    fence: &Fence,
) -> Result<()> {
    let held = sqlx::query(backend.fence_query())
        .bind(i64::from(fence.slot))
        .bind(fence.owner.as_str().to_string())
        .bind(epoch_param(fence.epoch))
        .fetch_optional(&mut *connection)
        .await
        .map_err(unavailable)?;
    match held {
        Some(_) => Ok(()),
        None => Err(StoreError::Fenced {
            slot: fence.slot,
            epoch: fence.epoch,
        }),
    }
}

/// A session from its row, with its metadata still as stored (sealed, or JSON).
fn session_from_row(row: &AnyRow) -> Result<(Session, String)> {
    let id: Vec<u8> = row.try_get("session_id").map_err(unavailable)?;
    let id: [u8; 16] = id
        .try_into()
        .map_err(|_| corrupt("a session id is not 16 bytes"))?;
    let user_id: String = row.try_get("user_id").map_err(unavailable)?;
    let metadata: String = row.try_get("metadata").map_err(unavailable)?;
    let slot: i64 = row.try_get("slot").map_err(unavailable)?;
    let session = Session {
        id: SessionId::from_bytes(id),
        user_id: UserId::parse(user_id).map_err(|error| corrupt(error.to_string()))?,
        slot: Slot::try_from(slot).map_err(|_| corrupt("a slot is out of range"))?,
        created_at: time_from_micros(row.try_get("created_at_us").map_err(unavailable)?),
        last_activity_at: time_from_micros(row.try_get("last_activity_us").map_err(unavailable)?),
        metadata: BTreeMap::new(),
        message_count: count(row.try_get("message_count").map_err(unavailable)?),
        double_text: {
            let policy: String = row.try_get("double_text").map_err(unavailable)?;
            DoubleText::parse(&policy).map_err(|error| corrupt(error.to_string()))?
        },
    };
    Ok((session, metadata))
}

fn message_from_row(row: &AnyRow) -> Result<ContextMessage> {
    let role: String = row.try_get("role").map_err(unavailable)?;
    Ok(ContextMessage {
        seq: count(row.try_get("seq").map_err(unavailable)?),
        role: Role::parse(&role, "role").map_err(|error| corrupt(error.to_string()))?,
        content: row.try_get("content").map_err(unavailable)?,
        name: row.try_get("name").map_err(unavailable)?,
        created_at: time_from_micros(row.try_get("created_at_us").map_err(unavailable)?),
    })
}

/// The columns `session_from_row` reads, as a macro so queries stay `&'static str`:
/// sqlx keeps a statement per distinct query string, so SQL is never built at run time
/// where a constant will do.
macro_rules! session_columns {
    () => {
        "session_id, user_id, slot, created_at_us, last_activity_us, metadata, message_count, double_text"
    };
}

#[async_trait]
impl SessionStore for SqlStore {
    async fn cluster_id(&self) -> Result<String> {
        Ok(self.cluster_id.clone())
    }

    async fn acquire_slots(
        &self,
        owner: &WorkerId,
        epoch: Epoch,
        slots: &[Slot],
    ) -> Result<Vec<Slot>> {
        let mut unique = slots.to_vec();
        unique.sort_unstable();
        unique.dedup();
        if unique.is_empty() {
            return Ok(Vec::new());
        }
        let slots_json = serde_json::to_string(&unique)
            .map_err(|error| corrupt(format!("slots do not encode: {error}")))?;
        let rows = sqlx::query(self.backend.acquire_slots_query())
            .bind(slots_json)
            .bind(owner.as_str().to_string())
            .bind(epoch_param(epoch))
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        let mut acquired = rows
            .iter()
            .map(|row| {
                let slot: i64 = row.try_get("slot").map_err(unavailable)?;
                Slot::try_from(slot)
                    .map_err(|_| corrupt(format!("lease slot {slot} is out of range")))
            })
            .collect::<Result<Vec<Slot>>>()?;
        acquired.sort_unstable();
        Ok(acquired)
    }

    async fn slot_leases(&self, slots: &[Slot]) -> Result<Vec<SlotLease>> {
        let slots_json = serde_json::to_string(slots)
            .map_err(|error| corrupt(format!("slots do not encode: {error}")))?;
        let rows = sqlx::query(self.backend.slot_leases_query())
            .bind(slots_json)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        rows.iter()
            .map(|row| {
                let slot: i64 = row.try_get("slot").map_err(unavailable)?;
                let owner: String = row.try_get("owner").map_err(unavailable)?;
                let epoch: i64 = row.try_get("epoch").map_err(unavailable)?;
                let released: i64 = row.try_get("released").map_err(unavailable)?;
                Ok(SlotLease {
                    slot: Slot::try_from(slot)
                        .map_err(|_| corrupt(format!("lease slot {slot} is out of range")))?,
                    owner: WorkerId::parse(owner)
                        .map_err(|error| corrupt(format!("lease owner: {error}")))?,
                    epoch: Epoch(count(epoch)),
                    released: released != 0,
                })
            })
            .collect()
    }

    async fn release_slots(&self, fences: &[Fence]) -> Result<usize> {
        if fences.is_empty() {
            return Ok(0);
        }
        let fences_json = serde_json::Value::Array(
            fences
                .iter()
                .map(|fence| {
                    serde_json::json!({
                        "s": i64::from(fence.slot),
                        "o": fence.owner.as_str(),
                        "e": epoch_param(fence.epoch),
                    })
                })
                .collect(),
        )
        .to_string();
        let result = sqlx::query(self.backend.release_slots_query())
            .bind(fences_json)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(result.rows_affected() as usize)
    }

    async fn save_placement(&self, placement: &StoredPlacement) -> Result<bool> {
        let result = sqlx::query(
            "INSERT INTO placement (singleton, epoch, placement) VALUES (1, $1, $2) \
             ON CONFLICT (singleton) DO UPDATE SET epoch = excluded.epoch, placement = excluded.placement \
             WHERE placement.epoch < excluded.epoch",
        )
        .bind(epoch_param(placement.epoch))
        .bind(placement.to_json())
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(result.rows_affected() > 0)
    }

    async fn load_placement(&self) -> Result<Option<StoredPlacement>> {
        let row = sqlx::query("SELECT placement FROM placement WHERE singleton = 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let json: String = row.try_get("placement").map_err(unavailable)?;
        StoredPlacement::from_json(&json).map(Some)
    }

    async fn max_lease_epoch(&self) -> Result<Epoch> {
        let row = sqlx::query("SELECT COALESCE(MAX(epoch), 0) AS epoch FROM slot_leases")
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)?;
        let epoch: i64 = row.try_get("epoch").map_err(unavailable)?;
        Ok(Epoch(count(epoch)))
    }

    async fn create_session(&self, fence: &Fence, session: &Session) -> Result<()> {
        let mut metadata = serde_json::to_string(&session.metadata)
            .map_err(|error| corrupt(format!("metadata does not encode: {error}")))?;
        let mut key = None;
        if let Some(sealer) = self.sealing()? {
            let (dek, wrapped) = sealer.keys.new_dek(session.id).map_err(sealing_error)?;
            metadata = sealer
                .keys
                .seal(&dek, &metadata_aad(session.id), &metadata)
                .map_err(sealing_error)?;
            key = Some((dek, wrapped, sealer));
        }
        let mut transaction = self.begin_fenced(fence).await?;
        let result = sqlx::query(
            "INSERT INTO sessions (session_id, user_id, slot, created_at_us, last_activity_us, \
                                   metadata, message_count, double_text) \
             VALUES ($1, $2, $3, $4, $5, $6, 0, $7) ON CONFLICT (session_id) DO NOTHING",
        )
        .bind(session.id.as_bytes().to_vec())
        .bind(session.user_id.as_str().to_string())
        .bind(i64::from(session.slot))
        .bind(micros(session.created_at))
        .bind(micros(session.last_activity_at))
        .bind(metadata)
        .bind(session.double_text.as_str())
        .execute(&mut *transaction)
        .await
        .map_err(unavailable)?;
        if result.rows_affected() == 0 {
            return Err(StoreError::SessionExists(session.id));
        }
        if let Some((_, wrapped, sealer)) = &key {
            sqlx::query(
                "INSERT INTO session_keys (session_id, kek_id, wrapped) VALUES ($1, $2, $3)",
            )
            .bind(session.id.as_bytes().to_vec())
            .bind(sealer.keys.active_id().to_string())
            .bind(wrapped.clone())
            .execute(&mut *transaction)
            .await
            .map_err(unavailable)?;
        }
        transaction.commit().await.map_err(unavailable)?;
        if let Some((dek, _, sealer)) = key {
            sealer.remember(session.id, dek);
        }
        Ok(())
    }

    async fn get_session(&self, session_id: SessionId) -> Result<Option<Session>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            session_columns!(),
            " FROM sessions WHERE session_id = $1"
        ))
        .bind(session_id.as_bytes().to_vec())
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        match row {
            Some(row) => Ok(self
                .sessions_from_rows(std::slice::from_ref(&row))
                .await?
                .pop()),
            None => Ok(None),
        }
    }

    async fn list_user_sessions(&self, user_id: &UserId) -> Result<Vec<Session>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            session_columns!(),
            " FROM sessions WHERE user_id = $1 ORDER BY created_at_us, session_id"
        ))
        .bind(user_id.as_str().to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        self.sessions_from_rows(&rows).await
    }

    async fn delete_session(&self, fence: &Fence, session_id: SessionId) -> Result<bool> {
        let mut transaction = self.begin_fenced(fence).await?;
        let id = session_id.as_bytes().to_vec();
        // The data key goes with the rows: a copy of them made before cannot be opened.
        for statement in [
            "DELETE FROM messages WHERE session_id = $1",
            "DELETE FROM request_ids WHERE session_id = $1",
            "DELETE FROM session_keys WHERE session_id = $1",
        ] {
            sqlx::query(statement)
                .bind(id.clone())
                .execute(&mut *transaction)
                .await
                .map_err(unavailable)?;
        }
        let deleted = sqlx::query("DELETE FROM sessions WHERE session_id = $1")
            .bind(id)
            .execute(&mut *transaction)
            .await
            .map_err(unavailable)?;
        transaction.commit().await.map_err(unavailable)?;
        if let Some(sealer) = &self.sealer {
            sealer.forget(session_id);
        }
        Ok(deleted.rows_affected() > 0)
    }

    async fn append_keyed(
        &self,
        fence: &Fence,
        session_id: SessionId,
        messages: &[Message],
        at: SystemTime,
        key: &AppendKey,
        keep_last: u64,
    ) -> Result<Appended> {
        let append = Append {
            fence: fence.clone(),
            session_id,
            messages: messages.into(),
            at,
            key: key.clone(),
            keep_last,
            durability: Durability::Now,
            usage: Vec::new(),
        };
        self.appender.queue(append, None).await?.outcome().await
    }

    async fn queue_append(
        &self,
        append: Append,
        after: Option<&AppendTicket>,
    ) -> Result<QueuedAppend> {
        self.appender.queue(append, after).await
    }

    async fn request_record(
        &self,
        session_id: SessionId,
        request_id: &str,
    ) -> Result<Option<RequestRecord>> {
        requests::record(&self.pool, session_id, request_id).await
    }

    async fn read_system_messages(
        &self,
        session_id: SessionId,
        before_seq: u64,
        limit: u32,
    ) -> Result<Vec<ContextMessage>> {
        let rows = sqlx::query(
            "SELECT seq, role, content, name, created_at_us FROM messages \
             WHERE session_id = $1 AND role = 'system' AND seq < $2 ORDER BY seq DESC LIMIT $3",
        )
        .bind(session_id.as_bytes().to_vec())
        .bind(i64::try_from(before_seq).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        let mut messages: Vec<ContextMessage> =
            rows.iter().map(message_from_row).collect::<Result<_>>()?;
        messages.reverse();
        self.opened(session_id, messages).await
    }

    async fn read_context(
        &self,
        session_id: SessionId,
        last_n: u32,
        after_seq: u64,
    ) -> Result<Vec<ContextMessage>> {
        let id = session_id.as_bytes().to_vec();
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        let rows = if last_n == 0 {
            sqlx::query(
                "SELECT seq, role, content, name, created_at_us FROM messages \
                 WHERE session_id = $1 AND seq > $2 ORDER BY seq",
            )
            .bind(id)
            .bind(after)
            .fetch_all(&self.pool)
            .await
        } else {
            sqlx::query(
                "SELECT seq, role, content, name, created_at_us FROM messages \
                 WHERE session_id = $1 AND seq > $2 ORDER BY seq DESC LIMIT $3",
            )
            .bind(id)
            .bind(after)
            .bind(i64::from(last_n))
            .fetch_all(&self.pool)
            .await
        }
        .map_err(unavailable)?;
        let mut messages: Vec<ContextMessage> =
            rows.iter().map(message_from_row).collect::<Result<_>>()?;
        if last_n > 0 {
            messages.reverse();
        }
        if messages.is_empty() && self.get_session(session_id).await?.is_none() {
            return Err(StoreError::SessionNotFound(session_id));
        }
        self.opened(session_id, messages).await
    }

    async fn read_context_page(
        &self,
        session_id: SessionId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<ContextMessage>> {
        let id = session_id.as_bytes().to_vec();
        let rows = sqlx::query(
            "SELECT seq, role, content, name, created_at_us FROM messages \
             WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(id)
        .bind(i64::try_from(after_seq).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        let messages: Vec<ContextMessage> =
            rows.iter().map(message_from_row).collect::<Result<_>>()?;
        if messages.is_empty() && self.get_session(session_id).await?.is_none() {
            return Err(StoreError::SessionNotFound(session_id));
        }
        self.opened(session_id, messages).await
    }

    async fn touch_session(
        &self,
        fence: &Fence,
        session_id: SessionId,
        at: SystemTime,
    ) -> Result<()> {
        let mut transaction = self.begin_fenced(fence).await?;
        sqlx::query(
            "UPDATE sessions SET last_activity_us = $2 \
             WHERE session_id = $1 AND last_activity_us < $2",
        )
        .bind(session_id.as_bytes().to_vec())
        .bind(micros(at))
        .execute(&mut *transaction)
        .await
        .map_err(unavailable)?;
        transaction.commit().await.map_err(unavailable)
    }

    async fn idle_sessions(
        &self,
        slots: &[Slot],
        before: SystemTime,
        limit: usize,
    ) -> Result<Vec<IdleSession>> {
        if slots.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        let slots = serde_json::to_string(slots)
            .map_err(|error| corrupt(format!("slots do not encode: {error}")))?;
        let query = sqlx::query(self.backend.idle_sessions_query())
            .bind(micros(before))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(slots);
        let rows = query.fetch_all(&self.pool).await.map_err(unavailable)?;
        rows.iter()
            .map(|row| {
                let id: Vec<u8> = row.try_get("session_id").map_err(unavailable)?;
                let id: [u8; 16] = id
                    .try_into()
                    .map_err(|_| corrupt("a session id is not 16 bytes"))?;
                let slot: i64 = row.try_get("slot").map_err(unavailable)?;
                Ok(IdleSession {
                    id: SessionId::from_bytes(id),
                    slot: Slot::try_from(slot).map_err(|_| corrupt("a slot is out of range"))?,
                    last_activity_at: time_from_micros(
                        row.try_get("last_activity_us").map_err(unavailable)?,
                    ),
                })
            })
            .collect()
    }

    async fn count_sessions(&self, slots: &[Slot]) -> Result<u64> {
        if slots.is_empty() {
            return Ok(0);
        }
        let slots = serde_json::to_string(slots)
            .map_err(|error| corrupt(format!("slots do not encode: {error}")))?;
        let row = sqlx::query(self.backend.count_sessions_query())
            .bind(slots)
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)?;
        let count: i64 = row.try_get("n").map_err(unavailable)?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    async fn load_user_quota(&self, user_id: &UserId) -> Result<UserQuotaRecord> {
        self.load_user_quota_sql(user_id).await
    }

    async fn set_user_quota(
        &self,
        fence: &Fence,
        user_id: &UserId,
        overrides: &[StoredLimit],
        clear: bool,
    ) -> Result<()> {
        self.set_user_quota_sql(fence, user_id, overrides, clear)
            .await
    }

    async fn save_usage(&self, usage: &[(Fence, StoredUsage)]) -> Result<usize> {
        self.save_usage_sql(usage).await
    }

    async fn erase_user_quota(&self, fence: &Fence, user_id: &UserId) -> Result<(bool, bool)> {
        self.erase_user_quota_sql(fence, user_id).await
    }

    async fn user_storage_bytes(&self, user_id: &UserId) -> Result<u64> {
        self.user_storage_bytes_sql(user_id).await
    }
}
