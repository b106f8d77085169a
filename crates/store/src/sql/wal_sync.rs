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

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
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
}

impl WalSyncer {
    /// Starts the thread that syncs `wal`, the WAL file of the lane's database.
    pub(super) fn start(wal: PathBuf, counters: Arc<Counters>) -> Result<Self> {
        let (jobs, receiver) = mpsc::channel();
        let worker = Worker {
            path: wal,
            file: None,
            failed: None,
            counters,
        };
        std::thread::Builder::new()
            .name("sqlite-wal-sync".into())
            .spawn(move || worker.run(receiver))
            .map_err(|error| {
                StoreError::Unavailable(format!("cannot start the WAL sync thread: {error}"))
            })?;
        Ok(WalSyncer { jobs })
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
    /// Why syncing stopped for good.
    failed: Option<String>,
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
            if waiting.is_empty() && !due && open {
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
        if let Some(reason) = &self.failed {
            return Err(StoreError::Unavailable(reason.clone()));
        }
        match self.sync_file() {
            Ok(()) => {
                self.counters.syncs.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(error) => {
                let reason = format!(
                    "the store could not sync its WAL ({}): {error}; it accepts no durable write until it is opened again",
                    self.path.display()
                );
                tracing::error!("{reason}");
                self.failed = Some(reason.clone());
                Err(StoreError::Unavailable(reason))
            }
        }
    }

    fn sync_file(&mut self) -> std::io::Result<()> {
        let file = match self.file.take() {
            Some(file) => file,
            None => std::fs::File::open(&self.path)?,
        };
        let file = self.file.insert(file);
        file.sync_data()?;
        // The WAL is one file for as long as the lane's connection is open. Should it have
        // been replaced (every connection closed, then one opened), the new file holds the
        // later frames: sync it too, and keep it.
        if !same_file(file, &self.path)? {
            let replaced = std::fs::File::open(&self.path)?;
            replaced.sync_data()?;
            self.file = Some(replaced);
        }
        Ok(())
    }
}

fn same_file(file: &std::fs::File, path: &Path) -> std::io::Result<bool> {
    let (open, named) = (file.metadata()?, std::fs::metadata(path)?);
    Ok(open.dev() == named.dev() && open.ino() == named.ino())
}
