//! Session health and alerts through AdminService: the score drops as a process agent fails
//! turns, and the alerts of every worker (and of the coordinator) are listed in one call.

use std::time::{Duration, SystemTime};

use switchyard::conversions::timestamp_from;
use switchyard::pb;
use switchyard_core::quota::Resource;
use switchyard_worker::quotas::{Limit, QuotaConfig};
use tonic::Code;

use crate::sandbox::{FLAKY_AGENT, SCARCE_AGENT, Sandbox, SandboxOptions, create, wait_for};

async fn health(sandbox: &Sandbox, session_id: &str) -> pb::SessionHealth {
    sandbox
        .admin()
        .await
        .get_session_health(pb::GetSessionHealthRequest {
            session_id: session_id.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn alerts(sandbox: &Sandbox, request: pb::ListAlertsRequest) -> Vec<pb::Alert> {
    let listed = sandbox
        .admin()
        .await
        .list_alerts(request)
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.unreachable_workers.is_empty(),
        "{:?}",
        listed.unreachable_workers
    );
    listed.alerts
}

#[tokio::test]
async fn the_health_score_drops_as_a_process_agent_fails_turns_and_an_alert_is_listed() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;
    let session = create(&client, "health-watched").await;
    let id = session.session_id.clone();

    let fresh = health(&sandbox, &id).await;
    assert_eq!((fresh.turns, fresh.errors), (0, 0));
    assert_eq!(fresh.score, 1.0);
    assert_eq!(fresh.status, "healthy");
    assert_eq!(fresh.user_id, "health-watched");
    let owner = sandbox
        .admin()
        .await
        .get_placement(pb::GetPlacementRequest {
            user_id: "health-watched".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .assignments[0]
        .worker_id
        .clone();
    assert_eq!(fresh.worker_id, owner, "created on {}", session.worker_id);
    assert!(fresh.latency_p50.is_none());

    let mut answered = 0;
    for round in 0..4 {
        let reply = client
            .send_message_collect(&id, FLAKY_AGENT, &format!("fine {round}"))
            .await
            .unwrap();
        assert_eq!(reply.text, format!("fine {round}"));
        answered += 1;
    }
    assert_eq!(answered, 4);
    let sound = health(&sandbox, &id).await;
    assert!(sound.hot);
    assert_eq!((sound.turns, sound.errors), (4, 0));
    assert_eq!((sound.prompt_tokens, sound.completion_tokens), (8, 4));
    assert_eq!(sound.agent_type, FLAKY_AGENT);
    assert!(sound.latency_p50.is_some() && sound.latency_p95.is_some());
    // Four turns are too few to judge latency: nothing but failures lowers the score yet.
    assert_eq!(sound.score, 1.0);

    // Each failure once: the SDK would otherwise retry an agent's failure (UNAVAILABLE).
    let once = sandbox
        .client()
        .await
        .with_retry(switchyard::retry::RetryPolicy::never());
    once.set_token(id.clone(), client.token(&id).unwrap());
    let mut failed = 0;
    for _ in 0..8 {
        let status = once
            .send_message_collect(&id, FLAKY_AGENT, "fail")
            .await
            .unwrap_err();
        assert!(status.message().contains("the model refused"), "{status:?}");
        failed += 1;
    }
    assert_eq!(failed, 8);
    let failing = health(&sandbox, &id).await;
    assert_eq!((failing.turns, failing.errors), (12, 8));
    assert_eq!((failing.recent_errors, failing.recent_turns), (8, 12));
    assert!(
        failing.score < sound.score && failing.score < 0.5,
        "{failing:?}"
    );
    assert_eq!(failing.status, "unhealthy");

    // The worker's alerts, merged by the coordinator: the failures, and the slowness (the
    // agent's threshold is 1 ms).
    let listed = alerts(&sandbox, pb::ListAlertsRequest::default()).await;
    let error_rate = listed
        .iter()
        .find(|alert| alert.kind == "error_rate" && alert.session_id == id)
        .unwrap_or_else(|| panic!("no error_rate alert in {listed:?}"));
    assert_eq!(error_rate.severity, "critical");
    assert_eq!(error_rate.user_id, "health-watched");
    assert_eq!(error_rate.node, owner);
    // Raised from the second failure (2 of 6) on: 4 of 8, ..., 8 of 12.
    assert!(error_rate.count >= 5, "{error_rate:?}");
    assert!(error_rate.first_seen.unwrap().seconds <= error_rate.last_seen.unwrap().seconds);
    assert!(
        error_rate.message.contains("8 of its last 12 turns failed"),
        "{}",
        error_rate.message
    );
    assert!(
        listed
            .iter()
            .any(|alert| alert.kind == "slow_turns" && alert.session_id == id),
        "{listed:?}"
    );

    // Filters: severity, user, time.
    let critical = alerts(
        &sandbox,
        pb::ListAlertsRequest {
            severity: "critical".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(critical.iter().all(|alert| alert.severity == "critical"));
    assert!(critical.iter().any(|alert| alert.kind == "error_rate"));
    let someone_else = alerts(
        &sandbox,
        pb::ListAlertsRequest {
            user_id: "someone-else".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(someone_else.is_empty(), "{someone_else:?}");
    let later = alerts(
        &sandbox,
        pb::ListAlertsRequest {
            since: Some(timestamp_from(SystemTime::now() + Duration::from_secs(60))),
            ..Default::default()
        },
    )
    .await;
    assert!(later.is_empty(), "{later:?}");

    // Bad requests name their field; a session nobody holds is NOT_FOUND.
    let mut admin = sandbox.admin().await;
    let bad = admin
        .get_session_health(pb::GetSessionHealthRequest {
            session_id: "not-a-session".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("session_id"), "{}", bad.message());
    let unknown = uuid::Uuid::new_v4().to_string();
    let missing = admin
        .get_session_health(pb::GetSessionHealthRequest {
            session_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    assert!(missing.message().contains(&unknown));
    let bad = admin
        .list_alerts(pb::ListAlertsRequest {
            severity: "loud".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("severity"), "{}", bad.message());
}

#[tokio::test]
async fn quotas_near_their_limit_a_waiting_pool_and_a_lost_worker_raise_alerts() {
    let mut sandbox = Sandbox::start_with(SandboxOptions {
        lease: Duration::from_millis(600),
        quotas: QuotaConfig {
            defaults: [(
                Resource::ApiCalls,
                Limit {
                    limit: 10.0,
                    window: Duration::from_secs(3600),
                },
            )]
            .into(),
            ..QuotaConfig::default()
        },
        ..SandboxOptions::default()
    })
    .await;
    let client = sandbox.client().await;
    let near_the_limit = pb::ListAlertsRequest {
        user_id: "near-the-limit".into(),
        ..Default::default()
    };
    // CreateSession and seven reads: 8 of 10 calls, 80%.
    let session = create(&client, "near-the-limit").await;
    for _ in 0..7 {
        client.get_context(&session.session_id, 0, 0).await.unwrap();
    }
    let quota = alerts(&sandbox, near_the_limit.clone()).await;
    assert_eq!(quota.len(), 1, "{quota:?}");
    assert_eq!(
        (quota[0].kind.as_str(), quota[0].severity.as_str()),
        ("quota", "warning")
    );
    assert!(quota[0].message.contains("80%"), "{}", quota[0].message);
    // 10 of 10: critical.
    client.get_context(&session.session_id, 0, 0).await.unwrap();
    client.get_context(&session.session_id, 0, 0).await.unwrap();
    let quota = alerts(&sandbox, near_the_limit.clone()).await;
    assert_eq!(quota[0].severity, "critical", "{quota:?}");
    assert_eq!(quota[0].count, 3);

    // Two turns at once on an agent type with one instance per worker: one waits.
    let other = create(&client, "pool-user").await;
    let second = create(&client, "pool-user").await;
    let (first, second) = tokio::join!(
        client.send_message_collect(&other.session_id, SCARCE_AGENT, "a"),
        client.send_message_collect(&second.session_id, SCARCE_AGENT, "b"),
    );
    let outcomes = [first.is_ok(), second.is_ok()];
    let pool = alerts(&sandbox, pb::ListAlertsRequest::default())
        .await
        .into_iter()
        .find(|alert| alert.kind == "pool_exhausted")
        .unwrap_or_else(|| panic!("no pool alert after turns {outcomes:?}"));
    assert_eq!(pool.subject, SCARCE_AGENT);

    // A worker that stops heartbeating is lost: the coordinator's own alert.
    let victim = sandbox.cluster.kill_worker(0).unwrap().to_string();
    let lost = wait_for("a worker_lost alert", Duration::from_secs(10), || {
        let sandbox = &sandbox;
        async move {
            sandbox
                .admin()
                .await
                .list_alerts(pb::ListAlertsRequest {
                    severity: "critical".into(),
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner()
                .alerts
                .into_iter()
                .find(|alert| alert.kind == "worker_lost")
        }
    })
    .await;
    assert_eq!(lost.subject, victim);
    assert_eq!(lost.node, "coordinator");
    assert!(
        lost.message.contains("missed its lease"),
        "{}",
        lost.message
    );
}
