//! Placement with real processes on PostgreSQL: a coordinator and three workers under load
//! while a worker joins, is drained, is killed, is paused, and while the coordinator
//! restarts. Each test checks that no acknowledged message was lost or stored twice.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use switchyard::SwitchyardClient;
use switchyard::pb;
use switchyard::pb::admin_service_client::AdminServiceClient;
use switchyard_store::testing::TestDatabase;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tonic::Code;

use crate::harness::{
    Process, free_address, spawn_coordinator_at, spawn_worker, temp_dir, wait_for_workers,
};

/// Sessions driven by the load, one user each.
const SESSIONS: usize = 18;

pub(crate) struct Cluster {
    dir: PathBuf,
    _database: TestDatabase,
    store: String,
    listen: String,
    pub(crate) url: String,
    timing: Vec<String>,
    coordinator: Process,
    workers: HashMap<String, Process>,
}

impl Cluster {
    /// A coordinator and `workers` on a fresh database, or `None` without PostgreSQL.
    pub(crate) async fn start(test: &str, workers: &[&str], timing: &[&str]) -> Option<Cluster> {
        let database = TestDatabase::create(&format!("process::{test}")).await?;
        let dir = temp_dir(test);
        let listen = free_address().to_string();
        let store = database.url.clone();
        let timing: Vec<String> = timing.iter().map(ToString::to_string).collect();
        let coordinator = spawn_coordinator(&dir, &listen, &store, &timing);
        let mut cluster = Cluster {
            dir,
            _database: database,
            store,
            url: format!("http://{listen}"),
            listen,
            timing,
            coordinator,
            workers: HashMap::new(),
        };
        for id in workers {
            cluster.add_worker(id);
        }
        wait_for_workers(&cluster.url, workers.len() as u32).await;
        Some(cluster)
    }

    fn add_worker(&mut self, id: &str) {
        let worker = spawn_worker(&self.dir, &self.url, id, &["--store", &self.store]);
        self.workers.insert(id.to_string(), worker);
    }

    pub(crate) fn worker(&mut self, id: &str) -> &mut Process {
        self.workers.get_mut(id).expect("a started worker")
    }

    /// SIGKILLs the coordinator and starts a new one on the same address and store.
    fn restart_coordinator(&mut self) {
        self.coordinator.kill();
        self.coordinator = spawn_coordinator(&self.dir, &self.listen, &self.store, &self.timing);
    }

    async fn admin(&self) -> AdminServiceClient<tonic::transport::Channel> {
        AdminServiceClient::connect(self.url.clone()).await.unwrap()
    }

    async fn worker_info(&self, id: &str) -> Option<pb::WorkerInfo> {
        let mut admin = AdminServiceClient::connect(self.url.clone()).await.ok()?;
        let listed = admin.list_workers(pb::ListWorkersRequest {}).await.ok()?;
        listed
            .into_inner()
            .workers
            .into_iter()
            .find(|worker| worker.worker_id == id)
    }

