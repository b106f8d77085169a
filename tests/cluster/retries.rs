//! Request ids make retried appends and turns happen once.

use std::time::Duration;

use switchyard::pb;
use tonic::Code;

use crate::sandbox::{SLOW_AGENT, Sandbox, create, text};

async fn collect(stream: &mut tonic::Streaming<pb::TurnEvent>) -> (String, usize, pb::TurnDone) {
    let mut text = String::new();
    let mut deltas = 0;
    while let Some(event) = stream.message().await.unwrap() {
        match event.event.unwrap() {
            pb::turn_event::Event::Delta(delta) => {
                text.push_str(&delta.text);
                deltas += 1;
            }
            pb::turn_event::Event::Done(done) => return (text, deltas, done),
        }
    }
    panic!("the turn ended without TurnDone");
}

/// The refusal of a turn, whether it came when the call began or as the stream's first event.
async fn refusal(started: Result<tonic::Streaming<pb::TurnEvent>, tonic::Status>) -> tonic::Status {
    match started {
        Err(status) => status,
        Ok(mut stream) => stream.message().await.unwrap_err(),
    }
}

#[tokio::test]
async fn a_repeated_append_lands_once() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;
    let session = create(&client, "retrier").await;
    let id = session.session_id.as_str();
    let first = client
        .append_context_with_id(
            id,
            vec![text("user", "a"), text("user", "b")],
            Some("append-1"),
        )
        .await
        .unwrap();
    let again = client
        .append_context_with_id(
            id,
            vec![text("user", "a"), text("user", "b")],
            Some("append-1"),
        )
        .await
        .unwrap();
    assert_eq!((first, again), (2, 2));
    assert_eq!(client.get_context(id, 0, 0).await.unwrap().len(), 2);
    // Without an id, every call appends.
    client
        .append_context_with_id(id, vec![text("user", "c")], None)
        .await
        .unwrap();
    client
        .append_context_with_id(id, vec![text("user", "c")], None)
        .await
        .unwrap();
    assert_eq!(client.get_context(id, 0, 0).await.unwrap().len(), 4);

    // Bad ids, and one id for two kinds of call.
    for bad in ["x".repeat(65), "a\nb".to_string(), "\u{202e}".to_string()] {
        let status = client
            .append_context_with_id(id, vec![text("user", "d")], Some(&bad))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().starts_with("request_id"),
            "{}",
            status.message()
        );
    }
    let status = refusal(
        client
            .send_message_with_id(id, "echo", "hi", Some("append-1"))
            .await,
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("request_id"),
        "{}",
        status.message()
    );
    assert_eq!(client.get_context(id, 0, 0).await.unwrap().len(), 4);
    sandbox.stop().await;
}

#[tokio::test]
async fn a_repeated_turn_replays_its_reply_or_is_refused_while_it_runs() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;
    let session = create(&client, "replayer").await;
    let id = session.session_id.as_str();

    let mut first = client
        .send_message_with_id(id, SLOW_AGENT, "once upon a time", Some("turn-1"))
        .await
        .unwrap();
    // While it runs, a repeat is refused: the result comes on the first call.
    assert!(first.message().await.unwrap().is_some(), "the turn started");
    let status = refusal(
        client
            .send_message_with_id(id, SLOW_AGENT, "once upon a time", Some("turn-1"))
            .await,
    )
    .await;
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(
        status.message().contains("in flight"),
        "{}",
        status.message()
    );
    let (_, _, done) = collect(&mut first).await;
    let context = client.get_context(id, 0, 0).await.unwrap();
    assert_eq!(context.len(), 2);

    // Once committed, a repeat replays: the whole reply as one delta and the same TurnDone,
    // and no agent runs (nothing is appended, and it answers at once).
    let started = std::time::Instant::now();
    let mut replayed = client
        .send_message_with_id(id, SLOW_AGENT, "once upon a time", Some("turn-1"))
        .await
        .unwrap();
    let (text, deltas, again) = collect(&mut replayed).await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(deltas, 1);
    assert_eq!(text, "echo: once upon a time");
    assert_eq!(again, done);
    assert_eq!(client.get_context(id, 0, 0).await.unwrap(), context);
    sandbox.stop().await;
}

#[tokio::test]
async fn a_turn_cancelled_before_its_reply_runs_again_on_its_user_message() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;
    let session = create(&client, "resumer").await;
    let id = session.session_id.as_str();
    let mut abandoned = client
        .send_message_with_id(id, SLOW_AGENT, "try again", Some("turn-2"))
        .await
        .unwrap();
    assert!(
        abandoned.message().await.unwrap().is_some(),
        "the turn started"
    );
    drop(abandoned);
    // The abandoned turn kept its user message and committed no reply.
    let context =
        crate::sandbox::wait_for("the abandoned turn to end", Duration::from_secs(5), || {
            let client = client.clone();
            async move {
                let mut repeat = client
                    .send_message_with_id(id, SLOW_AGENT, "try again", Some("turn-2"))
                    .await
                    .ok()?;
                match repeat.message().await {
                    Err(status) if status.code() == Code::Aborted => None,
                    Err(status) => panic!("{status:?}"),
                    Ok(first) => {
                        assert!(first.is_some());
                        Some(collect(&mut repeat).await)
                    }
                }
            }
        })
        .await;
    let (_, _, done) = context;
    let stored = client.get_context(id, 0, 0).await.unwrap();
    assert_eq!(
        stored.len(),
        2,
        "the user message once, then the reply: {stored:?}"
    );
    assert_eq!((done.user_seq, done.reply_seq), (1, 2));
    assert_eq!(stored[1].content, "echo: try again");
    sandbox.stop().await;
}
