//! Encryption at rest, seen from outside: the raw files and rows hold no plaintext, a
//! destroyed data key leaves a session unreadable, a plaintext store is sealed in place,
//! and KEKs rotate online.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

use sqlx::Connection;
use switchyard_core::{Epoch, Message, Role, Session, SessionId, UserId, WorkerId};
use switchyard_store::sealing::{Kek, KeyRing};
use switchyard_store::testing::TestDatabase;
use switchyard_store::{Fence, SessionStore, SqlStore, SqlStoreOptions, StoreError};

const SLOT: u32 = 5;
const KEK_A: &[u8] = b"the first key-encryption key, 32 bytes or more";
const KEK_B: &[u8] = b"the second key-encryption key, 32 bytes or more";

fn keys(active: &[u8], others: &[&[u8]]) -> KeyRing {
    KeyRing::new(
        Kek::from_secret(active).unwrap(),
        others
            .iter()
            .map(|secret| Kek::from_secret(secret).unwrap())
            .collect(),
    )
}

fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "switchyard-sealing-{test}-{}",
        SessionId::new_random()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn own_slot(store: &dyn SessionStore) -> Fence {
    let owner = WorkerId::parse("w").unwrap();
    let epoch = Epoch(store.max_lease_epoch().await.unwrap().0 + 1);
    store.acquire_slots(&owner, epoch, &[SLOT]).await.unwrap();
    Fence {
        slot: SLOT,
        owner,
        epoch,
    }
}

fn text(content: &str) -> Message {
    Message {
        role: Role::User,
        content: content.to_string(),
        name: String::new(),
    }
}

/// A session with a marked metadata value and three batches of marked messages; returns
/// the session and every marker written.
async fn write_marked(
    store: &dyn SessionStore,
    fence: &Fence,
    tag: &str,
) -> (Session, Vec<String>) {
    let now = SystemTime::now();
    let meta = format!("metadata-plaintext-{tag}");
    let session = Session {
        id: SessionId::new_random(),
        user_id: UserId::parse(format!("user-{tag}")).unwrap(),
        slot: SLOT,
        created_at: now,
        last_activity_at: now,
        metadata: BTreeMap::from([("note".to_string(), meta.clone())]),
        message_count: 0,
        double_text: Default::default(),
    };
    store.create_session(fence, &session).await.unwrap();
    let mut markers = vec![meta];
    for batch in 0..3 {
        let contents: Vec<String> = (0..2)
            .map(|n| format!("content-plaintext-{tag}-{batch}-{n}"))
            .collect();
        let messages: Vec<Message> = contents.iter().map(|content| text(content)).collect();
        store
            .append_messages(fence, session.id, &messages, now)
            .await
            .unwrap();
        markers.extend(contents);
    }
    (session, markers)
}

fn file_bytes(dir: &Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        bytes.extend(std::fs::read(entry.unwrap().path()).unwrap());
    }
    bytes
}

