//! SQLite's WAL when a reader keeps it from starting over.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use switchyard_store::{SessionStore, SqlStore, SqlStoreOptions};

use super::{own_slot, session, temp_dir, text};

/// The WAL's length past which the store truncates a WAL it has copied whole: 8 000
/// frames, each a 24-byte header and a 4 KiB page.
const TRUNCATED_PAST: u64 = 8_000 * (24 + 4096);

/// A reader left on an old snapshot keeps the WAL from starting over while appends go on;
/// once the reader is gone, the store copies the WAL back and truncates it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_kept_long_by_a_reader_is_truncated_once_the_reader_is_gone() {
    const WRITERS: usize = 16;
    const APPENDS: usize = 200;
    const CONTENT: usize = 12 * 1024;
    let dir = temp_dir("wal-reader");
    let path = dir.join("store.db");
    let store = Arc::new(
        SqlStore::open(SqlStoreOptions::sqlite_file(&path))
            .await
            .unwrap(),
    );
    let fence = own_slot(&*store).await;
    let reader = rusqlite::Connection::open(&path).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let sessions: i64 = reader
        .query_row("SELECT count(*) FROM sessions", [], |row| row.get(0))
        .unwrap();
    assert_eq!(sessions, 0);

    let content = "r".repeat(CONTENT);
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let session = session(&format!("reader-{writer}"));
        store.create_session(&fence, &session).await.unwrap();
        let (store, fence, content) = (store.clone(), fence.clone(), content.clone());
        writers.push(tokio::spawn(async move {
            for _ in 0..APPENDS {
                store
                    .append_messages(&fence, session.id, &[text(&content)], SystemTime::now())
                    .await
                    .unwrap();
            }
            session.id
        }));
    }
    let mut sessions = Vec::new();
    for writer in writers {
        sessions.push(writer.await.unwrap());
    }
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
