//! Session tokens: RefreshToken, and the two refusals a caller must tell apart (an expired
//! token, a token of a retired key).

use std::time::{Duration, SystemTime};

use switchyard::conversions::system_time_from;
use switchyard_core::{Limits, SessionId, TokenKey, UserId};
use tonic::Code;

use crate::sandbox::{Sandbox, SandboxOptions, create};

#[tokio::test]
async fn refresh_token_returns_a_new_token_for_the_ttl_and_the_old_one_still_works() {
    let sandbox = Sandbox::start_with(SandboxOptions {
        limits: Limits {
            token_ttl: Duration::from_secs(600),
            ..Limits::default()
        },
        ..SandboxOptions::default()
    })
    .await;
    let client = sandbox.client().await;
    let session = create(&client, "refresher").await.session_id;
    let old = client.token(&session).unwrap();
    // Tokens name their expiry to the second: a refresh in the same second would be equal.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let asked_at = SystemTime::now();
    let refreshed = client.refresh_token(&session).await.unwrap();
    assert_ne!(refreshed.token, old);
    assert_eq!(client.token(&session).unwrap(), refreshed.token);
    let expires_at = system_time_from(&refreshed.expires_at.unwrap());
    let ttl_left = expires_at.duration_since(asked_at).unwrap();
    assert!(
        ttl_left > Duration::from_secs(598) && ttl_left <= Duration::from_secs(601),
        "{ttl_left:?}"
    );
    let claims = sandbox
        .token_key
        .verify(&refreshed.token, SystemTime::now())
        .unwrap();
    assert_eq!(claims.session_id.to_string(), session);
    assert_eq!(claims.user_id.as_str(), "refresher");
    client.get_context(&session, 0, 0).await.unwrap();
    client.set_token(session.clone(), old);
    client.get_context(&session, 0, 0).await.unwrap();
    // An ended session's token cannot be refreshed.
    assert!(client.end_session(&session).await.unwrap());
    client.set_token(session.clone(), refreshed.token);
    let ended = client.refresh_token(&session).await.unwrap_err();
    assert_eq!(ended.code(), Code::NotFound, "{ended:?}");
    sandbox.stop().await;
}

#[tokio::test]
async fn an_expired_token_and_a_retired_keys_token_say_which_they_are() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;
    let session = create(&client, "expiring").await.session_id;
    let id = SessionId::parse(&session).unwrap();
    let user = UserId::parse("expiring").unwrap();

    let expired =
        sandbox
            .token_key
            .mint_expiring_at(id, &user, SystemTime::now() - Duration::from_secs(1));
    // (The client forgets a token the cluster refused, so each call is given it again.)
    client.set_token(session.clone(), expired.clone());
    let read = client.get_context(&session, 0, 0).await.unwrap_err();
    client.set_token(session.clone(), expired);
    let refresh = client.refresh_token(&session).await.unwrap_err();
    for status in [read, refresh] {
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains("token expired"), "{status:?}");
    }

    let retired = TokenKey::from_secret(&[9; 32]).unwrap();
    let by_retired = retired.mint(id, &user, Duration::from_secs(60));
    client.set_token(session.clone(), by_retired.clone());
    let read = client.get_context(&session, 0, 0).await.unwrap_err();
    client.set_token(session.clone(), by_retired);
    let refresh = client.refresh_token(&session).await.unwrap_err();
    for status in [read, refresh] {
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains("unknown key id"), "{status:?}");
    }
    sandbox.stop().await;
}
