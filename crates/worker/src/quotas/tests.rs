#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use switchyard_core::{Epoch, PlacementTable, WorkerId};
use switchyard_store::MemoryStore;

use super::*;

const SLOTS: u32 = 4;
const HOUR: Duration = Duration::from_secs(3600);

fn limit(limit: f64, window: Duration) -> Limit {
    Limit { limit, window }
}

/// Quotas of a worker `w` owning every slot of a memory store, with `defaults`.
async fn quotas_with(
    store: Arc<MemoryStore>,
    worker: &str,
    epoch: u64,
    defaults: &[(Resource, Limit)],
) -> Arc<Quotas> {
    let me = WorkerId::parse(worker).unwrap();
    let ownership = Arc::new(SlotOwnership::new(me.clone(), SLOTS));
    ownership.renew_lease(Instant::now(), Duration::from_secs(60));
    ownership.install(
        PlacementTable::empty(SLOTS)
            .rebalanced(std::slice::from_ref(&me))
            .unwrap(),
    );
    let slots: Vec<Slot> = (0..SLOTS).collect();
    store
        .acquire_slots(&me, Epoch(epoch), &slots)
        .await
        .unwrap();
    ownership.add_fences(&slots, Epoch(epoch));
    Arc::new(Quotas::new(
        QuotaConfig {
            defaults: defaults.iter().copied().collect(),
            ..QuotaConfig::default()
        },
        store,
        ownership,
        SLOTS,
    ))
}

/// The quota refusal a call ended with; anything else fails the test.
fn refusal<T>(result: Result<T>) -> QuotaError {
    match result {
        Err(WorkerError::Quota(refusal)) => *refusal,
        Err(other) => panic!("not a quota refusal: {other}"),
        Ok(_) => panic!("granted, where a refusal was expected"),
    }
}

fn user(name: &str) -> UserId {
    UserId::parse(name).unwrap()
}

