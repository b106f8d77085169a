//! SendMessage: streamed replies that land in the context.

use std::time::{Duration, Instant};

use switchyard::pb;
use tonic::Code;

use crate::sandbox::{SLOW_AGENT, Sandbox, create, text};

#[tokio::test]
async fn a_turn_streams_its_reply_and_lands_in_the_context() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;
    let session = create(&client, "carol").await;
    client
        .append_context(&session.session_id, vec![text("system", "you echo")])
        .await
        .unwrap();

    let content = "the quick brown fox jumps over the lazy dog";
    let reply = client
        .send_message_collect(&session.session_id, "echo", content)
        .await
        .unwrap();
    assert_eq!(reply.text, format!("echo: {content}"));
    // Deltas that are ready together go out as one event, so an echo agent, which makes
    // them all at once, may arrive in fewer; `deltas_arrive_while_the_turn_runs` shows the
    // streaming itself.
    assert!(reply.delta_count >= 1, "{} deltas", reply.delta_count);
    assert_eq!((reply.done.user_seq, reply.done.reply_seq), (2, 3));
    let usage = reply.done.usage.unwrap();
    // Four bytes a token: "you echo" is 8 bytes, the content 43, the reply 49.
    assert_eq!(usage.prompt_tokens, 2 + 11);
    assert_eq!(usage.completion_tokens, 13);

    let context = client.get_context(&session.session_id, 2, 0).await.unwrap();
    assert_eq!(context.len(), 2);
    assert_eq!(
        (
            context[0].seq,
            context[0].role.as_str(),
            context[0].content.as_str()
        ),
        (2, "user", content)
    );
    assert_eq!((context[1].seq, context[1].role.as_str()), (3, "assistant"));
    assert_eq!(context[1].content, reply.text);
    assert_eq!(
        context[1].name, "echo",
        "the reply names the agent that wrote it"
    );
    sandbox.stop().await;
}

#[tokio::test]
async fn deltas_arrive_while_the_turn_runs() {
    let sandbox = Sandbox::start_with(crate::sandbox::SandboxOptions {
        workers: 1,
        ..Default::default()
    })
    .await;
    let client = sandbox.client().await;
    let session = create(&client, "dave").await;
    let started = Instant::now();
    let mut stream = client
        .send_message(&session.session_id, SLOW_AGENT, "stream me")
        .await
        .unwrap();
    let mut arrivals = Vec::new();
    while let Some(event) = stream.message().await.unwrap() {
        arrivals.push((
            started.elapsed(),
            matches!(event.event, Some(pb::turn_event::Event::Done(_))),
        ));
    }
    assert!(
        arrivals.last().unwrap().1,
        "the stream ends with its final event"
    );
    // "echo: stream me" is 15 characters: 4 deltas of 4, each 150 ms after the last, so
    // the first must arrive well before the last if the coordinator forwards as it goes.
    assert!(arrivals.len() >= 5);
    let first = arrivals[0].0;
    let last = arrivals.last().unwrap().0;
    assert!(
        last - first >= Duration::from_millis(300),
        "deltas were collected, not streamed: {arrivals:?}"
    );
    sandbox.stop().await;
}

#[tokio::test]
async fn turns_on_one_session_run_one_at_a_time() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;
    let session = create(&client, "erin").await;
    let turns = (0..3).map(|index| {
        let client = client.clone();
        let id = session.session_id.clone();
        async move {
            client
                .send_message_collect(&id, SLOW_AGENT, &format!("turn {index}"))
                .await
                .unwrap()
        }
    });
    let replies = futures::future::join_all(turns).await;
    let context = client.get_context(&session.session_id, 0, 0).await.unwrap();
    assert_eq!(context.len(), 6);
    // Each user message is followed directly by its own reply: turns never interleave.
    for pair in context.chunks(2) {
        assert_eq!(pair[0].role, "user");
        assert_eq!(pair[1].content, format!("echo: {}", pair[0].content));
    }
    for reply in replies {
        assert_eq!(reply.done.reply_seq, reply.done.user_seq + 1);
    }
    sandbox.stop().await;
}

