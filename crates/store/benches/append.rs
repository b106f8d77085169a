//! Appends per second: durable (SQLite, PostgreSQL) against in memory, at concurrency 1
//! and 64, with and without group commit. Prints a table; asserts nothing.
//!
//!     cargo bench -p switchyard-store --bench append
//!
//! PostgreSQL rows need SWITCHYARD_TEST_POSTGRES_URL (a throw-away database is created).
//! SWITCHYARD_BENCH_SECONDS sets each run's length (default 3).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use switchyard_core::{Epoch, Message, Role, Session, SessionId, UserId, WorkerId};
use switchyard_store::testing::TestDatabase;
use switchyard_store::{Fence, MemoryStore, SessionStore, SqlStore, SqlStoreOptions};

const SESSIONS: usize = 64;
const SLOTS: u32 = 16;

struct Outcome {
    appends_per_second: f64,
    p50: Duration,
    p99: Duration,
}

async fn prepare(store: &dyn SessionStore) -> Vec<(Fence, SessionId)> {
    let owner = WorkerId::parse("bench").expect("valid id");
    let slots: Vec<u32> = (0..SLOTS).collect();
    store
        .acquire_slots(&owner, Epoch(1), &slots)
        .await
        .expect("leases");
    let mut sessions = Vec::with_capacity(SESSIONS);
    for index in 0..SESSIONS {
        let now = SystemTime::now();
        let slot = index as u32 % SLOTS;
        let session = Session {
            id: SessionId::new_random(),
            user_id: UserId::parse(format!("bench-{index}")).expect("valid id"),
            slot,
            created_at: now,
            last_activity_at: now,
            metadata: Default::default(),
            message_count: 0,
            double_text: Default::default(),
        };
        let fence = Fence {
            slot,
            owner: owner.clone(),
            epoch: Epoch(1),
        };
        store
            .create_session(&fence, &session)
            .await
            .expect("session");
        sessions.push((fence, session.id));
    }
    sessions
}

async fn run(store: Arc<dyn SessionStore>, concurrency: usize, length: Duration) -> Outcome {
    let sessions = Arc::new(prepare(&*store).await);
    let message = [Message {
        role: Role::User,
        content: "x".repeat(100),
        name: String::new(),
    }];
    let deadline = Instant::now() + length;
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|task| {
            let store = store.clone();
            let sessions = sessions.clone();
            let message = message.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut index = task;
                while Instant::now() < deadline && latencies.len() < 1_000_000 {
                    let (fence, session_id) = &sessions[index % sessions.len()];
                    let begun = Instant::now();
                    store
                        .append_messages(fence, *session_id, &message, SystemTime::now())
                        .await
                        .expect("append");
                    latencies.push(begun.elapsed());
                    index += concurrency;
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("task"));
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let at = |quantile: f64| latencies[((latencies.len() - 1) as f64 * quantile) as usize];
    Outcome {
        appends_per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: at(0.5),
        p99: at(0.99),
    }
}

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::var("SWITCHYARD_BENCH_SECONDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(3);
    let length = Duration::from_secs(seconds);
    let dir = std::env::temp_dir().join(format!("switchyard-bench-{}", SessionId::new_random()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let database = TestDatabase::create("bench postgres rows").await;

    println!("appends of one 100-byte message, {SESSIONS} sessions, {seconds} s per row");
    println!(
        "{:<34} {:>5} {:>12} {:>10} {:>10} {:>9}",
        "store", "conc", "appends/s", "p50", "p99", "vs mem"
    );
    for concurrency in [1usize, 64] {
        let baseline = run(Arc::new(MemoryStore::new()), concurrency, length).await;
        let mut rows = vec![(
            "memory".to_string(),
            baseline.appends_per_second,
            baseline.p50,
            baseline.p99,
        )];
        for max_batch in [1usize, 256] {
            let path = dir.join(format!("c{concurrency}-b{max_batch}.db"));
            let mut options = SqlStoreOptions::sqlite_file(&path);
            options.max_batch = max_batch;
            let store = SqlStore::open(options).await.expect("sqlite");
            let outcome = run(Arc::new(store), concurrency, length).await;
            rows.push((
                format!("sqlite, batch ≤ {max_batch}"),
                outcome.appends_per_second,
                outcome.p50,
                outcome.p99,
            ));
        }
        if let Some(database) = &database {
            for max_batch in [1usize, 256] {
                let mut options = SqlStoreOptions::new(database.url.clone());
                options.max_batch = max_batch;
                let store = SqlStore::open(options).await.expect("postgres");
                let outcome = run(Arc::new(store), concurrency, length).await;
                rows.push((
                    format!("postgres, batch ≤ {max_batch}"),
                    outcome.appends_per_second,
                    outcome.p50,
                    outcome.p99,
                ));
            }
        }
        for (name, rate, p50, p99) in rows {
            println!(
                "{name:<34} {concurrency:>5} {rate:>12.0} {:>10} {:>10} {:>8.3}×",
                format!("{:.1?}", p50),
                format!("{:.1?}", p99),
                rate / baseline.appends_per_second
            );
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}