fn pool(max_reply_tokens: u64) -> PoolConfig {
    PoolConfig {
        max_reply_tokens,
        price: switchyard_agents::TokenPrice {
            prompt_per_1k: 1.0,
            completion_per_1k: 2.0,
        },
        ..PoolConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_callers_get_exactly_the_limit() {
    let quotas = quotas_with(
        Arc::new(MemoryStore::new()),
        "w",
        1,
        &[(Resource::ApiCalls, limit(1000.0, HOUR))],
    )
    .await;
    let granted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (quotas, granted, refused) = (quotas.clone(), granted.clone(), refused.clone());
            tokio::spawn(async move {
                for _ in 0..50 {
                    match quotas.admit(&user("ann"), None).await {
                        Ok(()) => granted.fetch_add(1, Ordering::Relaxed),
                        Err(WorkerError::Quota(refusal))
                            if matches!(*refusal, QuotaError::Exhausted { .. }) =>
                        {
                            refused.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(other) => panic!("{other}"),
                    };
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(granted.load(Ordering::Relaxed), 1000);
    assert_eq!(refused.load(Ordering::Relaxed), 32 * 50 - 1000);
    // Another user has a budget of its own.
    quotas.admit(&user("bea"), None).await.unwrap();
}

#[tokio::test]
async fn nothing_is_counted_or_written_without_a_limit() {
    let store = Arc::new(MemoryStore::new());
    let quotas = quotas_with(store.clone(), "w", 1, &[]).await;
    for _ in 0..100 {
        quotas.admit(&user("ann"), None).await.unwrap();
    }
    assert_eq!(quotas.flush().await, 0);
    assert!(
        store
            .load_user_quota(&user("ann"))
            .await
            .unwrap()
            .usage
            .is_empty()
    );
    assert!(quotas.usage(&user("ann")).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_turn_reserves_its_estimate_and_settles_to_what_it_used() {
    let quotas = quotas_with(
        Arc::new(MemoryStore::new()),
        "w",
        1,
        &[
            (Resource::Tokens, limit(100.0, HOUR)),
            (Resource::CostUsd, limit(1.0, HOUR)),
            (Resource::ComputeSeconds, limit(2.0, HOUR)),
            (Resource::ConcurrentTurns, limit(2.0, Duration::ZERO)),
        ],
    )
    .await;
    let ann = user("ann");
    let used = |quotas: Arc<Quotas>| async move {
        quotas
            .usage(&user("ann"))
            .await
            .unwrap()
            .into_iter()
            .map(|usage| (usage.resource, usage.used))
            .collect::<BTreeMap<_, _>>()
    };
    // 10 prompt tokens + at most 50 of reply: 60 reserved, and its cost.
    let first = quotas.begin_turn(&ann, &pool(50), 10).await.unwrap();
    let now = used(quotas.clone()).await;
    assert_eq!(now[&Resource::Tokens], 60.0);
    assert!((now[&Resource::CostUsd] - (10.0 + 100.0) / 1000.0).abs() < 1e-12);
    assert_eq!(now[&Resource::ConcurrentTurns], 1.0);
    // A second turn does not fit the tokens left (40): refused, reserving nothing.
    let refused = refusal(quotas.begin_turn(&ann, &pool(50), 10).await);
    match refused {
        QuotaError::Exhausted {
            resource: Resource::Tokens,
            retry_after: Some(wait),
            ..
        } => assert!(wait > Duration::ZERO && wait <= HOUR + HOUR / 60),
        other => panic!("{other:?}"),
    }
    assert_eq!(used(quotas.clone()).await[&Resource::Tokens], 60.0);
    assert_eq!(used(quotas.clone()).await[&Resource::ConcurrentTurns], 1.0);
    // It settles to what the agent reported.
    first.settle(&pool(50), 10, 5, 0.25);
    let now = used(quotas.clone()).await;
    assert_eq!(now[&Resource::Tokens], 15.0);
    assert!((now[&Resource::CostUsd] - (10.0 + 10.0) / 1000.0).abs() < 1e-12);
    assert_eq!(now[&Resource::ComputeSeconds], 0.25);
    assert_eq!(now[&Resource::ConcurrentTurns], 0.0);

    // concurrent_turns: two at once, not three.
    let a = quotas.begin_turn(&ann, &pool(1), 1).await.unwrap();
    let b = quotas.begin_turn(&ann, &pool(1), 1).await.unwrap();
    assert!(matches!(
        refusal(quotas.begin_turn(&ann, &pool(1), 1).await),
        QuotaError::Exhausted {
            resource: Resource::ConcurrentTurns,
            ..
        }
    ));
    drop(a);
    let c = quotas.begin_turn(&ann, &pool(1), 1).await.unwrap();
    drop((b, c));

    // compute_seconds is paid after: a turn is refused once it is used up.
    let heavy = quotas.begin_turn(&ann, &pool(1), 1).await.unwrap();
    heavy.settle(&pool(1), 1, 1, 5.0);
    assert!(matches!(
        refusal(quotas.begin_turn(&ann, &pool(1), 1).await),
        QuotaError::Exhausted {
            resource: Resource::ComputeSeconds,
            ..
        }
    ));
}

#[tokio::test]
async fn usage_and_overrides_move_with_the_slot_to_the_next_owner() {
    let store = Arc::new(MemoryStore::new());
    let first = quotas_with(
        store.clone(),
        "first",
        1,
        &[(Resource::ApiCalls, limit(10.0, HOUR))],
    )
    .await;
    let ann = user("ann");
    first
        .set_overrides(&ann, &[(Resource::ApiCalls, limit(7.0, HOUR))], false)
        .await
        .unwrap();
    for _ in 0..5 {
        first.admit(&ann, None).await.unwrap();
    }
    // The handoff saves the usage and forgets the user.
    first.hand_over(&(0..SLOTS).collect()).await;
    assert_eq!(first.users_in_memory(), 0);

    let next = quotas_with(
        store.clone(),
        "next",
        2,
        &[(Resource::ApiCalls, limit(10.0, HOUR))],
    )
    .await;
    let usage = next.usage(&ann).await.unwrap();
    assert_eq!(usage[0].used, 5.0);
    assert_eq!(usage[0].limit, limit(7.0, HOUR));
    next.admit(&ann, None).await.unwrap();
    next.admit(&ann, None).await.unwrap();
    assert!(next.admit(&ann, None).await.is_err());

    // The old owner, its lease gone, saves nothing over the new owner's state.
    first.admit(&ann, None).await.unwrap();
    assert_eq!(first.flush().await, 0);
    assert_eq!(next.flush().await, 1);
    let stored = store.load_user_quota(&ann).await.unwrap();
    assert_eq!(stored.usage.len(), 1);
    let windows = decode_windows(&stored.usage[0].state).unwrap();
    assert_eq!(windows[0].0, Resource::ApiCalls);
    assert_eq!(windows[0].1.clone().used(now_us()), 7.0);
}

#[tokio::test]
async fn clear_drops_overrides_and_the_defaults_apply_again() {
    let quotas = quotas_with(
        Arc::new(MemoryStore::new()),
        "w",
        1,
        &[(Resource::Tokens, limit(100.0, HOUR))],
    )
    .await;
    let ann = user("ann");
    let effective = quotas
        .set_overrides(
            &ann,
            &[
                (Resource::Tokens, limit(5.0, Duration::from_secs(60))),
                (Resource::Sessions, limit(2.0, Duration::ZERO)),
            ],
            false,
        )
        .await
        .unwrap();
    assert_eq!(
        effective[&Resource::Tokens],
        limit(5.0, Duration::from_secs(60))
    );
    assert_eq!(quotas.session_cap(&ann).await.unwrap(), Some(2));
    let effective = quotas.set_overrides(&ann, &[], true).await.unwrap();
    assert_eq!(
        effective,
        BTreeMap::from([(Resource::Tokens, limit(100.0, HOUR))])
    );
    assert_eq!(quotas.session_cap(&ann).await.unwrap(), None);
}

#[tokio::test]
async fn storage_is_read_once_then_followed_and_given_back_on_failure() {
    let quotas = quotas_with(
        Arc::new(MemoryStore::new()),
        "w",
        1,
        &[(Resource::StorageBytes, limit(100.0, Duration::ZERO))],
    )
    .await;
    let ann = user("ann");
    let kept = quotas.reserve_storage(&ann, 60).await.unwrap();
    kept.keep();
    let failed = quotas.reserve_storage(&ann, 40).await.unwrap();
    assert!(matches!(
        refusal(quotas.reserve_storage(&ann, 1).await),
        QuotaError::Exhausted {
            resource: Resource::StorageBytes,
            retry_after: None,
            ..
        }
    ));
    failed.give_back();
    quotas.reserve_storage(&ann, 40).await.unwrap().keep();
    // The store holds nothing of ann: once told that storage changed, the count is read
    // from the store again.
    quotas.storage_changed(&ann);
    quotas.reserve_storage(&ann, 100).await.unwrap().keep();
}

#[tokio::test]
async fn windows_survive_their_encoding() {
    let mut window = SlidingWindow::new(HOUR);
    let now = now_us();
    window.add(now, 12.5);
    let decoded = decode_window(&encode_window(&window.to_parts())).unwrap();
    assert_eq!(decoded.clone().used(now), 12.5);
    assert!(decode_window("{\"w\":1}").is_none());
    assert!(decode_window("not json").is_none());
}

#[tokio::test]
async fn rate_limits_refuse_a_burst_with_the_wait() {
    let store = Arc::new(MemoryStore::new());
    let base = quotas_with(store.clone(), "w", 1, &[]).await;
    let quotas = Quotas::new(
        QuotaConfig {
            user_rate: Some(RateLimit::parse("2/s", Some(3)).unwrap()),
            session_rate: Some(RateLimit::parse("1/s", Some(1)).unwrap()),
            ..QuotaConfig::default()
        },
        store,
        base.placement.clone(),
        SLOTS,
    );
    let ann = user("ann");
    for _ in 0..3 {
        quotas.admit(&ann, None).await.unwrap();
    }
    match refusal(quotas.admit(&ann, None).await) {
        QuotaError::RateLimited {
            scope: "user",
            retry_after,
            ..
        } => assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_millis(500)),
        other => panic!("{other:?}"),
    }
    let bob = user("bob");
    let session = SessionId::new_random();
    quotas.admit(&bob, Some(session)).await.unwrap();
    assert!(matches!(
        refusal(quotas.admit(&bob, Some(session)).await),
        QuotaError::RateLimited {
            scope: "session",
            ..
        }
    ));
    // Another session of the same user is not held back.
    quotas
        .admit(&bob, Some(SessionId::new_random()))
        .await
        .unwrap();
}
