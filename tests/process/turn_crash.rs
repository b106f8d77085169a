//! A crash between a turn's two commits: `switchyard dev` is SIGKILLed while turns run,
//! between their user message's commit and their reply's. Restarted on the same data, every
//! session holds each turn whole, or its user message alone (the turn in flight), never a
//! reply without its user message; and a turn retried with its request id completes once.

use std::sync::Arc;
use std::time::Duration;

use switchyard::SwitchyardClient;
use switchyard::retry::RetryPolicy;
use tokio::sync::Mutex;

use crate::harness::{free_address, start_dev, temp_dir};

const SESSIONS: usize = 8;
/// An echo agent slow enough that every session has a turn in flight at the kill.
const AGENTS: &str = r#"
[agents.slow-echo]
backend = "echo"
echo = { chunk_chars = 4, delay = "40ms" }
"#;

/// A turn as a session's writer sent it: its request id and content, and, once it was
/// acknowledged, its TurnDone's seqs.
struct Sent {
    session: usize,
    request_id: String,
    content: String,
    done: Option<(u64, u64)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_a_turns_commits_leaves_its_user_message_alone_and_a_retry_completes_it() {
    let dir = temp_dir("turn-crash");
    std::fs::write(dir.join("agents.toml"), AGENTS).unwrap();
    let address = free_address().to_string();
    let mut dev = start_dev(&dir, &address, &["--agents", "agents.toml"]);
    // No retries: a turn cut by the kill is left as the kill left it.
    let client = SwitchyardClient::connect(format!("http://{address}"))
        .await
        .unwrap()
        .with_retry(RetryPolicy::never());
    let mut sessions = Vec::new();
    for user in 0..SESSIONS {
        let session = client
            .create_session(&format!("crasher-{user}"), [("k", "v")])
            .await
            .unwrap()
            .session
            .unwrap();
        sessions.push(session.session_id);
    }

    let sent: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let writers: Vec<_> = sessions
        .iter()
        .enumerate()
        .map(|(index, session_id)| {
            let (client, session_id, sent) = (client.clone(), session_id.clone(), sent.clone());
            tokio::spawn(async move {
                // Bounded: the kill ends it long before.
                for turn in 0..1_000 {
                    let request_id = format!("{index}-{turn}");
                    let content = format!("turn {turn} of {index}");
                    let result = client
                        .send_message_collect_with_id(
                            &session_id,
                            "slow-echo",
                            &content,
                            &request_id,
                        )
                        .await;
                    let done = result
                        .as_ref()
                        .ok()
                        .map(|reply| (reply.done.user_seq, reply.done.reply_seq));
                    sent.lock().await.push(Sent {
                        session: index,
                        request_id,
                        content,
                        done,
                    });
                    if done.is_none() {
                        return;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(900)).await;
    dev.kill();
    for writer in writers {
        writer.await.unwrap();
    }
    let sent = std::mem::take(&mut *sent.lock().await);
    let acknowledged = sent.iter().filter(|turn| turn.done.is_some()).count();
    let cut: Vec<&Sent> = sent.iter().filter(|turn| turn.done.is_none()).collect();
    assert!(
        acknowledged >= SESSIONS,
        "turns completed before the kill: {acknowledged}"
    );
    assert_eq!(
        cut.len(),
        SESSIONS,
        "every writer's last turn was cut by the kill"
    );

    let address = free_address().to_string();
    let _dev = start_dev(&dir, &address, &["--agents", "agents.toml"]);
    let restarted = SwitchyardClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    for session_id in &sessions {
        restarted.set_token(session_id.clone(), client.token(session_id).unwrap());
    }

    let mut user_alone = 0;
    for (index, session_id) in sessions.iter().enumerate() {
        let context = restarted.get_context(session_id, 0, 0).await.unwrap();
        // Never a reply without its user message, right before it.
        for (position, message) in context.iter().enumerate() {
            assert_eq!(message.seq, position as u64 + 1);
            if message.role == "assistant" {
                let question = position
                    .checked_sub(1)
                    .map(|before| &context[before])
                    .filter(|before| before.role == "user")
                    .unwrap_or_else(|| panic!("session {index}: a reply alone at {position}"));
                assert_eq!(message.content, format!("echo: {}", question.content));
            }
        }
        // Every acknowledged turn is there, at the seqs its TurnDone gave.
        for turn in sent.iter().filter(|turn| turn.session == index) {
            let Some((user_seq, reply_seq)) = turn.done else {
                continue;
            };
            assert_eq!(context[user_seq as usize - 1].content, turn.content);
            assert_eq!(
                context[reply_seq as usize - 1].content,
                format!("echo: {}", turn.content)
            );
        }
        if context.last().is_some_and(|last| last.role == "user") {
            user_alone += 1;
        }
    }
    // The kill fell between the two commits of turns in flight.
    assert!(
        user_alone >= 1,
        "no session was left with its user message alone"
    );

    // Retried with its request id, a cut turn completes, once: on its user message if that
    // was committed, from the start if not.
    for turn in &cut {
        let session_id = &sessions[turn.session];
        let reply = restarted
            .send_message_collect_with_id(session_id, "slow-echo", &turn.content, &turn.request_id)
            .await
            .unwrap();
        assert_eq!(reply.text, format!("echo: {}", turn.content));
        let context = restarted.get_context(session_id, 0, 0).await.unwrap();
        let asked: Vec<u64> = context
            .iter()
            .filter(|message| message.role == "user" && message.content == turn.content)
            .map(|message| message.seq)
            .collect();
        assert_eq!(asked, [reply.done.user_seq], "the question once");
        assert_eq!(reply.done.reply_seq, reply.done.user_seq + 1);
        assert_eq!(
            context[reply.done.reply_seq as usize - 1].content,
            reply.text,
            "the answer once, right after it"
        );
        // A second retry replays it.
        let again = restarted
            .send_message_collect_with_id(session_id, "slow-echo", &turn.content, &turn.request_id)
            .await
            .unwrap();
        assert_eq!(again.done, reply.done);
    }
    let _ = std::fs::remove_dir_all(dir);
}
