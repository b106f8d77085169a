//! The audit trail, and what no log line may hold: a workload with tokens, API keys, the
//! cluster's secrets and content all in play, then every line of every process scanned.

use std::collections::HashSet;
use std::time::Duration;

use switchyard::SwitchyardClient;
use switchyard::pb;
use switchyard::pb::admin_service_client::AdminServiceClient;

use crate::harness::{CLUSTER_SECRET, TOKEN_KEY, spawn_coordinator, spawn_worker, temp_dir};
use crate::security::{admin_request, eventually, new_key, write_keys};

fn audit_events<'a>(lines: &'a [serde_json::Value], event: &str) -> Vec<&'a serde_json::Value> {
    lines
        .iter()
        .filter(|line| line["target"] == "switchyard::audit" && line["event"] == event)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_name_who_did_what_and_no_log_line_holds_a_secret_or_content() {
    let dir = temp_dir("audit");
    let (app_key, app) = new_key("audit-app", &["sessions"], None);
    let (ops_key, ops) = new_key("operator", &["admin"], None);
    let keys_file = dir.join("api-keys.toml");
    write_keys(&keys_file, &[&app, &ops]);
    let kek_secret = "the audit test's key-encryption key, 32 bytes+";
    let kek = dir.join("audit.kek");
    std::fs::write(&kek, kek_secret).unwrap();
    let store = format!("sqlite://{}?mode=rwc", dir.join("store.db").display());
    let node = [
        "--log-format",
        "json",
        "--kek-file",
        kek.to_str().unwrap(),
        "--store",
        store.as_str(),
    ];
    let mut args = vec!["--api-keys", keys_file.to_str().unwrap()];
    args.extend(node);
    let (mut coordinator, url) = spawn_coordinator(&dir, &args);
    let mut worker = spawn_worker(&dir, &url, "worker-a", &node);
    let admin = AdminServiceClient::new(
        tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .connect_lazy(),
    );
    eventually("the worker serving", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        let key = ops_key.clone();
        async move {
            admin
                .cluster_status(admin_request(pb::ClusterStatusRequest {}, Some(&key)))
                .await
                .is_ok_and(|status| status.into_inner().serving)
        }
    })
    .await;

    let client = SwitchyardClient::connect(url.clone())
        .await
        .unwrap()
        .with_api_key(&app_key)
        .unwrap();
    let mut secrets: Vec<String> = vec![
        kek_secret.to_string(),
        app_key.clone(),
        ops_key.clone(),
        TOKEN_KEY.to_string(),
        CLUSTER_SECRET.to_string(),
    ];
    let mut sessions = Vec::new();
    for user in ["audit-ann", "audit-bob"] {
        for n in 0..2 {
            let meta = format!("metadata-marker-{user}-{n}");
            let session = client
                .create_session(user, [("note", meta.as_str())])
                .await
                .unwrap()
                .session
                .unwrap()
                .session_id;
            secrets.push(meta);
            let content = format!("content-marker-{user}-{n}");
            client
                .append_context(
                    &session,
                    vec![pb::Message {
                        role: "user".into(),
                        content: content.clone(),
                        name: String::new(),
                    }],
                )
                .await
                .unwrap();
            secrets.push(content);
            let said = format!("turn-marker-{user}-{n}");
            let reply = client
                .send_message_collect(&session, "echo", &said)
                .await
                .unwrap();
            secrets.push(said);
            secrets.push(reply.text);
            secrets.push(client.token(&session).unwrap());
            secrets.push(client.refresh_token(&session).await.unwrap().token);
            sessions.push((user, session));
        }
    }
    let (_, ended) = &sessions[0];
    assert!(client.end_session(ended).await.unwrap());

    let mut admin = admin.clone();
    admin
        .set_user_quota(admin_request(
            pb::SetUserQuotaRequest {
                user_id: "audit-ann".into(),
                limits: vec![pb::QuotaLimit {
                    resource: "sessions".into(),
                    limit: 9.0,
                    window: None,
                }],
                clear: false,
            },
            Some(&ops_key),
        ))
        .await
        .unwrap();
    let erased = admin
        .erase_user(admin_request(
            pb::EraseUserRequest {
                user_id: "audit-ann".into(),
            },
            Some(&ops_key),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(erased.session_ids, vec![sessions[1].1.clone()]);
    assert!(erased.overrides_erased);
    let again = admin
        .erase_user(admin_request(
            pb::EraseUserRequest {
                user_id: "audit-ann".into(),
            },
            Some(&ops_key),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(again.session_ids.is_empty() && !again.overrides_erased && !again.usage_erased);
    admin
        .rebalance(admin_request(pb::RebalanceRequest {}, Some(&ops_key)))
        .await
        .unwrap();
    // Everything of Ann is gone (the session erased, not ended by its caller, whose
    // token the client still holds); Bob is untouched.
    let gone = client.get_context(&sessions[1].1, 0, 0).await.unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound, "{gone:?}");
    for (_, session) in &sessions[2..] {
        assert_eq!(client.get_context(session, 0, 0).await.unwrap().len(), 3);
    }

    worker.signal("TERM");
    worker.wait_exit(Duration::from_secs(15));
    coordinator.signal("TERM");
    coordinator.wait_exit(Duration::from_secs(15));

    let mut lines = Vec::new();
    for process in [&coordinator, &worker] {
        let log = process.log();
        for line in log.lines().filter(|line| !line.is_empty()) {
            for secret in &secrets {
                assert!(
                    !line.contains(secret.as_str()),
                    "{}'s log holds {secret:?}: {line}",
                    process.name
                );
            }
            let parsed: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("not JSON ({error}): {line}"));
            lines.push(parsed);
        }
    }
    assert!(lines.len() > 10, "{} log lines", lines.len());

    let created = audit_events(&lines, "session created");
    assert_eq!(created.len(), 4, "{created:?}");
    let users: HashSet<&str> = created
        .iter()
        .map(|line| line["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(users, HashSet::from(["audit-ann", "audit-bob"]));
    for line in &created {
        assert_eq!(line["caller"], "audit-app");
        assert_eq!(line["outcome"], "ok");
        assert_eq!(line["session_id"].as_str().unwrap().len(), 36, "{line}");
    }
    let ended_events = audit_events(&lines, "session ended");
    assert_eq!(ended_events.len(), 1, "{ended_events:?}");
    assert_eq!(ended_events[0]["session_id"], ended.as_str());
    assert_eq!(ended_events[0]["outcome"], "ended");
    let overrides = audit_events(&lines, "quota overrides set");
    assert_eq!(overrides.len(), 1);
    assert_eq!(overrides[0]["caller"], "operator");
    assert_eq!(overrides[0]["outcome"], "sessions=9");
    let erasures = audit_events(&lines, "user erased");
    assert_eq!(erasures.len(), 2, "{erasures:?}");
    assert!(
        erasures
            .iter()
            .all(|line| line["caller"] == "operator" && line["user_id"] == "audit-ann")
    );
    assert_eq!(
        erasures[0]["outcome"],
        "1 sessions ended, usage none, overrides dropped"
    );
    assert_eq!(
        erasures[1]["outcome"],
        "0 sessions ended, usage none, overrides none"
    );
    let erased_sessions = audit_events(&lines, "session erased");
    assert_eq!(erased_sessions.len(), 1, "{erased_sessions:?}");
    assert_eq!(erased_sessions[0]["session_id"], sessions[1].1.as_str());
    assert_eq!(erased_sessions[0]["caller"], "operator");
    let rebalances = audit_events(&lines, "rebalance");
    assert_eq!(rebalances.len(), 1);
    assert_eq!(rebalances[0]["caller"], "operator");
}
