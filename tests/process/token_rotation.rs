//! Rotating the session-token key under load, as the README says, node by node: no call
//! fails, and at the end only the new key's tokens are accepted.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use switchyard::SwitchyardClient;
use switchyard::retry::RetryPolicy;
use switchyard_store::testing::TestDatabase;
use tokio::sync::Mutex;
use tonic::Code;

use crate::harness::{
    BINARY, Process, TOKEN_KEY, free_address, spawn_coordinator_at, spawn_worker, temp_dir,
    wait_for_workers,
};

const WORKERS: [&str; 2] = ["worker-a", "worker-b"];
const SESSIONS: usize = 6;

/// The nodes of one cluster, restarted with other key flags as the rotation goes.
struct Nodes {
    dir: PathBuf,
    store: String,
    listen: String,
    url: String,
    coordinator: Process,
    workers: Vec<Process>,
}

impl Nodes {
    fn coordinator_args<'a>(&'a self, keys: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "--store",
            self.store.as_str(),
            "--heartbeat-interval",
            "100ms",
            "--lease",
            "1s",
        ];
        args.extend_from_slice(keys);
        args
    }

    async fn start(dir: PathBuf, store: String) -> Nodes {
        let listen = free_address().to_string();
        let url = format!("http://{listen}");
        let mut nodes = Nodes {
            coordinator: spawn_coordinator_at(
                &dir,
                &listen,
                &[
                    "--store",
                    &store,
                    "--heartbeat-interval",
                    "100ms",
                    "--lease",
                    "1s",
                ],
            ),
            workers: Vec::new(),
            dir,
            store,
            listen,
            url,
        };
        for id in WORKERS {
            let worker = spawn_worker(&nodes.dir, &nodes.url, id, &["--store", &nodes.store]);
            nodes.workers.push(worker);
        }
        wait_for_workers(&nodes.url, WORKERS.len() as u32).await;
        nodes
    }

    /// Restarts every node with `keys`, one at a time: the coordinator (its callers retry
    /// while it is down), then each worker after a drain.
    async fn roll(&mut self, keys: &[&str]) {
        self.coordinator.signal("TERM");
        self.coordinator.wait_exit(Duration::from_secs(15));
        self.coordinator =
            spawn_coordinator_at(&self.dir, &self.listen, &self.coordinator_args(keys));
        wait_for_workers(&self.url, WORKERS.len() as u32).await;
        for (index, id) in WORKERS.iter().enumerate() {
            let drained = tokio::process::Command::new(BINARY)
                .args([
                    "drain",
                    "--coordinator",
                    &self.url,
                    "--id",
                    id,
                    "--timeout",
                    "20s",
                ])
                .output()
                .await
                .unwrap();
            assert!(
                drained.status.success(),
                "{}",
                String::from_utf8_lossy(&drained.stderr)
            );
            self.workers[index].wait_exit(Duration::from_secs(15));
            let mut args = vec!["--store", self.store.as_str()];
            args.extend_from_slice(keys);
            self.workers[index] = spawn_worker(&self.dir, &self.url, id, &args);
            wait_for_workers(&self.url, WORKERS.len() as u32).await;
        }
    }
}

fn key_file(dir: &Path, name: &str, secret: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, secret).unwrap();
    path.to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_key_rotates_under_load_without_a_failed_call() {
    let Some(database) = TestDatabase::create("process::token_rotation").await else {
        return;
    };
    let dir = temp_dir("token-rotation");
    let old = key_file(&dir, "old.key", TOKEN_KEY);
    let new = key_file(
        &dir,
        "new.key",
        "a-new-token-key-of-more-than-32-bytes-for-rotation",
    );
    let mut nodes = Nodes::start(dir.clone(), database.url.clone()).await;

    // The coordinator is restarted too (there is one): callers ride out its restart with a
    // retry budget longer than the SDK's default (which covers a worker failover, ~2 s).
    let client = SwitchyardClient::connect(nodes.url.clone())
        .await
        .unwrap()
        .with_timeout(Duration::from_secs(20))
        .with_retry(RetryPolicy {
            attempts: 30,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        });
    let mut sessions = Vec::new();
    for index in 0..SESSIONS {
        let session = client
            .create_session(&format!("rotating-{index}"), [("n", "1")])
            .await
            .unwrap()
            .session
            .unwrap()
            .session_id;
        sessions.push(session);
    }
    let by_old_key = client.token(&sessions[0]).unwrap();

    // Turns and appends on every session for the whole rotation, counted.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + Duration::from_secs(120);
    let load: Vec<_> = sessions
        .iter()
        .map(|session| {
            let (client, session) = (client.clone(), session.clone());
            let (stop, done, failures) = (stop.clone(), done.clone(), failures.clone());
            tokio::spawn(async move {
                for round in 0..100_000u64 {
                    if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                        break;
                    }
                    let result = if round % 2 == 0 {
                        client
                            .send_message_collect(&session, "echo", "rotate")
                            .await
                            .map(drop)
                    } else {
                        client.get_context(&session, 2, 0).await.map(drop)
                    };
                    match result {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(status) => {
                            failures.lock().await.push(status);
                            return;
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();

    // 1. The new key verifies everywhere; the old one still signs.
    nodes.roll(&["--token-verify-key-file", &new]).await;
    // 2. The new key signs; the old one still verifies.
    nodes
        .roll(&["--token-key-file", &new, "--token-verify-key-file", &old])
        .await;
    // Callers refresh their tokens (now signed by the new key) before the old key goes.
    for session in &sessions {
        client.refresh_token(session).await.unwrap();
    }
    // 3. The old key is retired.
    nodes.roll(&["--token-key-file", &new]).await;
    let before_stop = done.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;

    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let failures = failures.lock().await;
    assert!(failures.is_empty(), "calls failed: {failures:?}");
    let done = done.load(Ordering::Relaxed);
    assert!(
        done > before_stop && done >= 10 * SESSIONS as u64,
        "the load ran: {done} calls"
    );

    // A token of the retired key is refused, saying why.
    client.set_token(sessions[0].clone(), by_old_key);
    let refused = client.get_context(&sessions[0], 0, 0).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.message().contains("unknown key id"), "{refused:?}");
    eprintln!("token rotation: {done} calls, none failed");
}
