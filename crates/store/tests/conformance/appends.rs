//! Scenarios of appends: pages, request ids, bounded contexts, system messages, and a row
//! the database refuses.

use std::sync::Arc;
use std::time::SystemTime;

use switchyard_core::{Epoch, Message, Role, SessionId};
use switchyard_store::{
    Append, AppendKey, Appended, Durability, Fence, RequestRecord, SessionStore, StoreError,
    TurnUsage,
};

use super::{own_slot, seqs, session, text};

/// A page is at most `limit` messages after `after_seq`, in order; a missing session is
/// an error, not an empty page.
pub async fn context_pages(store: Arc<dyn SessionStore>) {
    let fence = own_slot(&*store).await;
    let session = session("pager");
    store.create_session(&fence, &session).await.unwrap();
    let batch: Vec<Message> = (1..=7).map(|i| text(&format!("m{i}"))).collect();
    store
        .append_messages(&fence, session.id, &batch, SystemTime::now())
        .await
        .unwrap();
    let page = |after, limit| {
        let store = store.clone();
        async move {
            seqs(
                &store
                    .read_context_page(session.id, after, limit)
                    .await
                    .unwrap(),
            )
        }
    };
    assert_eq!(page(0, 3).await, [1, 2, 3]);
    assert_eq!(page(3, 3).await, [4, 5, 6]);
    assert_eq!(page(6, 3).await, [7]);
    assert!(page(7, 3).await.is_empty());
    assert!(page(u64::MAX, 3).await.is_empty());
    assert!(matches!(
        store.read_context_page(SessionId::new_random(), 0, 3).await,
        Err(StoreError::SessionNotFound(_))
    ));
}

/// An append the database refuses (NUL, which PostgreSQL text cannot hold) fails alone:
/// the appends that shared its group-commit batch are committed.
pub async fn a_refused_row_fails_only_its_own_append(store: Arc<dyn SessionStore>) {
    let fence = own_slot(&*store).await;
    let good = session("good");
    let bad = session("bad");
    store.create_session(&fence, &good).await.unwrap();
    store.create_session(&fence, &bad).await.unwrap();
    let mut bad_outcomes = 0;
    for round in 0..4 {
        let goods = (0..16).map(|index| {
            let store = store.clone();
            let fence = fence.clone();
            async move {
                store
                    .append_messages(
                        &fence,
                        good.id,
                        &[text(&format!("r{round} m{index}"))],
                        SystemTime::now(),
                    )
                    .await
            }
        });
        let nul = [text("nul \0 here")];
        let refused = store.append_messages(&fence, bad.id, &nul, SystemTime::now());
        let (goods, refused) = tokio::join!(futures::future::join_all(goods), refused);
        for outcome in goods {
            outcome.expect("a good append next to a refused one is committed");
        }
        bad_outcomes += usize::from(refused.is_err());
    }
    assert_eq!(
        store.read_context(good.id, 0, 0).await.unwrap().len(),
        64,
        "every good append is stored once"
    );
    // The memory and SQLite stores can hold NUL; PostgreSQL refuses every one of them.
    let stored_bad = store.read_context(bad.id, 0, 0).await.unwrap().len();
    assert_eq!(stored_bad + bad_outcomes, 4);
}

