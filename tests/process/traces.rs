//! One trace across the hop: a caller's `traceparent` (or one the coordinator starts) is
//! in the coordinator's and the worker's access-log lines for the call, and in every other
//! line the call writes.

use std::time::Duration;

use switchyard::pb;
use switchyard::pb::admin_service_client::AdminServiceClient;
use switchyard::pb::session_service_client::SessionServiceClient;

use crate::harness::{spawn_coordinator, spawn_worker, temp_dir, wait_for_workers};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const ERASE_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

fn access_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["target"] == "switchyard::access")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_id_crosses_the_hop_into_both_access_logs() {
    let dir = temp_dir("tracing");
    let store = format!("sqlite://{}?mode=rwc", dir.join("store.db").display());
    let node = [
        "--access-log",
        "--log-format",
        "json",
        "--store",
        store.as_str(),
    ];
    let (mut coordinator, url) = spawn_coordinator(&dir, &node);
    let mut worker = spawn_worker(&dir, &url, "worker-a", &node);
    wait_for_workers(&url, 1).await;
    let mut client = SessionServiceClient::connect(url.clone()).await.unwrap();

    let mut traced = tonic::Request::new(pb::CreateSessionRequest {
        user_id: "traced".into(),
        ..Default::default()
    });
    traced.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE}-00f067aa0ba902b7-01").parse().unwrap(),
    );
    client.create_session(traced).await.unwrap();
    client
        .list_sessions(pb::ListSessionsRequest {
            user_id: "untraced".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    // A call that writes lines of its own (audit events, on the worker that erases).
    let mut admin = AdminServiceClient::connect(url.clone()).await.unwrap();
    let mut erase = tonic::Request::new(pb::EraseUserRequest {
        user_id: "traced".into(),
    });
    erase.metadata_mut().insert(
        "traceparent",
        format!("00-{ERASE_TRACE}-b7ad6b7169203331-01")
            .parse()
            .unwrap(),
    );
    assert_eq!(
        admin
            .erase_user(erase)
            .await
            .unwrap()
            .into_inner()
            .session_ids
            .len(),
        1
    );

    worker.signal("TERM");
    worker.wait_exit(Duration::from_secs(15));
    coordinator.signal("TERM");
    coordinator.wait_exit(Duration::from_secs(15));
    let at_coordinator = access_lines(&coordinator.log());
    let at_worker = access_lines(&worker.log());
    let call = |lines: &[serde_json::Value], method: &str| -> serde_json::Value {
        let found: Vec<&serde_json::Value> = lines
            .iter()
            .filter(|line| {
                line["method"] == method && line["service"] == "switchyard.v1.SessionService"
            })
            .collect();
        assert_eq!(found.len(), 1, "{method}: {lines:?}");
        found[0].clone()
    };

    // The caller's trace id, on both hops.
    let coordinator_line = call(&at_coordinator, "CreateSession");
    let worker_line = call(&at_worker, "CreateSession");
    assert_eq!(coordinator_line["trace_id"], TRACE);
    assert_eq!(worker_line["trace_id"], TRACE);
    assert_eq!(coordinator_line["code"], "Ok");
    assert_eq!(coordinator_line["node"], "coordinator");
    assert_eq!(worker_line["node"], "worker-a");
    assert!(
        coordinator_line["duration_ms"].as_f64().unwrap()
            >= worker_line["duration_ms"].as_f64().unwrap()
    );

    // Without one, the coordinator starts a trace, and the worker's line shares it.
    let started = call(&at_coordinator, "ListSessions")["trace_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(started.len(), 32);
    assert_ne!(started, TRACE);
    assert_eq!(
        call(&at_worker, "ListSessions")["trace_id"],
        started.as_str()
    );

    // Every line is one JSON object; those the erasure wrote carry its trace id.
    let worker_log = worker.log();
    let lines: Vec<serde_json::Value> = worker_log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|error| panic!("{error}: {line}")))
        .collect();
    let audit: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|line| line["target"] == "switchyard::audit")
        .collect();
    assert!(
        audit.len() >= 3,
        "a session created, a session erased and the user erased: {audit:?}"
    );
    for line in &audit {
        let trace = if line["event"] == "session created" {
            TRACE
        } else {
            ERASE_TRACE
        };
        assert_eq!(line["trace_id"], trace, "{line}");
        assert!(line["timestamp"].as_str().unwrap().ends_with('Z'), "{line}");
        assert_eq!(line["level"], "INFO");
    }
    // Lines written outside any call (start-up) have none.
    assert!(
        lines.iter().any(|line| line.get("trace_id").is_none()),
        "{lines:?}"
    );
}
