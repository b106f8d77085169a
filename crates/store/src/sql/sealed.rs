//! The store's side of encryption at rest (see [`crate::sealing`]): the session keys table,
//! a cache of opened DEKs, and turning a plaintext store into a sealed one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use sqlx::any::AnyRow;
use sqlx::{AnyPool, Row};
use switchyard_core::{ContextMessage, SessionId};

use super::batch::{hex, parse_hex_id};
use super::{Backend, SqlStore, corrupt, session_from_row, unavailable};
use crate::sealing::{Dek, KeyRing, SealError, message_aad, metadata_aad};
use crate::{Result, Session, StoreError};

/// Opened DEKs kept at most; past it the cache starts again (they are read back on use).
const MAX_CACHED_DEKS: usize = 65_536;

pub(crate) fn sealing_error(error: SealError) -> StoreError {
    match error {
        SealError::UnknownKek { .. } | SealError::Random => {
            StoreError::Unavailable(error.to_string())
        }
        _ => StoreError::Corrupt(error.to_string()),
    }
}

/// The keys of a sealed store and the DEKs opened so far.
pub(crate) struct Sealer {
    pub(crate) keys: KeyRing,
    backend: Backend,
    deks: Mutex<HashMap<SessionId, Arc<Dek>>>,
}

impl Sealer {
    pub(crate) fn new(keys: KeyRing, backend: Backend) -> Self {
        Sealer {
            keys,
            backend,
            deks: Mutex::new(HashMap::new()),
        }
    }

    fn cache(&self) -> MutexGuard<'_, HashMap<SessionId, Arc<Dek>>> {
        self.deks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn remember(&self, session_id: SessionId, dek: Dek) -> Arc<Dek> {
        let dek = Arc::new(dek);
        let mut cache = self.cache();
        if cache.len() >= MAX_CACHED_DEKS {
            cache.clear();
        }
        cache.insert(session_id, dek.clone());
        dek
    }

    pub(crate) fn forget(&self, session_id: SessionId) {
        self.cache().remove(&session_id);
    }

    fn keys_query(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => {
                "SELECT lower(hex(session_id)) AS id, kek_id, wrapped FROM session_keys \
                 WHERE session_id IN (SELECT unhex(value) FROM json_each($1))"
            }
            Backend::Postgres => {
                "SELECT encode(session_id, 'hex') AS id, kek_id, wrapped FROM session_keys \
                 WHERE session_id IN (SELECT decode(value, 'hex') FROM json_array_elements_text($1::json))"
            }
        }
    }

    /// The DEKs of `sessions`, from the cache or in one read. A session without a key (it
    /// ended, or never was) is left out.
    pub(crate) async fn deks(
        &self,
        pool: &AnyPool,
        sessions: impl IntoIterator<Item = SessionId>,
    ) -> Result<HashMap<SessionId, Arc<Dek>>> {
        let mut found = HashMap::new();
        let mut missing = Vec::new();
        {
            let cache = self.cache();
            for session_id in sessions {
                match cache.get(&session_id) {
                    Some(dek) => {
                        found.insert(session_id, dek.clone());
                    }
                    None if !found.contains_key(&session_id) => missing.push(hex(&session_id)),
                    None => {}
                }
            }
        }
        if missing.is_empty() {
            return Ok(found);
        }
        missing.sort_unstable();
        missing.dedup();
        let ids = serde_json::to_string(&missing)
            .map_err(|error| corrupt(format!("session ids do not encode: {error}")))?;
        let rows = sqlx::query(self.keys_query())
            .bind(ids)
            .fetch_all(pool)
            .await
            .map_err(unavailable)?;
        for row in rows {
            let id: String = row.try_get("id").map_err(unavailable)?;
            let session_id =
                parse_hex_id(&id).ok_or_else(|| corrupt("a session key names no session"))?;
            let kek_id: String = row.try_get("kek_id").map_err(unavailable)?;
            let wrapped: Vec<u8> = row.try_get("wrapped").map_err(unavailable)?;
            let dek = self
                .keys
                .unwrap(session_id, &kek_id, &wrapped)
                .map_err(sealing_error)?;
            found.insert(session_id, self.remember(session_id, dek));
        }
        Ok(found)
    }

    /// The DEK of one session; a session without one cannot be read.
    pub(crate) async fn dek(&self, pool: &AnyPool, session_id: SessionId) -> Result<Arc<Dek>> {
        self.deks(pool, [session_id])
            .await?
            .remove(&session_id)
            .ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "session {session_id} has no data key: its contents cannot be read"
                ))
            })
    }

    /// Opens the contents of messages of `session_id` read from the store.
    pub(crate) async fn open_messages(
        &self,
        pool: &AnyPool,
        session_id: SessionId,
        messages: &mut [ContextMessage],
    ) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        let dek = self.dek(pool, session_id).await?;
        for message in messages {
            message.content = dek
                .open(
                    session_id,
                    &message_aad(session_id, message.seq),
                    &message.content,
                )
                .map_err(sealing_error)?;
        }
        Ok(())
    }
}

