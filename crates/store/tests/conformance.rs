//! One suite, run against every store: in memory, SQLite and (when available) PostgreSQL.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use switchyard_core::{ContextMessage, Epoch, Message, Role, Session, SessionId, UserId, WorkerId};
use switchyard_store::sealing::{Kek, KeyRing};
use switchyard_store::testing::TestDatabase;
use switchyard_store::{
    ACTIVITY_STEP, Fence, MemoryStore, SessionStore, SqlStore, SqlStoreOptions, StoreError,
};

#[path = "conformance/appends.rs"]
mod appends;
#[path = "conformance/leases.rs"]
mod leases;
#[path = "conformance/quotas.rs"]
mod quotas;
#[path = "conformance/wal.rs"]
mod wal;

use appends::{
    a_bounded_context_drops_its_oldest_messages, a_follow_up_commits_only_after_its_predecessor,
    a_refused_row_fails_only_its_own_append, context_pages,
    each_append_of_a_batch_gets_its_own_outcome, request_ids_make_appends_happen_once,
    system_messages_before_a_window,
};
use leases::{
    a_released_lease_admits_no_writes, a_stale_owner_cannot_write, the_newest_placement_is_kept,
};
use quotas::{
    quota_overrides_and_usage_are_kept_per_user, storage_bytes_count_a_users_content,
    usage_is_saved_with_the_appends_that_carry_it,
};

const SLOT: u32 = 3;

fn worker(id: &str) -> WorkerId {
    WorkerId::parse(id).unwrap()
}

fn session(user: &str) -> Session {
    let now = SystemTime::now();
    Session {
        id: SessionId::new_random(),
        user_id: UserId::parse(user).unwrap(),
        slot: SLOT,
        created_at: now,
        last_activity_at: now,
        metadata: BTreeMap::from([("plan".to_string(), "pro".to_string())]),
        message_count: 0,
        double_text: Default::default(),
    }
}

fn text(content: &str) -> Message {
    Message {
        role: Role::User,
        content: content.to_string(),
        name: String::new(),
    }
}

fn seqs(messages: &[ContextMessage]) -> Vec<u64> {
    messages.iter().map(|message| message.seq).collect()
}

/// Takes slot `SLOT` for worker `a` at epoch 1 and returns its fence.
async fn own_slot(store: &dyn SessionStore) -> Fence {
    let owner = worker("a");
    assert_eq!(
        store
            .acquire_slots(&owner, Epoch(1), &[SLOT])
            .await
            .unwrap(),
        vec![SLOT]
    );
    Fence {
        slot: SLOT,
        owner,
        epoch: Epoch(1),
    }
}

