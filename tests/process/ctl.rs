//! `switchyard ctl` against a running `switchyard dev`: every command, as a table and as
//! JSON, agreeing with what the cluster says over gRPC.

use std::time::Duration;

use switchyard::SwitchyardClient;
use switchyard::pb;
use switchyard::pb::admin_service_client::AdminServiceClient;

use crate::harness::{BINARY, free_address, start_dev, temp_dir};

/// Runs `switchyard ctl ARGS --coordinator URL` and returns its stdout; it must succeed.
fn ctl(url: &str, args: &[&str]) -> String {
    let output = std::process::Command::new(BINARY)
        .arg("ctl")
        .args(args)
        .args(["--coordinator", url])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "ctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn ctl_json(url: &str, args: &[&str]) -> serde_json::Value {
    let mut args = args.to_vec();
    args.push("--json");
    let out = ctl(url, &args);
    serde_json::from_str(&out)
        .unwrap_or_else(|error| panic!("ctl {args:?} is not JSON ({error}): {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_shows_and_operates_the_cluster_as_tables_and_as_json() {
    let dir = temp_dir("ctl");
    let address = free_address().to_string();
    let _dev = start_dev(&dir, &address, &["--workers", "3"]);
    let url = format!("http://{address}");
    let client = SwitchyardClient::connect(url.clone()).await.unwrap();
    let session = client
        .create_session("ctl-user", [("team", "ops")])
        .await
        .unwrap()
        .session
        .unwrap()
        .session_id;
    client
        .send_message_collect(&session, "echo", "hello ctl")
        .await
        .unwrap();
    let token = client.token(&session).unwrap();
    let mut admin = AdminServiceClient::connect(url.clone()).await.unwrap();
    let placement = admin
        .get_placement(pb::GetPlacementRequest::default())
        .await
        .unwrap()
        .into_inner();

    let status = ctl_json(&url, &["status"]);
    assert_eq!(status["serving"], true);
    assert_eq!(status["live_workers"], 3);
    assert_eq!(status["epoch"], placement.epoch);
    assert!(ctl(&url, &["status"]).starts_with(&format!("serving: epoch {}", placement.epoch)));

    // Workers turn active once they hold their slots: wait for that, bounded.
    let started = std::time::Instant::now();
    let workers = loop {
        let workers = ctl_json(&url, &["workers"]);
        let listed = workers["workers"].as_array().unwrap();
        assert_eq!(listed.len(), 3);
        if listed.iter().all(|worker| worker["state"] == "active") {
            break workers;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "{workers}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(workers["workers"].as_array().unwrap().len(), 3);
    let table = ctl(&url, &["workers"]);
    assert_eq!(table.lines().count(), 4, "{table}");
    assert!(
        table.contains("dev-worker-0") && table.contains("active"),
        "{table}"
    );

    let shown = ctl_json(&url, &["placement"]);
    assert_eq!(shown["epoch"], placement.epoch);
    let slots: u64 = shown["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|worker| worker["slots"].as_u64().unwrap())
        .sum();
    assert_eq!(slots, placement.assignments.len() as u64);
    let bars = ctl(&url, &["placement"]);
    assert!(bars.contains('█') && bars.contains("slots"), "{bars}");

    let sessions = ctl_json(&url, &["sessions", "ctl-user"]);
    assert_eq!(sessions["sessions"][0]["session_id"], session.as_str());
    assert_eq!(sessions["sessions"][0]["message_count"], 2);
    assert_eq!(sessions["sessions"][0]["metadata"]["team"], "ops");
    assert!(ctl(&url, &["sessions", "ctl-user"]).contains(&session));

    let context = ctl_json(&url, &["context", &session, "--token", &token]);
    assert_eq!(context["messages"][1]["content"], "echo: hello ctl");
    let lines = ctl(&url, &["context", &session, "--token", &token]);
    assert!(lines.contains("#1     user: hello ctl"), "{lines}");
    assert!(
        lines.contains("#2     assistant (echo): echo: hello ctl"),
        "{lines}"
    );

    let quota = ctl_json(
        &url,
        &["quota", "set", "ctl-user", "--limit", "api_calls=100/1h"],
    );
    assert!(
        quota["limits"]
            .as_array()
            .unwrap()
            .iter()
            .any(|limit| limit["resource"] == "api_calls" && limit["limit"] == 100.0)
    );
    client.get_context(&session, 0, 0).await.unwrap();
    let usage = ctl_json(&url, &["usage", "ctl-user"]);
    let calls = usage["usage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["resource"] == "api_calls")
        .unwrap()
        .clone();
    assert_eq!(calls["used"], 1.0);
    assert!(ctl(&url, &["quota", "get", "ctl-user"]).contains("api_calls"));

    // The session's health, and an alert: one more call takes the user to 100% of a limit
    // of 2 (without being refused).
    let health = ctl_json(&url, &["health", &session]);
    assert_eq!(health["turns"], 1);
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["user_id"], "ctl-user");
    assert!(health["latency_p95_seconds"].as_f64().unwrap() > 0.0);
    let lines = ctl(&url, &["health", &session]);
    assert!(lines.contains("status     healthy (score 1.00)"), "{lines}");
    assert!(lines.contains("turns      1 (0 failed"), "{lines}");
    ctl(
        &url,
        &["quota", "set", "ctl-user", "--limit", "api_calls=2/1h"],
    );
    client.get_context(&session, 0, 0).await.unwrap();
    let alerts = ctl_json(&url, &["alerts", "--user", "ctl-user"]);
    assert_eq!(alerts["alerts"][0]["kind"], "quota", "{alerts}");
    assert_eq!(alerts["alerts"][0]["severity"], "critical");
    assert_eq!(alerts["unreachable_workers"].as_array().unwrap().len(), 0);
    let table = ctl(
        &url,
        &["alerts", "--severity", "critical", "--since", "10m"],
    );
    assert!(table.starts_with("SEVERITY"), "{table}");
    assert!(
        table.contains("used 100% of its api_calls quota"),
        "{table}"
    );
    ctl(&url, &["quota", "set", "ctl-user", "--clear"]);

    let rebalanced = ctl_json(&url, &["rebalance"]);
    assert!(rebalanced["epoch"].as_u64().unwrap() >= placement.epoch);
    assert!(ctl(&url, &["rebalance"]).starts_with("rebalancing"));

    let drained = ctl_json(&url, &["drain", "dev-worker-2", "--timeout", "20s"]);
    assert_eq!(drained["left"], true);
    assert_eq!(drained["worker_id"], "dev-worker-2");
    // The session still answers, wherever it lives now.
    let client = client.with_timeout(Duration::from_secs(10));
    assert_eq!(client.get_context(&session, 0, 0).await.unwrap().len(), 2);
    let status = ctl_json(&url, &["status"]);
    assert_eq!(status["live_workers"], 2);

    // On a terminal a drain shows where the worker stands while it hands over (with
    // --json, above, only the one object).
    let lines = ctl(&url, &["drain", "dev-worker-1", "--timeout", "20s"]);
    assert!(lines.starts_with("draining dev-worker-1"), "{lines}");
    assert!(lines.contains("\n  dev-worker-1: "), "{lines}");
    assert!(
        lines.trim_end().ends_with("and it has left the cluster"),
        "{lines}"
    );
    assert_eq!(client.get_context(&session, 0, 0).await.unwrap().len(), 2);
}