/// Sessions sealed per transaction when a plaintext store is sealed.
const SEAL_BATCH: i64 = 64;

/// Seals a plaintext store in place: every session gets a data key, and its metadata and
/// messages are sealed, a few sessions per transaction, with progress in the log; then the
/// store remembers that it is sealed. Resumes where an interrupted run stopped (a session
/// with a key is done). On SQLite the file is then rewritten (VACUUM) and its WAL emptied,
/// so that no plaintext is left in free pages.
pub(crate) async fn seal_store(pool: &AnyPool, backend: Backend, sealer: &Sealer) -> Result<()> {
    let row = sqlx::query(
        "SELECT COUNT(*) AS left_to_seal FROM sessions \
         WHERE session_id NOT IN (SELECT session_id FROM session_keys)",
    )
    .fetch_one(pool)
    .await
    .map_err(unavailable)?;
    let total: i64 = row.try_get("left_to_seal").map_err(unavailable)?;
    if total > 0 {
        tracing::info!(sessions = total, "sealing the store's contents at rest");
    }
    let mut done: i64 = 0;
    loop {
        let mut transaction = pool
            .begin_with(backend.begin_write())
            .await
            .map_err(unavailable)?;
        if backend == Backend::Postgres {
            // One node seals at a time; the others find the sessions done.
            sqlx::query("SELECT pg_advisory_xact_lock(7461)")
                .execute(&mut *transaction)
                .await
                .map_err(unavailable)?;
        }
        let sessions = sqlx::query(
            "SELECT session_id, metadata FROM sessions \
             WHERE session_id NOT IN (SELECT session_id FROM session_keys) LIMIT $1",
        )
        .bind(SEAL_BATCH)
        .fetch_all(&mut *transaction)
        .await
        .map_err(unavailable)?;
        if sessions.is_empty() {
            sqlx::query("UPDATE cluster SET sealed = 1 WHERE singleton = 1")
                .execute(&mut *transaction)
                .await
                .map_err(unavailable)?;
            transaction.commit().await.map_err(unavailable)?;
            break;
        }
        for row in &sessions {
            let id: Vec<u8> = row.try_get("session_id").map_err(unavailable)?;
            let bytes: [u8; 16] = id
                .clone()
                .try_into()
                .map_err(|_| corrupt("a session id is not 16 bytes"))?;
            let session_id = SessionId::from_bytes(bytes);
            let metadata: String = row.try_get("metadata").map_err(unavailable)?;
            let (dek, wrapped) = sealer.keys.new_dek(session_id).map_err(sealing_error)?;
            let metadata = sealer
                .keys
                .seal(&dek, &crate::sealing::metadata_aad(session_id), &metadata)
                .map_err(sealing_error)?;
            sqlx::query("UPDATE sessions SET metadata = $2 WHERE session_id = $1")
                .bind(id.clone())
                .bind(metadata)
                .execute(&mut *transaction)
                .await
                .map_err(unavailable)?;
            let messages = sqlx::query("SELECT seq, content FROM messages WHERE session_id = $1")
                .bind(id.clone())
                .fetch_all(&mut *transaction)
                .await
                .map_err(unavailable)?;
            for message in &messages {
                let seq: i64 = message.try_get("seq").map_err(unavailable)?;
                let content: String = message.try_get("content").map_err(unavailable)?;
                let sealed = sealer
                    .keys
                    .seal(&dek, &message_aad(session_id, seq as u64), &content)
                    .map_err(sealing_error)?;
                sqlx::query("UPDATE messages SET content = $3 WHERE session_id = $1 AND seq = $2")
                    .bind(id.clone())
                    .bind(seq)
                    .bind(sealed)
                    .execute(&mut *transaction)
                    .await
                    .map_err(unavailable)?;
            }
            sqlx::query(
                "INSERT INTO session_keys (session_id, kek_id, wrapped) VALUES ($1, $2, $3)",
            )
            .bind(id)
            .bind(sealer.keys.active_id().to_string())
            .bind(wrapped)
            .execute(&mut *transaction)
            .await
            .map_err(unavailable)?;
        }
        transaction.commit().await.map_err(unavailable)?;
        done += sessions.len() as i64;
        tracing::info!(
            sealed = done,
            of = total,
            "sealing the store's contents at rest"
        );
    }
    if backend == Backend::Sqlite && total > 0 {
        for statement in ["VACUUM", "PRAGMA wal_checkpoint(TRUNCATE)"] {
            sqlx::query(statement)
                .execute(pool)
                .await
                .map_err(unavailable)?;
        }
    }
    if total > 0 {
        tracing::info!(sessions = total, "the store's contents are sealed at rest");
    }
    Ok(())
}