#[tokio::test]
async fn the_callers_deadline_reaches_the_worker() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;
    let session = create(&client, "heidi").await;
    let hurried = client.clone().with_timeout(Duration::from_millis(300));
    let started = Instant::now();
    // 60 characters: 15 deltas 150 ms apart, over two seconds if the deadline is ignored.
    let content = "this turn takes more than two seconds when nothing stops it";
    let result = hurried
        .send_message_collect(&session.session_id, SLOW_AGENT, content)
        .await;
    let status = result.expect_err("a two-second turn cannot finish in 300 ms");
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "deadline was not honoured"
    );
    sandbox.stop().await;
}

#[tokio::test]
async fn a_full_agent_pool_answers_resource_exhausted_after_its_acquire_timeout() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;
    // One user, so both sessions share a worker and its one scarce instance.
    let busy = create(&client, "rosa").await;
    let waiting = create(&client, "rosa").await;
    let long_turn = {
        let client = client.clone();
        let id = busy.session_id.clone();
        tokio::spawn(async move {
            client
                .send_message_collect(
                    &id,
                    crate::sandbox::SCARCE_AGENT,
                    "hold the only instance for a while",
                )
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let started = Instant::now();
    let status = client
        .send_message_collect(&waiting.session_id, crate::sandbox::SCARCE_AGENT, "me too")
        .await
        .expect_err("the only instance is busy for longer than the acquire timeout");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("scarce-echo") && status.message().contains("waiting"),
        "{}",
        status.message()
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(
        long_turn.await.unwrap().is_ok(),
        "the turn holding the instance completes"
    );
    // Released and reset: the next turn gets it.
    let reply = client
        .send_message_collect(&waiting.session_id, crate::sandbox::SCARCE_AGENT, "now")
        .await
        .unwrap();
    assert_eq!(reply.text, "echo: now");
    sandbox.stop().await;
}

async fn create_with_policy(
    client: &switchyard::SwitchyardClient,
    user: &str,
    policy: &str,
) -> String {
    client
        .create_session_from(pb::CreateSessionRequest {
            user_id: user.to_string(),
            metadata: Default::default(),
            double_text: policy.to_string(),
        })
        .await
        .unwrap()
        .session
        .unwrap()
        .session_id
}

/// Starts a turn of about a second and waits until its first delta arrived.
async fn start_slow_turn(
    client: &switchyard::SwitchyardClient,
    session_id: &str,
    content: &str,
) -> tonic::Streaming<pb::TurnEvent> {
    let mut stream = client
        .send_message(session_id, SLOW_AGENT, content)
        .await
        .unwrap();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(first.event, Some(pb::turn_event::Event::Delta(_))));
    stream
}

async fn finish(mut stream: tonic::Streaming<pb::TurnEvent>) -> Result<(), tonic::Status> {
    while let Some(event) = stream.message().await? {
        if let Some(pb::turn_event::Event::Done(_)) = event.event {
            return Ok(());
        }
    }
    Err(tonic::Status::unknown(
        "stream ended without its final event",
    ))
}

#[tokio::test]
async fn double_text_reject_refuses_a_message_during_a_turn() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;
    let session = create_with_policy(&client, "quinn", "reject").await;
    assert_eq!(
        client.get_session(&session).await.unwrap().double_text,
        "reject"
    );
    let running = start_slow_turn(&client, &session, "first, slowly").await;
    let status = client
        .send_message_collect(&session, "echo", "second")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(status.message().contains("reject"), "{}", status.message());
    finish(running).await.unwrap();
    client
        .send_message_collect(&session, "echo", "third")
        .await
        .unwrap();
    let contents: Vec<String> = client
        .get_context(&session, 0, 0)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.content)
        .collect();
    assert_eq!(
        contents,
        [
            "first, slowly",
            "echo: first, slowly",
            "third",
            "echo: third"
        ]
    );
    sandbox.stop().await;
}

