//! SQLite: the checkpoints of a lane's WAL, mostly beside the lane rather than on its path.
//!
//! The WAL starts over from its beginning only once every frame in it has been copied back
//! into the database, and a checkpoint beside a lane that keeps writing never copies the
//! frames written while it runs. So the lane checkpoints itself, after a commit (once that
//! batch's appends are answered), when the WAL holds [`LANE_AT`] frames: while it does,
//! every append queued behind it waits. Done wholly by the lane, that checkpoint copied up
//! to 4 000 pages and synced the database, 4–17 ms at 32 turns in flight once the tables
//! outgrew the page cache, several times a second: the appends' p99 was that stall.
//!
//! Here a thread of its own, on a connection of its own, checkpoints pass after pass once
//! the WAL holds [`HELPER_AT`] frames, while the lane goes on committing: its first pass
//! copies what the lane's checkpoint would have, each further one what came during the
//! last. The lane's own checkpoint at [`LANE_AT`], made once the helper is idle, then
//! copies only what came since the helper's last pass began (1.9 ms on average and never
//! over 5 ms in the same run), and when a pass catches up with the lane the WAL starts over
//! without it. Past [`FORCED_AT`] frames the lane checkpoints whatever the helper is doing,
//! which bounds the WAL if the helper stalls.

use std::cell::Cell;
use std::os::raw::c_int;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use rusqlite::Connection;

use super::appender::Counters;
use crate::{Result, StoreError};

/// Frames in the WAL from which the helper checkpoints, pass after pass. From 1 000, it
/// copied the most rewritten pages many times over: 24.5 µs of CPU per turn at 32 in
/// flight, against about 15 µs from 3 000.
const HELPER_AT: c_int = 3_000;
/// Frames (16 MB) from which the lane checkpoints once the helper is idle. Four times
/// SQLite's default: a page rewritten by many batches is copied back once per checkpoint,
/// and the store's append benchmark committed about a quarter more appends per second than
/// at 1 000 pages.
const LANE_AT: c_int = 4_000;
/// Frames from which the lane checkpoints even while the helper is at it.
const FORCED_AT: c_int = 8_000;

const CHECKPOINT: &str = "PRAGMA wal_checkpoint(PASSIVE)";

thread_local! {
    /// The frames in the WAL after the last commit of the connection on this thread that
    /// [`watch`] set up. A lane's thread holds one such connection.
    static FRAMES: Cell<c_int> = const { Cell::new(0) };
}

/// Has `connection` record the WAL's length after each of its commits, for
/// [`LaneCheckpoints::after_commit`] on the same thread. This replaces SQLite's automatic
/// checkpoint on that connection.
pub(super) fn watch(connection: &Connection) {
    fn record(_: &rusqlite::hooks::Wal, frames: c_int) -> rusqlite::Result<()> {
        FRAMES.with(|cell| cell.set(frames));
        Ok(())
    }
    connection.wal_hook(Some(record));
}

/// The helper thread, and when the lane checkpoints itself.
pub(super) struct LaneCheckpoints {
    requests: mpsc::Sender<()>,
    /// The helper is checkpointing, or has been asked to.
    busy: Arc<AtomicBool>,
    counters: Arc<Counters>,
}

impl LaneCheckpoints {
    /// Starts the helper on a connection of its own, opened by `connect`.
    pub(super) fn start(
        path: &Path,
        connect: fn(&Path) -> Result<Connection>,
        counters: Arc<Counters>,
    ) -> Result<Self> {
        let connection = connect(path)?;
        let busy = Arc::new(AtomicBool::new(false));
        let (requests, asked) = mpsc::channel::<()>();
        let (done, helped) = (busy.clone(), counters.clone());
        std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                for () in asked {
                    match checkpoint(&connection, "beside") {
                        Ok(true) => {
                            helped
                                .checkpoints_beside
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        // The lane was at it (past `FORCED_AT`).
                        Ok(false) => {}
                        Err(error) => {
                            tracing::warn!(%error, "a WAL checkpoint beside the lane failed; the lane checkpoints itself");
                        }
                    }
                    done.store(false, Ordering::Release);
                }
            })
            .map_err(|error| {
                StoreError::Unavailable(format!("cannot start the WAL checkpoint thread: {error}"))
            })?;
        Ok(LaneCheckpoints {
            requests,
            busy,
            counters,
        })
    }

    /// On the watched connection's thread, once the lane's batch is answered: asks the
    /// helper for a pass, or checkpoints on `connection` itself, by the frames its last
    /// commit left in the WAL.
    pub(super) fn after_commit(&self, connection: &Connection) {
        let frames = FRAMES.with(Cell::get);
        let helper_busy = self.busy.load(Ordering::Acquire);
        if (HELPER_AT..LANE_AT).contains(&frames) && !helper_busy {
            self.busy.store(true, Ordering::Release);
            if self.requests.send(()).is_err() {
                // The helper is gone: the lane does it all.
                self.busy.store(false, Ordering::Release);
            }
        } else if (frames >= LANE_AT && !helper_busy) || frames >= FORCED_AT {
            match checkpoint(connection, "lane") {
                Ok(true) => {
                    self.counters
                        .checkpoints_in_lane
                        .fetch_add(1, Ordering::Relaxed);
                    // Until the next commit says otherwise: the WAL may start over then.
                    FRAMES.with(|cell| cell.set(0));
                }
                // The helper holds the checkpoint: the lane tries again after its next commit.
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%error, frames, "the lane's WAL checkpoint failed; it tries again after its next commit");
                }
            }
        }
    }
}

/// A passive checkpoint; whether it ran (another connection's may hold the checkpoint).
/// `by` names who made it in `switchyard_store_wal_checkpoint_seconds`.
fn checkpoint(connection: &Connection, by: &'static str) -> rusqlite::Result<bool> {
    let started = std::time::Instant::now();
    let ran = connection.query_row(CHECKPOINT, [], |row| Ok(row.get::<_, i64>(0)? == 0))?;
    if ran {
        metrics::histogram!("switchyard_store_wal_checkpoint_seconds", "by" => by)
            .record(started.elapsed().as_secs_f64());
    }
    Ok(ran)
}
