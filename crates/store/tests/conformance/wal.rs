//! SQLite's WAL: checkpointed and started over under steady appends, and truncated when a
//! reader kept it from starting over.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use switchyard_core::SessionId;
use switchyard_store::{SessionStore, SqlStore, SqlStoreOptions};

use super::{own_slot, session, temp_dir, text};

/// The WAL's length past which the store truncates a WAL it has copied whole: 8 000
/// frames, each a 24-byte header and a 4 KiB page.
const TRUNCATED_PAST: u64 = 8_000 * (24 + 4096);

/// Opens an SQLite store in `dir`, makes a session for each of `writers`, and appends
/// `appends` messages of `content` to each, all writers at once, after `before` has run on
/// the opened store. Returns the store, the sessions, each checked to hold every append,
/// and what `before` returned.
async fn append_at_once<T>(
    dir: &Path,
    writers: usize,
    appends: usize,
    content: &str,
    before: impl FnOnce() -> T,
) -> (Arc<SqlStore>, Vec<SessionId>, T) {
    let store = Arc::new(
        SqlStore::open(SqlStoreOptions::sqlite_file(&dir.join("store.db")))
            .await
            .unwrap(),
    );
    let fence = own_slot(&*store).await;
    let before = before();
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let session = session(&format!("wal-{writer}"));
        store.create_session(&fence, &session).await.unwrap();
        let (store, fence, content) = (store.clone(), fence.clone(), content.to_string());
        tasks.push(tokio::spawn(async move {
            for _ in 0..appends {
                store
                    .append_messages(&fence, session.id, &[text(&content)], SystemTime::now())
                    .await
                    .unwrap();
            }
            session.id
        }));
    }
    let mut sessions = Vec::new();
    for task in tasks {
        let session = task.await.unwrap();
        let kept = store.read_context(session, 0, 0).await.unwrap().len();
        assert_eq!(kept, appends, "every append was kept");
        sessions.push(session);
    }
    (store, sessions, before)
}

/// Under appends that never pause, the WAL is checkpointed and started over again and
/// again: it stays a few megabytes long while many times that passes through it, and most
/// of its copying is done beside the lane, by the thread that checkpoints for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_stays_short_under_appends_that_never_pause() {
    const WRITERS: usize = 32;
    const APPENDS: usize = 250;
    const CONTENT: usize = 6 * 1024;
    const WAL_BOUND: u64 = 20 * 1024 * 1024;
    let dir = temp_dir("wal-bound");
    let wal = dir.join("store.db-wal");
    let (done, mut watching) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(async move {
        let (mut samples, mut longest) = (0_u64, 0_u64);
        while !*watching.borrow_and_update() {
            if let Ok(metadata) = std::fs::metadata(&wal) {
                samples += 1;
                longest = longest.max(metadata.len());
            }
            let _ = tokio::time::timeout(Duration::from_millis(10), watching.changed()).await;
        }
        (samples, longest)
    });
    let (store, _, ()) = append_at_once(&dir, WRITERS, APPENDS, &"w".repeat(CONTENT), || {}).await;
    done.send(true).unwrap();
    let (samples, longest) = watcher.await.unwrap();
    let stats = store.group_commit_stats();
    assert!(
        stats.checkpoints_beside > 0,
        "no checkpoint was made beside the lane: {stats:?}"
    );
    let written = (WRITERS * APPENDS * CONTENT) as u64;
    assert!(samples > 0, "the WAL was never seen");
    assert!(
        written > 2 * WAL_BOUND,
        "the test writes too little to tell: {written} bytes"
    );
    assert!(
        longest <= WAL_BOUND,
        "the WAL reached {longest} bytes while {written} bytes of messages were appended"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A reader left on an old snapshot keeps the WAL from starting over while appends go on;
/// once the reader is gone, the store copies the WAL back and truncates it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_kept_long_by_a_reader_is_truncated_once_the_reader_is_gone() {
    const WRITERS: usize = 16;
    const APPENDS: usize = 200;
    const CONTENT: usize = 12 * 1024;
    let dir = temp_dir("wal-reader");
    // A reader that stays on the snapshot it began with, before the appends.
    let (store, sessions, reader) =
        append_at_once(&dir, WRITERS, APPENDS, &"r".repeat(CONTENT), || {
            let reader = rusqlite::Connection::open(dir.join("store.db")).unwrap();
            reader.execute_batch("BEGIN").unwrap();
            let sessions: i64 = reader
                .query_row("SELECT count(*) FROM sessions", [], |row| row.get(0))
                .unwrap();
            assert_eq!(sessions, 0);
            reader
        })
        .await;
    let wal = dir.join("store.db-wal");
    let long = std::fs::metadata(&wal).unwrap().len();
    assert!(
        long > TRUNCATED_PAST,
        "the reader should have kept the WAL from starting over, yet it is {long} bytes"
    );

    reader.execute_batch("COMMIT").unwrap();
    drop(reader);
    let waited = Instant::now();
    let (mut looks, mut now) = (0, long);
    while now >= 1024 * 1024 {
        assert!(
            waited.elapsed() < Duration::from_secs(20),
            "the WAL is still {now} bytes, 20 s after its reader went ({looks} looks)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        now = std::fs::metadata(&wal).map_or(0, |metadata| metadata.len());
        looks += 1;
    }
    assert!(looks > 0, "the WAL was short before the reader went");
    // Nothing was lost on the way back into the database.
    for session in sessions {
        assert_eq!(
            store.read_context(session, 0, 0).await.unwrap().len(),
            APPENDS
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
