//! Creating, listing, limiting, expiring and ending sessions.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use switchyard_core::Limits;
use tonic::Code;

use crate::sandbox::{Sandbox, SandboxOptions, create, text};

#[tokio::test]
async fn concurrent_creates_are_unique_and_no_user_exceeds_the_limit() {
    let sandbox = Sandbox::start_with(SandboxOptions {
        limits: Limits {
            max_sessions_per_user: 3,
            ..Limits::default()
        },
        ..SandboxOptions::default()
    })
    .await;
    let client = sandbox.client().await;
    let users = ["ada", "grace", "alan"];

    let creates = (0..10).map(|index| {
        let client = client.clone();
        let user = users[index % users.len()];
        async move {
            (
                user,
                client
                    .create_session(user, [("n", index.to_string())])
                    .await,
            )
        }
    });
    let results = futures::future::join_all(creates).await;

    let mut created: HashMap<&str, Vec<String>> = HashMap::new();
    let mut evicted: HashSet<String> = HashSet::new();
    for (user, result) in results {
        let response = result.expect("create succeeds");
        created
            .entry(user)
            .or_default()
            .push(response.session.expect("session").session_id);
        evicted.extend(response.evicted_session_ids);
    }
    let all: HashSet<&String> = created.values().flatten().collect();
    assert_eq!(all.len(), 10, "every session id is unique");

    for user in users {
        let listed = client.list_sessions(user).await.expect("list");
        assert!(
            listed.len() <= 3,
            "{user} holds {} sessions, above the limit of 3",
            listed.len()
        );
        let listed_ids: HashSet<String> = listed.iter().map(|s| s.session_id.clone()).collect();
        for id in &created[user] {
            // Every session created for the user is either still listed or was evicted.
            assert!(
                listed_ids.contains(id) ^ evicted.contains(id),
                "session {id} of {user} is lost"
            );
        }
        assert!(listed.iter().all(|session| session.user_id == user));
    }
    // ada got 4 creates against a limit of 3.
    assert!(!evicted.is_empty());
    sandbox.stop().await;
}

#[tokio::test]
async fn eviction_ends_the_least_recently_created_session_and_its_token() {
    let sandbox = Sandbox::start_with(SandboxOptions {
        workers: 1,
        limits: Limits {
            max_sessions_per_user: 2,
            ..Limits::default()
        },
        ..SandboxOptions::default()
    })
    .await;
    let client = sandbox.client().await;
    let first = create(&client, "eve").await;
    let token = client.token(&first.session_id).expect("token kept");
    let _second = create(&client, "eve").await;
    let third = client.create_session("eve", [("k", "v")]).await.unwrap();
    assert_eq!(third.evicted_session_ids, vec![first.session_id.clone()]);

    // The evicted session's token no longer opens anything.
    client.set_token(first.session_id.clone(), token);
    let status = client.get_session(&first.session_id).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(
        status.message().contains(&first.session_id),
        "{}",
        status.message()
    );
    sandbox.stop().await;
}

#[tokio::test]
async fn end_session_deletes_it() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;
    let session = create(&client, "frank").await;
    let token = client.token(&session.session_id).unwrap();
    client
        .append_context(&session.session_id, vec![text("user", "remember me")])
        .await
        .unwrap();
    assert!(client.end_session(&session.session_id).await.unwrap());
    client.set_token(session.session_id.clone(), token.clone());
    assert!(
        !client.end_session(&session.session_id).await.unwrap(),
        "second end reports false"
    );
    client.set_token(session.session_id.clone(), token.clone());
    let status = client
        .get_context(&session.session_id, 0, 0)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(client.list_sessions("frank").await.unwrap().is_empty());
    sandbox.stop().await;
}

#[tokio::test]
async fn idle_sessions_expire_but_never_under_a_running_call() {
    let sandbox = Sandbox::start_with(SandboxOptions {
        workers: 2,
        limits: Limits {
            idle_timeout: Duration::from_millis(400),
            ..Limits::default()
        },
        ..SandboxOptions::default()
    })
    .await;
    let client = sandbox.client().await;
    let idle = create(&client, "ivan").await;
    let busy = create(&client, "judy").await;

    // A turn of about a second, longer than the idle timeout, completes and lands.
    let reply = client
        .send_message_collect(
            &busy.session_id,
            crate::sandbox::SLOW_AGENT,
            "keep me alive please",
        )
        .await
        .expect("slow turn completes");
    assert_eq!(reply.text, "echo: keep me alive please");
    let context = client
        .get_context(&busy.session_id, 0, 0)
        .await
        .expect("busy session survives its turn");
    assert_eq!(context.len(), 2);

    // The untouched session expires.
    crate::sandbox::wait_for("the idle session to expire", Duration::from_secs(5), || {
        let client = client.clone();
        let id = idle.session_id.clone();
        async move {
            let status = client.get_session(&id).await.err()?;
            (status.code() == tonic::Code::NotFound).then_some(())
        }
    })
    .await;
    assert!(client.list_sessions("ivan").await.unwrap().is_empty());
    sandbox.stop().await;
}

