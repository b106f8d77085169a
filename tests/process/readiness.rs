//! A worker's readiness, as a Kubernetes gRPC readiness probe asks it: the server ("") is
//! SERVING while it runs, and `switchyard.v1.SessionService` only once the worker has
//! registered, its lease with the coordinator is fresh, and it holds the leases of its slots.

use std::time::{Duration, Instant};

use tonic_health::ServingStatus;

use crate::harness::{Process, free_address, health_status, spawn_coordinator_at, temp_dir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_is_ready_only_once_registered_and_holding_its_slots() {
    let dir = temp_dir("readiness");
    let store = format!("sqlite://{}?mode=rwc", dir.join("store.db").display());
    let coordinator_address = free_address().to_string();
    let worker_address = free_address().to_string();
    // No coordinator yet: the worker serves, but cannot register.
    let coordinator_url = format!("http://{coordinator_address}");
    let _worker = Process::spawn(
        "worker-r",
        &[
            "worker",
            "--coordinator",
            &coordinator_url,
            "--listen",
            &worker_address,
            "--id",
            "worker-r",
            "--store",
            &store,
        ],
        &dir,
    );
    let started = Instant::now();
    let live = loop {
        if let Some(live) = health_status(&worker_address, "").await {
            break live;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the worker never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(live, ServingStatus::Serving as i32);
    // A while without its coordinator: never ready.
    for _ in 0..5 {
        assert_eq!(
            health_status(&worker_address, "switchyard.v1.SessionService").await,
            Some(ServingStatus::NotServing as i32)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A call that reaches it meanwhile is UNAVAILABLE, which callers retry.
    let mut sessions = switchyard::pb::session_service_client::SessionServiceClient::connect(
        format!("http://{worker_address}"),
    )
    .await
    .unwrap();
    let early = sessions
        .get_context(switchyard::pb::GetContextRequest::default())
        .await
        .unwrap_err();
    assert_eq!(early.code(), tonic::Code::Unavailable, "{early:?}");
    assert!(early.message().contains("starting"), "{early:?}");

    let mut coordinator = spawn_coordinator_at(&dir, &coordinator_address, &["--store", &store]);
    wait_for_readiness(&worker_address, ServingStatus::Serving, "ready").await;

    // Its coordinator gone, the worker's lease lapses: it is no longer ready, though alive.
    coordinator.kill();
    wait_for_readiness(&worker_address, ServingStatus::NotServing, "unready").await;
    assert_eq!(
        health_status(&worker_address, "").await,
        Some(ServingStatus::Serving as i32)
    );
    let _coordinator = spawn_coordinator_at(&dir, &coordinator_address, &["--store", &store]);
    wait_for_readiness(&worker_address, ServingStatus::Serving, "ready again").await;
}

async fn wait_for_readiness(address: &str, wanted: ServingStatus, what: &str) {
    let started = Instant::now();
    while health_status(address, "switchyard.v1.SessionService").await != Some(wanted as i32) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the worker never became {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
