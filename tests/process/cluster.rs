//! A coordinator and two workers as separate processes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use switchyard::SwitchyardClient;
use switchyard::pb;
use switchyard::pb::admin_service_client::AdminServiceClient;
use tonic::Code;

use crate::harness::{
    Process, grpcurl, run_grpcurl, spawn_coordinator, spawn_worker, temp_dir, wait_for_workers,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_processes_serve_fail_over_and_stop_cleanly() {
    let dir = temp_dir("processes");
    let timing = ["--heartbeat-interval", "100ms", "--lease", "1s"];
    let (mut coordinator, coordinator_url) = spawn_coordinator(&dir, &timing);
    let coordinator_address = coordinator_url.trim_start_matches("http://").to_string();
    let mut workers: Vec<Process> = ["worker-a", "worker-b"]
        .iter()
        .map(|id| spawn_worker(&dir, &coordinator_url, id, &[]))
        .collect();
    wait_for_workers(&coordinator_url, 2).await;

    // Drive it through the SDK: sessions for many users, a turn each.
    let client = SwitchyardClient::connect(coordinator_url.clone())
        .await
        .unwrap();
    let mut sessions: HashMap<String, pb::Session> = HashMap::new();
    for index in 0..16 {
        let user = format!("proc-user-{index}");
        let session = client
            .create_session(&user, [("via", "process-test")])
            .await
            .unwrap()
            .session
            .unwrap();
        let reply = client
            .send_message_collect(&session.session_id, "echo", "over the wire")
            .await
            .unwrap();
        assert_eq!(reply.text, "echo: over the wire");
        assert_eq!(
            client
                .get_context(&session.session_id, 0, 0)
                .await
                .unwrap()
                .len(),
            2
        );
        sessions.insert(user, session);
    }
    let mut admin = AdminServiceClient::connect(coordinator_url.clone())
        .await
        .unwrap();
    let workers_listed = admin
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(workers_listed.len(), 2);
    assert_eq!(
        workers_listed.iter().map(|w| w.slot_count).sum::<u32>(),
        1024
    );
    assert!(sessions.values().any(|s| s.worker_id == "worker-a"));
    assert!(sessions.values().any(|s| s.worker_id == "worker-b"));

    // grpcurl against both kinds of server, with no proto files.
    if let Some(grpcurl) = grpcurl() {
        let listed = run_grpcurl(grpcurl, &["-plaintext", &coordinator_address, "list"]);
        for service in [
            "switchyard.v1.SessionService",
            "switchyard.v1.AdminService",
            "grpc.health.v1.Health",
        ] {
            assert!(listed.contains(service), "{service} not listed: {listed}");
        }
        let worker_address = &workers_listed[0].address;
        let listed = run_grpcurl(grpcurl, &["-plaintext", worker_address, "list"]);
        assert!(listed.contains("switchyard.v1.SessionService"), "{listed}");
        assert!(
            !listed.contains("AdminService"),
            "a worker lists what only the coordinator serves: {listed}"
        );
        let described = run_grpcurl(
            grpcurl,
            &[
                "-plaintext",
                &coordinator_address,
                "describe",
                "switchyard.v1.SessionService",
            ],
        );
        assert!(described.contains("rpc SendMessage"), "{described}");
        let status = run_grpcurl(
            grpcurl,
            &[
                "-plaintext",
                &coordinator_address,
                "switchyard.v1.AdminService/ClusterStatus",
            ],
        );
        assert!(status.contains("\"liveWorkers\": 2"), "{status}");
    }

    // SIGKILL worker-a: worker-b's users are served throughout, and worker-a's users, with
    // their sessions and contexts, by worker-b once the lease runs out.
    let victim = workers.remove(0);
    let mut victim = victim;
    victim.kill();
    let killed_at = Instant::now();
    for (user, session) in &sessions {
        if session.worker_id == "worker-b" {
            client
                .get_context(&session.session_id, 0, 0)
                .await
                .unwrap_or_else(|status| panic!("{user} lost service: {status:?}"));
        }
    }
    let affected: Vec<&String> = sessions
        .iter()
        .filter(|(_, s)| s.worker_id == "worker-a")
        .map(|(u, _)| u)
        .collect();
    for user in &affected {
        loop {
            match client.create_session(user, [("after", "failover")]).await {
                Ok(response) => {
                    assert_eq!(response.session.unwrap().worker_id, "worker-b");
                    break;
                }
                Err(status) => {
                    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                    assert!(
                        killed_at.elapsed() < Duration::from_secs(10),
                        "{user} was not served again"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    let failover = killed_at.elapsed();
    assert!(
        failover < Duration::from_secs(5),
        "failover took {failover:?}"
    );

    // SIGTERM stops each process cleanly.
    drop((client, admin));
    let mut survivor = workers.remove(0);
    survivor.signal("TERM");
    let status = survivor.wait_exit(Duration::from_secs(10));
    assert!(
        status.success(),
        "worker exited with {status}: {}",
        survivor.log()
    );
    coordinator.signal("TERM");
    let status = coordinator.wait_exit(Duration::from_secs(10));
    assert!(
        status.success(),
        "coordinator exited with {status}: {}",
        coordinator.log()
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_another_token_key_is_refused() {
    let dir = temp_dir("key-mismatch");
    let (_coordinator, coordinator_url) = spawn_coordinator(&dir, &[]);
    let key_file = dir.join("other.key");
    std::fs::write(&key_file, "a-completely-different-secret-of-forty-bytes").unwrap();
    let key_file = key_file.to_str().unwrap();
    let mut worker = spawn_worker(
        &dir,
        &coordinator_url,
        "stranger",
        &["--token-key-file", key_file],
    );
    let status = worker.wait_exit(Duration::from_secs(15));
    assert!(!status.success());
    let log = worker.log();
    assert!(log.contains("token key"), "{log}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_on_another_store_is_refused() {
    let dir = temp_dir("cluster-mismatch");
    let (_coordinator, coordinator_url) = spawn_coordinator(&dir, &[]);
    let mut worker = spawn_worker(
        &dir,
        &coordinator_url,
        "elsewhere",
        &["--data-dir", "own-store"],
    );
    let status = worker.wait_exit(Duration::from_secs(15));
    assert!(!status.success());
    let log = worker.log();
    assert!(
        log.contains("cluster") && log.contains("same store"),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