/// A request id makes an append happen once: a repeat, alone or in the same batch, writes
/// nothing and answers with the first's seqs; a turn's reply completes its record; ids live
/// as long as the session.
pub async fn request_ids_make_appends_happen_once(store: Arc<dyn SessionStore>) {
    let fence = own_slot(&*store).await;
    let session = session("retrier");
    store.create_session(&fence, &session).await.unwrap();
    let key = |id: &str, turn: bool| AppendKey::Request {
        id: id.to_string(),
        turn,
    };
    let first = store
        .append_keyed(
            &fence,
            session.id,
            &[text("a"), text("b")],
            SystemTime::now(),
            &key("r1", false),
            u64::MAX,
        )
        .await
        .unwrap();
    assert_eq!(
        first,
        Appended {
            last_seq: 2,
            written: true
        }
    );
    let again = store
        .append_keyed(
            &fence,
            session.id,
            &[text("a"), text("b")],
            SystemTime::now(),
            &key("r1", false),
            u64::MAX,
        )
        .await
        .unwrap();
    assert_eq!(
        again,
        Appended {
            last_seq: 2,
            written: false
        }
    );

    // Concurrent repeats, which group commit puts in one batch.
    let repeats = (0..8).map(|_| {
        let store = store.clone();
        let fence = fence.clone();
        async move {
            store
                .append_keyed(
                    &fence,
                    session.id,
                    &[text("c")],
                    SystemTime::now(),
                    &AppendKey::Request {
                        id: "r2".into(),
                        turn: false,
                    },
                    u64::MAX,
                )
                .await
                .unwrap()
        }
    });
    let outcomes = futures::future::join_all(repeats).await;
    assert_eq!(outcomes.iter().filter(|outcome| outcome.written).count(), 1);
    assert!(
        outcomes.iter().all(|outcome| outcome.last_seq == 3),
        "{outcomes:?}"
    );
    assert_eq!(
        seqs(&store.read_context(session.id, 0, 0).await.unwrap()),
        [1, 2, 3]
    );

    // A turn: its user message, then its reply with usage.
    let user = store
        .append_keyed(
            &fence,
            session.id,
            &[text("question")],
            SystemTime::now(),
            &key("t1", true),
            u64::MAX,
        )
        .await
        .unwrap();
    assert_eq!(user.last_seq, 4);
    let record = store
        .request_record(session.id, "t1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        record,
        RequestRecord {
            turn: true,
            last_seq: 4,
            reply: None
        }
    );
    let usage = TurnUsage {
        prompt_tokens: 3,
        completion_tokens: 5,
        compute_seconds: 0.25,
    };
    let reply = store
        .append_keyed(
            &fence,
            session.id,
            &[text("answer")],
            SystemTime::now(),
            &AppendKey::Reply {
                id: "t1".into(),
                usage,
            },
            u64::MAX,
        )
        .await
        .unwrap();
    assert_eq!(reply.last_seq, 5);
    let record = store
        .request_record(session.id, "t1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.reply, Some((5, usage)));

    // One id, two kinds of call: refused.
    assert!(matches!(
        store
            .append_keyed(
                &fence,
                session.id,
                &[text("x")],
                SystemTime::now(),
                &key("t1", false),
                u64::MAX
            )
            .await,
        Err(StoreError::RequestIdReused { .. })
    ));
    assert_eq!(
        store.request_record(session.id, "unknown").await.unwrap(),
        None
    );

    // Ending the session forgets its ids.
    assert!(store.delete_session(&fence, session.id).await.unwrap());
    assert_eq!(store.request_record(session.id, "r1").await.unwrap(), None);
}

/// The system messages before a seq, newest `limit` of them, in order.
pub async fn system_messages_before_a_window(store: Arc<dyn SessionStore>) {
    let fence = own_slot(&*store).await;
    let session = session("instructed");
    store.create_session(&fence, &session).await.unwrap();
    let messages: Vec<Message> = (1..=8)
        .map(|seq| Message {
            role: if seq % 3 == 1 {
                Role::System
            } else {
                Role::User
            },
            content: format!("m{seq}"),
            name: String::new(),
        })
        .collect();
    store
        .append_messages(&fence, session.id, &messages, SystemTime::now())
        .await
        .unwrap();
    // System messages are seqs 1, 4 and 7.
    let system = |before, limit| {
        let store = store.clone();
        async move {
            seqs(
                &store
                    .read_system_messages(session.id, before, limit)
                    .await
                    .unwrap(),
            )
        }
    };
    assert_eq!(system(7, 10).await, [1, 4]);
    assert_eq!(system(9, 2).await, [4, 7]);
    assert!(system(1, 10).await.is_empty());
}

/// A bounded context keeps its newest messages; seqs go on where they were.
pub async fn a_bounded_context_drops_its_oldest_messages(store: Arc<dyn SessionStore>) {
    let fence = own_slot(&*store).await;
    let session = session("bounded");
    store.create_session(&fence, &session).await.unwrap();
    for round in 0..3 {
        let batch: Vec<Message> = (0..4).map(|i| text(&format!("r{round} m{i}"))).collect();
        store
            .append_keyed(
                &fence,
                session.id,
                &batch,
                SystemTime::now(),
                &AppendKey::None,
                5,
            )
            .await
            .unwrap();
    }
    // Concurrent appends of one message each: group commit trims within a batch too.
    let appends = (0..6).map(|i| {
        let store = store.clone();
        let fence = fence.clone();
        async move {
            store
                .append_keyed(
                    &fence,
                    session.id,
                    &[text(&format!("late {i}"))],
                    SystemTime::now(),
                    &AppendKey::None,
                    5,
                )
                .await
                .unwrap()
        }
    });
    futures::future::join_all(appends).await;
    let context = store.read_context(session.id, 0, 0).await.unwrap();
    assert_eq!(seqs(&context), [14, 15, 16, 17, 18]);
    assert_eq!(
        seqs(&store.read_context(session.id, 2, 0).await.unwrap()),
        [17, 18]
    );
    assert_eq!(
        seqs(&store.read_context_page(session.id, 0, 2).await.unwrap()),
        [14, 15]
    );
    assert_eq!(
        seqs(&store.read_context_page(session.id, 15, 10).await.unwrap()),
        [16, 17, 18]
    );
    assert_eq!(
        store
            .get_session(session.id)
            .await
            .unwrap()
            .unwrap()
            .message_count,
        18
    );
}

/// A turn's reply, queued to follow its user message before either is waited for, commits
/// right after it; one whose user message is refused (by its fence, or by the database) is
/// refused too, and nothing of the pair is written.
pub async fn a_follow_up_commits_only_after_its_predecessor(store: Arc<dyn SessionStore>) {
    let fence = own_slot(&*store).await;
    let session = session("turner");
    store.create_session(&fence, &session).await.unwrap();
    let append = |fence: &Fence, content: &str, durability| Append {
        fence: fence.clone(),
        session_id: session.id,
        messages: Arc::from([text(content)]),
        at: SystemTime::now(),
        key: AppendKey::None,
        keep_last: u64::MAX,
        durability,
        usage: Vec::new(),
    };
    let mut turns = 0;
    for round in 0..8 {
        let user = store
            .queue_append(
                append(&fence, &format!("u{round}"), Durability::WithNext),
                None,
            )
            .await
            .unwrap();
        let reply = store
            .queue_append(
                append(&fence, &format!("r{round}"), Durability::Now),
                Some(user.ticket()),
            )
            .await
            .unwrap();
        let user = user.outcome().await.unwrap();
        let reply = reply.outcome().await.unwrap();
        assert_eq!(reply.last_seq, user.last_seq + 1);
        turns += 1;
    }
    assert_eq!(turns, 8);
    let stored = store.read_context(session.id, 0, 0).await.unwrap();
    let contents: Vec<&str> = stored.iter().map(|m| m.content.as_str()).collect();
    let expected: Vec<String> = (0..8)
        .flat_map(|round| [format!("u{round}"), format!("r{round}")])
        .collect();
    assert_eq!(contents, expected);

    // A user message the database refuses (NUL: PostgreSQL text cannot hold it) takes its
    // reply with it; the memory and SQLite stores keep both.
    let user = store
        .queue_append(append(&fence, "nul \0 user", Durability::WithNext), None)
        .await
        .unwrap();
    let reply = store
        .queue_append(
            append(&fence, "reply to nul", Durability::Now),
            Some(user.ticket()),
        )
        .await
        .unwrap();
    let (user, reply) = (user.outcome().await, reply.outcome().await);
    match (&user, &reply) {
        (Ok(user), Ok(reply)) => assert_eq!(reply.last_seq, user.last_seq + 1),
        (Err(_), Err(StoreError::PredecessorNotCommitted(id))) => assert_eq!(*id, session.id),
        other => panic!("a reply without its user message, or the reverse: {other:?}"),
    }
    let pair_stored = if user.is_ok() { 2 } else { 0 };
    assert_eq!(
        store.read_context(session.id, 0, 0).await.unwrap().len(),
        16 + pair_stored
    );

    // Another worker takes the slot: the user message is fenced, its reply never written.
    store
        .acquire_slots(&super::worker("b"), Epoch(2), &[fence.slot])
        .await
        .unwrap();
    let user = store
        .queue_append(append(&fence, "fenced", Durability::WithNext), None)
        .await
        .unwrap();
    let reply = store
        .queue_append(
            append(&fence, "fenced reply", Durability::Now),
            Some(user.ticket()),
        )
        .await
        .unwrap();
    assert!(matches!(
        user.outcome().await,
        Err(StoreError::Fenced { .. })
    ));
    assert_eq!(
        reply.outcome().await,
        Err(StoreError::PredecessorNotCommitted(session.id))
    );
    assert_eq!(
        store.read_context(session.id, 0, 0).await.unwrap().len(),
        16 + pair_stored
    );
}

/// Appends queued together share a batch where the store batches, and each gets its own
/// outcome: a stale fence, a session that does not exist and a repeated request id refuse
/// or answer only their own, and the rest are numbered as if those were not there.
pub async fn each_append_of_a_batch_gets_its_own_outcome(store: Arc<dyn SessionStore>) {
    let fence = own_slot(&*store).await;
    let good = session("batcher");
    store.create_session(&fence, &good).await.unwrap();
    // A second slot, taken from `a` by `b` after a session was made in it.
    let other_slot = fence.slot + 1;
    let a = super::worker("a");
    assert_eq!(
        store
            .acquire_slots(&a, Epoch(1), &[other_slot])
            .await
            .unwrap(),
        [other_slot]
    );
    let stale = Fence {
        slot: other_slot,
        owner: a,
        epoch: Epoch(1),
    };
    let moved = switchyard_core::Session {
        slot: other_slot,
        ..session("mover")
    };
    store.create_session(&stale, &moved).await.unwrap();
    store
        .acquire_slots(&super::worker("b"), Epoch(2), &[other_slot])
        .await
        .unwrap();
    let key = |id: &str| AppendKey::Request {
        id: id.to_string(),
        turn: false,
    };
    let seen = store
        .append_keyed(
            &fence,
            good.id,
            &[text("once")],
            SystemTime::now(),
            &key("seen"),
            u64::MAX,
        )
        .await
        .unwrap();
    assert_eq!(seen.last_seq, 1);
    let gone = session("ghost");

    let append = |fence: &Fence, session_id: SessionId, content: &str, key: AppendKey| Append {
        fence: fence.clone(),
        session_id,
        messages: Arc::from([text(content)]),
        at: SystemTime::now(),
        key,
        keep_last: u64::MAX,
        durability: Durability::Now,
        usage: Vec::new(),
    };
    // Every append is queued before any outcome is awaited.
    let mut queued = Vec::new();
    for append in [
        append(&fence, good.id, "g1", AppendKey::None),
        append(&stale, moved.id, "late", AppendKey::None),
        append(&fence, gone.id, "nobody", AppendKey::None),
        append(&fence, good.id, "once", key("seen")),
        append(&fence, good.id, "g2", key("new")),
    ] {
        queued.push(store.queue_append(append, None).await.unwrap());
    }
    let mut outcomes = Vec::new();
    for queued in queued {
        outcomes.push(queued.outcome().await);
    }
    assert_eq!(
        outcomes,
        [
            Ok(Appended {
                last_seq: 2,
                written: true
            }),
            Err(StoreError::Fenced {
                slot: other_slot,
                epoch: Epoch(1)
            }),
            Err(StoreError::SessionNotFound(gone.id)),
            Ok(Appended {
                last_seq: 1,
                written: false
            }),
            Ok(Appended {
                last_seq: 3,
                written: true
            }),
        ]
    );
    let stored = store.read_context(good.id, 0, 0).await.unwrap();
    let contents: Vec<&str> = stored.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(contents, ["once", "g1", "g2"]);
    assert_eq!(seqs(&stored), [1, 2, 3]);
    assert!(store.read_context(moved.id, 0, 0).await.unwrap().is_empty());
}
