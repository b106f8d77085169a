//! Quota usage outlives the process: across a clean restart of `switchyard dev`, and across
//! a SIGKILL once the usage has been saved (at most one flush interval is at risk).

use std::time::Duration;

use switchyard::SwitchyardClient;
use switchyard::pb;
use switchyard::pb::admin_service_client::AdminServiceClient;
use tonic::Code;

use crate::harness::{BINARY, free_address, start_dev, temp_dir};

const QUOTA: &[&str] = &["--quota", "api_calls=10/1h"];

async fn api_calls_used(address: &str, user_id: &str) -> f64 {
    let mut admin = AdminServiceClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    let usage = admin
        .get_usage(pb::GetUsageRequest {
            user_id: user_id.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    let api_calls = usage
        .usage
        .iter()
        .find(|usage| usage.resource == "api_calls")
        .unwrap_or_else(|| panic!("no api_calls in {usage:?}"));
    assert_eq!(api_calls.limit, 10.0);
    assert_eq!(api_calls.window.unwrap().seconds, 3600);
    api_calls.used
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_usage_survives_a_restart_and_a_kill_of_dev() {
    let dir = temp_dir("quota-restart");
    let address = free_address().to_string();
    let mut dev = start_dev(&dir, &address, QUOTA);
    let client = SwitchyardClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    let session = client
        .create_session("metered", [("n", "1")])
        .await
        .unwrap()
        .session
        .unwrap()
        .session_id;
    let token = client.token(&session).unwrap();
    for _ in 0..3 {
        client.get_context(&session, 0, 0).await.unwrap();
    }
    assert_eq!(api_calls_used(&address, "metered").await, 4.0);
    dev.signal("TERM");
    assert!(
        dev.wait_exit(Duration::from_secs(15)).success(),
        "{}",
        dev.log()
    );

    // A clean stop saved everything.
    let address = free_address().to_string();
    let mut dev = start_dev(&dir, &address, QUOTA);
    assert_eq!(api_calls_used(&address, "metered").await, 4.0);
    let client = SwitchyardClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    client.set_token(session.clone(), token.clone());
    for _ in 0..3 {
        client.get_context(&session, 0, 0).await.unwrap();
    }
    // Past one flush interval (1 s), a SIGKILL loses nothing.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    dev.kill();

    let address = free_address().to_string();
    let _dev = start_dev(&dir, &address, QUOTA);
    assert_eq!(api_calls_used(&address, "metered").await, 7.0);
    let client = SwitchyardClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    client.set_token(session.clone(), token);
    for _ in 0..3 {
        client.get_context(&session, 0, 0).await.unwrap();
    }
    let refused = client.get_context(&session, 0, 0).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(
        refused.message(),
        "quota api_calls exhausted for user metered: 10 of 10 per 1h"
    );

    // The operator's commands: usage as JSON, an override, the effective limits.
    let url = format!("http://{address}");
    let quota = |args: &[&str]| {
        let output = std::process::Command::new(BINARY)
            .arg("quota")
            .args(args)
            .args(["--coordinator", &url])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let usage: serde_json::Value =
        serde_json::from_str(&quota(&["usage", "metered", "--json"])).unwrap();
    let api_calls = usage["usage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["resource"] == "api_calls")
        .unwrap();
    assert_eq!(api_calls["used"], 10.0);
    assert_eq!(api_calls["percent"], 100.0);
    assert_eq!(api_calls["window_seconds"], 3600.0);
    let set = quota(&["set", "metered", "--limit", "api_calls=20/1h"]);
    assert!(
        set.lines().any(|line| line.starts_with("api_calls")
            && line.contains(" 20 ")
            && line.ends_with("1h")),
        "{set}"
    );
    client.get_context(&session, 0, 0).await.unwrap();
    let shown = quota(&["get", "metered"]);
    assert!(shown.contains("api_calls"), "{shown}");
    let cleared = quota(&["set", "metered", "--clear"]);
    assert!(
        cleared
            .lines()
            .any(|line| line.starts_with("api_calls") && line.contains(" 10 ")),
        "{cleared}"
    );
    let refused = client.get_context(&session, 0, 0).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
}