fn holds(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[tokio::test]
async fn the_raw_sqlite_files_hold_no_plaintext_and_reads_give_it_back() {
    let dir = temp_dir("raw");
    let path = dir.join("store.db");
    let store = SqlStore::open(SqlStoreOptions::sqlite_file(&path).with_keys(keys(KEK_A, &[])))
        .await
        .unwrap();
    let fence = own_slot(&store).await;
    let (session, markers) = write_marked(&store, &fence, "raw").await;
    let read = store.read_context(session.id, 0, 0).await.unwrap();
    assert_eq!(read.len(), 6);
    assert_eq!(read[5].content, "content-plaintext-raw-2-1");
    assert_eq!(
        store
            .get_session(session.id)
            .await
            .unwrap()
            .unwrap()
            .metadata["note"],
        "metadata-plaintext-raw"
    );
    drop(store);
    // The database, its WAL and anything else in the directory.
    let raw = file_bytes(&dir);
    assert!(raw.len() > 4096);
    for marker in &markers {
        assert!(!holds(&raw, marker), "the files hold {marker:?}");
    }
    // The test itself can find plaintext: a plaintext store shows it.
    let plain_dir = temp_dir("raw-plain");
    let plain = SqlStore::open(SqlStoreOptions::sqlite_file(&plain_dir.join("store.db")))
        .await
        .unwrap();
    let fence = own_slot(&plain).await;
    let (_, plain_markers) = write_marked(&plain, &fence, "control").await;
    drop(plain);
    assert!(holds(&file_bytes(&plain_dir), &plain_markers[1]));
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(plain_dir);
}

#[tokio::test]
async fn raw_postgres_rows_hold_no_plaintext() {
    let Some(database) = TestDatabase::create("sealing::raw_postgres").await else {
        return;
    };
    let store =
        SqlStore::open(SqlStoreOptions::new(database.url.clone()).with_keys(keys(KEK_A, &[])))
            .await
            .unwrap();
    let fence = own_slot(&store).await;
    let (session, markers) = write_marked(&store, &fence, "pg").await;
    assert_eq!(store.read_context(session.id, 0, 0).await.unwrap().len(), 6);
    let mut connection = sqlx::PgConnection::connect(&database.url).await.unwrap();
    let mut raw = String::new();
    for query in [
        "SELECT content AS value FROM messages",
        "SELECT metadata AS value FROM sessions",
    ] {
        let values: Vec<(String,)> = sqlx::query_as(query)
            .fetch_all(&mut connection)
            .await
            .unwrap();
        assert!(!values.is_empty());
        for (value,) in values {
            raw.push_str(&value);
        }
    }
    for marker in &markers {
        assert!(!raw.contains(marker.as_str()), "a row holds {marker:?}");
    }
}

#[tokio::test]
async fn a_session_whose_data_key_is_gone_is_unreadable_even_with_the_kek() {
    let dir = temp_dir("shredded");
    let path = dir.join("store.db");
    let options = SqlStoreOptions::sqlite_file(&path).with_keys(keys(KEK_A, &[]));
    let store = SqlStore::open(options.clone()).await.unwrap();
    let fence = own_slot(&store).await;
    let (session, markers) = write_marked(&store, &fence, "shredded").await;
    drop(store);
    // As a backup restored after the session ended would be once its key rows are dropped:
    // the message rows are there, the key is not.
    let mut raw = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let dropped = sqlx::query("DELETE FROM session_keys WHERE session_id = $1")
        .bind(session.id.as_bytes().to_vec())
        .execute(&mut raw)
        .await
        .unwrap();
    assert_eq!(dropped.rows_affected(), 1);
    let (rows,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM messages")
        .fetch_one(&mut raw)
        .await
        .unwrap();
    assert_eq!(rows, 6);
    drop(raw);
    let store = SqlStore::open(options).await.unwrap();
    let read = store.read_context(session.id, 0, 0).await;
    assert!(
        matches!(&read, Err(StoreError::Corrupt(message)) if message.contains("no data key")),
        "{read:?}"
    );
    assert!(store.get_session(session.id).await.is_err());
    let raw = file_bytes(&dir);
    for marker in &markers {
        assert!(!holds(&raw, marker));
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_plaintext_store_is_sealed_in_place_when_a_kek_arrives() {
    let dir = temp_dir("migrate");
    let path = dir.join("store.db");
    let plain = SqlStore::open(SqlStoreOptions::sqlite_file(&path))
        .await
        .unwrap();
    assert!(!plain.is_sealed());
    let fence = own_slot(&plain).await;
    let mut written = Vec::new();
    for tag in ["old-1", "old-2", "old-3"] {
        written.push(write_marked(&plain, &fence, tag).await);
    }
    drop(plain);
    assert!(
        holds(&file_bytes(&dir), &written[0].1[1]),
        "the control: plaintext on disk"
    );

    let sealed = SqlStore::open(SqlStoreOptions::sqlite_file(&path).with_keys(keys(KEK_A, &[])))
        .await
        .unwrap();
    assert!(sealed.is_sealed());
    for (session, markers) in &written {
        let read = sealed.read_context(session.id, 0, 0).await.unwrap();
        let contents: Vec<&str> = read
            .iter()
            .map(|message| message.content.as_str())
            .collect();
        assert_eq!(
            contents,
            markers[1..].iter().map(String::as_str).collect::<Vec<_>>()
        );
        assert_eq!(
            sealed
                .get_session(session.id)
                .await
                .unwrap()
                .unwrap()
                .metadata["note"],
            markers[0]
        );
    }
    // New writes are sealed too, and a node without the KEK cannot read any of it.
    let fence = own_slot(&sealed).await;
    let (fresh, fresh_markers) = write_marked(&sealed, &fence, "new").await;
    drop(sealed);
    let raw = file_bytes(&dir);
    for marker in written
        .iter()
        .flat_map(|(_, markers)| markers)
        .chain(&fresh_markers)
    {
        assert!(!holds(&raw, marker), "the files still hold {marker:?}");
    }
    let keyless = SqlStore::open(SqlStoreOptions::sqlite_file(&path))
        .await
        .unwrap();
    let refused = keyless.read_context(fresh.id, 0, 0).await;
    assert!(
        matches!(&refused, Err(StoreError::Unavailable(message)) if message.contains("--kek-file")),
        "{refused:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kek_rotates_online_while_appends_go_on() {
    let dir = temp_dir("rotate");
    let path = dir.join("store.db");
    let first = SqlStore::open(SqlStoreOptions::sqlite_file(&path).with_keys(keys(KEK_A, &[])))
        .await
        .unwrap();
    let fence = own_slot(&first).await;
    let mut sessions = Vec::new();
    for n in 0..40 {
        sessions.push(write_marked(&first, &fence, &format!("rotate-{n}")).await.0);
    }
    drop(first);

    // The new KEK first, the old one still there to unwrap: every node would run this way
    // while the rotation runs.
    let rotating = Arc::new(
        SqlStore::open(SqlStoreOptions::sqlite_file(&path).with_keys(keys(KEK_B, &[KEK_A])))
            .await
            .unwrap(),
    );
    let fence = own_slot(rotating.as_ref()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let appended = Arc::new(AtomicU64::new(0));
    let writer = {
        let (store, stop, appended, sessions) = (
            rotating.clone(),
            stop.clone(),
            appended.clone(),
            sessions.clone(),
        );
        tokio::spawn(async move {
            for round in 0..10_000u64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let session = &sessions[round as usize % sessions.len()];
                store
                    .append_messages(
                        &fence,
                        session.id,
                        &[text("during the rotation")],
                        SystemTime::now(),
                    )
                    .await
                    .unwrap();
                store.read_context(session.id, 2, 0).await.unwrap();
                appended.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut reports = Vec::new();
    let rewrapped = rotating
        .rotate_kek(|done, of| reports.push((done, of)))
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert_eq!(rewrapped, 40);
    assert_eq!(reports.first(), Some(&(0, 40)));
    assert_eq!(reports.last(), Some(&(40, 40)));
    assert!(appended.load(Ordering::Relaxed) > 0);
    // Run again, it has nothing left to do.
    assert_eq!(rotating.rotate_kek(|_, _| {}).await.unwrap(), 0);
    drop(rotating);

    // The old KEK retired: everything still opens.
    let retired = SqlStore::open(SqlStoreOptions::sqlite_file(&path).with_keys(keys(KEK_B, &[])))
        .await
        .unwrap();
    for session in &sessions {
        let read = retired.read_context(session.id, 0, 0).await.unwrap();
        assert!(read.len() >= 6);
    }
    let _ = std::fs::remove_dir_all(dir);
}
