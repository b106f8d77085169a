//! Quota overrides and usage: kept per user, fenced by the user's slot.

use std::sync::Arc;
use std::time::SystemTime;

use switchyard_core::{Epoch, UserId};
use switchyard_store::{Fence, SessionStore, StoreError, StoredLimit, StoredUsage};

use super::{own_slot, session, text, worker};

fn limit(resource: &str, limit: f64, window_us: u64) -> StoredLimit {
    StoredLimit {
        resource: resource.to_string(),
        limit,
        window_us,
    }
}

fn usage(user: &UserId, resource: &str, state: &str) -> StoredUsage {
    StoredUsage {
        user_id: user.clone(),
        resource: resource.to_string(),
        state: state.to_string(),
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
            ("api_calls".to_string(), "{\"v\":2}".to_string()),
            ("tokens".to_string(), "{\"v\":3}".to_string()),
        ]
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
        store.load_user_quota(&ada).await.unwrap().usage[1].1,
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