    async fn placement(&self) -> pb::GetPlacementResponse {
        self.admin()
            .await
            .get_placement(pb::GetPlacementRequest::default())
            .await
            .unwrap()
            .into_inner()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn spawn_coordinator(
    dir: &std::path::Path,
    listen: &str,
    store: &str,
    timing: &[String],
) -> Process {
    let mut extra = vec!["--store", store];
    extra.extend(timing.iter().map(String::as_str));
    spawn_coordinator_at(dir, listen, &extra)
}

/// One acknowledged call: an append, or a whole turn.
#[derive(Debug)]
struct Ack {
    session: usize,
    /// Sequence numbers and contents the acknowledgement promises.
    stored: Vec<(u64, String)>,
    /// When the call was sent, and when its acknowledgement came.
    sent: Instant,
    at: Instant,
}

impl Ack {
    fn is_turn(&self) -> bool {
        self.stored.len() == 2
    }
}

/// Appends and turns on every session, as fast as they go, bounded in count and time.
struct Load {
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Vec<Ack>>>,
    errors: Arc<Mutex<Vec<(Instant, Code, String)>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(client: &SwitchyardClient, sessions: &[String]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let deadline = Instant::now() + Duration::from_secs(60);
        let tasks = sessions
            .iter()
            .enumerate()
            .map(|(index, session_id)| {
                let client = client.clone();
                let session_id = session_id.clone();
                let (stop, acks, errors) = (stop.clone(), acks.clone(), errors.clone());
                tokio::spawn(async move {
                    for round in 0..10_000 {
                        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                            break;
                        }
                        // Every content is unique, so a message stored twice shows.
                        let content = format!("session {index} round {round}");
                        let sent = Instant::now();
                        let result = if round % 2 == 0 {
                            client
                                .append_context(&session_id, vec![message(&content)])
                                .await
                                .map(|seq| vec![(seq, content)])
                        } else {
                            client
                                .send_message_collect(&session_id, "echo", &content)
                                .await
                                .map(|reply| {
                                    vec![
                                        (reply.done.user_seq, content.clone()),
                                        (reply.done.reply_seq, format!("echo: {content}")),
                                    ]
                                })
                        };
                        match result {
                            Ok(stored) => acks.lock().await.push(Ack {
                                session: index,
                                stored,
                                sent,
                                at: Instant::now(),
                            }),
                            // Not acknowledged: it may or may not have landed, and is never
                            // sent again.
                            Err(status) => {
                                errors.lock().await.push((
                                    Instant::now(),
                                    status.code(),
                                    status.message().to_string(),
                                ));
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            acks,
            errors,
            tasks,
        }
    }

    /// When the first call (append or turn) on one of `sessions` sent after `since` was
    /// acknowledged.
    async fn acked_after(&self, sessions: &HashSet<usize>, since: Instant) -> Option<Instant> {
        self.acks
            .lock()
            .await
            .iter()
            .filter(|ack| sessions.contains(&ack.session) && ack.sent > since)
            .map(|ack| ack.at)
            .min()
    }

    /// When the first turn on one of `sessions` sent after `since` was acknowledged.
    async fn turn_sent_after(&self, sessions: &HashSet<usize>, since: Instant) -> Option<Instant> {
        self.acks
            .lock()
            .await
            .iter()
            .filter(|ack| sessions.contains(&ack.session) && ack.is_turn() && ack.sent > since)
            .map(|ack| ack.at)
            .min()
    }

    async fn finish(self) -> (Vec<Ack>, Vec<(Instant, Code, String)>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        let acks = std::mem::take(&mut *self.acks.lock().await);
        let errors = std::mem::take(&mut *self.errors.lock().await);
        (acks, errors)
    }
}

fn message(content: &str) -> pb::Message {
    pb::Message {
        role: "user".to_string(),
        content: content.to_string(),
        name: String::new(),
    }
}

/// Creates one session per user and returns the client, the session ids and their owners.
async fn sessions(cluster: &Cluster) -> (SwitchyardClient, Vec<String>, Vec<String>) {
    let client = SwitchyardClient::connect(cluster.url.clone())
        .await
        .unwrap()
        .with_timeout(Duration::from_secs(10));
    let mut ids = Vec::new();
    let mut owners = Vec::new();
    for index in 0..SESSIONS {
        let session = client
            .create_session(&format!("placed-{index}"), [("n", "1")])
            .await
            .unwrap()
            .session
            .unwrap();
        ids.push(session.session_id);
        owners.push(session.worker_id);
    }
    (client, ids, owners)
}

/// Sessions for every user, under load for a moment already.
struct Loaded {
    client: SwitchyardClient,
    sessions: Vec<String>,
    /// Indexes of the sessions worker-a served when the load began.
    on_worker_a: HashSet<usize>,
    load: Load,
}

async fn under_load(cluster: &Cluster) -> Loaded {
    let (client, sessions, owners) = sessions(cluster).await;
    let on_worker_a = sessions_on(&owners, "worker-a");
    let load = Load::start(&client, &sessions);
    tokio::time::sleep(Duration::from_millis(800)).await;
    Loaded {
        client,
        sessions,
        on_worker_a,
        load,
    }
}

/// Every acknowledged message is stored, once, where its acknowledgement said; sequence
/// numbers are dense. Returns how many messages were checked.
async fn assert_nothing_acknowledged_lost(
    client: &SwitchyardClient,
    sessions: &[String],
    acks: &[Ack],
) -> usize {
    let mut checked = 0;
    for (index, session_id) in sessions.iter().enumerate() {
        let started = Instant::now();
        let context = loop {
            match client.get_context(session_id, 0, 0).await {
                Ok(context) => break context,
                Err(status) if started.elapsed() < Duration::from_secs(15) => {
                    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => panic!("session {index} unreadable: {status:?}"),
            }
        };
        let seqs: Vec<u64> = context.iter().map(|message| message.seq).collect();
        assert_eq!(
            seqs,
            (1..=context.len() as u64).collect::<Vec<_>>(),
            "session {index}: seqs are dense and never fork"
        );
        let contents: HashSet<&str> = context.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(
            contents.len(),
            context.len(),
            "session {index}: a message is stored twice"
        );
        for ack in acks.iter().filter(|ack| ack.session == index) {
            for (seq, content) in &ack.stored {
                let stored = context
                    .get(*seq as usize - 1)
                    .map(|message| message.content.as_str());
                assert_eq!(
                    stored,
                    Some(content.as_str()),
                    "session {index}: acknowledged message lost or moved"
                );
                checked += 1;
            }
        }
    }
    checked
}

fn sessions_on(owners: &[String], worker: &str) -> HashSet<usize> {
    owners
        .iter()
        .enumerate()
        .filter(|(_, owner)| *owner == worker)
        .map(|(index, _)| index)
        .collect()
}

const FAST: [&str; 4] = ["--heartbeat-interval", "100ms", "--lease", "1s"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_joining_under_load_takes_slots_and_loses_nothing() {
    let Some(mut cluster) = Cluster::start("join", &["worker-a", "worker-b"], &FAST).await else {
        return;
    };
    let before = cluster.placement().await.epoch;
    let Loaded {
        client,
        sessions,
        load,
        ..
    } = under_load(&cluster).await;
    cluster.add_worker("worker-c");
    wait_for_workers(&cluster.url, 3).await;
    let joined_at = Instant::now();
    // The newcomer serves its slots once their old owners have handed them over (calls in
    // progress finish first), which takes longer on a busy machine: wait for it, bounded.
    let mut moved = HashSet::new();
    let served = loop {
        moved.clear();
        for (index, session_id) in sessions.iter().enumerate() {
            if client.get_session(session_id).await.unwrap().worker_id == "worker-c" {
                moved.insert(index);
            }
        }
        if let Some(at) = load.acked_after(&moved, joined_at).await {
            break at;
        }
        assert!(
            joined_at.elapsed() < Duration::from_secs(20),
            "the newcomer served nothing in 20 s ({} sessions moved)",
            moved.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Load goes on for a while after the newcomer began serving.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (acks, _) = load.finish().await;

    let joined = cluster.worker_info("worker-c").await.unwrap();
    assert!(joined.slot_count > 200, "{joined:?}");
    assert!(cluster.placement().await.epoch > before);
    assert!(
        acks.iter()
            .any(|ack| moved.contains(&ack.session) && ack.sent > joined_at),
        "the newcomer's acknowledgement is missing from the load's record"
    );
    eprintln!(
        "join: the newcomer served {} ms after joining",
        served.duration_since(joined_at).as_millis()
    );
    let checked = assert_nothing_acknowledged_lost(&client, &sessions, &acks).await;
    eprintln!(
        "join: {checked} acknowledged messages checked, {} sessions moved",
        moved.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_drained_under_load_hands_over_and_exits_cleanly() {
    let Some(mut cluster) =
        Cluster::start("drain", &["worker-a", "worker-b", "worker-c"], &FAST).await
    else {
        return;
    };
    let Loaded {
        client,
        sessions,
        on_worker_a: drained,
        load,
    } = under_load(&cluster).await;
    assert!(!drained.is_empty());
    // As a preStop hook would: `switchyard drain` returns once the worker has left.
    let drain_started = Instant::now();
    let drained_by = tokio::process::Command::new(crate::harness::BINARY)
        .args([
            "drain",
            "--coordinator",
            &cluster.url,
            "--id",
            "worker-a",
            "--timeout",
            "20s",
        ])
        .output()
        .await
        .unwrap();
    let drain_took = drain_started.elapsed();
    let said = String::from_utf8_lossy(&drained_by.stdout);
    assert!(
        drained_by.status.success() && said.contains("has left the cluster"),
        "{said}{}",
        String::from_utf8_lossy(&drained_by.stderr)
    );
    let status = cluster
        .worker("worker-a")
        .wait_exit(Duration::from_secs(10));
    assert!(
        status.success(),
        "the drained worker exits cleanly: {status:?}"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (acks, _) = load.finish().await;

    assert!(
        acks.iter()
            .any(|ack| drained.contains(&ack.session) && ack.sent > drain_started),
        "the drained worker's users were not served after the drain"
    );
    let info = cluster.worker_info("worker-a").await.unwrap();
    assert_eq!(info.state, pb::WorkerState::Dead as i32);
    let again = tokio::process::Command::new(crate::harness::BINARY)
        .args(["drain", "--coordinator", &cluster.url, "--id", "worker-a"])
        .output()
        .await
        .unwrap();
    let complaint = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success()
            && complaint.contains("FailedPrecondition")
            && complaint.contains("worker_id: worker worker-a is dead"),
        "{complaint}"
    );
    let checked = assert_nothing_acknowledged_lost(&client, &sessions, &acks).await;
    let log = cluster.worker("worker-a").log();
    assert!(log.contains("slots handed over"), "{log}");
    eprintln!(
        "drain: {checked} acknowledged messages checked; `switchyard drain` returned after {drain_took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_under_load_fails_over_within_seconds() {
    // The default timing: heartbeats every 500 ms, a 2 s lease.
    let Some(mut cluster) =
        Cluster::start("kill", &["worker-a", "worker-b", "worker-c"], &[]).await
    else {
        return;
    };
    let Loaded {
        client,
        sessions,
        on_worker_a: victims,
        load,
    } = under_load(&cluster).await;
    assert!(!victims.is_empty());
    cluster.worker("worker-a").kill();
    let killed_at = Instant::now();
    let served = loop {
        if let Some(at) = load.turn_sent_after(&victims, killed_at).await {
            break at;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(15),
            "the killed worker's users were never served again"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (acks, _) = load.finish().await;
    let failover = served.duration_since(killed_at);
    eprintln!("kill: first turn for an affected user acknowledged {failover:?} after the kill");
    // The target is 3 s (BENCHMARKS.md measures it); this bound only catches a failover
    // that waits for something it should not, such as the handoff grace.
    assert!(
        failover < Duration::from_secs(5),
        "failover took {failover:?}"
    );
    assert_nothing_acknowledged_lost(&client, &sessions, &acks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_worker_is_fenced_out_and_rejoins_cleanly() {
    let Some(mut cluster) =
        Cluster::start("pause", &["worker-a", "worker-b", "worker-c"], &FAST).await
    else {
        return;
    };
    let Loaded {
        client,
        sessions,
        on_worker_a: victims,
        load,
    } = under_load(&cluster).await;
    assert!(!victims.is_empty());
    cluster.worker("worker-a").signal("STOP");
    let paused_at = Instant::now();
    // Paused until its slots have moved and its users are served elsewhere.
    loop {
        let dead = cluster
            .worker_info("worker-a")
            .await
            .is_some_and(|info| info.state == pb::WorkerState::Dead as i32 && info.slot_count == 0);
        if dead && load.turn_sent_after(&victims, paused_at).await.is_some() {
            break;
        }
        assert!(
            paused_at.elapsed() < Duration::from_secs(15),
            "the paused worker's slots never moved"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.worker("worker-a").signal("CONT");
    let resumed_at = Instant::now();
    loop {
        let rejoined = cluster.worker_info("worker-a").await.is_some_and(|info| {
            info.state == pb::WorkerState::Active as i32 && info.slot_count > 0
        });
        if rejoined {
            break;
        }
        assert!(
            resumed_at.elapsed() < Duration::from_secs(15),
            "the resumed worker never rejoined"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (acks, _) = load.finish().await;
    let checked = assert_nothing_acknowledged_lost(&client, &sessions, &acks).await;
    // The rejoined worker serves again.
    let mut served_by_a = 0;
    for session_id in &sessions {
        if client.get_session(session_id).await.unwrap().worker_id == "worker-a" {
            client
                .append_context(session_id, vec![message("after the pause")])
                .await
                .unwrap();
            served_by_a += 1;
        }
    }
    assert!(
        served_by_a > 0,
        "the rejoined worker owns none of the sessions"
    );
    eprintln!("pause: {checked} acknowledged messages checked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_restarted_under_load_restores_the_same_placement() {
    let Some(mut cluster) = Cluster::start(
        "coordinator-restart",
        &["worker-a", "worker-b", "worker-c"],
        &["--heartbeat-interval", "100ms", "--lease", "2s"],
    )
    .await
    else {
        return;
    };
    let before = cluster.placement().await;
    let Loaded {
        client,
        sessions,
        load,
        ..
    } = under_load(&cluster).await;
    let restarted_at = Instant::now();
    cluster.restart_coordinator();
    wait_for_workers(&cluster.url, 3).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (acks, errors) = load.finish().await;

    let after = cluster.placement().await;
    assert!(
        after.epoch > before.epoch,
        "{} ≤ {}",
        after.epoch,
        before.epoch
    );
    assert_eq!(
        after.assignments, before.assignments,
        "the assignment changed"
    );
    let outage: Vec<&(Instant, Code, String)> = errors
        .iter()
        .filter(|(at, _, _)| *at >= restarted_at)
        .collect();
    // Every failure is UNAVAILABLE, except for the calls in flight when the coordinator was
    // killed: their connection broke under them, which tonic reports as UNKNOWN with the
    // transport's words (at most one per session).
    let mut broken_in_flight = 0;
    for (_, code, message) in &outage {
        if *code == Code::Unknown && (message.contains("transport") || message.contains("h2")) {
            broken_in_flight += 1;
            continue;
        }
        assert_eq!(
            *code,
            Code::Unavailable,
            "a call failed with {code:?} during the restart: {message}"
        );
    }
    assert!(
        broken_in_flight <= SESSIONS,
        "{broken_in_flight} broken calls"
    );
    let last_failure = outage
        .iter()
        .map(|(at, _, _)| at.duration_since(restarted_at))
        .max()
        .unwrap_or_default();
    assert!(
        last_failure < Duration::from_secs(5),
        "calls failed for {last_failure:?}"
    );
    assert!(
        acks.iter()
            .any(|ack| ack.sent > restarted_at + last_failure),
        "nothing was served after the restart"
    );
    let checked = assert_nothing_acknowledged_lost(&client, &sessions, &acks).await;
    eprintln!(
        "coordinator restart: {checked} acknowledged messages checked; {} calls failed, the last {last_failure:?} after the kill",
        outage.len()
    );
}
