//! Bad input gets the right status and a message naming the field; nothing panics.

use tonic::Code;

use crate::sandbox::{Sandbox, SandboxOptions, create, text};

#[tokio::test]
async fn bad_input_is_refused_with_the_field_named() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;

    let status = client.create_session("", [("k", "v")]).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("user_id:"),
        "{}",
        status.message()
    );

    let status = client
        .create_session(&"x".repeat(129), [("k", "v")])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("user_id:"),
        "{}",
        status.message()
    );

    let status = client.list_sessions("").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    for malformed in [
        "not-a-uuid",
        "../../etc/passwd",
        "",
        "00000000-0000-0000-0000-00000000000g",
    ] {
        let status = client.get_session(malformed).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{malformed:?}");
        assert!(
            status.message().starts_with("session_id:"),
            "{}",
            status.message()
        );
    }

    let big_value = "v".repeat(2000);
    let status = client
        .create_session("oscar", [("k", big_value.as_str())])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("metadata[k]:"),
        "{}",
        status.message()
    );

    let session = create(&client, "oscar").await;
    let id = session.session_id.as_str();
    let status = client
        .append_context(id, vec![text("root", "x")])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("messages[0].role:"),
        "{}",
        status.message()
    );
    let status = client.append_context(id, vec![]).await.unwrap_err();
    assert!(
        status.message().starts_with("messages:"),
        "{}",
        status.message()
    );
    let huge = "x".repeat(64 * 1024 + 1);
    let status = client
        .append_context(id, vec![text("user", "fine"), text("user", &huge)])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("messages[1].content:"),
        "{}",
        status.message()
    );
    assert!(
        client.get_context(id, 0, 0).await.unwrap().is_empty(),
        "a refused batch writes nothing"
    );

    let status = client
        .send_message(id, "no-such-agent", "hi")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("no-such-agent"),
        "{}",
        status.message()
    );
    let status = client.send_message(id, "", "hi").await.unwrap_err();
    assert!(
        status.message().starts_with("agent_type:"),
        "{}",
        status.message()
    );
    let status = client.send_message(id, "echo", "").await.unwrap_err();
    assert!(
        status.message().starts_with("content:"),
        "{}",
        status.message()
    );
    assert!(
        client.get_context(id, 0, 0).await.unwrap().is_empty(),
        "a refused turn writes nothing"
    );
    sandbox.stop().await;
}

#[tokio::test]
async fn no_live_worker_is_unavailable() {
    let mut sandbox = Sandbox::start_with(SandboxOptions {
        workers: 1,
        ..Default::default()
    })
    .await;
    sandbox.cluster.stop_worker(0).await;
    // The coordinator publishes the table without the worker once it is kept in the store.
    sandbox
        .wait_for_status("the worker's departure to be published", |status| {
            status.unassigned_slots == status.slot_count
        })
        .await;
    let client = sandbox.client().await;
    let status = client
        .create_session("nobody-home", [("k", "v")])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("no live worker"),
        "{}",
        status.message()
    );
    sandbox.stop().await;
}
