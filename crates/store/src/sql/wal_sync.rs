//! SQLite: the lane's commits made durable while it commits the next batch.
//!
//! The lane commits every batch without waiting for the disk (`synchronous = NORMAL`): when
//! a commit returns, its frames are written to the WAL file, not yet synced. A thread of the
//! store's own then syncs that file (`fdatasync`) and only then answers the batch's appends.
//! A sync that starts after a commit returned covers every frame the commit wrote, and every
//! frame before it. Batches committed during one sync wait for the next, which covers them
//! all: the disk's latency is paid once per sync, never while the lane holds SQLite's write
//! lock, and the lane commits the next batch meanwhile.
//!
//! A failed sync is not tried again: once the kernel has reported a write-back error, a
//! later sync may succeed without the lost pages, and SQLite's recovery would stop at the
//! first bad frame, dropping later commits too. The store answers every durable append
//! with an error from then on, until it is opened again (PostgreSQL stops on such an error
//! for the same reason).

use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tokio::sync::oneshot;

use super::appender::{Counters, UNSYNCED_LIMIT};
use crate::{Appended, Result, StoreError};

/// An append's answer, sent once the WAL is synced past its commit.
pub(super) type Answer = (oneshot::Sender<Result<Appended>>, Result<Appended>);

enum Job {
    /// A batch committed: answer it once a sync has covered it.
    Answer(Vec<Answer>),
    /// A batch committed that nobody waits on (turns' user messages alone): sync it within
    /// [`UNSYNCED_LIMIT`] if no other sync comes first.
    Deferred,
}

/// The syncing thread's handle; dropping it lets the thread finish what it holds and end.
pub(super) struct WalSyncer {
    jobs: mpsc::Sender<Job>,
    failed: Arc<OnceLock<String>>,
}

impl WalSyncer {
    /// Starts the thread that syncs `wal`, the WAL file of the lane's database. The file is
    /// opened now, before the lane's first commit without a sync, so that a write-back
    /// error on any of its frames is reported to this handle.
    pub(super) fn start(wal: PathBuf, counters: Arc<Counters>) -> Result<Self> {
        let (jobs, receiver) = mpsc::channel();
        let failed = Arc::new(OnceLock::new());
        let file = open_wal(&wal).map_err(|error| {
            StoreError::Unavailable(format!("cannot open the WAL {}: {error}", wal.display()))
        })?;
        let worker = Worker {
            path: wal,
            file,
            failed: failed.clone(),
            counters,
        };
        std::thread::Builder::new()
            .name("sqlite-wal-sync".into())
            .spawn(move || worker.run(receiver))
            .map_err(|error| {
                StoreError::Unavailable(format!("cannot start the WAL sync thread: {error}"))
            })?;
        Ok(WalSyncer { jobs, failed })
    }

    /// Why the store stopped accepting writes, if a sync failed.
    pub(super) fn failed(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }

    /// Answers a committed batch's appends once the WAL is synced past it.
    pub(super) fn answer(&self, answers: Vec<Answer>) {
        if let Err(mpsc::SendError(Job::Answer(answers))) = self.jobs.send(Job::Answer(answers)) {
            // The thread only ends once this handle is gone; answer rather than drop.
            for (reply, _) in answers {
                let _ = reply.send(Err(StoreError::Unavailable(
                    "the WAL sync thread has stopped".into(),
                )));
            }
        }
    }

    /// Notes a committed batch that nobody waits on.
    pub(super) fn deferred(&self) {
        let _ = self.jobs.send(Job::Deferred);
    }
}

struct Worker {
    path: PathBuf,
    /// The WAL file, opened at the first sync.
    file: Option<std::fs::File>,
    /// Why syncing stopped for good; the lane reads it too.
    failed: Arc<OnceLock<String>>,
    counters: Arc<Counters>,
}

impl Worker {
    fn run(mut self, jobs: mpsc::Receiver<Job>) {
        let mut waiting: Vec<Answer> = Vec::new();
        // When the oldest commit that nobody waits on was noted, if none is synced yet.
        let mut unsynced_since: Option<Instant> = None;
        let mut open = true;
        while open || !waiting.is_empty() || unsynced_since.is_some() {
            let job = match unsynced_since {
                _ if !open => None,
                Some(since) => {
                    let left = UNSYNCED_LIMIT.saturating_sub(since.elapsed());
                    match jobs.recv_timeout(left) {
                        Ok(job) => Some(job),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => {
                            open = false;
                            None
                        }
                    }
                }
                None => match jobs.recv() {
                    Ok(job) => Some(job),
                    Err(_) => {
                        open = false;
                        None
                    }
                },
            };
            // Everything committed by now joins this sync.
            for job in job
                .into_iter()
                .chain(std::iter::from_fn(|| jobs.try_recv().ok()))
            {
                match job {
                    Job::Answer(answers) => waiting.extend(answers),
                    Job::Deferred => {
                        unsynced_since.get_or_insert_with(Instant::now);
                    }
                }
            }
            let due = unsynced_since.is_some_and(|since| since.elapsed() >= UNSYNCED_LIMIT);
            // Closing, a commit nobody waits on is synced before the thread ends.
            let closing = !open && unsynced_since.is_some();
            if waiting.is_empty() && !due && !closing {
                continue;
            }
            let synced = self.sync();
            unsynced_since = None;
            for (reply, outcome) in waiting.drain(..) {
                let outcome = match (&synced, outcome) {
                    (Err(error), Ok(_)) => Err(error.clone()),
                    (_, outcome) => outcome,
                };
                // A caller that went away no longer needs its answer.
                let _ = reply.send(outcome);
            }
        }
    }

