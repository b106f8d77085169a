//! Quota usage outlives the process: across a clean restart of `switchyard dev`, across a
//! SIGKILL once the usage has been saved (at most one save interval of usage that came
//! without an append is at risk), and across a SIGKILL right after a turn, whose usage was
//! saved in the transaction of its appends.

use std::time::Duration;

use switchyard::SwitchyardClient;
use switchyard::pb;
use switchyard::pb::admin_service_client::AdminServiceClient;
use tonic::Code;

use crate::harness::{BINARY, free_address, start_dev, temp_dir};

const QUOTA: &[&str] = &["--quota", "api_calls=10/1h"];

async fn used(address: &str, user_id: &str, resource: &str) -> pb::ResourceUsage {
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
    usage
        .usage
        .iter()
        .find(|usage| usage.resource == resource)
        .unwrap_or_else(|| panic!("no {resource} in {usage:?}"))
        .clone()
}

async fn api_calls_used(address: &str, user_id: &str) -> f64 {
    let api_calls = used(address, user_id, "api_calls").await;
    assert_eq!(api_calls.limit, 10.0);
    assert_eq!(api_calls.window.unwrap().seconds, 3600);
    api_calls.used
}

/// With usage saved only once an hour apart from appends, a SIGKILL right after turns
/// loses none of their usage: each turn's reply carried it into its own transaction. A read
/// after the last turn, which appends nothing, is what the save interval puts at risk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turns_usage_is_saved_with_its_reply() {
    let dir = temp_dir("quota-with-appends");
    let flags = [
        "--quota",
        "tokens=1000000/1h",
        "--quota",
        "api_calls=1000/1h",
        "--usage-save-interval",
        "1h",
    ];
    let address = free_address().to_string();
    let mut dev = start_dev(&dir, &address, &flags);
    let client = SwitchyardClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    let session = client
        .create_session("metered-turns", [("n", "1")])
        .await
        .unwrap()
        .session
        .unwrap()
        .session_id;
    let mut tokens = 0;
    let mut turns = 0;
    for round in 0..3 {
        let reply = client
            .send_message_collect(&session, "echo", &format!("turn {round} of three"))
            .await
            .unwrap();
        let usage = reply.done.usage.unwrap();
        tokens += usage.prompt_tokens + usage.completion_tokens;
        turns += 1;
    }
    assert_eq!(turns, 3);
    assert!(tokens > 0);
    // CreateSession and three turns: four calls.
    assert_eq!(used(&address, "metered-turns", "api_calls").await.used, 4.0);
    client.get_context(&session, 0, 0).await.unwrap();
    assert_eq!(used(&address, "metered-turns", "api_calls").await.used, 5.0);
    dev.kill();

    let address = free_address().to_string();
    let _dev = start_dev(&dir, &address, &flags);
    assert_eq!(
        used(&address, "metered-turns", "tokens").await.used,
        tokens as f64
    );
    // The read after the last turn came without an append, and an hour's interval had not
    // saved it.
    assert_eq!(used(&address, "metered-turns", "api_calls").await.used, 4.0);
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
