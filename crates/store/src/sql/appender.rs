//! Group commit of appends: each lane's task drains its queue into one transaction, on a
//! connection it keeps for itself.
//!
//! A batch waits for the disk only when one of its appends must be durable now: a batch of
//! turns' user messages alone ([`Durability::WithNext`]) commits without it, and is made
//! durable by the next durable commit (the WAL, SQLite's or PostgreSQL's, is written and
//! flushed in order). An append queued to follow another commits only if that one did.
//!
//! On SQLite a lane runs on a thread of its own, which calls SQLite directly: the batches
//! are a serial path, and a lane that is a task waits for a busy runtime's threads to poll
//! it twice per batch (its queue, then its connection's answer). A lane never waits for
//! the disk while others queue behind it: it commits without syncing, and another thread
//! syncs the WAL while the lane commits the next batch ([`WalSyncer`]).
//!
//! No commit stays short of the disk for long: on SQLite, a commit nobody waits on is synced
//! within [`UNSYNCED_LIMIT`] if no other sync came first; on PostgreSQL the WAL writer
//! flushes asynchronous commits within `wal_writer_delay`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::{AnyPool, Row};
use switchyard_core::SessionId;
use tokio::sync::{mpsc, oneshot};

use super::backend::Synchronous;
use super::batch::{AppendRequest, BatchError, BatchSeal, Committed, LaneConnection, commit_batch};
use super::sealed::Sealer;
use super::sqlite_writer::SqliteWriter;
use super::wal_sync::{Answer, WalSyncer};
use super::{Backend, unavailable};
use crate::{Append, AppendTicket, Appended, Durability, QueuedAppend, Result, StoreError};

/// Queued appends per lane before callers wait for room.
const QUEUE_DEPTH: usize = 4096;
/// Sessions whose counts a lane keeps at most; past it, it starts again.
const MAX_KNOWN_COUNTS: usize = 65_536;
/// How long a batch of turns' user messages alone waits for a reply to join it.
const FOLLOW_UP_WAIT: Duration = Duration::from_millis(1);
/// How long an SQLite commit made without waiting for the disk may stay so when no durable
/// commit follows (a turn whose agent takes longer, or that ended without a reply).
pub(super) const UNSYNCED_LIMIT: Duration = Duration::from_millis(20);
/// SQLite: a commit on the lane's sqlx connection (a staged batch) checkpoints the WAL once
/// it holds 4000 pages (16 MB), as the lane's direct connection does after its commits
/// ([`super::lane_checkpoint`]). Only the lane can empty the WAL: no other writer appends
/// between its commits, so its checkpoint copies every frame left and its next commit
/// starts the WAL over from the beginning. A checkpoint beside the lane never finds the WAL
/// whole under steady load; at 32 turns in flight the WAL grew by 70 MB/s until the next
/// truncation.
pub(super) const LANE_CHECKPOINT: &str = "PRAGMA wal_autocheckpoint = 4000";

/// What the group commit has done since the store opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupCommitStats {
    /// Transactions committed.
    pub batches: u64,
    /// Appends in them.
    pub appends: u64,
    /// Batches holding appends of more than one writer (worker).
    pub shared_batches: u64,
    /// Batches committed without waiting for the disk (turns' user messages alone).
    pub deferred_batches: u64,
    /// SQLite: syncs of the WAL made by the store, each covering every batch committed
    /// before it.
    pub syncs: u64,
    /// Batches that could not commit in one call (a fence had moved, a session was gone,
    /// a row was refused) and were staged.
    pub staged_batches: u64,
    /// SQLite: checkpoints of the WAL made beside the lane, while it went on committing.
    pub checkpoints_beside: u64,
    /// SQLite: checkpoints the lane made itself, holding its appends up meanwhile.
    pub checkpoints_in_lane: u64,
}

#[derive(Default)]
pub(super) struct Counters {
    batches: AtomicU64,
    appends: AtomicU64,
    shared_batches: AtomicU64,
    deferred_batches: AtomicU64,
    pub(super) syncs: AtomicU64,
    staged_batches: AtomicU64,
    pub(super) checkpoints_beside: AtomicU64,
    pub(super) checkpoints_in_lane: AtomicU64,
}