    /// Syncs the WAL file; every frame written before the call is durable once it returns
    /// `Ok`.
    fn sync(&mut self) -> Result<()> {
        if let Some(reason) = self.failed.get() {
            return Err(StoreError::Unavailable(reason.clone()));
        }
        match self.sync_file() {
            Ok(()) => {
                self.counters.syncs.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(error) => {
                let reason = format!(
                    "the store could not sync its WAL ({}): {error}; it accepts no write until it is opened again",
                    self.path.display()
                );
                tracing::error!("{reason}");
                let _ = self.failed.set(reason.clone());
                Err(StoreError::Unavailable(reason))
            }
        }
    }

    fn sync_file(&mut self) -> std::io::Result<()> {
        if let Some(file) = &self.file {
            file.sync_data()?;
        }
        // The WAL is one file for as long as the lane's connection is open. Should it have
        // been replaced (every connection closed, then one opened), the new file holds the
        // later frames: sync it too, and keep it. Should it be gone, SQLite removed it only
        // once it had copied it into the database and synced that: nothing is left to sync.
        let named = match std::fs::metadata(&self.path) {
            Ok(named) => named,
            Err(error) if error.kind() == ErrorKind::NotFound => {
                self.file = None;
                return Ok(());
            }
            Err(error) => return Err(error),
        };
        let same = match &self.file {
            Some(file) => {
                let open = file.metadata()?;
                open.dev() == named.dev() && open.ino() == named.ino()
            }
            None => false,
        };
        if !same {
            self.file = open_wal(&self.path)?;
            if let Some(file) = &self.file {
                file.sync_data()?;
            }
        }
        Ok(())
    }
}

/// Opens the WAL file, if there is one, and syncs its directory so that its name is
/// durable too (SQLite does the same on a new WAL's first sync).
fn open_wal(path: &Path) -> std::io::Result<Option<std::fs::File>> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    if let Some(directory) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        std::fs::File::open(directory)?.sync_all()?;
    }
    Ok(Some(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(path: &Path) -> Worker {
        Worker {
            path: path.to_path_buf(),
            file: open_wal(path).unwrap(),
            failed: Arc::new(OnceLock::new()),
            counters: Arc::new(Counters::default()),
        }
    }

    fn temp_dir(test: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn inode(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().ino()
    }

    #[test]
    fn a_replaced_wal_is_synced_and_kept_and_a_removed_one_leaves_nothing_to_sync() {
        let dir = temp_dir("wal-sync");
        let path = dir.join("store.db-wal");
        std::fs::write(&path, b"first").unwrap();
        let mut worker = worker(&path);
        worker.sync().unwrap();
        assert_eq!(worker.counters.syncs.load(Ordering::Relaxed), 1);

        // Replaced: a new file under the same name, which the worker then holds.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(dir.join("next"), b"second").unwrap();
        std::fs::rename(dir.join("next"), &path).unwrap();
        worker.sync().unwrap();
        let held = worker.file.as_ref().unwrap().metadata().unwrap().ino();
        assert_eq!(held, inode(&path));

        // Removed (SQLite checkpointed it into the database first): not a failure.
        std::fs::remove_file(&path).unwrap();
        worker.sync().unwrap();
        assert!(worker.file.is_none());
        assert!(worker.failed.get().is_none());
        assert_eq!(worker.counters.syncs.load(Ordering::Relaxed), 3);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_failed_sync_stays_failed() {
        let dir = temp_dir("wal-fail");
        // A path under a file cannot be read: every sync of it fails.
        let blocker = dir.join("blocker");
        std::fs::write(&blocker, b"").unwrap();
        let mut worker = worker(&dir.join("absent"));
        worker.path = blocker.join("store.db-wal");
        let error = worker.sync().unwrap_err().to_string();
        assert!(error.contains("could not sync its WAL"), "{error}");
        // The path is fine again, but the failure stands.
        worker.path = dir.join("absent");
        assert!(worker.sync().is_err());
        assert!(worker.failed.get().is_some());
        let _ = std::fs::remove_dir_all(dir);
    }
}