/// Re-wraps every data key not under the active KEK, a batch at a time, calling `progress`
/// with how many are done and how many were left at the start; resumes where an
/// interrupted run stopped. No message is re-encrypted.
pub(crate) async fn rewrap_keys(
    pool: &AnyPool,
    keys: &KeyRing,
    mut progress: impl FnMut(u64, u64),
) -> Result<u64> {
    let active = keys.active_id().to_string();
    let row = sqlx::query("SELECT COUNT(*) AS left_to_wrap FROM session_keys WHERE kek_id <> $1")
        .bind(active.clone())
        .fetch_one(pool)
        .await
        .map_err(unavailable)?;
    let total: i64 = row.try_get("left_to_wrap").map_err(unavailable)?;
    let total = u64::try_from(total).unwrap_or(0);
    let mut done = 0;
    progress(0, total);
    loop {
        let rows = sqlx::query(
            "SELECT session_id, kek_id, wrapped FROM session_keys WHERE kek_id <> $1 LIMIT 256",
        )
        .bind(active.clone())
        .fetch_all(pool)
        .await
        .map_err(unavailable)?;
        if rows.is_empty() {
            return Ok(done);
        }
        for row in &rows {
            let id: Vec<u8> = row.try_get("session_id").map_err(unavailable)?;
            let bytes: [u8; 16] = id
                .clone()
                .try_into()
                .map_err(|_| corrupt("a session id is not 16 bytes"))?;
            let kek_id: String = row.try_get("kek_id").map_err(unavailable)?;
            let wrapped: Vec<u8> = row.try_get("wrapped").map_err(unavailable)?;
            let rewrapped = keys
                .rewrap(SessionId::from_bytes(bytes), &kek_id, &wrapped)
                .map_err(sealing_error)?;
            // Only if no one changed it meanwhile (the session may have ended).
            sqlx::query(
                "UPDATE session_keys SET kek_id = $2, wrapped = $3 \
                 WHERE session_id = $1 AND kek_id = $4",
            )
            .bind(id)
            .bind(active.clone())
            .bind(rewrapped)
            .bind(kek_id)
            .execute(pool)
            .await
            .map_err(unavailable)?;
            done += 1;
        }
        progress(done, total);
    }
}

impl SqlStore {
    /// The keys to seal and open contents with, `None` for a plaintext store; an error for
    /// a sealed store on a node without them.
    pub(super) fn sealing(&self) -> Result<Option<&Sealer>> {
        match (&self.sealer, self.sealed) {
            (Some(sealer), _) => Ok(Some(sealer)),
            (None, false) => Ok(None),
            (None, true) => Err(StoreError::Unavailable(
                "the store is encrypted at rest and this node has no key-encryption key: give it --kek-file".into(),
            )),
        }
    }

    /// Whether contents are sealed at rest.
    pub fn is_sealed(&self) -> bool {
        self.sealed
    }

    /// Re-wraps every data key that is not under this store's active KEK (the first of its
    /// keys), online and resumable; `progress` hears how many are done of how many. Returns
    /// how many were re-wrapped. No message is re-encrypted.
    pub async fn rotate_kek(&self, progress: impl FnMut(u64, u64)) -> Result<u64> {
        let sealer = self.sealing()?.ok_or_else(|| {
            StoreError::Unavailable("the store is not sealed: there is no key to rotate".into())
        })?;
        rewrap_keys(&self.pool, &sealer.keys, progress).await
    }

    /// Sessions read from rows, their metadata opened (when sealed) and parsed.
    pub(super) async fn sessions_from_rows(&self, rows: &[AnyRow]) -> Result<Vec<Session>> {
        let mut read: Vec<(Session, String)> =
            rows.iter().map(session_from_row).collect::<Result<_>>()?;
        if let Some(sealer) = self.sealing()? {
            let deks = sealer
                .deks(&self.pool, read.iter().map(|(session, _)| session.id))
                .await?;
            for (session, metadata) in &mut read {
                let dek = deks
                    .get(&session.id)
                    .ok_or_else(|| corrupt(format!("session {} has no data key", session.id)))?;
                *metadata = dek
                    .open(session.id, &metadata_aad(session.id), metadata)
                    .map_err(sealing_error)?;
            }
        }
        read.into_iter()
            .map(|(mut session, metadata)| {
                session.metadata = serde_json::from_str(&metadata).map_err(|error| {
                    corrupt(format!("session metadata is not a JSON object: {error}"))
                })?;
                Ok(session)
            })
            .collect()
    }

    /// Opens the contents of messages read from a sealed store.
    pub(super) async fn opened(
        &self,
        session_id: SessionId,
        mut messages: Vec<ContextMessage>,
    ) -> Result<Vec<ContextMessage>> {
        if let Some(sealer) = self.sealing()? {
            sealer
                .open_messages(&self.pool, session_id, &mut messages)
                .await?;
        }
        Ok(messages)
    }
}