async fn context_windows(store: Arc<dyn SessionStore>) {
    let fence = own_slot(&*store).await;
    let mut session = session("alice");
    session.double_text = switchyard_core::DoubleText::Interrupt;
    store.create_session(&fence, &session).await.unwrap();
    let batch: Vec<Message> = (1..=5).map(|i| text(&format!("m{i}"))).collect();
    assert_eq!(
        store
            .append_messages(&fence, session.id, &batch, SystemTime::now())
            .await,
        Ok(5)
    );
    assert_eq!(
        seqs(&store.read_context(session.id, 0, 0).await.unwrap()),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(
        seqs(&store.read_context(session.id, 2, 0).await.unwrap()),
        [4, 5]
    );
    assert_eq!(
        seqs(&store.read_context(session.id, 0, 3).await.unwrap()),
        [4, 5]
    );
    assert_eq!(
        seqs(&store.read_context(session.id, 1, 2).await.unwrap()),
        [5]
    );
    assert!(
        store
            .read_context(session.id, 0, u64::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    let context = store.read_context(session.id, 0, 0).await.unwrap();
    assert_eq!(context[2].content, "m3");
    assert_eq!(context[2].role, Role::User);

    let stored = store.get_session(session.id).await.unwrap().unwrap();
    assert_eq!(stored.message_count, 5);
    assert_eq!(stored.metadata, session.metadata);
    assert_eq!(stored.user_id, session.user_id);
    assert_eq!(stored.double_text, switchyard_core::DoubleText::Interrupt);
    let missing = SessionId::new_random();
    assert_eq!(
        store.read_context(missing, 0, 0).await,
        Err(StoreError::SessionNotFound(missing))
    );
    assert_eq!(
        store
            .append_messages(&fence, missing, &[text("x")], SystemTime::now())
            .await,
        Err(StoreError::SessionNotFound(missing))
    );
}

async fn delete_removes_everything(store: Arc<dyn SessionStore>) {
    let fence = own_slot(&*store).await;
    let first = session("bob");
    let second = session("bob");
    store.create_session(&fence, &first).await.unwrap();
    store.create_session(&fence, &second).await.unwrap();
    store
        .append_messages(&fence, first.id, &[text("x")], SystemTime::now())
        .await
        .unwrap();
    assert!(store.delete_session(&fence, first.id).await.unwrap());
    assert!(!store.delete_session(&fence, first.id).await.unwrap());
    let left = store.list_user_sessions(&first.user_id).await.unwrap();
    assert_eq!(left.iter().map(|s| s.id).collect::<Vec<_>>(), [second.id]);
    assert_eq!(
        store.read_context(first.id, 0, 0).await,
        Err(StoreError::SessionNotFound(first.id))
    );
    assert_eq!(store.get_session(first.id).await.unwrap(), None);
}

async fn idle_sessions_respect_slots_and_time(store: Arc<dyn SessionStore>) {
    let fence = own_slot(&*store).await;
    let old = session("carol");
    store.create_session(&fence, &old).await.unwrap();
    let later = SystemTime::now() + Duration::from_secs(60);
    let idle = store.idle_sessions(&[SLOT, 900], later, 10).await.unwrap();
    assert_eq!(idle.iter().map(|i| i.id).collect::<Vec<_>>(), [old.id]);
    assert!(
        store
            .idle_sessions(&[4], later, 10)
            .await
            .unwrap()
            .is_empty()
    );
    store.touch_session(&fence, old.id, later).await.unwrap();
    assert!(
        store
            .idle_sessions(&[SLOT], later, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

/// An append moves the stored activity only once it is `ACTIVITY_STEP` past it; a touch
/// (a session leaving memory) saves the exact time.
async fn activity_moves_in_steps_and_a_touch_is_exact(store: Arc<dyn SessionStore>) {
    fn micros(at: SystemTime) -> u128 {
        at.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_micros()
    }
    let fence = own_slot(&*store).await;
    let created = session("erin");
    store.create_session(&fence, &created).await.unwrap();
    let activity = async || {
        micros(
            store
                .get_session(created.id)
                .await
                .unwrap()
                .unwrap()
                .last_activity_at,
        )
    };
    let start = created.last_activity_at;
    let within = start + ACTIVITY_STEP - Duration::from_millis(1);
    store
        .append_messages(&fence, created.id, &[text("soon")], within)
        .await
        .unwrap();
    assert_eq!(activity().await, micros(start));
    let past = start + ACTIVITY_STEP;
    store
        .append_messages(&fence, created.id, &[text("later")], past)
        .await
        .unwrap();
    assert_eq!(activity().await, micros(past));
    let touched = past + Duration::from_secs(1);
    store
        .touch_session(&fence, created.id, touched)
        .await
        .unwrap();
    assert_eq!(activity().await, micros(touched));
    // The appends were kept whatever they did to the activity.
    assert_eq!(
        store
            .get_session(created.id)
            .await
            .unwrap()
            .unwrap()
            .message_count,
        2
    );
}

/// Many concurrent appends (group-committed on SQL stores): every acknowledged append is
/// stored exactly once, under the seqs it was acknowledged with.
async fn concurrent_appends_are_all_kept_once(store: Arc<dyn SessionStore>) {
    let fence = own_slot(&*store).await;
    let sessions: Vec<Session> = (0..8).map(|i| session(&format!("user-{i}"))).collect();
    for session in &sessions {
        store.create_session(&fence, session).await.unwrap();
    }
    let appends = (0..256).map(|index| {
        let store = store.clone();
        let fence = fence.clone();
        let session_id = sessions[index % sessions.len()].id;
        async move {
            let content = format!("append {index}");
            let messages = [text(&content), text(&format!("{content} again"))];
            let last_seq = store
                .append_messages(&fence, session_id, &messages, SystemTime::now())
                .await
                .unwrap();
            (session_id, last_seq, content)
        }
    });
    let acknowledged = futures::future::join_all(appends).await;
    for session in &sessions {
        let context = store.read_context(session.id, 0, 0).await.unwrap();
        assert_eq!(seqs(&context), (1..=64).collect::<Vec<_>>());
        let contents: HashSet<&str> = context.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(contents.len(), 64, "no message is stored twice");
        for (session_id, last_seq, content) in
            acknowledged.iter().filter(|(id, ..)| *id == session.id)
        {
            let _ = session_id;
            let at = |seq: u64| &context[seq as usize - 1].content;
            assert_eq!(at(last_seq - 1), content);
            assert_eq!(at(*last_seq), &format!("{content} again"));
        }
        assert_eq!(
            store
                .get_session(session.id)
                .await
                .unwrap()
                .unwrap()
                .message_count,
            64
        );
    }
}

async fn users_are_listed_oldest_first(store: Arc<dyn SessionStore>) {
    let fence = own_slot(&*store).await;
    let mut created = Vec::new();
    for offset in 0..3 {
        let mut session = session("erin");
        session.created_at = SystemTime::now() + Duration::from_millis(offset * 10);
        store.create_session(&fence, &session).await.unwrap();
        created.push(session.id);
    }
    store
        .create_session(&fence, &session("frank"))
        .await
        .unwrap();
    let listed: Vec<SessionId> = store
        .list_user_sessions(&UserId::parse("erin").unwrap())
        .await
        .unwrap()
        .iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(listed, created);
    let duplicate = store.get_session(created[0]).await.unwrap().unwrap();
    assert_eq!(
        store.create_session(&fence, &duplicate).await,
        Err(StoreError::SessionExists(created[0]))
    );
}

async fn awkward_content_round_trips(store: Arc<dyn SessionStore>) {
    let fence = own_slot(&*store).await;
    let session = session("ünïcödé \"quoted\" user");
    store.create_session(&fence, &session).await.unwrap();
    let contents = [
        "",
        "quotes \" and ' and backslash \\ and $1 and ?",
        "{\"s\": \"not json to the store\", \"q\": 1}",
        "emoji 🚂 and 中文 and RTL עברית",
        "line\nbreaks\r\nand\ttabs",
        &"long ".repeat(10_000),
    ];
    let messages: Vec<Message> = contents
        .iter()
        .map(|content| Message {
            role: Role::Tool,
            content: content.to_string(),
            name: "tool \"x\"".into(),
        })
        .collect();
    store
        .append_messages(&fence, session.id, &messages, SystemTime::now())
        .await
        .unwrap();
    let stored = store.read_context(session.id, 0, 0).await.unwrap();
    let round_tripped: Vec<&str> = stored
        .iter()
        .map(|message| message.content.as_str())
        .collect();
    assert_eq!(round_tripped, contents);
    assert!(
        stored
            .iter()
            .all(|message| message.name == "tool \"x\"" && message.role == Role::Tool)
    );
    let listed = store.list_user_sessions(&session.user_id).await.unwrap();
    assert_eq!(listed[0].user_id, session.user_id);
}

macro_rules! conformance {
    ($($scenario:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test] async fn $scenario() { super::$scenario(std::sync::Arc::new(super::MemoryStore::new())).await; })*
        }
        mod sqlite {
            $(#[tokio::test] async fn $scenario() {
                let (store, dir) = super::sqlite_store(stringify!($scenario)).await;
                super::$scenario(store).await;
                let _ = std::fs::remove_dir_all(dir);
            })*
        }
        mod postgres {
            $(#[tokio::test] async fn $scenario() {
                let Some(database) = super::TestDatabase::create(concat!("postgres::", stringify!($scenario))).await else { return };
                let store = super::SqlStore::open(super::SqlStoreOptions::new(database.url.clone())).await.unwrap();
                super::$scenario(std::sync::Arc::new(store)).await;
            })*
        }
        /// The same, every content and metadata value sealed at rest.
        mod sqlite_sealed {
            $(#[tokio::test] async fn $scenario() {
                let dir = super::temp_dir(stringify!($scenario));
                let options = super::SqlStoreOptions::sqlite_file(&dir.join("store.db")).with_keys(super::test_keys());
                let store = super::SqlStore::open(options).await.unwrap();
                assert!(store.is_sealed());
                super::$scenario(std::sync::Arc::new(store)).await;
                let _ = std::fs::remove_dir_all(dir);
            })*
        }
        mod postgres_sealed {
            $(#[tokio::test] async fn $scenario() {
                let Some(database) = super::TestDatabase::create(concat!("postgres_sealed::", stringify!($scenario))).await else { return };
                let options = super::SqlStoreOptions::new(database.url.clone()).with_keys(super::test_keys());
                let store = super::SqlStore::open(options).await.unwrap();
                super::$scenario(std::sync::Arc::new(store)).await;
            })*
        }
    };
}

