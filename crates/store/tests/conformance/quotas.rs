//! Quota overrides and usage: kept per user, fenced by the user's slot.

use std::sync::Arc;
use std::time::SystemTime;

use switchyard_core::{Epoch, UserId};
use switchyard_store::{
    Append, AppendKey, Durability, Fence, SessionStore, StoreError, StoredLimit, StoredUsage,
};

use super::{own_slot, session, text, worker};

fn limit(resource: &str, limit: f64, window_us: u64) -> StoredLimit {
    StoredLimit {
        resource: resource.to_string(),
        limit,
        window_us,
    }
}

fn usage(user: &UserId, resource: &str, state: &str) -> StoredUsage {
    versioned(user, resource, state, 1)
}

fn versioned(user: &UserId, resource: &str, state: &str, version: u64) -> StoredUsage {
    StoredUsage {
        user_id: user.clone(),
        resource: resource.to_string(),
        state: state.to_string(),
        version,
    }
}

pub async fn quota_overrides_and_usage_are_kept_per_user(store: Arc<dyn SessionStore>) {
    let fence = own_slot(store.as_ref()).await;
    let ada = UserId::parse("ada").unwrap();
    let bob = UserId::parse("bob").unwrap();
    assert!(
        store
            .load_user_quota(&ada)
            .await
            .unwrap()
            .overrides
            .is_empty()
    );

    store
        .set_user_quota(
            &fence,
            &ada,
            &[
                limit("tokens", 10_000.0, 3_600_000_000),
                limit("sessions", 3.0, 0),
            ],
            false,
        )
        .await
        .unwrap();
    // A second override replaces its resource's, and keeps the others.
    store
        .set_user_quota(
            &fence,
            &ada,
            &[limit("tokens", 20_000.5, 60_000_000)],
            false,
        )
        .await
        .unwrap();
    let kept = store.load_user_quota(&ada).await.unwrap();
    assert_eq!(
        kept.overrides,
        vec![
            limit("sessions", 3.0, 0),
            limit("tokens", 20_000.5, 60_000_000)
        ]
    );
    assert!(
        store
            .load_user_quota(&bob)
            .await
            .unwrap()
            .overrides
            .is_empty()
    );

    // Usage: the newest state of each (user, resource) wins, in one call.
    let saved = store
        .save_usage(&[
            (fence.clone(), usage(&ada, "tokens", "{\"v\":1}")),
            (fence.clone(), usage(&ada, "api_calls", "{\"v\":2}")),
            (fence.clone(), usage(&ada, "tokens", "{\"v\":3}")),
            (fence.clone(), usage(&bob, "tokens", "{\"v\":4}")),
        ])
        .await
        .unwrap();
    assert_eq!(saved, 3);
    let kept = store.load_user_quota(&ada).await.unwrap();
    assert_eq!(
        kept.usage,
        vec![
            usage(&ada, "api_calls", "{\"v\":2}"),
            usage(&ada, "tokens", "{\"v\":3}"),
        ]
    );
    // A newer version replaces it; an older one never does, whichever is saved last.
    assert_eq!(
        store
            .save_usage(&[(fence.clone(), versioned(&ada, "api_calls", "{\"v\":5}", 5))])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .save_usage(&[(fence.clone(), versioned(&ada, "api_calls", "{\"v\":4}", 4))])
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store.load_user_quota(&ada).await.unwrap().usage[0],
        versioned(&ada, "api_calls", "{\"v\":5}", 5)
    );

    // A stale fence saves nothing and sets nothing.
    let stale = Fence {
        epoch: Epoch(fence.epoch.0 + 7),
        ..fence.clone()
    };
    assert_eq!(
        store
            .save_usage(&[(stale.clone(), usage(&ada, "tokens", "{\"v\":9}"))])
            .await
            .unwrap(),
        0
    );
    assert!(matches!(
        store
            .set_user_quota(&stale, &ada, &[limit("tokens", 1.0, 1)], true)
            .await,
        Err(StoreError::Fenced { .. })
    ));
    let other_owner = Fence {
        owner: worker("b"),
        ..fence.clone()
    };
    assert_eq!(
        store
            .save_usage(&[(other_owner, usage(&ada, "tokens", "{\"v\":9}"))])
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store.load_user_quota(&ada).await.unwrap().usage[1].state,
        "{\"v\":3}"
    );

    // clear drops every override, then sets the given ones.
    store
        .set_user_quota(&fence, &ada, &[limit("api_calls", 5.0, 1_000_000)], true)
        .await
        .unwrap();
    assert_eq!(
        store.load_user_quota(&ada).await.unwrap().overrides,
        vec![limit("api_calls", 5.0, 1_000_000)]
    );
    store.set_user_quota(&fence, &ada, &[], true).await.unwrap();
    assert!(
        store
            .load_user_quota(&ada)
            .await
            .unwrap()
            .overrides
            .is_empty()
    );
}