#[tokio::test]
async fn double_text_interrupt_cancels_the_running_turn_and_keeps_what_it_committed() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;
    let session = create_with_policy(&client, "ravi", "interrupt").await;
    let running = start_slow_turn(&client, &session, "a long question").await;
    let reply = client
        .send_message_collect(&session, "echo", "never mind")
        .await
        .unwrap();
    assert_eq!(reply.text, "echo: never mind");
    let status = finish(running).await.unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(
        status.message().contains("interrupted"),
        "{}",
        status.message()
    );
    let contents: Vec<String> = client
        .get_context(&session, 0, 0)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.content)
        .collect();
    assert_eq!(
        contents,
        ["a long question", "never mind", "echo: never mind"]
    );
    sandbox.stop().await;
}

#[tokio::test]
async fn double_text_enqueue_waits_in_a_bounded_queue() {
    let sandbox = Sandbox::start_with(crate::sandbox::SandboxOptions {
        limits: switchyard_core::Limits {
            max_queued_turns: 1,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let client = sandbox.client().await;
    let session = create_with_policy(&client, "sam", "enqueue").await;
    let running = start_slow_turn(&client, &session, "one").await;
    let queued = {
        let client = client.clone();
        let session = session.clone();
        tokio::spawn(async move { client.send_message_collect(&session, "echo", "two").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let status = client
        .send_message_collect(&session, "echo", "three")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    finish(running).await.unwrap();
    assert_eq!(queued.await.unwrap().unwrap().text, "echo: two");

    let status = client
        .create_session_from(pb::CreateSessionRequest {
            user_id: "sam".into(),
            metadata: Default::default(),
            double_text: "shout".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("double_text:"),
        "{}",
        status.message()
    );
    sandbox.stop().await;
}

#[tokio::test]
async fn a_caller_that_goes_away_cancels_its_turn_and_frees_the_agent() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;
    // One user: both sessions share a worker and its one scarce instance (200 ms patience).
    let leaving = create(&client, "uma").await;
    let next = create(&client, "uma").await;
    let mut stream = client
        .send_message(
            &leaving.session_id,
            crate::sandbox::SCARCE_AGENT,
            "a turn nobody waits for",
        )
        .await
        .unwrap();
    assert!(
        stream.message().await.unwrap().is_some(),
        "the turn started"
    );
    drop(stream);
    // Were the instance still held by the abandoned turn (a second more of deltas), this
    // would fail after 200 ms.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let reply = client
        .send_message_collect(&next.session_id, crate::sandbox::SCARCE_AGENT, "mine")
        .await
        .unwrap();
    assert_eq!(reply.text, "echo: mine");
    // The abandoned turn committed its user message and no reply.
    let context = client.get_context(&leaving.session_id, 0, 0).await.unwrap();
    assert_eq!(context.len(), 1, "{context:?}");
    sandbox.stop().await;
}

#[tokio::test]
async fn a_turn_past_its_agents_turn_timeout_ends_and_frees_the_instance() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;
    let session = create(&client, "tess").await;
    let id = session.session_id.as_str();
    for attempt in 0..2 {
        let started = std::time::Instant::now();
        let status = client
            .send_message_collect(id, crate::sandbox::HANGING_AGENT, "hang")
            .await
            .unwrap_err();
        // Not RESOURCE_EXHAUSTED on the second: the hung instance was stopped and replaced.
        assert_eq!(
            status.code(),
            tonic::Code::DeadlineExceeded,
            "attempt {attempt}: {status:?}"
        );
        assert!(
            status.message().contains("turn_timeout"),
            "{}",
            status.message()
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
    // Each kept its user message and committed no reply.
    let context = client.get_context(id, 0, 0).await.unwrap();
    assert_eq!(context.len(), 2, "{context:?}");
    assert!(context.iter().all(|message| message.role == "user"));
    let reply = client
        .send_message_collect(id, crate::sandbox::HANGING_AGENT, "wake up")
        .await
        .unwrap();
    assert_eq!(reply.text, "awake");
    sandbox.stop().await;
}

#[tokio::test]
async fn a_caller_that_leaves_a_silent_agent_frees_it() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;
    // One user: both sessions share a worker and its one instance (500 ms of patience).
    let leaving = create(&client, "sid").await;
    let next = create(&client, "sid").await;
    let stream = client
        .send_message(&leaving.session_id, crate::sandbox::SILENT_AGENT, "hang")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(stream);
    // The agent never sends again; it is stopped within a second of the caller leaving,
    // long before its 10 s turn timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reply = client
        .send_message_collect(&next.session_id, crate::sandbox::SILENT_AGENT, "hi")
        .await
        .unwrap();
    assert_eq!(reply.text, "awake");
    sandbox.stop().await;
}

#[tokio::test]
async fn ending_a_session_ends_its_running_turn() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;
    let session = create(&client, "eve").await;
    let mut stream = client
        .send_message(&session.session_id, SLOW_AGENT, "a long story to tell")
        .await
        .unwrap();
    assert!(
        stream.message().await.unwrap().is_some(),
        "the turn started"
    );
    assert!(client.end_session(&session.session_id).await.unwrap());
    let ended = std::time::Instant::now();
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the turn finished although its session ended"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert!(status.message().contains("ended"), "{}", status.message());
    assert!(
        ended.elapsed() < Duration::from_millis(500),
        "{:?}",
        ended.elapsed()
    );
    sandbox.stop().await;
}

#[tokio::test]
async fn of_several_interrupting_messages_only_the_newest_runs() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;
    let id = create_with_policy(&client, "ines", "interrupt").await;
    let collect = |content: &'static str| {
        let client = client.clone();
        let id = id.clone();
        async move { client.send_message_collect(&id, SLOW_AGENT, content).await }
    };
    let first = tokio::spawn(collect("first"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = tokio::spawn(collect("second"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let third = tokio::spawn(collect("third"));
    let (first, second, third) = (
        first.await.unwrap(),
        second.await.unwrap(),
        third.await.unwrap(),
    );
    assert_eq!(first.unwrap_err().code(), tonic::Code::Aborted);
    assert_eq!(second.unwrap_err().code(), tonic::Code::Aborted);
    assert_eq!(third.unwrap().text, "echo: third");
    sandbox.stop().await;
}

#[tokio::test]
async fn a_turn_sends_the_newest_messages_that_fit_after_the_instructions() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;
    let session = create(&client, "wendy").await;
    let id = session.session_id.as_str();
    let mut messages = vec![text("system", "You are terse.")];
    messages.extend((2..=10).map(|index| text("user", &format!("message {index}"))));
    client.append_context(id, messages).await.unwrap();
    // A window of three: the instructions (seq 1), the newest message before the turn
    // (seq 10) and the turn's own (seq 11); nothing else of the history.
    let reply = client
        .send_message_collect(id, crate::sandbox::WINDOW_AGENT, "what did I say?")
        .await
        .unwrap();
    assert_eq!(reply.text, "1,10,11");
    sandbox.stop().await;
}

/// The nodes of one process share one SQLite file and one group commit: appends of
/// different workers land in the same transactions.
#[tokio::test]
async fn workers_of_one_process_share_the_group_commit() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;
    // Sessions until three workers hold some.
    let mut by_worker: std::collections::HashMap<String, Vec<String>> = Default::default();
    for user in 0..64 {
        let session = create(&client, &format!("sharer-{user}")).await;
        by_worker
            .entry(session.worker_id.clone())
            .or_default()
            .push(session.session_id);
        if by_worker.len() == 3 && by_worker.values().all(|sessions| sessions.len() >= 4) {
            break;
        }
    }
    assert_eq!(by_worker.len(), 3, "{by_worker:?}");
    let sessions: Vec<String> = by_worker.into_values().flatten().collect();

    let before = sandbox.store.group_commit_stats();
    let mut rounds = 0;
    while sandbox.store.group_commit_stats().shared_batches == before.shared_batches {
        assert!(
            rounds < 50,
            "no batch held appends of two workers in 50 rounds"
        );
        rounds += 1;
        let appends = sessions.iter().map(|session_id| {
            let client = client.clone();
            async move {
                client
                    .append_context(session_id, vec![text("user", "together")])
                    .await
            }
        });
        for appended in futures::future::join_all(appends).await {
            appended.unwrap();
        }
    }
    let after = sandbox.store.group_commit_stats();
    assert!(after.shared_batches > before.shared_batches);
    assert!(
        after.batches - before.batches < after.appends - before.appends,
        "appends were batched: {before:?} -> {after:?}"
    );
    sandbox.stop().await;
}
