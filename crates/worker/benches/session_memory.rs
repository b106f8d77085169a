//! Memory per session on a worker: hot sessions holding ten 100-byte messages, against the
//! same sessions passivated. Each state is measured in a fresh child process, so its RSS is
//! not mixed with the other's. Prints heap bytes (the binary's allocator, mimalloc, counted)
//! and RSS per session; asserts nothing.
//!
//!     cargo bench -p switchyard-worker --bench session_memory
//!     SWITCHYARD_BENCH_SESSIONS=1000000 cargo bench -p switchyard-worker --bench session_memory
//!
//! The store is SQLite without fsync (only what the worker holds is measured, and a
//! million fsynced creates would take an hour); a real worker's store is its own process
//! (PostgreSQL) or a bounded page cache (SQLite).

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mimalloc::MiMalloc;
use stats_alloc::{Region, StatsAlloc};
use switchyard_core::{Epoch, Limits, Message, PlacementTable, Role, UserId, WorkerId};
use switchyard_store::{SessionStore, SqlStore, SqlStoreOptions};
use switchyard_worker::{SessionManager, SlotOwnership};

/// The binary's allocator (mimalloc), counted.
static INSTRUMENTED: StatsAlloc<MiMalloc> = StatsAlloc::new(MiMalloc);

#[global_allocator]
static ALLOCATOR: &StatsAlloc<MiMalloc> = &INSTRUMENTED;

const MODE: &str = "SWITCHYARD_BENCH_MEMORY_MODE";

/// Heap bytes allocated and not yet freed since `region` began. (stats_alloc already counts
/// a reallocation's growth in `bytes_allocated` and its shrinking in `bytes_deallocated`.)
fn live_bytes(region: &Region<'_, MiMalloc>) -> i64 {
    let change = region.change();
    change.bytes_allocated as i64 - change.bytes_deallocated as i64
}

fn rss_bytes() -> i64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: i64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn sessions_to_make() -> usize {
    std::env::var("SWITCHYARD_BENCH_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

/// Runs one state in this process and prints `heap_bytes rss_bytes seconds`.
async fn measure(passivate: bool) {
    let count = sessions_to_make();
    let dir = std::env::temp_dir().join(format!("switchyard-memory-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut options = SqlStoreOptions::sqlite_file(&dir.join("store.db"));
    options.durable = false;
    let store = Arc::new(SqlStore::open(options).await.expect("store"));
    let me = WorkerId::parse("bench").expect("id");
    let placement = Arc::new(SlotOwnership::new(me.clone(), 1024));
    placement.install(
        PlacementTable::empty(1024)
            .rebalanced(std::slice::from_ref(&me))
            .expect("table"),
    );
    let slots: Vec<u32> = (0..1024).collect();
    store
        .acquire_slots(&me, Epoch(1), &slots)
        .await
        .expect("leases");
    placement.add_fences(&slots, Epoch(1));
    let limits = Limits {
        passivate_after: Duration::from_secs(3600),
        idle_timeout: Duration::from_secs(7200),
        max_sessions_per_user: 5,
        ..Limits::default()
    };
    let sessions = SessionManager::new(store.clone(), placement, limits, 1024);
    let messages: Vec<Message> = (0..10)
        .map(|index| Message {
            role: Role::User,
            content: format!("{index:0>100}"),
            name: String::new(),
        })
        .collect();

    let region = Region::new(ALLOCATOR);
    let rss_before = rss_bytes();
    let started = Instant::now();
    for index in 0..count {
        let user = UserId::parse(format!("user-{index}")).expect("id");
        let (session, _) = sessions
            .create(user, Default::default(), Default::default())
            .await
            .expect("create");
        let call = sessions.begin(session.id).await.expect("begin");
        sessions.append(&call, &messages).await.expect("append");
        drop(call);
        if passivate && index % 1000 == 999 {
            sessions.passivate_all().await;
        }
    }
    if passivate {
        sessions.passivate_all().await;
    }
    println!(
        "{} {} {:.1}",
        live_bytes(&region),
        rss_bytes() - rss_before,
        started.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    match std::env::var(MODE).as_deref() {
        Ok("hot") => return runtime.block_on(measure(false)),
        Ok("passivated") => return runtime.block_on(measure(true)),
        _ => {}
    }
    let count = sessions_to_make();
    println!("{count} sessions, each holding 10 messages of 100 bytes (embedded SQLite store)");
    println!(
        "{:<12} {:>16} {:>16} {:>10}",
        "state", "heap B/session", "RSS B/session", "seconds"
    );
    // SWITCHYARD_BENCH_MEMORY_STATES=hot measures only the hot state (a million takes a while).
    let states =
        std::env::var("SWITCHYARD_BENCH_MEMORY_STATES").unwrap_or_else(|_| "hot,passivated".into());
    for mode in states.split(',') {
        let output = Command::new(std::env::current_exe().expect("own path"))
            .env(MODE, mode)
            .output()
            .expect("child runs");
        let line = String::from_utf8_lossy(&output.stdout);
        let figures: Vec<f64> = line
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        if figures.len() != 3 {
            println!(
                "{mode}: the measurement failed: {line}{}",
                String::from_utf8_lossy(&output.stderr)
            );
            continue;
        }
        println!(
            "{:<12} {:>16.0} {:>16.0} {:>10.1}",
            mode,
            figures[0] / count as f64,
            figures[1] / count as f64,
            figures[2]
        );
    }
}