pub async fn storage_bytes_count_a_users_content(store: Arc<dyn SessionStore>) {
    let fence = own_slot(store.as_ref()).await;
    let first = session("carol");
    let second = session("carol");
    let other = session("dave");
    for created in [&first, &second, &other] {
        store.create_session(&fence, created).await.unwrap();
    }
    let carol = first.user_id.clone();
    assert_eq!(store.user_storage_bytes(&carol).await.unwrap(), 0);
    // Sessions by slot, for the passivated gauge.
    let slot = first.slot;
    assert_eq!(store.count_sessions(&[slot]).await.unwrap(), 3);
    assert_eq!(store.count_sessions(&[slot, slot + 1]).await.unwrap(), 3);
    assert_eq!(store.count_sessions(&[slot + 1]).await.unwrap(), 0);
    assert_eq!(store.count_sessions(&[]).await.unwrap(), 0);
    let now = SystemTime::now();
    // Bytes, not characters: "é" is two.
    store
        .append_messages(&fence, first.id, &[text("hello"), text("é")], now)
        .await
        .unwrap();
    store
        .append_messages(&fence, second.id, &[text("0123456789")], now)
        .await
        .unwrap();
    store
        .append_messages(&fence, other.id, &[text("not carol's")], now)
        .await
        .unwrap();
    assert_eq!(store.user_storage_bytes(&carol).await.unwrap(), 5 + 2 + 10);
    store.delete_session(&fence, first.id).await.unwrap();
    assert_eq!(store.user_storage_bytes(&carol).await.unwrap(), 10);
}

/// Usage carried by an append is saved with it, in its transaction: only if it commits and
/// writes, and never over a newer version.
pub async fn usage_is_saved_with_the_appends_that_carry_it(store: Arc<dyn SessionStore>) {
    let fence = own_slot(store.as_ref()).await;
    let session = session("erin");
    store.create_session(&fence, &session).await.unwrap();
    let erin = session.user_id.clone();
    let append = |fence: &Fence, content: &str, key: AppendKey, version: u64| Append {
        fence: fence.clone(),
        session_id: session.id,
        messages: Arc::from([text(content)]),
        at: SystemTime::now(),
        key,
        keep_last: u64::MAX,
        durability: Durability::Now,
        usage: vec![
            versioned(&erin, "tokens", &format!("{{\"t\":{version}}}"), version),
            versioned(&erin, "api_calls", &format!("{{\"a\":{version}}}"), version),
        ],
    };
    let kept = |store: Arc<dyn SessionStore>| async move {
        store
            .load_user_quota(&UserId::parse("erin").unwrap())
            .await
            .unwrap()
            .usage
            .iter()
            .map(|usage| (usage.resource.clone(), usage.version))
            .collect::<Vec<_>>()
    };
    let request = |id: &str| AppendKey::Request {
        id: id.to_string(),
        turn: false,
    };

    store
        .queue_append(append(&fence, "one", request("r-1"), 5), None)
        .await
        .unwrap()
        .outcome()
        .await
        .unwrap();
    assert_eq!(
        kept(store.clone()).await,
        vec![("api_calls".to_string(), 5), ("tokens".to_string(), 5)]
    );
    // The messages of an append with older usage commit; the usage stays the newer.
    store
        .queue_append(append(&fence, "two", AppendKey::None, 4), None)
        .await
        .unwrap()
        .outcome()
        .await
        .unwrap();
    assert_eq!(kept(store.clone()).await[1], ("tokens".to_string(), 5));
    // A repeat of a request id writes nothing, usage included.
    let repeat = store
        .queue_append(append(&fence, "one", request("r-1"), 6), None)
        .await
        .unwrap()
        .outcome()
        .await
        .unwrap();
    assert!(!repeat.written);
    assert_eq!(kept(store.clone()).await[1], ("tokens".to_string(), 5));

    // In one batch: an append under a stale fence is refused with its usage, and the one
    // beside it commits with its own.
    let stale = Fence {
        epoch: Epoch(fence.epoch.0 + 3),
        ..fence.clone()
    };
    let refused = store
        .queue_append(append(&stale, "stale", AppendKey::None, 9), None)
        .await
        .unwrap();
    let accepted = store
        .queue_append(append(&fence, "three", AppendKey::None, 7), None)
        .await
        .unwrap();
    assert!(matches!(
        refused.outcome().await,
        Err(StoreError::Fenced { .. })
    ));
    accepted.outcome().await.unwrap();
    assert_eq!(
        kept(store.clone()).await,
        vec![("api_calls".to_string(), 7), ("tokens".to_string(), 7)]
    );
    let contents: Vec<String> = store
        .read_context(session.id, 0, 0)
        .await
        .unwrap()
        .into_iter()
        .map(|message| message.content)
        .collect();
    assert_eq!(contents, ["one", "two", "three"]);
}
