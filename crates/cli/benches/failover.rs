//! Failover time with real processes: a coordinator and three workers at the default timing
//! (heartbeats every 500 ms, a 2 s lease); a worker is SIGKILLed and the figure is the time
//! from the kill to the first acknowledged turn, sent after the kill, of a user the killed
//! worker served. Five kills; a fresh worker replaces each.
//!
//! `cargo bench -p switchyard-cli --bench failover` (SQLite shared by the processes; with
//! `SWITCHYARD_TEST_POSTGRES_URL` set, a fresh PostgreSQL database instead).

#![allow(clippy::unwrap_used)]

#[path = "../../../tests/process/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::time::{Duration, Instant};

use switchyard::SwitchyardClient;
use switchyard_store::testing::TestDatabase;
use tokio::task::JoinSet;

use harness::{Process, spawn_coordinator, spawn_worker, temp_dir, wait_for_workers};

const KILLS: usize = 5;
const USERS: usize = 24;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = temp_dir("failover-bench");
    let database = TestDatabase::create("bench::failover").await;
    let store = match &database {
        Some(database) => database.url.clone(),
        None => format!("sqlite://{}?mode=rwc", dir.join("switchyard.db").display()),
    };
    let (_coordinator, url) = spawn_coordinator(&dir, &["--store", &store]);
    let mut workers: Vec<(String, Process)> = Vec::new();
    let mut next_worker = 0;
    let mut spawn = |workers: &mut Vec<(String, Process)>| {
        let id = format!("worker-{next_worker}");
        next_worker += 1;
        let process = spawn_worker(&dir, &url, &id, &["--store", &store]);
        workers.push((id, process));
    };
    for _ in 0..3 {
        spawn(&mut workers);
    }
    wait_for_workers(&url, 3).await;
    let client = SwitchyardClient::connect(url.clone())
        .await
        .unwrap()
        .with_timeout(Duration::from_secs(5));
    let mut sessions = Vec::new();
    for index in 0..USERS {
        let session = client
            .create_session(&format!("failover-{index}"), [("n", "1")])
            .await
            .unwrap()
            .session
            .unwrap();
        sessions.push(session.session_id);
    }
    println!(
        "failover: store {}, 3 worker processes, heartbeat 500 ms, lease 2 s",
        if database.is_some() {
            "PostgreSQL"
        } else {
            "SQLite"
        }
    );
    let mut figures = Vec::new();
    for kill in 0..KILLS {
        let (victim, mut process) = workers.remove(0);
        let mut affected = Vec::new();
        for session_id in &sessions {
            if client.get_session(session_id).await.unwrap().worker_id == victim {
                affected.push(session_id.clone());
            }
        }
        // Kill at a different point of the victim's heartbeat interval each time.
        tokio::time::sleep(Duration::from_millis(200 + 97 * kill as u64)).await;
        process.kill();
        let killed_at = Instant::now();
        let mut turns = JoinSet::new();
        for session_id in affected.clone() {
            let client = client.clone();
            turns.spawn(async move {
                loop {
                    if client
                        .send_message_collect(&session_id, "echo", "after the kill")
                        .await
                        .is_ok()
                    {
                        return Instant::now();
                    }
                    assert!(
                        killed_at.elapsed() < Duration::from_secs(30),
                        "never served"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
        }
        let served = turns.join_next().await.unwrap().unwrap();
        turns.abort_all();
        let failover = served.duration_since(killed_at);
        figures.push(failover);
        println!(
            "  kill {}: {victim} ({} affected users): first turn acknowledged after {:.2} s",
            kill + 1,
            affected.len(),
            failover.as_secs_f64()
        );
        spawn(&mut workers);
        wait_for_workers(&url, 3).await;
    }
    figures.sort();
    println!(
        "failover after SIGKILL: median {:.2} s, max {:.2} s over {KILLS} kills (target 3 s; the lease alone is 2 s)",
        figures[KILLS / 2].as_secs_f64(),
        figures[KILLS - 1].as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(dir);
}
