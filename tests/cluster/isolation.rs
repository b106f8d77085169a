//! No user reaches another's data; a token opens only its own session.

use std::collections::HashSet;
use std::time::Duration;

use switchyard_core::{SessionId, UserId};
use tonic::Code;

use crate::sandbox::{Sandbox, create, text};

#[tokio::test]
async fn two_users_contexts_never_mix() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;
    let alice = create(&client, "alice").await;
    let bob = create(&client, "bob").await;
    let writes = (0..20).map(|index| {
        let client = client.clone();
        let (session, who) = if index % 2 == 0 {
            (&alice, "alice")
        } else {
            (&bob, "bob")
        };
        let id = session.session_id.clone();
        async move {
            client
                .append_context(&id, vec![text("user", &format!("{who} says {index}"))])
                .await
                .unwrap()
        }
    });
    futures::future::join_all(writes).await;

    let alice_context = client.get_context(&alice.session_id, 0, 0).await.unwrap();
    let bob_context = client.get_context(&bob.session_id, 0, 0).await.unwrap();
    assert_eq!(alice_context.len(), 10);
    assert_eq!(bob_context.len(), 10);
    assert!(
        alice_context
            .iter()
            .all(|m| m.content.starts_with("alice says"))
    );
    assert!(
        bob_context
            .iter()
            .all(|m| m.content.starts_with("bob says"))
    );
    let seqs: Vec<u64> = alice_context.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        (1..=10).collect::<Vec<_>>(),
        "seqs are dense and ordered"
    );
    sandbox.stop().await;
}

#[tokio::test]
async fn every_session_of_a_user_sits_on_the_slot_owner() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;
    let mut workers_used = HashSet::new();
    for user in ["u-1", "u-2", "u-3", "u-4", "u-5", "u-6", "u-7", "u-8"] {
        let owner = sandbox.owner_of(user).await;
        for _ in 0..3 {
            let session = create(&client, user).await;
            assert_eq!(
                session.worker_id, owner,
                "a session of {user} left its slot's owner"
            );
        }
        for session in client.list_sessions(user).await.unwrap() {
            assert_eq!(session.worker_id, owner);
        }
        workers_used.insert(owner);
    }
    assert!(
        workers_used.len() > 1,
        "eight users should spread over more than one worker"
    );
    sandbox.stop().await;
}

#[tokio::test]
async fn a_token_opens_only_its_own_session() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;
    let alice = create(&client, "alice").await;
    let bob = create(&client, "bob").await;
    let alice_token = client.token(&alice.session_id).unwrap();

    // Bob's session with Alice's token: refused, and nothing of Bob's leaks.
    let stranger = sandbox.client().await;
    stranger.set_token(bob.session_id.clone(), alice_token.clone());
    for status in [
        stranger.get_session(&bob.session_id).await.unwrap_err(),
        stranger
            .get_context(&bob.session_id, 0, 0)
            .await
            .unwrap_err(),
        stranger
            .append_context(&bob.session_id, vec![text("user", "x")])
            .await
            .unwrap_err(),
        stranger.end_session(&bob.session_id).await.unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains(&bob.session_id),
            "{}",
            status.message()
        );
        assert!(!status.message().contains("bob"), "{}", status.message());
    }
    let status = stranger
        .send_message(&bob.session_id, "echo", "hi")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        client.get_session(&bob.session_id).await.is_ok(),
        "bob's session is intact"
    );

    // No token, a forged token, a token signed with another key.
    let anonymous = sandbox.client().await;
    let status = anonymous.get_session(&alice.session_id).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("x-session-token"),
        "{}",
        status.message()
    );
    let (payload, _) = alice_token.rsplit_once('.').unwrap();
    anonymous.set_token(alice.session_id.clone(), format!("{payload}.AAAA"));
    assert_eq!(
        anonymous
            .get_session(&alice.session_id)
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let other_key = switchyard_core::TokenKey::from_secret(&[1u8; 32]).unwrap();
    let session_id = SessionId::parse(&alice.session_id).unwrap();
    let foreign = other_key.mint(
        session_id,
        &UserId::parse("alice").unwrap(),
        Duration::from_secs(60),
    );
    anonymous.set_token(alice.session_id.clone(), foreign);
    assert_eq!(
        anonymous
            .get_session(&alice.session_id)
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    sandbox.stop().await;
}

#[tokio::test]
async fn a_valid_token_for_a_session_that_does_not_exist_is_not_found() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;
    let ghost = SessionId::new_random();
    let token = sandbox.token_key.mint(
        ghost,
        &UserId::parse("ghost").unwrap(),
        Duration::from_secs(60),
    );
    client.set_token(ghost.to_string(), token);
    let status = client
        .get_context(&ghost.to_string(), 0, 0)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), format!("session {ghost} not found"));
    sandbox.stop().await;
}