conformance!(
    context_windows,
    delete_removes_everything,
    idle_sessions_respect_slots_and_time,
    activity_moves_in_steps_and_a_touch_is_exact,
    a_stale_owner_cannot_write,
    concurrent_appends_are_all_kept_once,
    users_are_listed_oldest_first,
    awkward_content_round_trips,
    a_released_lease_admits_no_writes,
    the_newest_placement_is_kept,
    a_refused_row_fails_only_its_own_append,
    context_pages,
    request_ids_make_appends_happen_once,
    system_messages_before_a_window,
    a_bounded_context_drops_its_oldest_messages,
    a_follow_up_commits_only_after_its_predecessor,
    each_append_of_a_batch_gets_its_own_outcome,
    quota_overrides_and_usage_are_kept_per_user,
    storage_bytes_count_a_users_content,
    usage_is_saved_with_the_appends_that_carry_it,
);

/// Key-encryption keys for the sealed stores of the suite.
fn test_keys() -> KeyRing {
    KeyRing::new(
        Kek::from_secret(b"a key-encryption key for the conformance suite").unwrap(),
        Vec::new(),
    )
}

fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "switchyard-store-{test}-{}",
        SessionId::new_random()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn sqlite_store(test: &str) -> (Arc<dyn SessionStore>, PathBuf) {
    let dir = temp_dir(test);
    let store = SqlStore::open(SqlStoreOptions::sqlite_file(&dir.join("store.db")))
        .await
        .unwrap();
    (Arc::new(store), dir)
}

