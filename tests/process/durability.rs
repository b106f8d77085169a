//! Nothing acknowledged is lost: across a restart of `switchyard dev`, and across a worker
//! SIGKILLed under load on PostgreSQL.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use switchyard::SwitchyardClient;
use switchyard::pb;
use switchyard_store::testing::TestDatabase;
use tokio::sync::Mutex;

use crate::harness::{
    Process, free_address, spawn_coordinator, spawn_worker, start_dev, temp_dir, wait_for_workers,
};

fn text(content: &str) -> pb::Message {
    pb::Message {
        role: "user".to_string(),
        content: content.to_string(),
        name: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_restarted_on_the_same_data_dir_has_every_session_token_and_context() {
    let dir = temp_dir("restart");
    let address = free_address().to_string();
    let mut dev = start_dev(&dir, &address, &[]);
    let client = SwitchyardClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    let mut kept = Vec::new();
    for user in ["rita", "sam", "tom"] {
        let session = client
            .create_session(user, [("kept", "yes")])
            .await
            .unwrap()
            .session
            .unwrap();
        client
            .append_context(&session.session_id, vec![text("first"), text("second")])
            .await
            .unwrap();
        let reply = client
            .send_message_collect(&session.session_id, "echo", "before the restart")
            .await
            .unwrap();
        assert_eq!(reply.done.reply_seq, 4);
        let token = client
            .token(&session.session_id)
            .expect("the client keeps the token");
        kept.push((session, token));
    }
    drop(client);
    dev.signal("TERM");
    assert!(
        dev.wait_exit(Duration::from_secs(15)).success(),
        "{}",
        dev.log()
    );

    let address = free_address().to_string();
    let _dev = start_dev(&dir, &address, &[]);
    let client = SwitchyardClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    for (session, token) in &kept {
        client.set_token(session.session_id.clone(), token.clone());
        let context = client.get_context(&session.session_id, 0, 0).await.unwrap();
        let contents: Vec<&str> = context.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(
            contents,
            [
                "first",
                "second",
                "before the restart",
                "echo: before the restart"
            ]
        );
        let restored = client.get_session(&session.session_id).await.unwrap();
        assert_eq!(
            restored.metadata.get("kept").map(String::as_str),
            Some("yes")
        );
        assert_eq!(restored.message_count, 4);
        let reply = client
            .send_message_collect(&session.session_id, "echo", "after")
            .await
            .unwrap();
        assert_eq!(reply.done.user_seq, 5);
    }
    let _ = std::fs::remove_dir_all(dir);
}

struct Acknowledged {
    session_id: String,
    seq: u64,
    content: String,
    at: Instant,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_under_load_loses_no_acknowledged_append() {
    let Some(database) =
        TestDatabase::create("process::a_worker_killed_under_load_loses_no_acknowledged_append")
            .await
    else {
        return;
    };
    let dir = temp_dir("crash");
    let store = database.url.as_str();
    let (_coordinator, coordinator_url) = spawn_coordinator(
        &dir,
        &[
            "--store",
            store,
            "--heartbeat-interval",
            "100ms",
            "--lease",
            "1s",
        ],
    );
    let mut workers: HashMap<&str, Process> = ["worker-a", "worker-b"]
        .into_iter()
        .map(|id| {
            (
                id,
                spawn_worker(&dir, &coordinator_url, id, &["--store", store]),
            )
        })
        .collect();
    wait_for_workers(&coordinator_url, 2).await;

    let client = SwitchyardClient::connect(coordinator_url.clone())
        .await
        .unwrap();
    let mut sessions = Vec::new();
    for index in 0..16 {
        let session = client
            .create_session(&format!("load-{index}"), [("n", "1")])
            .await
            .unwrap()
            .session
            .unwrap();
        sessions.push(session);
    }
    let on_victim: HashSet<String> = sessions
        .iter()
        .filter(|session| session.worker_id == "worker-a")
        .map(|session| session.session_id.clone())
        .collect();
    assert!(!on_victim.is_empty() && on_victim.len() < sessions.len());

    // Appenders as fast as they go, bounded in count and time.
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(Mutex::new(Vec::<Acknowledged>::new()));
    let deadline = Instant::now() + Duration::from_secs(20);
    let tasks: Vec<_> = (0..8)
        .map(|task| {
            let client = client.clone();
            let stop = stop.clone();
            let acknowledged = acknowledged.clone();
            let mine: Vec<String> = sessions
                .iter()
                .skip(task)
                .step_by(8)
                .map(|session| session.session_id.clone())
                .collect();
            tokio::spawn(async move {
                for round in 0..5_000 {
                    if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                        break;
                    }
                    let session_id = &mine[round % mine.len()];
                    let content = format!("task {task} append {round}");
                    match client
                        .append_context(session_id, vec![text(&content)])
                        .await
                    {
                        Ok(seq) => acknowledged.lock().await.push(Acknowledged {
                            session_id: session_id.clone(),
                            seq,
                            content,
                            at: Instant::now(),
                        }),
                        // Not acknowledged: it may or may not have landed, and is never retried.
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(700)).await;
    workers.get_mut("worker-a").unwrap().kill();
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }

    let acknowledged = acknowledged.lock().await;
    let served_again = acknowledged
        .iter()
        .filter(|ack| on_victim.contains(&ack.session_id) && ack.at > killed_at)
        .count();
    assert!(
        served_again > 0,
        "worker-a's users were not served again after the kill"
    );
    let before_kill = acknowledged.iter().filter(|ack| ack.at < killed_at).count();
    assert!(
        before_kill > 50,
        "too little load before the kill: {before_kill}"
    );

    for session in &sessions {
        let context = client.get_context(&session.session_id, 0, 0).await.unwrap();
        let seqs: Vec<u64> = context.iter().map(|message| message.seq).collect();
        assert_eq!(
            seqs,
            (1..=context.len() as u64).collect::<Vec<_>>(),
            "seqs are dense and never fork"
        );
        let contents: HashSet<&str> = context
            .iter()
            .map(|message| message.content.as_str())
            .collect();
        assert_eq!(contents.len(), context.len(), "no append is stored twice");
        for ack in acknowledged
            .iter()
            .filter(|ack| ack.session_id == session.session_id)
        {
            let stored = context
                .get(ack.seq as usize - 1)
                .map(|message| message.content.as_str());
            assert_eq!(
                stored,
                Some(ack.content.as_str()),
                "acknowledged append lost or moved"
            );
        }
        if on_victim.contains(&session.session_id) {
            assert_eq!(
                client
                    .get_session(&session.session_id)
                    .await
                    .unwrap()
                    .worker_id,
                "worker-b"
            );
        }
    }
    eprintln!(
        "crash test: {} appends acknowledged, {} after the kill on worker-a's sessions",
        acknowledged.len(),
        served_again
    );
    let _ = std::fs::remove_dir_all(dir);
}
