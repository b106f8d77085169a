//! Memory of 100k sessions held hot against 100k passivated, on a worker with the embedded
//! SQLite store. Prints heap bytes (counted by an instrumented allocator) and RSS; asserts
//! nothing.
//!
//!     cargo bench -p switchyard-worker --bench session_memory

use std::alloc::System;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use switchyard_core::{Epoch, Limits, PlacementTable, UserId, WorkerId};
use switchyard_store::{SessionStore, SqlStore, SqlStoreOptions};
use switchyard_worker::{PlacementView, SessionManager};

#[global_allocator]
static ALLOCATOR: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Heap bytes allocated and not yet freed since `region` began.
fn live_bytes(region: &Region<'_, System>) -> i64 {
    let change = region.change();
    change.bytes_allocated as i64 - change.bytes_deallocated as i64
        + change.bytes_reallocated as i64
}

const SESSIONS: usize = 100_000;

fn rss_bytes() -> i64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: i64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

#[tokio::main]
async fn main() {
    let dir = std::env::temp_dir().join(format!("switchyard-memory-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let store = Arc::new(
        SqlStore::open(SqlStoreOptions::sqlite_file(&dir.join("store.db")))
            .await
            .expect("store"),
    );
    let me = WorkerId::parse("bench").expect("id");
    let placement = Arc::new(PlacementView::new(me.clone(), 1024));
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
        ..Limits::default()
    };
    let sessions = SessionManager::new(store.clone(), placement, limits, 1024);

    let region = Region::new(ALLOCATOR);
    let rss_before = rss_bytes();
    let started = Instant::now();
    for index in 0..SESSIONS {
        let user = UserId::parse(format!("user-{index}")).expect("id");
        sessions
            .create(user, Default::default())
            .await
            .expect("create");
    }
    let created_in = started.elapsed();
    let heap_hot = live_bytes(&region);
    let rss_hot = rss_bytes();
    assert_eq!(sessions.hot_count(), SESSIONS);

    sessions.passivate_all().await;
    let heap_passivated = live_bytes(&region);
    let rss_passivated = rss_bytes();

    let per = |bytes: i64| bytes as f64 / SESSIONS as f64;
    println!("{SESSIONS} sessions created in {created_in:.1?} (embedded SQLite store)");
    println!(
        "{:<12} {:>16} {:>16}",
        "", "heap B/session", "RSS B/session"
    );
    println!(
        "{:<12} {:>16.0} {:>16.0}",
        "hot",
        per(heap_hot),
        per(rss_hot - rss_before)
    );
    println!(
        "{:<12} {:>16.0} {:>16.0}",
        "passivated",
        per(heap_passivated),
        per(rss_passivated - rss_before)
    );
    println!("(RSS after passivation keeps what the allocator has not returned to the system)");
    let _ = std::fs::remove_dir_all(dir);
}
