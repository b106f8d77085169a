//! Exactly once under retries: writers append through the SDK (a request id on every
//! append, retried after UNAVAILABLE with the same id) while the worker holding most of
//! their sessions is SIGKILLed. Every acknowledged message is stored once, and no message
//! is stored twice.
//!
//! One run in CI; `SWITCHYARD_EXACTLY_ONCE_RUNS=20` runs it 20 times.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use switchyard::SwitchyardClient;
use switchyard::pb;
use switchyard::retry::RetryPolicy;
use tokio::sync::Mutex;

use crate::placement::Cluster;

const WRITERS: usize = 10;

/// An acknowledged append: the writer, its seq, its content, when the ack came.
type Ack = (usize, u64, String, Instant);

fn runs() -> usize {
    std::env::var("SWITCHYARD_EXACTLY_ONCE_RUNS")
        .ok()
        .and_then(|runs| runs.parse().ok())
        .unwrap_or(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_retried_across_a_worker_kill_land_exactly_once() {
    for run in 0..runs() {
        let Some(mut cluster) = Cluster::start(
            &format!("exactly-once-{run}"),
            &["worker-a", "worker-b", "worker-c"],
            &[],
        )
        .await
        else {
            return;
        };
        // Retries that outlast a failover (a 2 s lease).
        let client = SwitchyardClient::connect(cluster.url.clone())
            .await
            .unwrap()
            .with_retry(RetryPolicy {
                attempts: 40,
                first_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_millis(400),
            });
        let mut sessions = Vec::new();
        let mut owner_of = Vec::new();
        let mut owners: HashMap<String, usize> = HashMap::new();
        for writer in 0..WRITERS {
            let session = client
                .create_session(&format!("once-{writer}"), [("run", "once")])
                .await
                .unwrap()
                .session
                .unwrap();
            *owners.entry(session.worker_id.clone()).or_default() += 1;
            owner_of.push(session.worker_id.clone());
            sessions.push(session.session_id);
        }
        let victim = owners
            .iter()
            .max_by_key(|(_, count)| **count)
            .map(|(worker, _)| worker.clone())
            .unwrap();

        let stop = Arc::new(AtomicBool::new(false));
        let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
        let failures: Arc<Mutex<Vec<String>>> = Arc::default();
        let deadline = Instant::now() + Duration::from_secs(60);
        let writers: Vec<_> = sessions
            .iter()
            .enumerate()
            .map(|(writer, session_id)| {
                let (client, session_id) = (client.clone(), session_id.clone());
                let (stop, acks, failures) = (stop.clone(), acks.clone(), failures.clone());
                tokio::spawn(async move {
                    for round in 0..100_000 {
                        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                            break;
                        }
                        let content = format!("writer {writer} message {round}");
                        let message = pb::Message {
                            role: "user".into(),
                            content: content.clone(),
                            name: String::new(),
                        };
                        match client.append_context(&session_id, vec![message]).await {
                            Ok(seq) => {
                                acks.lock()
                                    .await
                                    .push((writer, seq, content, Instant::now()))
                            }
                            // Not acknowledged: it may or may not have landed; never sent again.
                            Err(status) => failures.lock().await.push(format!("{status:?}")),
                        }
                    }
                })
            })
            .collect();

        tokio::time::sleep(Duration::from_millis(700)).await;
        cluster.worker(&victim).kill();
        let killed_at = Instant::now();
        tokio::time::sleep(Duration::from_secs(4)).await;
        stop.store(true, Ordering::Relaxed);
        for writer in writers {
            writer.await.unwrap();
        }
        let acks = std::mem::take(&mut *acks.lock().await);
        let failures = std::mem::take(&mut *failures.lock().await);

        let mut checked = 0;
        for (writer, session_id) in sessions.iter().enumerate() {
            let context = client.get_context(session_id, 0, 0).await.unwrap();
            let contents: Vec<&str> = context.iter().map(|m| m.content.as_str()).collect();
            let distinct: HashSet<&str> = contents.iter().copied().collect();
            assert_eq!(
                distinct.len(),
                contents.len(),
                "run {run}: writer {writer} has a message twice"
            );
            let seqs: Vec<u64> = context.iter().map(|m| m.seq).collect();
            assert_eq!(seqs, (1..=context.len() as u64).collect::<Vec<_>>());
            for (_, seq, content, _) in acks.iter().filter(|ack| ack.0 == writer) {
                assert_eq!(
                    context.get(*seq as usize - 1).map(|m| m.content.as_str()),
                    Some(content.as_str()),
                    "run {run}: an acknowledged message is not where its seq says"
                );
                checked += 1;
            }
        }
        // Acknowledged after the kill on the killed worker's sessions: served elsewhere.
        let after_kill = acks
            .iter()
            .filter(|ack| ack.3 > killed_at && owner_of[ack.0] == victim)
            .count();
        eprintln!(
            "exactly once, run {run}: {checked} acknowledged appends checked ({after_kill} after the kill of {victim}), {} unacknowledged",
            failures.len()
        );
        assert!(
            checked > 0 && after_kill > 0,
            "the load ran across the kill"
        );
        assert!(failures.is_empty(), "retries gave up: {failures:?}");
    }
}
