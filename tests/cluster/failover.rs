//! Losing a worker leaves the users of the others served.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::sandbox::{Sandbox, SandboxOptions, create, text, wait_for};

#[tokio::test]
async fn a_dead_worker_leaves_the_others_users_served() {
    // A lease long enough that "served before it ran out" holds on a slow machine too.
    let lease = Duration::from_secs(3);
    let mut sandbox = Sandbox::start_with(SandboxOptions {
        lease,
        ..SandboxOptions::default()
    })
    .await;
    let client = sandbox.client().await;
    let mut sessions: HashMap<String, (String, String)> = HashMap::new();
    for index in 0..24 {
        let user = format!("user-{index}");
        let session = create(&client, &user).await;
        client
            .append_context(&session.session_id, vec![text("user", "before")])
            .await
            .unwrap();
        sessions.insert(user, (session.session_id, session.worker_id));
    }
    let victim = sandbox.cluster.kill_worker(0).unwrap().to_string();
    let killed_at = Instant::now();
    assert!(sessions.values().any(|(_, worker)| *worker == victim));

    // Users of the surviving workers are served at once, without waiting for the lease.
    for (user, (session_id, worker)) in &sessions {
        if *worker != victim {
            client
                .append_context(session_id, vec![text("user", "during")])
                .await
                .unwrap_or_else(|status| panic!("{user} on {worker} was not served: {status:?}"));
        }
    }
    assert!(
        killed_at.elapsed() < Duration::from_millis(600),
        "served only after the lease"
    );

    // Before the lease runs out, a call for the victim's users fails with UNAVAILABLE naming
    // it (a status every retry policy retries), never UNKNOWN.
    let once = sandbox
        .client()
        .await
        .with_retry(switchyard::retry::RetryPolicy::never());
    let (session_id, _) = sessions
        .values()
        .find(|(_, worker)| *worker == victim)
        .unwrap();
    once.set_token(session_id.clone(), client.token(session_id).unwrap());
    let status = once.get_context(session_id, 0, 0).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains(&victim), "{}", status.message());

    // After the lease the victim's users move to the survivors; with the shared dev store
    // their sessions come along.
    for (user, (session_id, worker)) in &sessions {
        if *worker != victim {
            continue;
        }
        let context = wait_for(
            &format!("{user} to be served again"),
            Duration::from_secs(10),
            || {
                let client = client.clone();
                let id = session_id.clone();
                async move { client.get_context(&id, 0, 0).await.ok() }
            },
        )
        .await;
        assert_eq!(context[0].content, "before");
        let moved = client.get_session(session_id).await.unwrap();
        assert_ne!(moved.worker_id, victim);
    }
    sandbox.stop().await;
}