#[tokio::test]
async fn a_sqlite_store_keeps_everything_across_reopen() {
    let dir = temp_dir("reopen");
    let path = dir.join("store.db");
    let (cluster_id, session) = {
        let store = SqlStore::open(SqlStoreOptions::sqlite_file(&path))
            .await
            .unwrap();
        let fence = own_slot(&store).await;
        let session = session("grace");
        store.create_session(&fence, &session).await.unwrap();
        store
            .append_messages(&fence, session.id, &[text("durable")], SystemTime::now())
            .await
            .unwrap();
        (store.cluster_id().await.unwrap(), session)
    };
    let store = SqlStore::open(SqlStoreOptions::sqlite_file(&path))
        .await
        .unwrap();
    assert_eq!(store.cluster_id().await.unwrap(), cluster_id);
    assert_eq!(
        store.read_context(session.id, 0, 0).await.unwrap()[0].content,
        "durable"
    );
    assert_eq!(store.max_lease_epoch().await.unwrap(), Epoch(1));
    let other = SqlStore::open(SqlStoreOptions::sqlite_file(&dir.join("other.db")))
        .await
        .unwrap();
    assert_ne!(
        other.cluster_id().await.unwrap(),
        cluster_id,
        "each store is its own cluster"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Batches of turns' user messages alone commit without waiting for the disk; any batch
/// with an append that must be durable waits for it.
#[tokio::test]
async fn only_batches_of_user_messages_alone_skip_the_wait_for_the_disk() {
    let dir = temp_dir("deferred");
    let store = SqlStore::open(SqlStoreOptions::sqlite_file(&dir.join("store.db")))
        .await
        .unwrap();
    let fence = own_slot(&store).await;
    let session = session("defer");
    store.create_session(&fence, &session).await.unwrap();
    let append = |durability| switchyard_store::Append {
        fence: fence.clone(),
        session_id: session.id,
        messages: Arc::from([text("m")]),
        at: SystemTime::now(),
        key: switchyard_store::AppendKey::None,
        keep_last: u64::MAX,
        durability,
        usage: Vec::new(),
    };
    let before = store.group_commit_stats();
    let deferred = store
        .queue_append(append(switchyard_store::Durability::WithNext), None)
        .await
        .unwrap();
    assert_eq!(deferred.outcome().await.unwrap().last_seq, 1);
    let after_deferred = store.group_commit_stats();
    assert_eq!(after_deferred.batches, before.batches + 1);
    assert_eq!(after_deferred.deferred_batches, before.deferred_batches + 1);
    // Nothing durable follows it, so the lane makes it durable itself, soon.
    let waited = std::time::Instant::now();
    while store.group_commit_stats().syncs == before.syncs {
        assert!(
            waited.elapsed() < Duration::from_secs(5),
            "the deferred commit was never made durable"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(store.group_commit_stats().syncs, before.syncs + 1);
    store
        .append_messages(&fence, session.id, &[text("durable")], SystemTime::now())
        .await
        .unwrap();
    let after_durable = store.group_commit_stats();
    assert_eq!(after_durable.batches, before.batches + 2);
    assert_eq!(
        after_durable.deferred_batches,
        after_deferred.deferred_batches
    );
    // The durable append was answered only once a sync of the WAL had covered it.
    assert_eq!(after_durable.syncs, before.syncs + 2);
    // And nothing is left to sync after it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(store.group_commit_stats().syncs, before.syncs + 2);
    assert_eq!(after_durable.appends, before.appends + 2);
    drop(store);
    // Reopened, both are there: the durable commit made the deferred one durable too.
    let store = SqlStore::open(SqlStoreOptions::sqlite_file(&dir.join("store.db")))
        .await
        .unwrap();
    assert_eq!(
        seqs(&store.read_context(session.id, 0, 0).await.unwrap()),
        [1, 2]
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_bad_store_url_is_a_clear_error() {
    let Err(error) = SqlStore::open(SqlStoreOptions::new("mysql://localhost/x")).await else {
        panic!("a mysql URL must be refused");
    };
    assert!(
        error.to_string().contains("sqlite:// or postgres://"),
        "{error}"
    );
}

/// Batches commit in one call unless an append is refused; then they are staged. Exercised
/// on both SQL stores with what a turn writes (a user message and its reply, with request
/// ids, in one batch), bounded contexts, and a stale fence.
async fn batches_commit_at_once_unless_refused(store: Arc<SqlStore>) {
    use switchyard_store::{Append, AppendKey, Durability, TurnUsage};

    let fence = own_slot(&*store).await;
    let session = session("at-once");
    store.create_session(&fence, &session).await.unwrap();
    let append = |fence: &Fence, content: &str, key: AppendKey, keep_last: u64| Append {
        fence: fence.clone(),
        session_id: session.id,
        messages: Arc::from([text(content)]),
        at: SystemTime::now(),
        key,
        keep_last,
        durability: Durability::Now,
        usage: Vec::new(),
    };
    let usage = TurnUsage {
        prompt_tokens: 3,
        completion_tokens: 4,
        compute_seconds: 0.5,
    };
    let before = store.group_commit_stats();
    for round in 0..4 {
        let id = format!("turn-{round}");
        let user = store
            .queue_append(
                append(
                    &fence,
                    "question",
                    AppendKey::Request {
                        id: id.clone(),
                        turn: true,
                    },
                    u64::MAX,
                ),
                None,
            )
            .await
            .unwrap();
        let reply = store
            .queue_append(
                append(
                    &fence,
                    "answer",
                    AppendKey::Reply {
                        id: id.clone(),
                        usage,
                    },
                    u64::MAX,
                ),
                Some(user.ticket()),
            )
            .await
            .unwrap();
        let (user, reply) = (
            user.outcome().await.unwrap(),
            reply.outcome().await.unwrap(),
        );
        assert_eq!(
            (user.last_seq, reply.last_seq),
            (round * 2 + 1, round * 2 + 2)
        );
        let record = store
            .request_record(session.id, &id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (record.last_seq, record.reply),
            (user.last_seq, Some((reply.last_seq, usage)))
        );
    }
    let after_turns = store.group_commit_stats();
    assert!(after_turns.batches > before.batches);
    assert_eq!(
        after_turns.staged_batches, before.staged_batches,
        "none refused"
    );

    // A bound: the oldest messages go, at once while the batch does not drop its own.
    store
        .append_keyed(
            &fence,
            session.id,
            &[text("bounded")],
            SystemTime::now(),
            &AppendKey::None,
            5,
        )
        .await
        .unwrap();
    assert_eq!(
        seqs(&store.read_context(session.id, 0, 0).await.unwrap()),
        [5, 6, 7, 8, 9]
    );
    // Three messages in one append bounded to two: the append drops one of its own.
    store
        .append_keyed(
            &fence,
            session.id,
            &[text("a"), text("b"), text("c")],
            SystemTime::now(),
            &AppendKey::None,
            2,
        )
        .await
        .unwrap();
    assert_eq!(
        seqs(&store.read_context(session.id, 0, 0).await.unwrap()),
        [11, 12]
    );
    let after_bounds = store.group_commit_stats();

    // Another worker takes the slot: refused, and staged to say so.
    store
        .acquire_slots(&worker("b"), Epoch(2), &[fence.slot])
        .await
        .unwrap();
    assert!(matches!(
        store
            .append_keyed(
                &fence,
                session.id,
                &[text("late")],
                SystemTime::now(),
                &AppendKey::None,
                u64::MAX
            )
            .await,
        Err(StoreError::Fenced { .. })
    ));
    assert_eq!(
        store.group_commit_stats().staged_batches,
        after_bounds.staged_batches + 1
    );
}

#[tokio::test]
async fn sqlite_batches_commit_at_once_unless_refused() {
    let dir = temp_dir("at-once");
    let store = SqlStore::open(SqlStoreOptions::sqlite_file(&dir.join("store.db")))
        .await
        .unwrap();
    batches_commit_at_once_unless_refused(Arc::new(store)).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn postgres_batches_commit_at_once_unless_refused() {
    let Some(database) = TestDatabase::create("postgres::batches_commit_at_once").await else {
        return;
    };
    let store = SqlStore::open(SqlStoreOptions::new(database.url.clone()))
        .await
        .unwrap();
    batches_commit_at_once_unless_refused(Arc::new(store)).await;
}