#[tokio::test]
async fn get_session_reports_counts_metadata_and_placement() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;
    let created = client
        .create_session("mallory", [("plan", "pro"), ("region", "eu")])
        .await
        .unwrap();
    let session = created.session.unwrap();
    client
        .append_context(
            &session.session_id,
            vec![text("system", "be brief"), text("user", "hi")],
        )
        .await
        .unwrap();
    let fetched = client.get_session(&session.session_id).await.unwrap();
    assert_eq!(fetched.message_count, 2);
    assert_eq!(
        fetched.metadata.get("plan").map(String::as_str),
        Some("pro")
    );
    assert_eq!(fetched.user_id, "mallory");
    assert_eq!(fetched.slot, switchyard_core::slot_of("mallory", 1024));
    assert_eq!(fetched.worker_id, sandbox.owner_of("mallory").await);
    assert!(fetched.last_activity_at.unwrap().seconds >= fetched.created_at.unwrap().seconds);
    sandbox.stop().await;
}

#[tokio::test]
async fn idle_sessions_leave_memory_and_come_back_on_their_next_call() {
    let sandbox = Sandbox::start_with(SandboxOptions {
        workers: 1,
        limits: Limits {
            passivate_after: Duration::from_millis(1500),
            ..Limits::default()
        },
        ..SandboxOptions::default()
    })
    .await;
    let client = sandbox.client().await;
    let mut sessions = Vec::new();
    for index in 0..5 {
        let session = create(&client, &format!("sleeper-{index}")).await;
        client
            .append_context(
                &session.session_id,
                vec![text("user", &format!("kept {index}"))],
            )
            .await
            .unwrap();
        sessions.push(session);
    }
    let admin = sandbox.admin().await;
    // Heartbeats report the sessions each worker holds in memory.
    let in_memory = |expected: u64| {
        let admin = admin.clone();
        move || {
            let mut admin = admin.clone();
            async move {
                let status = admin
                    .cluster_status(switchyard::pb::ClusterStatusRequest {})
                    .await
                    .ok()?
                    .into_inner();
                (status.session_count == expected).then_some(())
            }
        }
    };
    let wait = crate::sandbox::wait_for;
    wait(
        "the sessions to be in memory",
        Duration::from_secs(5),
        in_memory(5),
    )
    .await;
    wait(
        "every session to leave memory",
        Duration::from_secs(10),
        in_memory(0),
    )
    .await;
    for (index, session) in sessions.iter().enumerate() {
        let context = client.get_context(&session.session_id, 0, 0).await.unwrap();
        assert_eq!(context[0].content, format!("kept {index}"));
    }
    wait(
        "the sessions to be back in memory",
        Duration::from_secs(5),
        in_memory(5),
    )
    .await;
    sandbox.stop().await;
}

#[tokio::test]
async fn the_client_forgets_the_tokens_of_sessions_that_are_gone() {
    let sandbox = Sandbox::start().await;
    let holder = sandbox.client().await;
    let session = crate::sandbox::create(&holder, "gina").await;
    let id = session.session_id.clone();
    assert!(holder.token(&id).is_some());
    // Ended by another client that was handed the token.
    let other = sandbox.client().await;
    other.set_token(id.clone(), holder.token(&id).unwrap());
    assert!(other.end_session(&id).await.unwrap());
    assert!(other.token(&id).is_none());
    // The holder learns it at its next call and forgets the token.
    let status = holder.get_context(&id, 0, 0).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert!(holder.token(&id).is_none());
    sandbox.stop().await;
}

#[tokio::test]
async fn a_session_keeps_its_newest_messages_and_says_where_history_starts() {
    let sandbox = Sandbox::start_with(SandboxOptions {
        limits: Limits {
            max_context_messages: 5,
            ..Limits::default()
        },
        ..SandboxOptions::default()
    })
    .await;
    let client = sandbox.client().await;
    let session = create(&client, "hilda").await;
    let id = session.session_id.as_str();
    let messages: Vec<_> = (1..=6).map(|i| text("user", &format!("m{i}"))).collect();
    client.append_context(id, messages).await.unwrap();
    let reply = client.send_message_collect(id, "echo", "m7").await.unwrap();
    assert_eq!((reply.done.user_seq, reply.done.reply_seq), (7, 8));
    let page = client.get_context_page(id, 0, 0).await.unwrap();
    let seqs: Vec<u64> = page.messages.iter().map(|message| message.seq).collect();
    assert_eq!(seqs, [4, 5, 6, 7, 8]);
    assert_eq!(page.first_seq, 4);
    assert_eq!(page.messages[0].content, "m4");
    assert_eq!(client.get_session(id).await.unwrap().message_count, 8);
    sandbox.stop().await;
}