impl Counters {
    fn record(&self, requests: &[AppendRequest], durable: bool, staged: bool) {
        if staged {
            self.staged_batches.fetch_add(1, Ordering::Relaxed);
        }
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.appends
            .fetch_add(requests.len() as u64, Ordering::Relaxed);
        if let Some(first) = requests.first()
            && requests
                .iter()
                .any(|request| request.append.fence.owner != first.append.fence.owner)
        {
            self.shared_batches.fetch_add(1, Ordering::Relaxed);
        }
        if !durable {
            self.deferred_batches.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> GroupCommitStats {
        GroupCommitStats {
            batches: self.batches.load(Ordering::Relaxed),
            appends: self.appends.load(Ordering::Relaxed),
            shared_batches: self.shared_batches.load(Ordering::Relaxed),
            deferred_batches: self.deferred_batches.load(Ordering::Relaxed),
            syncs: self.syncs.load(Ordering::Relaxed),
            staged_batches: self.staged_batches.load(Ordering::Relaxed),
            checkpoints_beside: self.checkpoints_beside.load(Ordering::Relaxed),
            checkpoints_in_lane: self.checkpoints_in_lane.load(Ordering::Relaxed),
        }
    }
}

pub(super) struct Appender {
    lanes: Vec<mpsc::Sender<AppendRequest>>,
    counters: Arc<Counters>,
}

impl Appender {
    /// `durable`: whether the store waits for the disk at all (SQLite benchmarks of memory
    /// turn it off; a server never does).
    pub(super) fn start(
        pool: AnyPool,
        backend: Backend,
        lanes: usize,
        max_batch: usize,
        durable: bool,
        sealer: Option<Arc<Sealer>>,
    ) -> Result<Self> {
        let counters = Arc::new(Counters::default());
        let runtime = tokio::runtime::Handle::current();
        let lanes = (0..lanes)
            .map(|_| {
                let (sender, receiver) = mpsc::channel(QUEUE_DEPTH);
                let lane = Lane {
                    pool: pool.clone(),
                    backend,
                    durable,
                    connection: None,
                    wal: None,
                    alone: false,
                    synced_inline: false,
                    counters: counters.clone(),
                    sealer: sealer.clone(),
                    counts: HashMap::new(),
                };
                match backend {
                    // Its calls to SQLite block the thread they run on.
                    Backend::Sqlite => {
                        let runtime = runtime.clone();
                        std::thread::Builder::new()
                            .name("sqlite-lane".into())
                            .spawn(move || {
                                // The thread runs nothing else: no task waits for its turn.
                                let lane = lane.run(receiver, max_batch, true);
                                runtime.block_on(tokio::task::coop::unconstrained(lane))
                            })
                            .map_err(|error| {
                                StoreError::Unavailable(format!(
                                    "cannot start the SQLite lane's thread: {error}"
                                ))
                            })?;
                    }
                    Backend::Postgres => {
                        runtime.spawn(lane.run(receiver, max_batch, false));
                    }
                }
                Ok(sender)
            })
            .collect::<Result<_>>()?;
        Ok(Appender { lanes, counters })
    }

    pub(super) fn stats(&self) -> GroupCommitStats {
        self.counters.snapshot()
    }

    /// Queues an append; returns once it is in its lane's queue.
    pub(super) async fn queue(
        &self,
        append: Append,
        after: Option<&AppendTicket>,
    ) -> Result<QueuedAppend> {
        // One slot always goes to one lane, so a session's appends commit in order.
        let lane = &self.lanes[append.fence.slot as usize % self.lanes.len()];
        let (reply, answer) = oneshot::channel();
        let ticket = AppendTicket::default();
        let request = AppendRequest {
            append,
            after: after.cloned(),
            ticket: ticket.clone(),
            reply,
        };
        lane.send(request)
            .await
            .map_err(|_| StoreError::Unavailable("the store's appender has stopped".into()))?;
        Ok(QueuedAppend::waiting(ticket, answer))
    }
}

/// One group-commit queue and the connection it commits on. The connection is its own
/// (detached from the pool), so how it syncs never leaks to other writers.
struct Lane {
    pool: AnyPool,
    backend: Backend,
    durable: bool,
    connection: Option<LaneConnection>,
    /// SQLite with a WAL file, durable: syncs it after the lane's commits.
    wal: Option<WalSyncer>,
    /// Nothing was queued behind the batch being committed when it was taken.
    alone: bool,
    /// The last commit waited for the disk itself.
    synced_inline: bool,
    counters: Arc<Counters>,
    /// A sealed store's keys.
    sealer: Option<Arc<Sealer>>,
    /// Sealed stores: each session's message count after this lane's last commit of it,
    /// so that a batch's messages are numbered (and sealed to their seqs) before it runs.
    counts: HashMap<SessionId, u64>,
}

impl Lane {
    /// `own_thread`: the lane runs on a thread of its own, where it may block.
    async fn run(
        mut self,
        mut receiver: mpsc::Receiver<AppendRequest>,
        max_batch: usize,
        own_thread: bool,
    ) {
        let mut batch = Vec::with_capacity(max_batch);
        loop {
            let received = receiver.recv_many(&mut batch, max_batch).await;
            if received == 0 {
                break;
            }
            // Nobody waits on turns' user messages alone before their replies, which a fast
            // agent makes within the moment: a reply that joins its user message's batch
            // saves the pair a transaction and a wait for the disk.
            let deadline = std::time::Instant::now() + FOLLOW_UP_WAIT;
            while batch.len() < max_batch
                && batch
                    .iter()
                    .all(|request| request.append.durability == Durability::WithNext)
            {
                let room = max_batch - batch.len();
                let received = if own_thread {
                    receive_until(&mut receiver, &mut batch, room, deadline)
                } else {
                    tokio::time::timeout_at(deadline.into(), receiver.recv_many(&mut batch, room))
                        .await
                        .unwrap_or(0)
                };
                if received == 0 {
                    break;
                }
            }
            let requests = std::mem::take(&mut batch);
            self.alone = receiver.is_empty();
            match self.commit(&requests).await {
                Ok(outcomes) => self.settle(requests, outcomes),
                // A statement failed, so the transaction committed nothing: one bad row (one
                // the database refuses) must not fail the others' appends. Each goes alone,
                // in order, so an append that follows another sees its fate.
                Err(BatchError::Statement(error)) if requests.len() > 1 => {
                    tracing::warn!(appends = requests.len(), %error, "append batch failed; committing its appends one by one");
                    for request in requests {
                        let alone = std::slice::from_ref(&request);
                        let outcome = match self.commit(alone).await {
                            Ok(mut outcomes) => {
                                outcomes.pop().unwrap_or_else(|| Err(error.clone()))
                            }
                            Err(failed) => Err(failed.into_inner()),
                        };
                        self.settle(vec![request], vec![outcome]);
                    }
                }
                Err(error) => {
                    let error = error.into_inner();
                    tracing::warn!(appends = requests.len(), %error, "append batch failed; nothing in it was committed");
                    let outcomes = requests.iter().map(|_| Err(error.clone())).collect();
                    self.settle(requests, outcomes);
                }
            }
            if let Some(writer) = self
                .connection
                .as_ref()
                .and_then(|lane| lane.writer.as_ref())
            {
                writer.checkpoint_if_due();
            }
        }
    }

    /// Commits a batch; any failure drops the connection, and the next batch opens another.
    async fn commit(
        &mut self,
        requests: &[AppendRequest],
    ) -> Result<Vec<Result<Appended>>, BatchError> {
        let durable = waited_on(requests);
        let started = std::time::Instant::now();
        let result = self.commit_on_connection(requests, durable).await;
        metrics::histogram!("switchyard_store_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("switchyard_store_batch_size").record(requests.len() as f64);
        match result {
            Ok(committed) => {
                self.counters.record(requests, durable, committed.staged);
                if self.synced_inline && self.wal.is_some() {
                    self.counters.syncs.fetch_add(1, Ordering::Relaxed);
                }
                Ok(committed.outcomes)
            }
            Err(error) => {
                self.connection = None;
                Err(error)
            }
        }
    }

    async fn commit_on_connection(
        &mut self,
        requests: &[AppendRequest],
        durable: bool,
    ) -> Result<Committed, BatchError> {
        // Open first: whether SQLite syncs itself depends on what the connection finds.
        self.connection().await.map_err(BatchError::Statement)?;
        // After a failed sync nothing more is written: a later commit, even one that syncs
        // itself, could be lost with the frames that failed before it.
        if let Some(reason) = self.wal.as_ref().and_then(WalSyncer::failed) {
            return Err(BatchError::Commit(StoreError::Unavailable(
                reason.to_string(),
            )));
        }
        let synchronous = match self.backend {
            // With nothing behind it, a durable batch has no next commit to sync beside: it
            // waits for the disk itself, which saves it the hop to the syncing thread.
            Backend::Sqlite if self.wal.is_some() && self.durable && durable && self.alone => {
                Synchronous::Full
            }
            Backend::Sqlite => self.sqlite_synchronous(),
            Backend::Postgres if durable => Synchronous::Full,
            Backend::Postgres => Synchronous::Normal,
        };
        self.synced_inline = synchronous == Synchronous::Full;
        let backend = self.backend;
        let Some(sealer) = self.sealer.clone() else {
            let connection = self.connection().await.map_err(BatchError::Statement)?;
            return commit_batch(connection, backend, requests, synchronous, None).await;
        };
        // A sealed store: every session's data key first, then the batch, numbered from
        // the counts this lane saw last.
        let deks = sealer
            .deks(
                &self.pool,
                requests.iter().map(|request| request.append.session_id),
            )
            .await
            .map_err(BatchError::Statement)?;
        if self.counts.len() > MAX_KNOWN_COUNTS {
            self.counts.clear();
        }
        let counts = std::mem::take(&mut self.counts);
        let seal = BatchSeal {
            keys: &sealer.keys,
            deks: &deks,
            counts: &counts,
        };
        let connection = self.connection().await;
        let committed = match connection {
            Ok(connection) => {
                commit_batch(connection, backend, requests, synchronous, Some(&seal)).await
            }
            Err(error) => Err(BatchError::Statement(error)),
        };
        self.counts = counts;
        if let Ok(committed) = &committed {
            for (request, outcome) in requests.iter().zip(&committed.outcomes) {
                if let Ok(appended) = outcome {
                    let known = self.counts.entry(request.append.session_id).or_default();
                    *known = (*known).max(appended.last_seq);
                }
            }
        }
        committed
    }

    /// Settles each request's ticket (the lane orders appends by them), then answers it:
    /// at once, or once the WAL syncer has made the batch durable. A batch nobody waits
    /// on is answered at once, and synced soon after.
    fn settle(&self, requests: Vec<AppendRequest>, outcomes: Vec<Result<Appended>>) {
        let durable = waited_on(&requests);
        let answers: Vec<Answer> = requests
            .into_iter()
            .zip(outcomes)
            .map(|(request, outcome)| {
                request.ticket.settle(outcome.is_ok());
                (request.reply, outcome)
            })
            .collect();
        if let Some(wal) = &self.wal
            && !self.synced_inline
        {
            if durable {
                return wal.answer(answers);
            }
            wal.deferred();
        }
        for (reply, outcome) in answers {
            // A caller that went away no longer needs its answer.
            let _ = reply.send(outcome);
        }
    }

    /// SQLite: the lane checkpoints the WAL itself ([`LANE_CHECKPOINT`]), and a
    /// durable store's lane syncs the WAL file itself when there is one. Returns the
    /// direct connection that commits at-once batches, for a database in a file.
    async fn prepare_sqlite(
        &mut self,
        connection: &mut sqlx::AnyConnection,
    ) -> Result<Option<SqliteWriter>> {
        sqlx::Executor::execute(&mut *connection, LANE_CHECKPOINT)
            .await
            .map_err(unavailable)?;
        let file: String = sqlx::query("SELECT file FROM pragma_database_list WHERE name = 'main'")
            .fetch_one(&mut *connection)
            .await
            .and_then(|row| row.try_get(0))
            .map_err(unavailable)?;
        // An in-memory database has no file to open twice, nor to sync.
        if file.is_empty() {
            return Ok(None);
        }
        if self.durable && self.wal.is_none() {
            self.find_wal(connection, &file).await?;
        }
        SqliteWriter::open(std::path::Path::new(&file), self.counters.clone()).map(Some)
    }

    /// Starts syncing the database's WAL file, if it has one.
    async fn find_wal(&mut self, connection: &mut sqlx::AnyConnection, file: &str) -> Result<()> {
        let mode: String = sqlx::query("PRAGMA journal_mode")
            .fetch_one(&mut *connection)
            .await
            .and_then(|row| row.try_get(0))
            .map_err(unavailable)?;
        // Without a WAL, commits sync themselves.
        if mode.eq_ignore_ascii_case("wal") {
            let wal = std::path::PathBuf::from(format!("{file}-wal"));
            self.wal = Some(WalSyncer::start(wal, self.counters.clone())?);
        }
        Ok(())
    }

    /// How the lane's SQLite commits sync, but for a durable batch alone.
    fn sqlite_synchronous(&self) -> Synchronous {
        match (self.durable, &self.wal) {
            (false, _) => Synchronous::Off,
            // The WAL syncer makes each commit durable, after it.
            (true, Some(_)) => Synchronous::Normal,
            (true, None) => Synchronous::Full,
        }
    }

    /// The lane's connection, opened when it has none.
    async fn connection(&mut self) -> Result<&mut LaneConnection> {
        let connection = match self.connection.take() {
            Some(connection) => connection,
            None => {
                let mut connection = self.pool.acquire().await.map_err(unavailable)?.detach();
                if self.backend == Backend::Postgres {
                    // Every statement of a batch finds its rows by primary key, from a JSON
                    // array whose length PostgreSQL cannot know (it guesses 100 rows): left
                    // to itself it plans hash joins over whole tables, which cost a scan
                    // of every message and request id per batch once they grow. With
                    // sequential scans off it still hashes a whole index (the sessions'
                    // primary key, every session read to update a few), so joins are
                    // nested loops: one look-up per row of the array. Plans are generic, so
                    // that none is made again per batch.
                    sqlx::Executor::execute(
                        &mut connection,
                        "SET enable_seqscan = off; SET enable_hashjoin = off; \
                         SET enable_mergejoin = off; SET plan_cache_mode = force_generic_plan",
                    )
                    .await
                    .map_err(unavailable)?;
                }
                let writer = if self.backend == Backend::Sqlite {
                    self.prepare_sqlite(&mut connection).await?
                } else {
                    None
                };
                LaneConnection::new(connection, writer)
            }
        };
        Ok(self.connection.insert(connection))
    }
}

/// Receives up to `room` more requests into `batch`, waiting until `deadline` at most, on
/// a lane's own thread: it blocks that thread, and uses no timer of the runtime's (one
/// polled while the runtime shuts down panics). Returns how many came.
fn receive_until(
    receiver: &mut mpsc::Receiver<AppendRequest>,
    batch: &mut Vec<AppendRequest>,
    room: usize,
    deadline: std::time::Instant,
) -> usize {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut context = std::task::Context::from_waker(&waker);
    loop {
        if let std::task::Poll::Ready(received) = receiver.poll_recv_many(&mut context, batch, room)
        {
            return received;
        }
        let now = std::time::Instant::now();
        if now >= deadline {
            return 0;
        }
        std::thread::park_timeout(deadline - now);
    }
}

/// Whether anyone waits for the batch to be durable.
fn waited_on(requests: &[AppendRequest]) -> bool {
    requests
        .iter()
        .any(|request| request.append.durability == Durability::Now)
}
