//! Quotas and rate limits, met through the coordinator as a calling service meets them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use switchyard::SwitchyardClient;
use switchyard::conversions::duration_to_wire;
use switchyard::pb;
use switchyard_core::quota::Resource;
use switchyard_worker::quotas::{Limit, QuotaConfig, RateLimit};
use tonic::Code;
use tonic_types::StatusExt;

use crate::sandbox::{QUOTA_AGENT, QUOTA_TURN_TOKENS, Sandbox, SandboxOptions, create};

const HOUR: Duration = Duration::from_secs(3600);

fn limit(resource: &str, limit: f64, window: Option<Duration>) -> pb::QuotaLimit {
    pb::QuotaLimit {
        resource: resource.to_string(),
        limit,
        window: window.map(duration_to_wire),
    }
}

async fn set_quota(
    sandbox: &Sandbox,
    user_id: &str,
    limits: Vec<pb::QuotaLimit>,
    clear: bool,
) -> Result<pb::UserQuota, tonic::Status> {
    sandbox
        .admin()
        .await
        .set_user_quota(pb::SetUserQuotaRequest {
            user_id: user_id.to_string(),
            limits,
            clear,
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn used(sandbox: &Sandbox, user_id: &str, resource: &str) -> f64 {
    let usage = sandbox
        .admin()
        .await
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
        .unwrap_or_else(|| panic!("no usage of {resource} in {usage:?}"))
        .used
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_callers_are_granted_exactly_the_api_calls_limit() {
    let sandbox = Sandbox::start().await;
    let user = "quota-calls";
    set_quota(
        &sandbox,
        user,
        vec![limit("api_calls", 1000.0, Some(HOUR))],
        false,
    )
    .await
    .unwrap();
    let client = sandbox.client().await;
    let session = create(&client, user).await.session_id;
    let granted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (client, session) = (client.clone(), session.clone());
            let (granted, refused) = (granted.clone(), refused.clone());
            tokio::spawn(async move {
                for _ in 0..100 {
                    match client.get_context(&session, 0, 0).await {
                        Ok(_) => granted.fetch_add(1, Ordering::Relaxed),
                        Err(status) => {
                            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                            assert!(
                                status
                                    .message()
                                    .starts_with("quota api_calls exhausted for user quota-calls: 1000 of 1000 per 1h"),
                                "{status:?}"
                            );
                            refused.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    // The CreateSession was one of the thousand.
    assert_eq!(granted.load(Ordering::Relaxed), 999);
    assert_eq!(refused.load(Ordering::Relaxed), 3200 - 999);
    assert_eq!(used(&sandbox, user, "api_calls").await, 1000.0);
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn turns_get_exactly_the_tokens_limit_and_a_refused_turn_commits_nothing() {
    let sandbox = Sandbox::start().await;
    let user = "quota-tokens";
    set_quota(
        &sandbox,
        user,
        vec![
            limit("tokens", 1000.0, Some(HOUR)),
            limit("sessions", 32.0, None),
        ],
        false,
    )
    .await
    .unwrap();
    let client = sandbox.client().await;
    let mut sessions = Vec::new();
    for _ in 0..32 {
        sessions.push(create(&client, user).await.session_id);
    }
    let granted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = sessions
        .iter()
        .map(|session| {
            let (client, session) = (client.clone(), session.clone());
            let (granted, refused) = (granted.clone(), refused.clone());
            tokio::spawn(async move {
                for _ in 0..20 {
                    match client
                        .send_message_collect(&session, QUOTA_AGENT, "ping")
                        .await
                    {
                        Ok(reply) => {
                            let usage = reply.done.usage.unwrap();
                            assert_eq!(
                                usage.prompt_tokens + usage.completion_tokens,
                                QUOTA_TURN_TOKENS
                            );
                            granted.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(status) => {
                            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                            assert!(
                                status.message().starts_with("quota tokens exhausted"),
                                "{status:?}"
                            );
                            refused.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(granted.load(Ordering::Relaxed), 1000 / QUOTA_TURN_TOKENS);
    assert_eq!(
        refused.load(Ordering::Relaxed),
        32 * 20 - 1000 / QUOTA_TURN_TOKENS
    );
    assert_eq!(used(&sandbox, user, "tokens").await, 1000.0);
    // Each granted turn stored its user message and reply; a refused one stored nothing.
    let mut stored = 0;
    for session in &sessions {
        stored += client.get_context(session, 0, 0).await.unwrap().len() as u64;
    }
    assert_eq!(stored, 2 * 1000 / QUOTA_TURN_TOKENS);
    sandbox.stop().await;
}

#[tokio::test]
async fn a_refusal_carries_quota_failure_and_retry_info_through_the_coordinator() {
    let sandbox = Sandbox::start().await;
    let user = "quota-details";
    set_quota(
        &sandbox,
        user,
        vec![
            limit("api_calls", 5.0, Some(HOUR)),
            limit("cost_usd", 0.0215, Some(HOUR)),
        ],
        false,
    )
    .await
    .unwrap();
    let client = sandbox.client().await;
    let session = create(&client, user).await.session_id;

    // A turn of QUOTA_AGENT costs 0.007 USD (1 prompt token at 1$/1k, 3 at 2$/1k): three
    // fit 0.0215; the fourth is refused on its stream, its details intact.
    for _ in 0..3 {
        client
            .send_message_collect(&session, QUOTA_AGENT, "ping")
            .await
            .unwrap();
    }
    let refused = client
        .send_message_collect(&session, QUOTA_AGENT, "ping")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .starts_with("quota cost_usd exhausted for user quota-details: 0.021 of 0.0215 per 1h"),
        "{refused:?}"
    );
    let failure = refused.get_details_quota_failure().expect("QuotaFailure");
    assert_eq!(failure.violations[0].subject, "user:quota-details");
    assert_eq!(failure.violations[0].description, "quota cost_usd");
    let wait = refused
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .expect("RetryInfo");
    assert!(
        wait > Duration::ZERO && wait <= HOUR + HOUR / 60,
        "{wait:?}"
    );

    // A unary refusal: api_calls (the create and four turns, the refused one too, used
    // the five).
    let refused = client.get_context(&session, 0, 0).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(
        refused.message(),
        "quota api_calls exhausted for user quota-details: 5 of 5 per 1h"
    );
    let failure = refused.get_details_quota_failure().expect("QuotaFailure");
    assert_eq!(failure.violations[0].description, "quota api_calls");
    assert!(refused.get_details_retry_info().is_some());
    sandbox.stop().await;
}

#[tokio::test]
async fn overrides_replace_defaults_clear_restores_them_and_bad_limits_name_their_field() {
    let sandbox = Sandbox::start_with(SandboxOptions {
        quotas: QuotaConfig {
            defaults: [
                (
                    Resource::Tokens,
                    Limit {
                        limit: 5000.0,
                        window: HOUR,
                    },
                ),
                (
                    Resource::ApiCalls,
                    Limit {
                        limit: 100.0,
                        window: Duration::from_secs(60),
                    },
                ),
            ]
            .into(),
            ..QuotaConfig::default()
        },
        ..SandboxOptions::default()
    })
    .await;
    let user = "quota-admin";
    let mut admin = sandbox.admin().await;
    let effective = |quota: &pb::UserQuota| -> Vec<(String, f64, u64)> {
        quota
            .limits
            .iter()
            .map(|limit| {
                (
                    limit.resource.clone(),
                    limit.limit,
                    limit.window.map_or(0, |window| window.seconds as u64),
                )
            })
            .collect()
    };
    let defaults = admin
        .get_user_quota(pb::GetUserQuotaRequest {
            user_id: user.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        effective(&defaults),
        vec![
            ("api_calls".to_string(), 100.0, 60),
            ("tokens".to_string(), 5000.0, 3600),
        ]
    );
    let set = set_quota(
        &sandbox,
        user,
        vec![
            limit("tokens", 10.0, Some(HOUR)),
            limit("storage_bytes", 1e6, None),
        ],
        false,
    )
    .await
    .unwrap();
    assert_eq!(
        effective(&set),
        vec![
            ("api_calls".to_string(), 100.0, 60),
            ("tokens".to_string(), 10.0, 3600),
            ("storage_bytes".to_string(), 1e6, 0),
        ]
    );
    // The override holds where the user's sessions live.
    let client = sandbox.client().await;
    let session = create(&client, user).await.session_id;
    let refused = client
        .send_message_collect(&session, QUOTA_AGENT, "ping")
        .await;
    assert!(refused.is_ok(), "4 tokens fit 10: {refused:?}");
    let refused = client
        .send_message_collect(&session, QUOTA_AGENT, "ping ping ping ping ping ping")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);

    let cleared = set_quota(&sandbox, user, vec![], true).await.unwrap();
    assert_eq!(effective(&cleared), effective(&defaults));

    for (limits, field) in [
        (
            vec![limit("bananas", 1.0, Some(HOUR))],
            "limits[0].resource",
        ),
        (
            vec![
                limit("tokens", 1.0, Some(HOUR)),
                limit("tokens", -1.0, Some(HOUR)),
            ],
            "limits[1].limit",
        ),
        (vec![limit("tokens", 1.0, None)], "limits[0].window"),
        (
            vec![limit("api_calls", 1.0, Some(Duration::ZERO))],
            "limits[0].window",
        ),
        (
            vec![limit(
                "cost_usd",
                1.0,
                Some(Duration::from_secs(31 * 86_400)),
            )],
            "limits[0].window",
        ),
    ] {
        let status = set_quota(&sandbox, user, limits, false).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(field), "{field}: {status:?}");
        let bad = status.get_details_bad_request().expect("BadRequest");
        assert_eq!(bad.field_violations[0].field, field);
    }
    let status = set_quota(&sandbox, "", vec![], true).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("user_id"), "{status:?}");
    // Nothing of the refused calls was kept.
    assert_eq!(
        effective(
            &admin
                .get_user_quota(pb::GetUserQuotaRequest {
                    user_id: user.to_string(),
                })
                .await
                .unwrap()
                .into_inner()
        ),
        effective(&defaults)
    );
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_survives_a_drain_of_the_owning_worker() {
    let sandbox = Sandbox::start().await;
    let user = "quota-drain";
    set_quota(
        &sandbox,
        user,
        vec![limit("api_calls", 10.0, Some(HOUR))],
        false,
    )
    .await
    .unwrap();
    let client = sandbox.client().await;
    let session = create(&client, user).await.session_id;
    for _ in 0..4 {
        client.get_context(&session, 0, 0).await.unwrap();
    }
    let owner = sandbox.owner_of(user).await;
    sandbox
        .admin()
        .await
        .drain_worker(pb::DrainWorkerRequest {
            worker_id: owner.clone(),
            wait: true,
        })
        .await
        .unwrap();
    let new_owner = sandbox.owner_of(user).await;
    assert_ne!(new_owner, owner);
    assert_eq!(used(&sandbox, user, "api_calls").await, 5.0);
    let client = client.with_timeout(Duration::from_secs(10));
    for _ in 0..5 {
        client.get_context(&session, 0, 0).await.unwrap();
    }
    let refused = client.get_context(&session, 0, 0).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    sandbox.stop().await;
}

async fn rate_limited(rate: QuotaConfig) -> (Sandbox, SwitchyardClient) {
    let sandbox = Sandbox::start_with(SandboxOptions {
        quotas: rate,
        ..SandboxOptions::default()
    })
    .await;
    let client = sandbox.client().await;
    (sandbox, client)
}

#[tokio::test]
async fn a_burst_over_the_user_rate_is_refused_and_a_caller_honouring_retry_info_succeeds() {
    let (sandbox, client) = rate_limited(QuotaConfig {
        user_rate: Some(RateLimit::parse("2/s", Some(3)).unwrap()),
        ..QuotaConfig::default()
    })
    .await;
    let session = create(&client, "rated").await.session_id;
    client.get_context(&session, 0, 0).await.unwrap();
    client.get_context(&session, 0, 0).await.unwrap();
    let refused = client.get_context(&session, 0, 0).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .starts_with("rate limit of 2/1s (burst 3) exceeded for user rated")
    );
    assert_eq!(
        refused.get_details_quota_failure().unwrap().violations[0].subject,
        "user:rated"
    );
    let wait = refused
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .expect("RetryInfo");
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(500),
        "{wait:?}"
    );
    tokio::time::sleep(wait).await;
    client.get_context(&session, 0, 0).await.unwrap();
    // Another user is not held back by this one's burst.
    create(&client, "unrated").await;
    sandbox.stop().await;
}

#[tokio::test]
async fn a_burst_on_one_session_is_refused_while_the_users_other_sessions_go_on() {
    let (sandbox, client) = rate_limited(QuotaConfig {
        session_rate: Some(RateLimit::parse("1/s", Some(2)).unwrap()),
        ..QuotaConfig::default()
    })
    .await;
    let busy = create(&client, "sessions-rated").await.session_id;
    let other = create(&client, "sessions-rated").await.session_id;
    client.get_context(&busy, 0, 0).await.unwrap();
    client.get_context(&busy, 0, 0).await.unwrap();
    let refused = client.get_context(&busy, 0, 0).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(
        refused.get_details_quota_failure().unwrap().violations[0].subject,
        format!("session:{busy}")
    );
    client.get_context(&other, 0, 0).await.unwrap();
    let wait = refused
        .get_details_retry_info()
        .unwrap()
        .retry_delay
        .unwrap();
    tokio::time::sleep(wait).await;
    client.get_context(&busy, 0, 0).await.unwrap();
    sandbox.stop().await;
}
