//! Prometheus metrics of `switchyard dev`: after a known workload, every family is there
//! with the counts the workload made, and no label holds a user or session id.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use switchyard::SwitchyardClient;
use switchyard::conversions::duration_to_wire;
use switchyard::pb;
use switchyard::pb::admin_service_client::AdminServiceClient;

use crate::harness::{free_address, start_dev, temp_dir};

/// One sample: its family name, labels and value.
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn scrape(address: &str) -> (String, Vec<Sample>) {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    let samples = body
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|pair| !pair.is_empty())
                .filter_map(|pair| {
                    let (key, value) = pair.split_once('=')?;
                    Some((key.to_string(), value.trim_matches('"').to_string()))
                })
                .collect();
            Some(Sample {
                name: name.to_string(),
                labels,
                value: value.parse().ok()?,
            })
        })
        .collect();
    (body, samples)
}

/// The sum of a family's samples whose labels include every one of `with`.
fn total(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|sample| sample.name == name)
        .filter(|sample| {
            with.iter()
                .all(|(key, value)| sample.labels.get(*key).is_some_and(|got| got == value))
        })
        .map(|sample| sample.value)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_the_workload_did_with_bounded_labels() {
    let dir = temp_dir("metrics");
    let address = free_address().to_string();
    let metrics = free_address().to_string();
    let dev = start_dev(&dir, &address, &["--metrics-listen", &metrics]);
    let url = format!("http://{address}");
    let client = SwitchyardClient::connect(url.clone()).await.unwrap();
    let users = ["metrics-ann", "metrics-bob", "metrics-cid"];
    let mut sessions = Vec::new();
    for user in users {
        let session = client
            .create_session(user, [("k", "v")])
            .await
            .unwrap()
            .session
            .unwrap()
            .session_id;
        client
            .append_context(
                &session,
                vec![pb::Message {
                    role: "user".into(),
                    content: "context".into(),
                    name: String::new(),
                }],
            )
            .await
            .unwrap();
        for _ in 0..2 {
            client
                .send_message_collect(&session, "echo", "count me")
                .await
                .unwrap();
        }
        sessions.push(session);
    }
    // One quota refusal.
    let mut admin = AdminServiceClient::connect(url.clone()).await.unwrap();
    admin
        .set_user_quota(pb::SetUserQuotaRequest {
            user_id: "metrics-ann".into(),
            limits: vec![pb::QuotaLimit {
                resource: "api_calls".into(),
                limit: 1.0,
                window: Some(duration_to_wire(Duration::from_secs(60))),
            }],
            clear: false,
        })
        .await
        .unwrap();
    // The one call the limit grants takes the user to 100%: an alert; the next is refused.
    client.get_context(&sessions[0], 0, 0).await.unwrap();
    let refused = client.get_context(&sessions[0], 0, 0).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    let epoch = admin
        .get_placement(pb::GetPlacementRequest::default())
        .await
        .unwrap()
        .into_inner()
        .epoch;

    // The gauges are set as the workers go round their upkeep: wait for them, bounded.
    let started = Instant::now();
    let (body, samples) = loop {
        let (body, samples) = scrape(&metrics);
        // The workers' and pools' gauges are set as they go round their upkeep.
        if total(&samples, "switchyard_sessions_active", &[("state", "hot")]) >= 3.0
            && total(
                &samples,
                "switchyard_agent_pool_instances",
                &[("agent_type", "echo")],
            ) >= 1.0
        {
            break (body, samples);
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the gauges never showed the sessions and the echo instances:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let sessions_service = ("service", "switchyard.v1.SessionService");
    let creates = [
        sessions_service,
        ("method", "CreateSession"),
        ("code", "Ok"),
    ];
    assert_eq!(
        total(
            &samples,
            "switchyard_rpc_requests_total",
            &[creates[0], creates[1], creates[2], ("node", "coordinator")]
        ),
        3.0
    );
    // The same calls, served by the workers (each names itself).
    let on_workers: f64 = samples
        .iter()
        .filter(|sample| {
            sample.name == "switchyard_rpc_requests_total"
                && sample
                    .labels
                    .get("method")
                    .is_some_and(|method| method == "CreateSession")
                && sample
                    .labels
                    .get("node")
                    .is_some_and(|node| node.starts_with("dev-worker-"))
        })
        .map(|sample| sample.value)
        .sum();
    assert_eq!(on_workers, 3.0);
    assert_eq!(
        total(
            &samples,
            "switchyard_rpc_duration_seconds_count",
            &[
                sessions_service,
                ("method", "SendMessage"),
                ("node", "coordinator")
            ]
        ),
        6.0
    );
    assert_eq!(
        total(
            &samples,
            "switchyard_rpc_requests_total",
            &[
                sessions_service,
                ("method", "GetContext"),
                ("code", "ResourceExhausted"),
                ("node", "coordinator")
            ]
        ),
        1.0
    );
    assert_eq!(
        total(
            &samples,
            "switchyard_sessions_total",
            &[("event", "created")]
        ),
        3.0
    );
    assert_eq!(
        total(
            &samples,
            "switchyard_turns_total",
            &[("agent_type", "echo"), ("outcome", "ok")]
        ),
        6.0
    );
    assert_eq!(
        total(
            &samples,
            "switchyard_turn_first_delta_seconds_count",
            &[("agent_type", "echo")]
        ),
        6.0
    );
    assert_eq!(
        total(
            &samples,
            "switchyard_turn_duration_seconds_count",
            &[("agent_type", "echo")]
        ),
        6.0
    );
    // "count me" is 8 bytes: 2 tokens; "echo: count me" 14: 4. The prompt holds the context.
    assert_eq!(
        total(
            &samples,
            "switchyard_tokens_total",
            &[("agent_type", "echo"), ("kind", "completion")]
        ),
        6.0 * 4.0
    );
    assert!(total(&samples, "switchyard_tokens_total", &[("kind", "prompt")]) >= 6.0 * 2.0);
    assert!(total(&samples, "switchyard_store_commit_seconds_count", &[]) >= 1.0);
    // Three appends, and each turn's user message and reply: every append in one batch.
    assert_eq!(
        total(&samples, "switchyard_store_batch_size_sum", &[]),
        3.0 + 6.0 * 2.0
    );
    assert_eq!(
        total(&samples, "switchyard_placement_epoch", &[]),
        epoch as f64
    );
    assert_eq!(total(&samples, "switchyard_worker_slots", &[]), 1024.0);
    assert_eq!(
        total(
            &samples,
            "switchyard_quota_refusals_total",
            &[("resource", "api_calls")]
        ),
        1.0
    );
    assert_eq!(
        total(
            &samples,
            "switchyard_agent_pool_acquire_seconds_count",
            &[("agent_type", "echo")]
        ),
        6.0
    );
    assert!(
        total(
            &samples,
            "switchyard_agent_pool_instances",
            &[("agent_type", "echo")]
        ) >= 1.0,
        "{body}"
    );
    assert!(
        body.contains("switchyard_agent_pool_waiters{agent_type=\"echo\"} 0"),
        "{body}"
    );
    assert_eq!(
        total(&samples, "switchyard_alerts_total", &[("kind", "quota")]),
        1.0,
        "{body}"
    );
    // Every session is hot; the passivated gauge is there, at 0.
    assert!(
        body.contains("switchyard_sessions_active{node=\"dev-worker-0\",state=\"passivated\"} 0")
            || body.contains(
                "switchyard_sessions_active{state=\"passivated\",node=\"dev-worker-0\"} 0"
            ),
        "{body}"
    );
    // Bounded labels: no user id and no session id anywhere.
    for id in users
        .iter()
        .map(|user| user.to_string())
        .chain(sessions.iter().cloned())
    {
        assert!(!body.contains(&id), "/metrics names {id}");
    }
    drop(dev);
}
